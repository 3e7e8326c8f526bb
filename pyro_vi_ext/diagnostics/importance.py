r"""The guide as an importance proposal: PSIS k-hat, log-evidence, resampling, bounds versus K.

A fitted guide :math:`q(z \mid x)` is a proposal for the posterior :math:`p(z \mid x)`. With draws
:math:`z_s \sim q` and log importance ratios

.. math::

    \log w_s = \log p(x, z_s) - \log q(z_s \mid x),

four questions have standard answers:

* *is q close enough for importance sampling?* The Pareto shape :math:`\hat k` of the upper tail
  of :math:`w` (Yao et al. 2018, Vehtari et al. 2024): below 0.5 good, up to
  :math:`\min(1 - 1/\log_{10} S, 0.7)` usable, above unreliable;
* *what is log p(x)?* :math:`\log \frac1S \sum_s w_s` (the IWAE bound with :math:`K = S`,
  Burda et al. 2016) with a delta-method standard error;
* *what posterior does q imply?* Sampling-importance-resampling from the draws by their weights
  (the importance-weighted posterior of Domke & Sheldon 2018);
* *how tight is the bound?* :math:`\mathrm{IWAE}_K` as a function of ``K``.

All are taken *per data point* when every latent lives in the data plate(s) (amortized local
latents, as in a VAE: the weights factorize over points), and over the *whole trace* otherwise
(global latents): see :mod:`pyro_vi_ext.infer._weights` for the plate bookkeeping. Draws run in
blocks of ``chunk_size`` vectorized particles under ``torch.no_grad``.

The answers live in :mod:`~pyro_vi_ext.diagnostics.psis`, :mod:`~pyro_vi_ext.diagnostics.evidence`,
:mod:`~pyro_vi_ext.diagnostics.resampling` and :mod:`~pyro_vi_ext.diagnostics.bound_curve`; this
module gathers them. A guide that cannot serve as a proposal (a point mass) is flagged by all of
them, naming the sites; NaN log-weights and empty batches raise.

References
----------
.. [1] Y. Yao, A. Vehtari, D. Simpson, A. Gelman, "Yes, but Did It Work?: Evaluating Variational
   Inference", ICML 2018.
.. [2] A. Vehtari, D. Simpson, A. Gelman, Y. Yao, J. Gabry, "Pareto Smoothed Importance
   Sampling", JMLR 25(72), 2024 (arXiv:1507.02646, 2015).
.. [3] J. Domke, D. Sheldon, "Importance Weighting and Variational Inference", NeurIPS 2018.
.. [4] Y. Burda, R. Grosse, R. Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016.
"""

from pyro_vi_ext.diagnostics.bound_curve import (
    BoundCurve,
    bound_curve_from_log_weights,
    iw_bound_curve,
)
from pyro_vi_ext.diagnostics.evidence import EvidenceResult, log_evidence
from pyro_vi_ext.diagnostics.psis import (
    PSISResult,
    khat_threshold,
    psis_diagnostic,
    psis_from_log_weights,
)
from pyro_vi_ext.diagnostics.resampling import (
    ResampledPosterior,
    importance_resample,
    resampled_draws,
)

__all__ = [
    "BoundCurve",
    "EvidenceResult",
    "PSISResult",
    "ResampledPosterior",
    "bound_curve_from_log_weights",
    "importance_resample",
    "iw_bound_curve",
    "khat_threshold",
    "log_evidence",
    "psis_diagnostic",
    "psis_from_log_weights",
    "resampled_draws",
]
