"""The per-data-point importance-weighted ELBO (IWAE) with IWAE, STL and DReG gradients."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

from pyro_vi_ext.infer._loss_base import ParticleELBO
from pyro_vi_ext.infer._weights import ParticleWeights, latent_sites, trace_particles

Estimator = Literal["iwae", "stl", "dreg"]
Variant = Literal["iwae", "ciwae", "piwae"]
_ESTIMATORS = ("iwae", "stl", "dreg")
_VARIANTS = ("iwae", "ciwae", "piwae")


class ImportanceWeightedELBO(ParticleELBO):
    r"""Importance-weighted evidence lower bound, taken per data point, as a Pyro loss.

    For every element :math:`n` of the data plate(s) shared by all sample sites, with
    :math:`z_{n,1..K} \sim q(z \mid x_n)` and :math:`\log w_{n,k} = \log p(x_n, z_{n,k}) -
    \log q(z_{n,k} \mid x_n)`, the bound [1] is

    .. math::

        \mathcal{L}_K(x_n) = \log \frac{1}{K} \sum_{k=1}^K w_{n,k} \le \log p(x_n),

    and the loss is :math:`-\frac{N}{B} \sum_{n \in \text{batch}} \frac{1}{M}\sum_{m=1}^M
    \mathcal{L}^{(m)}_K(x_n)` (MIWAE(M, K) [3] when ``num_outer=M > 1``). The subsampling factor
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

    * ``"iwae"``: the standard reparameterized gradient [1]; guide sites without ``rsample`` get a
      score-function term with the leave-one-out (VIMCO) baseline [6], never a silent zero;
    * ``"stl"``: "sticking the landing" [4]: the guide parameters are detached inside
      :math:`\log q`, leaving the path derivative. Zero variance at the exact posterior; for
      ``K > 1`` the guide gradient is biased;
    * ``"dreg"``: doubly reparameterized gradient [5]: guide gradient
      :math:`\sum_k \tilde w_k^2 \, \partial_{z_k} \log w_k \, \partial_\phi z_k`,
      unbiased, with a signal-to-noise ratio that grows with ``K``; model parameters keep the IWAE
      gradient :math:`\sum_k \tilde w_k \nabla_\theta \log p(x, z_k)`.

    Variants (``variant``), following [3]:

    * ``"iwae"``: MIWAE(M, K) as above (plain IWAE for ``num_outer=1``);
    * ``"ciwae"``: :math:`\beta\,\mathrm{ELBO} + (1 - \beta)\,\mathrm{IWAE}_K` on the same samples,
      with :math:`\beta` = ``ciwae_beta``; the value is that combination;
    * ``"piwae"``: model parameters follow :math:`\mathrm{IWAE}_{MK}` and guide parameters follow
      MIWAE(M, K); the value is :math:`-\mathrm{IWAE}_{MK}`.

    Validity: the bound is per data point only when every latent lives in the shared data plate(s).
    A model with global latents gets the whole-trace bound when its plates are not subsampled; with
    subsampling no unbiased bound exists and an error is raised. Particles are vectorized on a plate
    left of the model's plates, so the model needs static structure and batch-shape correct sites.
    STL and DReG need every guide site reparameterizable and every guide parameter registered with
    Pyro (``pyro.param``, ``pyro.module``, ``PyroModule``, or the guide being an ``nn.Module``).

    After each call :attr:`last_terms` holds ``iw_bound`` (the objective's value), ``elbo`` (the
    mean single-sample ELBO on the same draws) and ``ess`` (effective sample size per point, out of
    ``K``), in nats per data point.

    Example::

        from pyro.infer import SVI
        from pyro_vi_ext import ImportanceWeightedELBO

        loss = ImportanceWeightedELBO(num_particles=50, estimator="dreg")
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), loss=loss)
        for x_batch, idx in loader:
            svi.step(x_batch, idx)
            print(loss.last_terms["iw_bound"])

    :param num_particles: particles ``K`` per bound.
    :param num_outer: number ``M`` of independent ``K``-particle bounds averaged (MIWAE).
    :param estimator: ``"iwae"``, ``"stl"`` or ``"dreg"``.
    :param variant: ``"iwae"``, ``"ciwae"`` or ``"piwae"``.
    :param ciwae_beta: weight of the ELBO in CIWAE, in [0, 1].
    :param max_plate_nesting: the model's plate nesting, without the particle plate; guessed by one
        extra run of model and guide when omitted.
    :param vectorize_particles: must be True (particles are always vectorized).
    :param retain_graph: passed to ``backward`` in ``loss_and_grads``.

    References

    [1] Y. Burda, R. Grosse, R. Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016.
    [2] J. Domke, D. Sheldon, "Importance Weighting and Variational Inference", NeurIPS 2018.
    [3] T. Rainforth et al., "Tighter Variational Bounds are Not Necessarily Better", ICML 2018.
    [4] G. Roeder, Y. Wu, D. Duvenaud, "Sticking the Landing: Simple, Lower-Variance Gradient
        Estimators for Variational Inference", NeurIPS 2017.
    [5] G. Tucker, D. Lawson, S. Gu, C. Maddison, "Doubly Reparameterized Gradient Estimators for
        Monte Carlo Objectives", ICLR 2019.
    [6] A. Mnih, D. Rezende, "Variational Inference for Monte Carlo Objectives", ICML 2016.
    """

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
    ):
        if estimator not in _ESTIMATORS:
            raise ValueError(f"estimator must be one of {_ESTIMATORS}, got {estimator!r}")
        if variant not in _VARIANTS:
            raise ValueError(f"variant must be one of {_VARIANTS}, got {variant!r}")
        if not isinstance(num_outer, int) or num_outer < 1:
            raise ValueError(f"num_outer must be a positive int, got {num_outer!r}")
        if not 0.0 <= float(ciwae_beta) <= 1.0:
            raise ValueError(f"ciwae_beta must lie in [0, 1], got {ciwae_beta!r}")
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            retain_graph=retain_graph,
        )
        self.num_outer = num_outer
        self.estimator: Estimator = estimator
        self.variant: Variant = variant
        self.ciwae_beta = float(ciwae_beta)

    # -- the objective on [M, K, P] log-weights -------------------------------------------------
    def _objective(self, log_weights: torch.Tensor) -> torch.Tensor:
        """Per outer draw and point ``[M, P]``: the bound of the chosen variant over ``dim=1``."""
        num_particles = log_weights.shape[1]
        iwae = torch.logsumexp(log_weights, dim=1) - math.log(num_particles)
        if self.variant == "ciwae":
            return self.ciwae_beta * log_weights.mean(1) + (1.0 - self.ciwae_beta) * iwae
        return iwae

    def _dreg_multiplier(self, normalized: torch.Tensor) -> torch.Tensor:
        """Ratio of DReG's path weight to the model's weight per particle (hook on the latents)."""
        if self.variant != "ciwae":
            return normalized
        beta, num_particles = self.ciwae_beta, normalized.shape[1]
        model_weight = beta / num_particles + (1.0 - beta) * normalized
        path_weight = beta / num_particles + (1.0 - beta) * normalized**2
        ratio = path_weight / model_weight
        return torch.where(model_weight > 0, ratio, torch.zeros_like(ratio))

    def _score_term(self, log_weights: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """Score-function surrogate ``[M, P]`` with the leave-one-out (VIMCO) learning signal."""
        log_weights = log_weights.detach()
        num_particles = log_weights.shape[1]
        value = self._objective(log_weights)  # [M, P]
        if num_particles == 1:
            signal = value.unsqueeze(1)
        else:
            others = (log_weights.sum(1, keepdim=True) - log_weights) / (num_particles - 1)
            replaced = log_weights.unsqueeze(1).repeat(1, num_particles, 1, 1)  # [M, k, K, P]
            index = torch.arange(num_particles, device=log_weights.device)
            replaced[:, index, index, :] = others
            shape = replaced.shape
            loo = self._objective(replaced.reshape(-1, num_particles, shape[-1]))
            signal = value.unsqueeze(1) - loo.reshape(shape[0], num_particles, shape[-1])
        return (signal * score).sum(1)

    def _register_dreg_hooks(self, weights: ParticleWeights, log_weights: torch.Tensor) -> None:
        normalized = torch.softmax(log_weights.detach(), dim=1)
        multiplier = self._dreg_multiplier(normalized).reshape(weights.num_particles, -1)
        for name, site in latent_sites(weights.guide_trace):
            alias = weights.latent_aliases.get(name)
            if alias is None or not alias.requires_grad:
                continue
            factor = weights.per_point_to_site(multiplier, site)
            alias.register_hook(lambda grad, factor=factor: grad * factor)

    # -- the Pyro contract ------------------------------------------------------------------
    def differentiable_loss(
        self, model: Callable, guide: Callable, *args, **kwargs
    ) -> torch.Tensor:
        """The negative bound as a scalar tensor whose gradient is the chosen estimator."""
        nesting = self._model_plate_nesting(model, guide, args, kwargs)
        num_outer, num_particles = self.num_outer, self.num_particles
        reparam = self.estimator in ("stl", "dreg")
        grad_enabled = torch.is_grad_enabled()
        weights = trace_particles(
            model,
            guide,
            args,
            kwargs,
            num_particles=num_outer * num_particles,
            plate_nesting=nesting,
            detach_guide_parameters=reparam,
            alias_latents=self.estimator == "dreg" and grad_enabled,
            require_rsample=self.estimator if reparam else None,
        )
        log_weights = weights.log_weights.reshape(num_outer, num_particles, -1)
        scale = weights.scale

        if self.variant == "piwae":
            value = torch.logsumexp(log_weights.reshape(1, num_outer * num_particles, -1), 1)
            value = value - math.log(num_outer * num_particles)
        else:
            value = self._objective(log_weights)
        bound = scale * value.mean(0).sum()
        self._record_terms(weights, log_weights, bound)
        if not grad_enabled:
            return -bound

        guide_objective = self._objective(log_weights)  # [M, P]
        if weights.score is not None:
            score = weights.score.reshape(num_outer, num_particles, -1)
            guide_objective = guide_objective + self._score_term(log_weights, score)
        if self.estimator == "dreg":
            self._register_dreg_hooks(weights, log_weights)
        guide_surrogate = scale * guide_objective.mean(0).sum()

        if self.variant == "piwae":
            surrogate = self._piwae_surrogate(model, guide, weights, bound, guide_surrogate)
        else:
            surrogate = guide_surrogate
        return -(bound.detach() + surrogate - surrogate.detach())

    def _piwae_surrogate(self, model, guide, weights, model_bound, guide_surrogate):
        guide_params = _trace_parameters(weights.guide_trace, guide)
        guide_ids = {id(p) for p in guide_params}
        model_params = [
            p for p in _trace_parameters(weights.model_trace, model) if id(p) not in guide_ids
        ]
        surrogate = torch.zeros((), device=model_bound.device)
        for objective, params in ((model_bound, model_params), (guide_surrogate, guide_params)):
            if not params or not objective.requires_grad:
                continue
            grads = torch.autograd.grad(objective, params, retain_graph=True, allow_unused=True)
            for param, grad in zip(params, grads, strict=True):
                if grad is not None:
                    surrogate = surrogate + (grad.detach() * param).sum()
        return surrogate

    def _record_terms(self, weights: ParticleWeights, log_weights: torch.Tensor, bound) -> None:
        with torch.no_grad():
            per_point = weights.scale / weights.data_size
            normalized = torch.softmax(log_weights, dim=1)
            ess = (1.0 / (normalized**2).sum(1)).mean()
            self.last_terms = {
                "iw_bound": float(bound) / weights.data_size,
                "elbo": float(log_weights.mean((0, 1)).sum()) * per_point,
                "ess": float(ess),
            }


def _trace_parameters(trace, fn: Callable) -> list[torch.Tensor]:
    """Leaf tensors of the parameters a model or guide used (param sites and module parameters)."""
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
