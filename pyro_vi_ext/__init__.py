"""Importance-weighted and decomposed ELBOs, an SVI runner and ArviZ diagnostics for Pyro.

The losses are :class:`pyro.infer.ELBO` subclasses for ``pyro.infer.SVI`` (or ``ELBOModule`` with a
torch optimizer); :func:`fit` trains any model and guide over a dataset; the diagnostics answer
"did it work?" in ArviZ's terms. Datasets and metrics live in :mod:`pyro_vi_ext.datasets` and
:mod:`pyro_vi_ext.metrics`.
"""

from pyro_vi_ext.diagnostics import (
    SurgeryResult,
    elbo_surgery,
    importance_resample,
    inference_gaps,
    log_evidence,
    psis_diagnostic,
    to_inference_data,
)
from pyro_vi_ext.infer.closed_form import ClosedFormELBO
from pyro_vi_ext.infer.decomposed import DecomposedELBO
from pyro_vi_ext.infer.importance_weighted import ImportanceWeightedELBO
from pyro_vi_ext.infer.renyi import RenyiAlphaELBO
from pyro_vi_ext.training import (
    Callback,
    EarlyStopping,
    FitResult,
    fit,
    load_checkpoint,
    plot_history,
)

__all__ = [
    "Callback",
    "ClosedFormELBO",
    "DecomposedELBO",
    "EarlyStopping",
    "FitResult",
    "ImportanceWeightedELBO",
    "RenyiAlphaELBO",
    "SurgeryResult",
    "elbo_surgery",
    "fit",
    "importance_resample",
    "inference_gaps",
    "load_checkpoint",
    "log_evidence",
    "plot_history",
    "psis_diagnostic",
    "to_inference_data",
]

__version__ = "0.1.0"
