"""Example generative models and guides, written as ordinary Pyro programs.

Each module holds a model, its guide(s) and a builder for given sizes; every model follows the
runner's minibatch convention ``model(*batch, idx=idx, n_data=n_data)``: local variables live in a
``pyro.plate(..., size=n_data, subsample=idx)``, so a minibatch's log-likelihood is scaled by
``N / B``, and ``model(x)`` alone uses the full data.

* :mod:`models.vae`: MLP VAE (:func:`build_vae`), Bernoulli or Gaussian likelihood, and the
  :class:`VAE` class that every VAE here shares;
* :mod:`models.conv_vae`: convolutional VAE for 64x64 images (:func:`build_conv_vae`);
* :mod:`models.beta_tcvae`: beta-TCVAE model and factorized encoder for dSprites
  (:func:`build_beta_tcvae`), trained with :class:`pyro_vi_ext.DecomposedELBO`;
* :mod:`models.linear_regression`: conjugate Bayesian linear regression with the exact posterior,
  the exact evidence, exact and under-dispersed guides (:func:`build_linear_regression`);
* :mod:`models.logistic_regression`: Bayesian logistic regression with a mean-field guide and a
  Laplace reference (:func:`build_logistic_regression`);
* :mod:`models.ppca`: probabilistic PCA with a correlated posterior and closed-form evidence,
  posterior and Gaussian ELBOs (:func:`build_ppca`, :func:`make_linear_gaussian_guide`);
* :mod:`models.eight_schools`: eight schools, centered and non-centered, with autoguides
  (:func:`build_eight_schools`).

``models`` is a folder of the repository, not part of the installed package: import it from the
repository root.
"""

from models.beta_tcvae import build_beta_tcvae
from models.conv_vae import build_conv_vae
from models.eight_schools import build_eight_schools, eight_schools_data
from models.linear_regression import (
    build_linear_regression,
    exact_log_evidence,
    exact_posterior,
    make_exact_guide,
    make_regression_data,
    make_underdispersed_guide,
)
from models.logistic_regression import build_logistic_regression, make_logistic_data
from models.ppca import PPCA, build_ppca, make_linear_gaussian_guide
from models.vae import VAE, build_vae

__all__ = [
    "PPCA",
    "VAE",
    "build_beta_tcvae",
    "build_conv_vae",
    "build_eight_schools",
    "build_linear_regression",
    "build_logistic_regression",
    "build_ppca",
    "build_vae",
    "eight_schools_data",
    "exact_log_evidence",
    "exact_posterior",
    "make_exact_guide",
    "make_linear_gaussian_guide",
    "make_logistic_data",
    "make_regression_data",
    "make_underdispersed_guide",
]
