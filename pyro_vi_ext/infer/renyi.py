"""The Renyi-alpha variational bound per data point, with IWAE, STL and DReG gradients."""

from __future__ import annotations

import math

from pyro_vi_ext.infer._bounds import Bound
from pyro_vi_ext.infer._gradients import Estimator
from pyro_vi_ext.infer._loss_base import BoundELBO


class RenyiAlphaELBO(BoundELBO):
    r"""The Renyi-alpha variational bound [1]_, taken per data point, as a Pyro loss.

    For every element :math:`n` of the data plate(s) shared by all sample sites, with
    :math:`z_{n,1..K} \sim q(z \mid x_n)` and :math:`w_{n,k} = p(x_n, z_{n,k}) / q(z_{n,k} \mid
    x_n)`,

    .. math::

        \mathcal{L}_\alpha(x_n) = \frac{1}{1-\alpha} \log \frac{1}{K}
            \sum_{k=1}^K w_{n,k}^{1-\alpha},

    and the loss is :math:`-\frac{N}{B}\sum_{n \in \text{batch}} \frac{1}{M}\sum_m
    \mathcal{L}^{(m)}_\alpha(x_n)`. ``alpha=0`` is IWAE, ``alpha -> 1`` the ELBO (taken exactly
    at ``alpha=1``); on every sample the value is non-increasing in ``alpha``, so for every
    ``alpha >= 0`` it lower-bounds :math:`\log p(x_n)` in expectation (``alpha < 0`` is refused:
    the estimate may exceed the evidence). With the exact posterior all weights equal
    :math:`p(x_n)` and the bound is :math:`\log p(x_n)` for every ``alpha`` and ``K``.

    The subsampling factor :math:`N / B` is applied *after* the log-mean-exp, so the minibatch
    estimate is unbiased for the full-data bound; Pyro's ``RenyiELBO`` puts the scaled
    log-densities inside it and is biased under subsampling. A user's :func:`pyro.poutine.scale`
    is treated as in :class:`~pyro_vi_ext.ImportanceWeightedELBO`.

    Gradient estimators, with :math:`v_k = w_k^{1-\alpha} / \sum_j w_j^{1-\alpha}` (so that
    :math:`\partial \mathcal{L}_\alpha / \partial \log w_k = v_k`):

    * ``"iwae"``: the reparameterized gradient :math:`\sum_k v_k \nabla \log w_k`; guide sites
      without ``rsample`` get a score-function term with the leave-one-out baseline (defined for
      every ``alpha``: the baseline replaces particle ``k``'s log-weight by the mean of the
      others). Unbiased.
    * ``"stl"``: the path derivative only, :math:`\sum_k v_k\, \partial_{z_k} \log w_k\,
      \nabla_\phi z_k`. Zero at the exact posterior; biased for ``K > 1`` unless ``alpha = 1``
      (the dropped score term :math:`-\mathbb{E}[\sum_k v_k \nabla_\phi \log q(z_k)]` vanishes only
      when :math:`v_k = 1/K`).
    * ``"dreg"``: doubly reparameterized [2]_. By the identity
      :math:`\mathbb{E}_q[g(z)\nabla_\phi \log q_\phi(z)] =
      \mathbb{E}_q[\nabla_z g(z)\nabla_\phi z]` applied to :math:`g = v_k`, with
      :math:`\partial v_k / \partial \log w_k = (1-\alpha)(v_k - v_k^2)`, the unbiased guide
      gradient is

      .. math::

          \sum_k \left(\alpha\, v_k + (1-\alpha)\, v_k^2\right)
              \partial_{z_k} \log w_k \, \nabla_\phi z_k,

      which is Tucker et al.'s :math:`\tilde w_k^2` at ``alpha=0`` and plain STL (unbiased for
      the ELBO) at ``alpha=1``. Zero at the exact posterior. Model parameters keep
      :math:`\sum_k v_k \nabla_\theta \log p(x, z_k)`.

    STL and DReG need every guide site reparameterizable. After each call :attr:`last_terms`
    holds ``renyi_bound``, ``elbo`` (mean single-sample ELBO on the same draws) and ``ess``, in
    nats per data point.

    Parameters
    ----------
    num_particles : int
        Particles ``K`` per bound.
    alpha : float
        Renyi order, ``alpha >= 0``.
    num_outer : int
        Independent bounds ``M`` averaged.
    estimator : {"iwae", "stl", "dreg"}
        The gradient estimator.
    max_plate_nesting : int or None
        The model's plate nesting without the particle plate; guessed when omitted.
    vectorize_particles : bool
        Draw the particles on a vectorized plate (default) or in a loop (False).
    retain_graph : bool or None
        Passed to ``backward`` in ``loss_and_grads``.
    jit : bool or {"inductor"}
        Compile once per signature: ``torch.jit.trace`` (True) or torch inductor
        (``"inductor"``); see :class:`~pyro_vi_ext.ImportanceWeightedELBO`.
    particle_chunk_size : int or None
        Evaluate the particles ``C`` at a time (default ``None``: all in one run), so that peak
        memory is that of ``C`` particles instead of ``M K``. Exact: ``loss_and_grads`` gives the
        same value and gradient, up to float rounding, as the unchunked loss on the same draws, for
        every estimator (score-function sites included) and for any ``num_outer``. Two passes: the
        log-weights of all chunks without graph, then each chunk replayed from its recorded random
        state with ``backward`` on its share of the surrogate, whose coefficients (the bound's
        normalized weights, DReG's path weights, the leave-one-out signals) come from the full
        log-weights; about two forward passes and one backward per step. ``loss`` needs only the
        first pass. Use it when ``M K`` particles of a minibatch do not fit (the memory check before
        the first run suggests it). A chunked run draws ``C`` particles at a time, so its random
        stream differs from an unchunked run's under the same seed (statistically the same
        estimator); all chunks share the first chunk's minibatch of a subsampled plate.
        ``differentiable_loss`` (and so ``ELBOModule``) raises
        :class:`~pyro_vi_ext.infer._validation.ParticleChunkingError` while ``C < M K``: use ``SVI``
        or ``fit``, which call ``loss_and_grads``. Refused: ``jit=True``. With
        ``vectorize_particles=False`` each chunk loops over ``C`` particles (their graphs, not all
        ``M K``, are held at once). Randomness must come from torch's, Python's or NumPy's global
        generators; a replay that does not reproduce its chunk raises. Modules in training mode
        are not exact (warned once): a ``torch.nn.Dropout*`` module draws one mask per chunk, so
        particles of different chunks see different guides (a different estimator, not only a
        different stream); BatchNorm running statistics are updated once per chunk with that
        chunk's statistics (the first pass leaves module buffers unchanged).

    References
    ----------
    .. [1] Y. Li, R. E. Turner, "Renyi Divergence Variational Inference", NeurIPS 2016.
    .. [2] G. Tucker, D. Lawson, S. Gu, C. Maddison, "Doubly Reparameterized Gradient Estimators
       for Monte Carlo Objectives", ICLR 2019.

    Examples
    --------
    >>> from pyro.infer import SVI
    >>> loss = RenyiAlphaELBO(num_particles=10, alpha=0.5, estimator="dreg")
    >>> svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), loss=loss)  # doctest: +SKIP
    >>> svi.step(x_batch)  # doctest: +SKIP
    >>> chunked = RenyiAlphaELBO(num_particles=1000, alpha=0.5, particle_chunk_size=100)
    """

    bound_term = "renyi_bound"

    def __init__(
        self,
        num_particles: int = 1,
        alpha: float = 0.5,
        num_outer: int = 1,
        estimator: Estimator = "iwae",
        max_plate_nesting: int | None = None,
        vectorize_particles: bool = True,
        retain_graph: bool | None = None,
        jit: bool | str = False,
        particle_chunk_size: int | None = None,
    ):
        if not isinstance(alpha, int | float) or not math.isfinite(alpha) or alpha < 0:
            raise ValueError(
                f"alpha must be a finite number >= 0, got {alpha!r}: for alpha < 0 the "
                "Renyi estimate is not a lower bound of log p(x)."
            )
        super().__init__(
            num_particles=num_particles,
            num_outer=num_outer,
            estimator=estimator,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            retain_graph=retain_graph,
            jit=jit,
            particle_chunk_size=particle_chunk_size,
        )
        self.alpha = float(alpha)

    def bound(self) -> Bound:
        """Return the Renyi-alpha bound of order :attr:`alpha`."""
        return Bound.renyi(self.alpha)


__all__ = ["RenyiAlphaELBO"]
