r"""Surrogate builders: how a bound's gradient is estimated.

A loss returns ``-(value.detach() + surrogate - surrogate.detach())``: the value of its bound and
the gradient of a *surrogate* whose expectation has the gradient wanted. This module builds the
surrogates from the log-weights of :mod:`pyro_vi_ext.infer._weights` and a
:class:`~pyro_vi_ext.infer._bounds.Bound`:

* ``"iwae"`` (reparameterized): the bound itself, differentiated through reparameterized latents;
  guide sites without ``rsample`` add score-function terms with the leave-one-out (VIMCO)
  baseline [3]_ (:func:`score_function_surrogate`);
* ``"stl"`` (sticking the landing [1]_): the bound with ``log q`` computed from detached guide
  parameters (the tracing lives in ``_weights.py``; :func:`needs_detached_guide` makes the choice);
* ``"dreg"`` (doubly reparameterized [2]_): as STL, and the gradient reaching each latent is
  reweighted from the bound's particle weight to its path weight by a hook on an alias of the
  latent (:class:`DregAliases`, handed to ``trace_particles`` as ``latent_hook``);
* PIWAE's split of model and guide gradients [4]_ (:func:`split_surrogate`).

References
----------
.. [1] G. Roeder, Y. Wu, D. Duvenaud, "Sticking the Landing: Simple, Lower-Variance Gradient
   Estimators for Variational Inference", NeurIPS 2017.
.. [2] G. Tucker, D. Lawson, S. Gu, C. Maddison, "Doubly Reparameterized Gradient Estimators for
   Monte Carlo Objectives", ICLR 2019.
.. [3] A. Mnih, D. Rezende, "Variational Inference for Monte Carlo Objectives", ICML 2016.
.. [4] T. Rainforth et al., "Tighter Variational Bounds are Not Necessarily Better", ICML 2018.
.. [5] J. Schulman, N. Heess, T. Weber, P. Abbeel, "Gradient Estimation Using Stochastic
   Computation Graphs", NeurIPS 2015.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import pyro.poutine as poutine
import torch

from pyro_vi_ext.infer._bounds import PARTICLE_DIM, Bound

Estimator = Literal["iwae", "stl", "dreg"]
ESTIMATORS: tuple[str, ...] = ("iwae", "stl", "dreg")


def check_estimator(estimator: str) -> None:
    """Raise ``ValueError`` unless ``estimator`` is one of :data:`ESTIMATORS`.

    Parameters
    ----------
    estimator : str
        The estimator name a user passed.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")


def needs_detached_guide(estimator: str) -> bool:
    """Return whether ``log q`` must be computed with detached guide parameters (STL, DReG).

    Parameters
    ----------
    estimator : str
        One of :data:`ESTIMATORS`.

    Returns
    -------
    bool
        True for ``"stl"`` and ``"dreg"``, which also need every guide site reparameterized.
    """
    return estimator in ("stl", "dreg")


def surrogate_loss(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """Return ``-(value + surrogate - sg(surrogate))``: the value of one, the gradient of the other.

    Parameters
    ----------
    value : torch.Tensor
        Scalar bound whose value is reported.
    surrogate : torch.Tensor
        Scalar whose gradient is the estimator.

    Returns
    -------
    torch.Tensor
        The loss (negative bound).

    Examples
    --------
    >>> float(surrogate_loss(torch.tensor(2.0), torch.tensor(5.0)))
    -2.0
    """
    return -(value.detach() + surrogate - surrogate.detach())


def leave_one_out_signals(
    bound: Bound, log_weights: torch.Tensor, site_log_weights: torch.Tensor | None = None
) -> torch.Tensor:
    r"""Return leave-one-out learning signals of a score-function term, ``[M, K, P, E]``.

    For particle ``k`` and plate element ``e`` of a guide site,
    :math:`s_{k,e} = f(\log w) - f(\log w^{(k,e)})`, where :math:`\log w^{(k,e)}` replaces
    particle ``k``'s log-weight by :math:`O_{k,e} + \frac{1}{K-1}\sum_{j \ne k} R_{j,e}`:
    ``R`` (``site_log_weights``) are the log-weight terms summed down to the site's plate
    elements, as ``Trace_ELBO``'s ``sum_to`` [5]_, and :math:`O = \log w - R` the terms of the
    site's *other* plate elements. The baseline does not depend on :math:`z_{k,e}` (other
    particles, other elements of a conditionally independent plate), so the score term stays
    unbiased; it removes the other elements' noise (Rao-Blackwellization) and the particle's own
    level (VIMCO [3]_). Without plates inside a point (``E = 1``, ``R = \log w``) this is VIMCO.
    With one particle every bound is the ELBO and the signal is ``R`` itself, Trace_ELBO's.

    Parameters
    ----------
    bound : Bound
        The bound :math:`f`, symmetric in its particles.
    log_weights : torch.Tensor
        ``[M, K, P]`` log-weights (detached here).
    site_log_weights : torch.Tensor, optional
        ``[M, K, P, E]`` the site's ``R``; ``log_weights`` itself (``E = 1``) when omitted.

    Returns
    -------
    torch.Tensor
        ``[M, K, P, E]`` detached signals.

    References
    ----------
    .. [3] A. Mnih, D. Rezende, "Variational Inference for Monte Carlo Objectives", ICML 2016.
    .. [5] J. Schulman, N. Heess, T. Weber, P. Abbeel, "Gradient Estimation Using Stochastic
       Computation Graphs", NeurIPS 2015.
    """
    log_weights = log_weights.detach()
    if site_log_weights is None:
        site_log_weights = log_weights.unsqueeze(-1)
    site_log_weights = site_log_weights.detach()
    outer, num_particles, points = log_weights.shape
    elements = site_log_weights.shape[-1]
    if num_particles == 1:
        return site_log_weights
    value = bound.value(log_weights)  # [M, P]
    others = log_weights.unsqueeze(-1) - site_log_weights  # O: [M, K, P, E]
    mean_of_rest = (site_log_weights.sum(1, keepdim=True) - site_log_weights) / (num_particles - 1)
    replaced = log_weights[:, None, :, :, None].repeat(1, num_particles, 1, 1, elements)
    index = torch.arange(num_particles, device=log_weights.device)
    replaced[:, index, index] = others + mean_of_rest  # [M, k, K, P, E]
    baseline = bound.value(replaced.reshape(outer * num_particles, num_particles, -1))
    baseline = baseline.reshape(outer, num_particles, points, elements)
    return value[:, None, :, None] - baseline


def score_function_surrogate(
    bound: Bound,
    log_weights: torch.Tensor,
    score: torch.Tensor,
    site_log_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Return the score-function surrogate, ``[M, P]``.

    .. math::

        \sum_{k,e} \mathrm{sg}(s_{k,e}) \log q(z_{k,e}).

    ``s`` are the signals of :func:`leave_one_out_signals`; ``score`` holds the log-density of
    one guide site without ``rsample`` (or their sum), with its gradient.

    Parameters
    ----------
    bound : Bound
        The bound.
    log_weights : torch.Tensor
        ``[M, K, P]`` log-weights.
    score : torch.Tensor
        ``[M, K, P, E]`` (or ``[M, K, P]``) log q of the site per plate element.
    site_log_weights : torch.Tensor, optional
        ``[M, K, P, E]`` the site's log-weight terms (see :func:`leave_one_out_signals`).

    Returns
    -------
    torch.Tensor
        ``[M, P]``.
    """
    if score.dim() == 3:
        score = score.unsqueeze(-1)
    signals = leave_one_out_signals(bound, log_weights, site_log_weights)
    return (signals * score).sum((PARTICLE_DIM, -1))


class DregAliases:
    r"""DReG's aliases and hooks: reweight the path derivative reaching each latent.

    Passed to ``trace_particles(..., latent_hook=aliases)``, it gives the model and the detached
    guide replay an identity alias of every reparameterized latent. The surrogate (the bound on
    log-weights with detached guide parameters) sends :math:`\partial_k f \cdot \partial_{z_k}
    \log w_k` to alias ``k``; :meth:`reweight` registers hooks that multiply it by
    ``path_weights / particle_weights`` of the bound, leaving :math:`\sum_k (\partial_k f -
    \partial_k^2 f)\,\partial_{z_k} \log w_k\, \nabla_\phi z_k` for the guide [2]_. Model
    parameters do not pass through the aliases and keep the plain gradient.

    References
    ----------
    .. [2] G. Tucker, D. Lawson, S. Gu, C. Maddison, "Doubly Reparameterized Gradient Estimators for
       Monte Carlo Objectives", ICLR 2019.

    Examples
    --------
    >>> aliases = DregAliases()
    >>> z = torch.ones(2, requires_grad=True)
    >>> aliases("z", z) is z
    False
    """

    def __init__(self, traceable: bool = False) -> None:
        self.aliases: dict[str, list[torch.Tensor]] = {}
        self.traceable = traceable
        self._slots: dict[str, list[_FactorSlot]] = {}
        self._filled: list[torch.Tensor] = []

    def __call__(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """Return an identity alias of ``value`` (recorded), or ``value`` if it has no graph."""
        if not value.requires_grad:
            return value
        if self.traceable:
            slot = _FactorSlot()
            alias = _ScaleGradientLater.apply(value, slot)
            self._slots.setdefault(name, []).append(slot)
        else:
            alias = value.view_as(value)
        self.aliases.setdefault(name, []).append(alias)
        return alias

    def keep_alive(self, surrogate: torch.Tensor) -> torch.Tensor:
        """Return ``surrogate`` tied to the factors set on the traceable path (same value).

        A traced graph only keeps operations that its outputs depend on; adding zero times the
        factors keeps the operations that store them.
        """
        for factor in self._filled:
            surrogate = surrogate + 0.0 * factor.sum()
        return surrogate

    def reweight(
        self,
        bound: Bound,
        log_weights: torch.Tensor,
        to_site: Callable[[torch.Tensor, str, int], torch.Tensor],
    ) -> None:
        """Register the hooks for one evaluation of ``bound`` on ``log_weights``.

        Parameters
        ----------
        bound : Bound
            The bound differentiated.
        log_weights : torch.Tensor
            ``[M, K, P]`` log-weights of that evaluation.
        to_site : callable
            ``to_site(factor, name, index)`` reshapes an ``[S, P]`` factor (``S = M K``) to
            broadcast against alias ``index`` of site ``name`` (one alias per run: one run when
            vectorized, one per particle on the sequential path), e.g.
            :meth:`~pyro_vi_ext.infer._weights.ParticleWeights.per_point_to_run_site`.
        """
        with torch.no_grad():
            model_weight = bound.particle_weights(log_weights)
            path_weight = bound.path_weights(log_weights)
            ratio = torch.where(
                model_weight > 0, path_weight / model_weight, torch.zeros_like(path_weight)
            )
            ratio = ratio.reshape(-1, log_weights.shape[-1])
        for name, aliases in self.aliases.items():
            for index, alias in enumerate(aliases):
                factor = to_site(ratio, name, index)
                if self.traceable:
                    self._filled.append(_FillFactor.apply(factor, self._slots[name][index]))
                else:
                    alias.register_hook(lambda grad, factor=factor: grad * factor)


class _FactorSlot:
    """Where one alias's backward finds its factor; re-armed by every forward of the alias.

    On the compiled path the slot object is a constant of the traced graph: each run of
    :class:`_ScaleGradientLater` hands its backward a fresh cell and :class:`_FillFactor` fills
    that cell later in the same run, so a graph kept from an earlier call keeps its own factor.
    """

    def __init__(self) -> None:
        self.cell: list[torch.Tensor] = []


class _ScaleGradientLater(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by a factor known only later (DReG).

    The hook-free form of the alias hook: both functions are recorded by ``torch.jit.trace`` and
    run at every call of the traced graph.
    """

    @staticmethod
    def forward(ctx, value, slot):
        ctx.cell = slot.cell = []
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.cell[0], None


class _FillFactor(torch.autograd.Function):
    """Identity on a detached factor that stores it in the slot of its alias (see above)."""

    @staticmethod
    def forward(ctx, factor, slot):
        slot.cell.append(factor.detach())
        return factor.view_as(factor)

    @staticmethod
    def backward(ctx, grad):
        return None, None


def trace_parameters(trace: poutine.Trace, fn: Callable) -> list[torch.Tensor]:
    """Return the leaf tensors of the parameters a model or guide used.

    Parameters
    ----------
    trace : pyro.poutine.Trace
        A trace of ``fn`` (its ``param`` sites are read).
    fn : callable
        The model or guide; if it is an ``nn.Module`` its parameters are included.

    Returns
    -------
    list of torch.Tensor
        Unconstrained leaves that require a gradient, without duplicates.
    """
    params: dict[int, torch.Tensor] = {}
    for site in trace.nodes.values():
        if site["type"] == "param":
            value = site["value"]
            leaf = value.unconstrained() if hasattr(value, "unconstrained") else value
            if leaf.requires_grad:
                params[id(leaf)] = leaf
    if isinstance(fn, torch.nn.Module):
        for param in fn.parameters():
            if param.requires_grad:
                params[id(param)] = param
    return list(params.values())


def split_surrogate(
    model_objective: torch.Tensor,
    guide_objective: torch.Tensor,
    model_params: Sequence[torch.Tensor],
    guide_params: Sequence[torch.Tensor],
) -> torch.Tensor:
    r"""Return a surrogate whose gradient is one objective's for the model, another's for the guide.

    PIWAE [4]_: model parameters :math:`\theta` follow :math:`\mathrm{IWAE}_{MK}`, guide parameters
    :math:`\phi` follow MIWAE(M, K). The surrogate is :math:`\sum_\theta \mathrm{sg}(\nabla_\theta
    f_{model}) \theta + \sum_\phi \mathrm{sg}(\nabla_\phi f_{guide}) \phi`.

    Parameters
    ----------
    model_objective, guide_objective : torch.Tensor
        Scalars.
    model_params, guide_params : sequence of torch.Tensor
        Disjoint parameter leaves.

    Returns
    -------
    torch.Tensor
        Scalar surrogate.

    References
    ----------
    .. [4] T. Rainforth et al., "Tighter Variational Bounds are Not Necessarily Better", ICML 2018.
    """
    surrogate = torch.zeros((), device=model_objective.device)
    for objective, params in ((model_objective, model_params), (guide_objective, guide_params)):
        if not params or not objective.requires_grad:
            continue
        grads = torch.autograd.grad(objective, list(params), retain_graph=True, allow_unused=True)
        for param, grad in zip(params, grads, strict=True):
            if grad is not None:
                surrogate = surrogate + (grad.detach() * param).sum()
    return surrogate


__all__ = [
    "ESTIMATORS",
    "DregAliases",
    "Estimator",
    "check_estimator",
    "leave_one_out_signals",
    "needs_detached_guide",
    "score_function_surrogate",
    "split_surrogate",
    "surrogate_loss",
    "trace_parameters",
]
