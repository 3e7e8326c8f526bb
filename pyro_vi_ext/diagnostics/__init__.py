r"""Did it work? Diagnostics of a fitted guide in the terms of ArviZ and Yao et al. (2018).

* :func:`to_inference_data`: model, guide and data to an ArviZ ``InferenceData`` (posterior,
  posterior predictive, pointwise log-likelihood, observed data, importance weights);
* :func:`psis_diagnostic`: PSIS k-hat of the guide as an importance proposal, whole-trace or per
  data point, with effective sample sizes;
* :func:`log_evidence`: importance-sampled :math:`\\log p(x)` with a standard error;
* :func:`importance_resample`: posterior draws resampled by importance weight;
* :func:`elbo_surgery`: the exact decomposition of the ELBO over a dataset (MI, TC, dim-wise KL);
* :func:`iw_bound_curve`, :func:`plot_bound_vs_k`, :func:`plot_khat`: bounds versus ``K`` and
  k-hat across the dataset, with matplotlib;
* :func:`inference_gaps`, :func:`plot_inference_gaps`: per data point, the approximation and
  amortization gaps of an amortized guide (Cremer et al. 2018).

Every sampling diagnostic takes ``vectorize_particles`` (``True``, ``False`` or ``"auto"``, the
default): a block of draws in one run on a particle plate, or one run per draw for models that
do not broadcast over a leftmost dim (``"auto"`` falls back to the loop with a
:class:`ParticleFallbackWarning`).
"""

from pyro_vi_ext.diagnostics._sampling import ParticleFallbackWarning
from pyro_vi_ext.diagnostics.arviz_export import to_inference_data
from pyro_vi_ext.diagnostics.gap_plots import plot_inference_gaps
from pyro_vi_ext.diagnostics.gaps import InferenceGaps, inference_gaps
from pyro_vi_ext.diagnostics.importance import (
    BoundCurve,
    EvidenceResult,
    PSISResult,
    ResampledPosterior,
    bound_curve_from_log_weights,
    importance_resample,
    iw_bound_curve,
    khat_threshold,
    log_evidence,
    psis_diagnostic,
    psis_from_log_weights,
)
from pyro_vi_ext.diagnostics.loo import loo_from_inference_data, loo_from_log_weights, vi_loo
from pyro_vi_ext.diagnostics.plots import plot_bound_curve, plot_bound_vs_k, plot_khat
from pyro_vi_ext.diagnostics.surgery import SURGERY_TERMS, SurgeryResult, elbo_surgery

__all__ = [
    "SURGERY_TERMS",
    "BoundCurve",
    "EvidenceResult",
    "InferenceGaps",
    "PSISResult",
    "ParticleFallbackWarning",
    "ResampledPosterior",
    "SurgeryResult",
    "bound_curve_from_log_weights",
    "elbo_surgery",
    "importance_resample",
    "inference_gaps",
    "iw_bound_curve",
    "khat_threshold",
    "log_evidence",
    "loo_from_inference_data",
    "loo_from_log_weights",
    "plot_bound_curve",
    "plot_bound_vs_k",
    "plot_inference_gaps",
    "plot_khat",
    "psis_diagnostic",
    "psis_from_log_weights",
    "to_inference_data",
    "vi_loo",
]
