"""Importance-weighted and decomposed ELBOs, an SVI runner and ArviZ diagnostics for Pyro."""

from pyro_vi_ext.infer.importance_weighted import ImportanceWeightedELBO

__all__ = [
    "ImportanceWeightedELBO",
]

__version__ = "0.1.0"
