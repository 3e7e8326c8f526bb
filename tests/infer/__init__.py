"""Tests of the inference core (bounds, gradient estimators, losses)."""
