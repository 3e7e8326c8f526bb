"""The per-data-point importance-weighted ELBO (IWAE) with IWAE, STL and DReG gradients."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from pyro_vi_ext.infer._bounds import Bound, iwae_bound
from pyro_vi_ext.infer._gradients import Estimator, split_surrogate, trace_parameters
from pyro_vi_ext.infer._loss_base import BoundELBO
from pyro_vi_ext.infer._validation import ParticleChunkingError
from pyro_vi_ext.infer._weights import ParticleWeights

Variant = Literal["iwae", "ciwae", "piwae"]
_VARIANTS = ("iwae", "ciwae", "piwae")


class ImportanceWeightedELBO(BoundELBO):
    r"""Importance-weighted evidence lower bound, taken per data point, as a Pyro loss.

    For every element :math:`n` of the data plate(s) shared by all sample sites, with
    :math:`z_{n,1..K} \sim q(z \mid x_n)` and :math:`\log w_{n,k} = \log p(x_n, z_{n,k}) -
    \log q(z_{n,k} \mid x_n)`, the bound [1]_ is

    .. math::

        \mathcal{L}_K(x_n) = \log \frac{1}{K} \sum_{k=1}^K w_{n,k} \le \log p(x_n),

    and the loss is :math:`-\frac{N}{B} \sum_{n \in \text{batch}} \frac{1}{M}\sum_{m=1}^M
    \mathcal{L}^{(m)}_K(x_n)` (MIWAE(M, K) [3]_ when ``num_outer=M > 1``). The subsampling factor
    :math:`N / B` of a subsampled data plate is applied *after* the log-mean-exp, which keeps the
    minibatch estimate unbiased for the full-data bound (Pyro's ``RenyiELBO(alpha=0)`` applies it
    before). A user's own :func:`pyro.poutine.scale` is kept apart from subsampling: a scale shared
    by every site multiplies the loss; site-specific scales (e.g. KL annealing) temper the
    log-weights.

    Special cases and properties:

    * ``num_particles=1`` is the ordinary ELBO (``Trace_ELBO``) on the same sample;
    * the bound is non-decreasing in ``K`` and tends to :math:`\log p(x_n)`;
    * with :math:`q` equal to the exact posterior it equals :math:`\log p(x_n)` for every ``K``.

    Gradient estimators (``estimator``) change gradients, never the value:

    * ``"iwae"``: the standard reparameterized gradient [1]_; guide sites without ``rsample`` get a
      score-function term with the leave-one-out (VIMCO) baseline [6]_, never a silent zero;
    * ``"stl"``: "sticking the landing" [4]_: the guide parameters are detached inside
      :math:`\log q`, leaving the path derivative. Zero variance at the exact posterior; for
      ``K > 1`` the guide gradient is biased;
    * ``"dreg"``: doubly reparameterized gradient [5]_: guide gradient
      :math:`\sum_k \tilde w_k^2 \, \partial_{z_k} \log w_k \, \partial_\phi z_k`,
      unbiased, with a signal-to-noise ratio that grows with ``K``; model parameters keep the IWAE
      gradient :math:`\sum_k \tilde w_k \nabla_\theta \log p(x, z_k)`.

    Variants (``variant``), following [3]_:

    * ``"iwae"``: MIWAE(M, K) as above (plain IWAE for ``num_outer=1``);
    * ``"ciwae"``: :math:`\beta\,\mathrm{ELBO} + (1 - \beta)\,\mathrm{IWAE}_K` on the same samples,
      with :math:`\beta` = ``ciwae_beta``; the value is that combination;
    * ``"piwae"``: model parameters follow :math:`\mathrm{IWAE}_{MK}` and guide parameters follow
      MIWAE(M, K); the value is :math:`-\mathrm{IWAE}_{MK}`.

    Validity: the bound is per data point only when every latent lives in the shared data plate(s).
    A model with global latents gets the whole-trace bound when its plates are not subsampled; with
    subsampling no unbiased bound exists for ``K > 1`` and an error is raised (with one particle the
    loss is the ELBO, unbiased under any subsampling, and runs as ``Trace_ELBO`` does). For
    ``K > 1`` particles are vectorized on a plate left of the model's plates (the model must
    broadcast; a failure names the site) or, with ``vectorize_particles=False``, drawn in a loop
    that replays one minibatch for all particles. Discrete model sites marked for enumeration are
    summed out exactly inside ``log p(x, z)``. STL and DReG need every guide site
    reparameterizable and every guide parameter registered with Pyro (``pyro.param``,
    ``pyro.module``, ``PyroModule``, or the guide being an ``nn.Module``).

    After each call :attr:`last_terms` holds ``iw_bound`` (the objective's value), ``elbo`` (the
    mean single-sample ELBO on the same draws) and ``ess`` (effective sample size per point, out of
    ``K``), in nats per data point.

    Parameters
    ----------
    num_particles : int
        Particles ``K`` per bound.
    num_outer : int
        Number ``M`` of independent ``K``-particle bounds averaged (MIWAE).
    estimator : {"iwae", "stl", "dreg"}
        The gradient estimator.
    variant : {"iwae", "ciwae", "piwae"}
        The objective.
    ciwae_beta : float
        Weight of the ELBO in CIWAE, in ``[0, 1]``.
    max_plate_nesting : int or None
        The model's plate nesting, without the particle plate; guessed by one extra run of model
        and guide when omitted.
    vectorize_particles : bool
        Draw the particles on a vectorized plate (default) or in a loop (False: for models that do
        not broadcast; same values on the same draws). One particle never adds a plate.
    retain_graph : bool or None
        Passed to ``backward`` in ``loss_and_grads``.
    jit : bool or {"inductor"}
        Compile model, guide and bound with ``torch.jit.trace`` once per signature (new argument
        shapes, a new model or guide, gradients on/off recompile); same values and gradients as
        the eager path on the same draws, eager fallback with a warning when tracing fails.
        ``"inductor"``: loss and gradients as one graph per signature compiled by torch inductor
        (fastest per step; seconds to compile; uncompiled graph without a C++ compiler).
        Values the model or guide reads from a global or a closure (e.g. a KL-annealing
        factor in ``poutine.scale``) are frozen at the first call: pass them as arguments.
        See :mod:`pyro_vi_ext.infer._compiled`.
    particle_chunk_size : int or None
        Evaluate the particles ``C`` at a time (default ``None``: all in one run), so that peak
        memory is that of ``C`` particles instead of ``M K``. Exact: ``loss_and_grads`` gives the
        same value and gradient, up to float rounding, as the unchunked loss on the same draws, for
        every estimator (score-function sites included) and for MIWAE and CIWAE. Two passes: the
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
        or ``fit``, which call ``loss_and_grads``. Refused: ``jit=True`` and ``variant="piwae"``
        (its split of model and guide gradients needs the whole graph). With
        ``vectorize_particles=False`` each chunk loops over ``C`` particles (their graphs, not all
        ``M K``, are held at once). Randomness must come from torch's, Python's or NumPy's global
        generators; a replay that does not reproduce its chunk raises. Modules in training mode
        are not exact (warned once): a ``torch.nn.Dropout*`` module draws one mask per chunk, so
        particles of different chunks see different guides (a different estimator, not only a
        different stream); BatchNorm running statistics are updated once per chunk with that
        chunk's statistics (the first pass leaves module buffers unchanged).

    References
    ----------
    .. [1] Y. Burda, R. Grosse, R. Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016.
    .. [2] J. Domke, D. Sheldon, "Importance Weighting and Variational Inference", NeurIPS 2018.
    .. [3] T. Rainforth et al., "Tighter Variational Bounds are Not Necessarily Better", ICML 2018.
    .. [4] G. Roeder, Y. Wu, D. Duvenaud, "Sticking the Landing: Simple, Lower-Variance Gradient
       Estimators for Variational Inference", NeurIPS 2017.
    .. [5] G. Tucker, D. Lawson, S. Gu, C. Maddison, "Doubly Reparameterized Gradient Estimators
       for Monte Carlo Objectives", ICLR 2019.
    .. [6] A. Mnih, D. Rezende, "Variational Inference for Monte Carlo Objectives", ICML 2016.

    Examples
    --------
    >>> from pyro.infer import SVI
    >>> loss = ImportanceWeightedELBO(num_particles=50, estimator="dreg")
    >>> svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), loss=loss)  # doctest: +SKIP
    >>> for x_batch, idx in loader:  # doctest: +SKIP
    ...     svi.step(x_batch, idx)
    ...     print(loss.last_terms["iw_bound"])

    K = 1000 particles 100 at a time (same value and gradient, peak memory of 100 particles):

    >>> big = ImportanceWeightedELBO(num_particles=1000, estimator="dreg", particle_chunk_size=100)
    """

    bound_term = "iw_bound"

    def __init__(
        self,
        num_particles: int = 1,
        num_outer: int = 1,
        estimator: Estimator = "iwae",
        variant: Variant = "iwae",
        ciwae_beta: float = 0.5,
        max_plate_nesting: int | None = None,
        vectorize_particles: bool = True,
        retain_graph: bool | None = None,
        jit: bool | str = False,
        particle_chunk_size: int | None = None,
    ):
        if variant not in _VARIANTS:
            raise ValueError(f"variant must be one of {_VARIANTS}, got {variant!r}")
        if not 0.0 <= float(ciwae_beta) <= 1.0:
            raise ValueError(f"ciwae_beta must lie in [0, 1], got {ciwae_beta!r}")
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
        self.variant: Variant = variant
        self.ciwae_beta = float(ciwae_beta)
        refusal = self.chunking_refusal() if particle_chunk_size is not None else None
        if refusal is not None:
            raise ParticleChunkingError(refusal)

    def chunking_refusal(self) -> str | None:
        """Return why PIWAE cannot be chunked (``None`` for the other variants)."""
        if self.variant == "piwae":
            return (
                "variant='piwae' cannot use particle_chunk_size: it differentiates the model's "
                "and the guide's objectives separately (torch.autograd.grad) on the graph of all "
                "particles. Use particle_chunk_size=None, or variant='iwae' (MIWAE with "
                "num_outer) with chunking."
            )
        return None

    def compile_refusal(self) -> str | None:
        """Return why PIWAE is not traced (it differentiates inside the loss), else ``None``."""
        if self.variant == "piwae":
            return (
                "variant='piwae' splits model and guide gradients with torch.autograd.grad "
                "inside the loss, which torch.jit.trace cannot record"
            )
        return None

    def bound(self) -> Bound:
        """Return CIWAE for ``variant="ciwae"``, IWAE otherwise (PIWAE's guide objective)."""
        if self.variant == "ciwae":
            return Bound.ciwae(self.ciwae_beta)
        return Bound.iwae()

    def is_linear_in_log_weights(self) -> bool:
        """Return whether every bound has one particle (PIWAE: all ``M K`` particles)."""
        if self.variant == "piwae":
            return self.num_outer * self.num_particles == 1
        return self.num_particles == 1

    def reported_value(self, log_weights: torch.Tensor) -> torch.Tensor:
        r"""Return the value per point: :math:`\mathrm{IWAE}_{MK}` for PIWAE, else the bound."""
        if self.variant == "piwae":
            return iwae_bound(log_weights.reshape(1, -1, log_weights.shape[-1])).squeeze(0)
        return super().reported_value(log_weights)

    def reports_bound_value(self) -> bool:
        """Return whether the reported value is the bound's mean (every variant but PIWAE)."""
        overridden = type(self).reported_value is not ImportanceWeightedELBO.reported_value
        if overridden or self.variant == "piwae":
            return super().reports_bound_value()
        return True

    def combine_surrogates(
        self,
        model: Callable,
        guide: Callable,
        weights: ParticleWeights,
        value: torch.Tensor,
        guide_surrogate: torch.Tensor,
    ) -> torch.Tensor:
        """Return PIWAE's split surrogate (model: the value, guide: MIWAE), else the guide's."""
        if self.variant != "piwae":
            return guide_surrogate
        guide_params = trace_parameters(weights.guide_trace, guide)
        guide_ids = {id(p) for p in guide_params}
        model_params = [
            p for p in trace_parameters(weights.model_trace, model) if id(p) not in guide_ids
        ]
        return split_surrogate(value, guide_surrogate, model_params, guide_params)


__all__ = ["ImportanceWeightedELBO"]
