r"""Probabilistic PCA (Tipping & Bishop 1999): a linear-Gaussian model with a correlated posterior.

The generative model, for data points :math:`x_n \in \mathbb R^{D}` and codes
:math:`z_n \in \mathbb R^{d}`:

.. math::

    z_n \sim \mathcal N(0, I_d), \qquad x_n \mid z_n \sim \mathcal N(W z_n, \sigma^2 I_D).

Everything an inference diagnostic needs is closed form [1]_. With the posterior precision
:math:`\Lambda = I_d + W^\top W / \sigma^2` (the same for every point):

* evidence :math:`p(x_n) = \mathcal N(x_n; 0, W W^\top + \sigma^2 I_D)`;
* posterior :math:`p(z_n \mid x_n) = \mathcal N(\mu_n, \Lambda^{-1})` with
  :math:`\mu_n = \Lambda^{-1} W^\top x_n / \sigma^2`;
* for any Gaussian :math:`q = \mathcal N(m, C)`: :math:`\mathrm{ELBO}(q) = \log p(x_n) -
  \mathrm{KL}(q \,\|\, p(z_n \mid x_n))` with
  :math:`2\,\mathrm{KL} = \operatorname{tr}(\Lambda C) + (m - \mu_n)^\top \Lambda (m - \mu_n) - d -
  \log\det\Lambda - \log\det C`;
* the best *factorized* Gaussian (minimizing that KL over diagonal :math:`C`) has mean
  :math:`\mu_n` and variances :math:`1 / \Lambda_{jj}`, so its gap to :math:`\log p(x_n)` is
  :math:`\frac12 (\sum_j \log \Lambda_{jj} - \log\det\Lambda) \ge 0`, zero exactly when
  :math:`W^\top W` is diagonal.

:class:`PPCA` holds ``W`` and :math:`\sigma` as fixed tensors (no Pyro parameter), its
:meth:`PPCA.model` follows the runner's minibatch convention, and
:func:`make_linear_gaussian_guide` builds amortized guides
:math:`q(z_n \mid x_n) = \mathcal N(A x_n + b, \mathrm{diag}(s)^2)`, exact in the mean for
:meth:`PPCA.posterior_mean_map`, deliberately mis-scaled otherwise.

References
----------
.. [1] M. E. Tipping, C. M. Bishop, "Probabilistic Principal Component Analysis", Journal of the
   Royal Statistical Society B 61(3), 1999.

Examples
--------
>>> ppca = build_ppca(x_dim=5, z_dim=2, seed=0)
>>> x = ppca.sample(10, seed=1)
>>> a, b = ppca.posterior_mean_map()
>>> guide = make_linear_gaussian_guide(a, b, ppca.best_factorized_scale())
>>> bool(ppca.approximation_gap() > 0)
True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch

from models._common import check_positive, data_plate

__all__ = ["PPCA", "build_ppca", "make_linear_gaussian_guide"]


@dataclass(frozen=True)
class PPCA:
    r"""Probabilistic PCA with fixed loadings ``W [D, d]`` and noise scale ``noise_scale``.

    Parameters
    ----------
    loadings
        ``W``, a ``[x_dim, z_dim]`` tensor.
    noise_scale
        The observation noise standard deviation :math:`\sigma > 0`.
    """

    loadings: torch.Tensor
    noise_scale: float

    def __post_init__(self) -> None:
        """Check the shape of the loadings and the noise scale."""
        if self.loadings.dim() != 2:
            raise ValueError(f"loadings must be [x_dim, z_dim], got {tuple(self.loadings.shape)}")
        check_positive(noise_scale=self.noise_scale)

    @property
    def x_dim(self) -> int:
        """Data dimension ``D``."""
        return int(self.loadings.shape[0])

    @property
    def z_dim(self) -> int:
        """Latent dimension ``d``."""
        return int(self.loadings.shape[1])

    # -- the Pyro program ---------------------------------------------------------------------
    def model(
        self, x: torch.Tensor, *, idx: torch.Tensor | None = None, n_data: int | None = None
    ) -> None:
        """``z_n ~ N(0, I)``, ``x_n ~ N(W z_n, sigma^2 I)`` in the data plate (site names z, x)."""
        batch = x.shape[0]
        w = self.loadings.to(x)
        with data_plate(batch, idx, n_data):
            prior = dist.Normal(x.new_zeros(batch, self.z_dim), x.new_ones(batch, self.z_dim))
            z = pyro.sample("z", prior.to_event(1))
            mean = (z.unsqueeze(-2) * w).sum(-1)  # W z for any leading particle dims
            pyro.sample("x", dist.Normal(mean, self.noise_scale).to_event(1), obs=x)

    def sample(self, num: int, seed: int = 0) -> torch.Tensor:
        """``[num, x_dim]`` draws from :math:`p(x)`, with a private generator."""
        generator = torch.Generator().manual_seed(seed)
        z = torch.randn(num, self.z_dim, generator=generator, dtype=self.loadings.dtype)
        noise = torch.randn(num, self.x_dim, generator=generator, dtype=self.loadings.dtype)
        return z @ self.loadings.T + self.noise_scale * noise

    # -- closed forms -------------------------------------------------------------------------
    def posterior_precision(self) -> torch.Tensor:
        r""":math:`\Lambda = I + W^\top W / \sigma^2`, ``[z_dim, z_dim]``."""
        w = self.loadings
        return torch.eye(self.z_dim, dtype=w.dtype) + w.T @ w / self.noise_scale**2

    def posterior_covariance(self) -> torch.Tensor:
        r""":math:`\Lambda^{-1}`, ``[z_dim, z_dim]`` (the same for every data point)."""
        return torch.linalg.inv(self.posterior_precision())

    def posterior_mean_map(self) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Return ``(A, b)`` with :math:`\mu_n = A x_n + b`.

        :math:`A = \Lambda^{-1} W^\top / \sigma^2` and ``b = 0``.
        """
        a = self.posterior_covariance() @ self.loadings.T / self.noise_scale**2
        return a, torch.zeros(self.z_dim, dtype=a.dtype)

    def posterior_mean(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`\mu_n`, ``[N, z_dim]``."""
        a, b = self.posterior_mean_map()
        return x @ a.T.to(x) + b.to(x)

    def best_factorized_scale(self) -> torch.Tensor:
        r"""Return the best factorized Gaussian's scales :math:`\Lambda_{jj}^{-1/2}`."""
        return torch.diagonal(self.posterior_precision()).rsqrt()

    def log_evidence(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`\log \mathcal N(x_n; 0, W W^\top + \sigma^2 I)`, ``[N]``."""
        w = self.loadings.to(x)
        covariance = w @ w.T + self.noise_scale**2 * torch.eye(self.x_dim, dtype=x.dtype)
        evidence = torch.distributions.MultivariateNormal(x.new_zeros(self.x_dim), covariance)
        return evidence.log_prob(x)

    def gaussian_elbo(
        self, x: torch.Tensor, loc: torch.Tensor, covariance: torch.Tensor
    ) -> torch.Tensor:
        r"""Exact ELBO of :math:`q(z_n) = \mathcal N(m_n, C_n)`, ``[N]``.

        Parameters
        ----------
        x
            ``[N, x_dim]`` data.
        loc
            ``[N, z_dim]`` means :math:`m_n`.
        covariance
            ``[z_dim, z_dim]`` or ``[N, z_dim, z_dim]`` covariances :math:`C_n`.

        Returns
        -------
        torch.Tensor
            :math:`\log p(x_n) - \mathrm{KL}(q_n \,\|\, p(z_n \mid x_n))` per point.
        """
        precision = self.posterior_precision().to(x)
        offset = loc - self.posterior_mean(x)
        trace_term = (precision * covariance).sum((-2, -1))  # tr(Lambda C), both symmetric
        quadratic = ((offset @ precision) * offset).sum(-1)
        log_det = torch.logdet(precision) + torch.logdet(covariance)
        kl = 0.5 * (trace_term + quadratic - self.z_dim - log_det)
        return self.log_evidence(x) - kl

    def approximation_gap(self) -> torch.Tensor:
        r"""Return the gap :math:`\log p(x_n) - \max_{\text{factorized}} \mathrm{ELBO}`.

        It is :math:`\frac12(\sum_j \log\Lambda_{jj} - \log\det\Lambda)`, the same for every point.
        """
        precision = self.posterior_precision()
        return 0.5 * (torch.diagonal(precision).log().sum() - torch.logdet(precision))


def build_ppca(
    x_dim: int = 5,
    z_dim: int = 2,
    noise_scale: float = 0.5,
    column_correlation: float = 0.9,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> PPCA:
    r"""Build a PPCA model with correlated random loadings drawn from a private generator.

    ``W = G L^T`` with ``G`` standard normal ``[x_dim, z_dim]`` and ``L`` the Cholesky factor of
    the ``[z_dim, z_dim]`` matrix with unit diagonal and ``column_correlation`` elsewhere, so the
    columns of ``W`` are correlated, :math:`W^\top W` is far from diagonal, the posterior is
    correlated and a factorized guide has a clearly positive approximation gap.

    Parameters
    ----------
    x_dim, z_dim
        Data and latent dimensions.
    noise_scale
        Observation noise standard deviation.
    column_correlation
        Correlation between the columns of the loadings, in ``(-1 / (z_dim - 1), 1)``.
    seed
        Seed of the loadings.
    dtype
        Floating point type of the loadings (float64 keeps closed forms exact to ~1e-12).

    Returns
    -------
    PPCA
    """
    if x_dim < 1 or z_dim < 1:
        raise ValueError(f"x_dim and z_dim must be positive, got x_dim={x_dim}, z_dim={z_dim}")
    correlation = torch.full((z_dim, z_dim), float(column_correlation), dtype=dtype)
    correlation.fill_diagonal_(1.0)
    cholesky, info = torch.linalg.cholesky_ex(correlation)
    if int(info) != 0:
        raise ValueError(
            f"column_correlation={column_correlation} does not give a positive definite "
            f"correlation matrix for z_dim={z_dim}; use a value in (-1/(z_dim-1), 1)"
        )
    generator = torch.Generator().manual_seed(seed)
    loadings = torch.randn(x_dim, z_dim, generator=generator, dtype=dtype) @ cholesky.T
    return PPCA(loadings=loadings, noise_scale=float(noise_scale))


def make_linear_gaussian_guide(
    weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor
) -> Callable[..., torch.Tensor]:
    r"""Build the guide :math:`q(z_n \mid x_n) = \mathcal N(A x_n + b, \mathrm{diag}(s)^2)`.

    ``A``, ``b`` and ``s`` are fixed tensors (no Pyro parameter): the guide is a fixed "encoder",
    exact in the mean with :meth:`PPCA.posterior_mean_map`, mis-scaled with any other values.

    Parameters
    ----------
    weight
        ``A``, ``[z_dim, x_dim]``.
    bias
        ``b``, ``[z_dim]``.
    scale
        ``s``, ``[z_dim]`` positive standard deviations.

    Returns
    -------
    Callable
        ``guide(x, *, idx=None, n_data=None)`` with latent site ``"z"``.
    """
    if not bool((scale > 0).all()):
        raise ValueError("scale must be positive in every coordinate")

    def guide(
        x: torch.Tensor, *, idx: torch.Tensor | None = None, n_data: int | None = None
    ) -> torch.Tensor:
        batch = x.shape[0]
        with data_plate(batch, idx, n_data):
            loc = x @ weight.T.to(x) + bias.to(x)
            spread = scale.to(x).expand(batch, -1)
            return pyro.sample("z", dist.Normal(loc, spread).to_event(1))

    return guide
