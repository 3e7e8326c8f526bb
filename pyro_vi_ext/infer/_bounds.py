r"""Importance-weighted bounds as pure functions of log-weights.

Every function takes log-weights :math:`\log w` of shape ``[M, K, P]``: ``M`` independent outer
draws, ``K`` particles per bound (reduced over ``dim=1``) and ``P`` data points, with
:math:`\log w_{m,k,n} = \log p(x_n, z_{m,k,n}) - \log q(z_{m,k,n} \mid x_n)`. Bounds return
``[M, P]``. Subsampling factors and user scales are applied by the caller, *after* these
reductions (see :mod:`pyro_vi_ext.infer._weights`).

Besides its value, a bound :math:`f(\log w_1, \dots, \log w_K)` is described to the gradient
estimators (:mod:`pyro_vi_ext.infer._gradients`) by two per-particle coefficients:

* the *particle weight* :math:`\partial f / \partial \log w_k` (how the model's and the score
  function's gradients weight particle ``k``), and
* the *path weight* :math:`\partial f / \partial \log w_k - \partial^2 f / \partial (\log w_k)^2`,
  the coefficient of the path derivative in the doubly reparameterized (DReG) gradient [3]: the
  score term :math:`-\mathbb{E}[\partial_k f \, \nabla_\phi \log q_\phi(z_k)]` equals
  :math:`-\mathbb{E}[\partial^2_k f \, \partial_{z_k} \log w_k \, \nabla_\phi z_k]` by the
  reparameterization identity :math:`\mathbb{E}_q[g(z)\nabla_\phi \log q_\phi(z)] =
  \mathbb{E}_q[\nabla_z g(z) \nabla_\phi z]`.

References
----------
.. [1] Y. Burda, R. Grosse, R. Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016.
.. [2] Y. Li, R. E. Turner, "Renyi Divergence Variational Inference", NeurIPS 2016.
.. [3] G. Tucker, D. Lawson, S. Gu, C. Maddison, "Doubly Reparameterized Gradient Estimators for
   Monte Carlo Objectives", ICLR 2019.
.. [4] T. Rainforth et al., "Tighter Variational Bounds are Not Necessarily Better", ICML 2018.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PARTICLE_DIM = 1


def log_mean_exp(values: torch.Tensor, dim: int = PARTICLE_DIM) -> torch.Tensor:
    r"""Return :math:`\log \frac{1}{K} \sum_k e^{v_k}` over ``dim``, computed stably.

    Parameters
    ----------
    values : torch.Tensor
        Any tensor; ``K = values.shape[dim]``.
    dim : int
        The dim reduced.

    Returns
    -------
    torch.Tensor
        ``values`` with ``dim`` removed.

    Examples
    --------
    >>> float(log_mean_exp(torch.zeros(1, 3, 1)).squeeze())
    0.0
    """
    if values.shape[dim] == 1:  # exactly the value (logsumexp of one term, minus log 1)
        return values.squeeze(dim)
    return torch.logsumexp(values, dim) - math.log(values.shape[dim])


def elbo_bound(log_weights: torch.Tensor) -> torch.Tensor:
    r"""Return the mean single-sample ELBO :math:`\frac{1}{K}\sum_k \log w_k`, ``[M, P]``.

    Parameters
    ----------
    log_weights : torch.Tensor
        ``[M, K, P]`` log importance weights.

    Returns
    -------
    torch.Tensor
        ``[M, P]``.

    Examples
    --------
    >>> elbo_bound(torch.tensor([[[1.0], [3.0]]])).tolist()
    [[2.0]]
    """
    return log_weights.mean(PARTICLE_DIM)


def iwae_bound(log_weights: torch.Tensor) -> torch.Tensor:
    r"""Return the IWAE bound [1]_ :math:`\log \frac{1}{K} \sum_k w_k`, ``[M, P]``.

    Averaging the result over ``M`` gives MIWAE(M, K) [4]_ (:func:`miwae_bound`).

    Parameters
    ----------
    log_weights : torch.Tensor
        ``[M, K, P]`` log importance weights.

    Returns
    -------
    torch.Tensor
        ``[M, P]``.

    References
    ----------
    .. [1] Y. Burda, R. Grosse, R. Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016.
    .. [4] T. Rainforth et al., "Tighter Variational Bounds are Not Necessarily Better", ICML 2018.

    Examples
    --------
    >>> round(float(iwae_bound(torch.tensor([[[0.0], [math.log(3.0)]]])).squeeze()), 6)
    0.693147
    """
    return log_mean_exp(log_weights, PARTICLE_DIM)


def miwae_bound(log_weights: torch.Tensor) -> torch.Tensor:
    r"""Return MIWAE(M, K) [4]_ :math:`\frac{1}{M}\sum_m \log \frac{1}{K}\sum_k w_{m,k}`, ``[P]``.

    Parameters
    ----------
    log_weights : torch.Tensor
        ``[M, K, P]`` log importance weights.

    Returns
    -------
    torch.Tensor
        ``[P]``.

    References
    ----------
    .. [4] T. Rainforth et al., "Tighter Variational Bounds are Not Necessarily Better", ICML 2018.

    Examples
    --------
    >>> miwae_bound(torch.zeros(2, 3, 4)).shape
    torch.Size([4])
    """
    return iwae_bound(log_weights).mean(0)


def ciwae_bound(log_weights: torch.Tensor, beta: float) -> torch.Tensor:
    r"""Return CIWAE [4]_ :math:`\beta\,\mathrm{ELBO} + (1-\beta)\,\mathrm{IWAE}_K`, ``[M, P]``.

    Both terms are taken on the same samples.

    Parameters
    ----------
    log_weights : torch.Tensor
        ``[M, K, P]`` log importance weights.
    beta : float
        Weight of the ELBO, in ``[0, 1]``.

    Returns
    -------
    torch.Tensor
        ``[M, P]``.

    References
    ----------
    .. [4] T. Rainforth et al., "Tighter Variational Bounds are Not Necessarily Better", ICML 2018.

    Examples
    --------
    >>> ciwae_bound(torch.zeros(1, 2, 1), 0.5).tolist()
    [[0.0]]
    """
    return beta * elbo_bound(log_weights) + (1.0 - beta) * iwae_bound(log_weights)


def renyi_bound(log_weights: torch.Tensor, alpha: float) -> torch.Tensor:
    r"""Return the Renyi-alpha bound [2]_, ``[M, P]``.

    .. math::

        L_\alpha = \frac{1}{1-\alpha}\log\frac{1}{K}\sum_k w_k^{1-\alpha}.

    ``alpha = 0`` is IWAE; the limit ``alpha -> 1`` is the ELBO :math:`\frac{1}{K}\sum_k \log w_k`,
    returned exactly at ``alpha = 1``. On every sample the value is non-increasing in ``alpha``
    (a power mean of the weights with exponent ``1 - alpha``).

    Parameters
    ----------
    log_weights : torch.Tensor
        ``[M, K, P]`` log importance weights.
    alpha : float
        The Renyi order.

    Returns
    -------
    torch.Tensor
        ``[M, P]``.

    References
    ----------
    .. [2] Y. Li, R. E. Turner, "Renyi Divergence Variational Inference", NeurIPS 2016.

    Examples
    --------
    >>> lw = torch.tensor([[[0.0], [1.0]]])
    >>> bool(torch.allclose(renyi_bound(lw, 0.0), iwae_bound(lw)))
    True
    """
    if alpha == 1.0:
        return elbo_bound(log_weights)
    if alpha == 0.0:  # IWAE: times and over 1.0 are exact identities, in value and gradient
        return log_mean_exp(log_weights, PARTICLE_DIM)
    return log_mean_exp((1.0 - alpha) * log_weights, PARTICLE_DIM) / (1.0 - alpha)


def normalized_weights(log_weights: torch.Tensor, exponent: float = 1.0) -> torch.Tensor:
    r"""Return :math:`\tilde w_k \propto w_k^{e}`, normalized over the particle dim.

    Parameters
    ----------
    log_weights : torch.Tensor
        ``[M, K, P]`` log importance weights.
    exponent : float
        The power ``e`` of the weights (``1 - alpha`` for the Renyi bound).

    Returns
    -------
    torch.Tensor
        ``[M, K, P]``, summing to one over ``dim=1``.

    Examples
    --------
    >>> normalized_weights(torch.zeros(1, 4, 1)).squeeze().tolist()
    [0.25, 0.25, 0.25, 0.25]
    """
    return torch.softmax(exponent * log_weights, PARTICLE_DIM)


def effective_sample_size(log_weights: torch.Tensor) -> torch.Tensor:
    r"""Return the effective sample size :math:`1 / \sum_k \tilde w_k^2`, ``[M, P]``.

    It lies in ``[1, K]``; ``K`` means equal weights.

    Parameters
    ----------
    log_weights : torch.Tensor
        ``[M, K, P]`` log importance weights.

    Returns
    -------
    torch.Tensor
        ``[M, P]``.

    Examples
    --------
    >>> effective_sample_size(torch.zeros(1, 5, 1)).tolist()
    [[5.0]]
    """
    return 1.0 / (normalized_weights(log_weights) ** 2).sum(PARTICLE_DIM)


@dataclass(frozen=True)
class Bound:
    r"""A bound with the per-particle coefficients its gradient estimators need.

    ``value`` is :math:`f`, ``particle_weights`` is :math:`\partial f / \partial \log w_k` and
    ``path_weights`` is :math:`\partial_k f - \partial_k^2 f` (the DReG coefficient), all for
    ``[M, K, P]`` log-weights.

    Parameters
    ----------
    name : str
        Short name, reported in error messages.
    alpha : float
        Renyi order; ``0`` for IWAE.
    elbo_weight : float
        Weight ``beta`` of the ELBO mixed in (CIWAE); ``0`` otherwise.

    Examples
    --------
    >>> Bound.iwae().value(torch.zeros(1, 2, 3)).shape
    torch.Size([1, 3])
    """

    name: str
    alpha: float = 0.0
    elbo_weight: float = 0.0

    @classmethod
    def iwae(cls) -> Bound:
        """Return the IWAE bound."""
        return cls("iwae")

    @classmethod
    def ciwae(cls, beta: float) -> Bound:
        """Return CIWAE with ELBO weight ``beta``."""
        return cls("ciwae", elbo_weight=float(beta))

    @classmethod
    def renyi(cls, alpha: float) -> Bound:
        """Return the Renyi-alpha bound."""
        return cls("renyi", alpha=float(alpha))

    def value(self, log_weights: torch.Tensor) -> torch.Tensor:
        r"""Return :math:`\beta\,\mathrm{ELBO} + (1-\beta) L_\alpha`, ``[M, P]``."""
        bound = renyi_bound(log_weights, self.alpha)
        if self.elbo_weight == 0.0:
            return bound
        return self.elbo_weight * elbo_bound(log_weights) + (1.0 - self.elbo_weight) * bound

    def particle_weights(self, log_weights: torch.Tensor) -> torch.Tensor:
        r"""Return :math:`\beta / K + (1 - \beta) v_k`, ``[M, K, P]``.

        Here :math:`v = \mathrm{softmax}((1-\alpha) \log w)` over the particles.
        """
        num_particles = log_weights.shape[PARTICLE_DIM]
        tilted = normalized_weights(log_weights, 1.0 - self.alpha)
        return self.elbo_weight / num_particles + (1.0 - self.elbo_weight) * tilted

    def path_weights(self, log_weights: torch.Tensor) -> torch.Tensor:
        r"""Return :math:`\beta / K + (1-\beta)(\alpha v_k + (1-\alpha) v_k^2)`, ``[M, K, P]``.

        With :math:`\partial_k L_\alpha = v_k` and :math:`\partial_k^2 L_\alpha = (1-\alpha)(v_k -
        v_k^2)`; for IWAE (``alpha = 0``) this is Tucker et al.'s :math:`\tilde w_k^2`, at
        ``alpha = 1`` the plain path derivative :math:`1/K` (STL, unbiased for the ELBO).
        """
        num_particles = log_weights.shape[PARTICLE_DIM]
        tilted = normalized_weights(log_weights, 1.0 - self.alpha)
        renyi_path = self.alpha * tilted + (1.0 - self.alpha) * tilted**2
        return self.elbo_weight / num_particles + (1.0 - self.elbo_weight) * renyi_path


__all__ = [
    "Bound",
    "ciwae_bound",
    "effective_sample_size",
    "elbo_bound",
    "iwae_bound",
    "log_mean_exp",
    "miwae_bound",
    "normalized_weights",
    "renyi_bound",
]
