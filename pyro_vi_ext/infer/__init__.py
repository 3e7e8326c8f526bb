"""Losses: log-weights (``_weights``), bounds (``_bounds``), gradient estimators, loss classes."""
