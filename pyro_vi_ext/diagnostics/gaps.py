r"""Inference gaps: how much of log p(x) - ELBO is due to the family, how much to the encoder.

For an amortized guide :math:`q_\phi(z \mid x)` from a family :math:`\mathcal Q` (say factorized
Gaussians), Cremer, Li and Duvenaud [1]_ split the gap of each data point into two parts:

.. math::

    \underbrace{\log p(x) - \mathrm{ELBO}(q_\phi)}_{\text{inference gap}}
    = \underbrace{\log p(x) - \max_{q \in \mathcal Q} \mathrm{ELBO}(q)}_{\text{approximation gap}}
    + \underbrace{\max_{q \in \mathcal Q} \mathrm{ELBO}(q) - \mathrm{ELBO}(q_\phi)}_{
    \text{amortization gap}},

where the maximum is over the members of the guide's own family *for that point alone*,
found by optimizing free per-point distribution parameters started at the encoder's output. A
richer family :math:`\mathcal R \supset \mathcal Q` (full-covariance Gaussians) shows how much of
the approximation gap a better family closes:
:math:`(\max_{\mathcal R} - \max_{\mathcal Q}) / (\log p(x) - \max_{\mathcal Q})`.

:func:`inference_gaps` computes every term per data point with a Monte Carlo standard error;
:class:`InferenceGaps` holds them, with a table and a plot
(:func:`pyro_vi_ext.diagnostics.gap_plots.plot_inference_gaps`).

References
----------
.. [1] C. Cremer, X. Li, D. Duvenaud, "Inference Suboptimality in Variational Autoencoders",
   ICML 2018.
.. [2] Y. Burda, R. Grosse, R. Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016.
.. [3] D. P. Kingma, J. Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import Distribution, Independent, Normal

from pyro_vi_ext.diagnostics._sampling import VectorizeParticles, settle_vectorize
from pyro_vi_ext.infer._weights import guess_plate_nesting, trace_particles

RicherFamily = Literal["full_covariance"]
EvidenceProposal = Literal["amortized", "family", "richer"]

__all__ = ["InferenceGaps", "inference_gaps"]


# -- the result ----------------------------------------------------------------------------------


def _difference(a: np.ndarray, a_se: np.ndarray, b: np.ndarray, b_se: np.ndarray):
    """Return ``a - b`` and its standard error, the two estimates being from independent draws."""
    return a - b, np.sqrt(np.square(a_se) + np.square(b_se))


@dataclass(frozen=True)
class InferenceGaps:
    r"""Per-data-point log-evidence, bounds and inference gaps, each with a standard error.

    All arrays are ``[P]``, one entry per data point in the order of ``data``; ``*_se`` are Monte
    Carlo standard errors (conditional on the fitted parameters).

    Attributes
    ----------
    log_evidence, log_evidence_se
        Importance-sampled :math:`\log p(x_n)` (IWAE with ``num_evidence_samples`` draws).
    amortized_elbo, amortized_elbo_se
        ELBO of the guide as it is (the encoder's output).
    family_elbo, family_elbo_se
        ELBO of the best member of the guide's family for each point (per-point optimization).
    richer_elbo, richer_elbo_se
        ELBO of the best member of the richer family, or ``None`` when none was fitted.
    iw_bound, iw_bound_se
        :math:`\mathrm{IWAE}_K` of the amortized guide, or ``None`` (``iw_num_particles`` unset).
    iw_num_particles
        ``K`` of ``iw_bound``.
    richer_family
        Name of the richer family (``"full_covariance"``) or ``None``.
    family_converged, richer_converged
        ``[P]`` booleans: whether the per-point optimization met its convergence test within the
        step budget (``richer_converged`` is ``None`` without a richer family).
    family_steps, richer_steps
        ``[P]`` optimizer steps used.
    num_evidence_samples, num_elbo_samples
        Draws behind ``log_evidence`` and behind each ELBO.
    evidence_proposal
        Which guide proposed the draws of ``log_evidence``.
    evidence_khat
        ``[P]`` PSIS :math:`\hat k` of that proposal's importance weights (``None`` when not
        checked). Above about 0.7 the weights are heavy-tailed and ``log_evidence`` and its
        standard error are unreliable (biased low): a factorized proposal for a strongly
        correlated posterior is such a case, which is why the default proposal is the richest
        fitted family.
    """

    log_evidence: np.ndarray
    log_evidence_se: np.ndarray
    amortized_elbo: np.ndarray
    amortized_elbo_se: np.ndarray
    family_elbo: np.ndarray
    family_elbo_se: np.ndarray
    family_converged: np.ndarray
    family_steps: np.ndarray
    num_evidence_samples: int
    num_elbo_samples: int
    evidence_proposal: str
    richer_family: str | None = None
    richer_elbo: np.ndarray | None = field(default=None, repr=False)
    richer_elbo_se: np.ndarray | None = field(default=None, repr=False)
    richer_converged: np.ndarray | None = field(default=None, repr=False)
    richer_steps: np.ndarray | None = field(default=None, repr=False)
    iw_num_particles: int | None = None
    iw_bound: np.ndarray | None = field(default=None, repr=False)
    iw_bound_se: np.ndarray | None = field(default=None, repr=False)
    evidence_khat: np.ndarray | None = field(default=None, repr=False)

    # -- per-point gaps ---------------------------------------------------------------------
    @property
    def num_points(self) -> int:
        """Number of data points ``P``."""
        return int(self.log_evidence.shape[0])

    @property
    def approximation_gap(self) -> np.ndarray:
        r"""``[P]`` :math:`\log p(x_n) - \max_{\mathcal Q} \mathrm{ELBO}`."""
        return self.log_evidence - self.family_elbo

    @property
    def approximation_gap_se(self) -> np.ndarray:
        """``[P]`` standard error of :attr:`approximation_gap`."""
        return _difference(
            self.log_evidence, self.log_evidence_se, self.family_elbo, self.family_elbo_se
        )[1]

    @property
    def amortization_gap(self) -> np.ndarray:
        r"""``[P]`` :math:`\max_{\mathcal Q} \mathrm{ELBO} - \mathrm{ELBO}(q_\phi)`."""
        return self.family_elbo - self.amortized_elbo

    @property
    def amortization_gap_se(self) -> np.ndarray:
        """``[P]`` standard error of :attr:`amortization_gap`."""
        return _difference(
            self.family_elbo, self.family_elbo_se, self.amortized_elbo, self.amortized_elbo_se
        )[1]

    @property
    def inference_gap(self) -> np.ndarray:
        r"""``[P]`` :math:`\log p(x_n) - \mathrm{ELBO}(q_\phi)`, the sum of the two gaps."""
        return self.log_evidence - self.amortized_elbo

    @property
    def inference_gap_se(self) -> np.ndarray:
        """``[P]`` standard error of :attr:`inference_gap`."""
        return _difference(
            self.log_evidence, self.log_evidence_se, self.amortized_elbo, self.amortized_elbo_se
        )[1]

    @property
    def richer_gap(self) -> np.ndarray | None:
        r"""``[P]`` gap the richer family leaves, :math:`\log p(x_n) - \max_{\mathcal R}`."""
        if self.richer_elbo is None:
            return None
        return self.log_evidence - self.richer_elbo

    @property
    def richer_gap_se(self) -> np.ndarray | None:
        """``[P]`` standard error of :attr:`richer_gap`."""
        if self.richer_elbo is None:
            return None
        return _difference(
            self.log_evidence, self.log_evidence_se, self.richer_elbo, self.richer_elbo_se
        )[1]

    @property
    def fraction_closed(self) -> float | None:
        r"""Share of the total approximation gap the richer family closes.

        :math:`\sum_n (\max_{\mathcal R} - \max_{\mathcal Q}) / \sum_n (\log p(x_n) -
        \max_{\mathcal Q})`, a ratio of sums (stable when single gaps are near zero).
        """
        if self.richer_elbo is None:
            return None
        total = float(self.approximation_gap.sum())
        if total == 0.0:
            return float("nan")
        return float((self.richer_elbo - self.family_elbo).sum()) / total

    # -- summaries --------------------------------------------------------------------------
    def table(self) -> dict[str, tuple[float, float]]:
        r"""Mean over the data points of every quantity, with its Monte Carlo standard error.

        Returns
        -------
        dict
            Row name to ``(mean, se)``, in nats per data point; the standard error of a mean is
            :math:`\sqrt{\sum_n \mathrm{se}_n^2} / P`.
        """

        def row(values: np.ndarray, se: np.ndarray) -> tuple[float, float]:
            return float(np.mean(values)), float(np.sqrt(np.square(se).sum()) / len(values))

        rows = {"log p(x)": row(self.log_evidence, self.log_evidence_se)}
        if self.iw_bound is not None:
            rows[f"IWAE (K={self.iw_num_particles}), amortized"] = row(
                self.iw_bound, self.iw_bound_se
            )
        rows["ELBO, amortized"] = row(self.amortized_elbo, self.amortized_elbo_se)
        rows["ELBO, best in family"] = row(self.family_elbo, self.family_elbo_se)
        if self.richer_elbo is not None:
            rows[f"ELBO, best {self.richer_family}"] = row(self.richer_elbo, self.richer_elbo_se)
        rows["inference gap"] = row(self.inference_gap, self.inference_gap_se)
        rows["approximation gap"] = row(self.approximation_gap, self.approximation_gap_se)
        rows["amortization gap"] = row(self.amortization_gap, self.amortization_gap_se)
        if self.richer_elbo is not None:
            rows[f"gap left by {self.richer_family}"] = row(self.richer_gap, self.richer_gap_se)
        return rows

    def to_string(self) -> str:
        """Format the :meth:`table` as aligned text, with convergence and the closed fraction."""
        rows = self.table()
        width = max(len(name) for name in rows)
        lines = [f"{'nats per point':<{width}}      mean         se"]
        lines += [f"{name:<{width}}  {mean:9.4f}  {se:9.4f}" for name, (mean, se) in rows.items()]
        if self.richer_elbo is not None:
            lines.append(
                f"{self.richer_family} closes {self.fraction_closed:.1%} of the approximation gap"
            )
        lines.append(
            f"{self.num_points} points; per-point fits converged: "
            f"{self.family_converged.mean():.0%} (family)"
            + (
                f", {self.richer_converged.mean():.0%} ({self.richer_family})"
                if self.richer_converged is not None
                else ""
            )
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        """Return :meth:`to_string`."""
        return self.to_string()

    def __repr__(self) -> str:
        """Return a one-line summary: number of points and mean gaps."""
        text = (
            f"InferenceGaps(points={self.num_points}, approximation_gap="
            f"{self.approximation_gap.mean():.3f}, amortization_gap="
            f"{self.amortization_gap.mean():.3f}"
        )
        if self.richer_elbo is not None:
            text += f", {self.richer_family}_gap={self.richer_gap.mean():.3f}"
        return text + ")"

    def plot(self, kind: str = "bars", ax=None, max_points: int = 40):
        """Plot the gaps per point (stacked bars) or across points (histograms).

        See :func:`pyro_vi_ext.diagnostics.gap_plots.plot_inference_gaps`.
        """
        from pyro_vi_ext.diagnostics.gap_plots import plot_inference_gaps

        return plot_inference_gaps(self, kind=kind, ax=ax, max_points=max_points)


# -- the guide's family, re-parameterized per point ---------------------------------------------


def _normal_parts(site_name: str, fn: Distribution) -> tuple[Normal, int]:
    """Return the base Normal of ``Normal`` or ``Independent(Normal)``, and its event dims."""
    event_dim = 0
    base = fn
    while isinstance(base, Independent):
        event_dim += base.reinterpreted_batch_ndims
        base = base.base_dist
    if not isinstance(base, Normal) or event_dim != fn.event_dim:
        raise ValueError(
            f"Guide site '{site_name}' is {type(fn).__name__}; inference_gaps re-fits per point "
            "only Normal and Independent(Normal) guide sites (e.g. dist.Normal(loc, scale)"
            ".to_event(1)), whose family it can re-parameterize. Discrete, Delta, transformed, "
            "masked and other guide distributions are refused: rewrite the site as a Normal, or "
            "compare log p(x) with the amortized ELBO only (log_evidence)."
        )
    return base, event_dim


class _SiteFamily:
    """Free per-point parameters of one guide site and the distribution they define."""

    def __init__(self, name: str, fn: Distribution, family: str, start: _SiteFamily | None = None):
        base, event_dim = _normal_parts(name, fn)
        loc, scale = torch.broadcast_tensors(base.loc.detach(), base.scale.detach())
        if start is not None:  # a fitted factorized member: the richer family starts there
            loc, scale = start.loc.detach(), start.log_scale.detach().exp()
        self.name = name
        self.family = family
        self.event_dim = event_dim
        self.loc = loc.clone().requires_grad_(True)
        if family == "factorized":
            self.log_scale = scale.log().clone().requires_grad_(True)
            self.parameters = [self.loc, self.log_scale]
            return
        if event_dim != 1:
            raise ValueError(
                f"Guide site '{name}' has {event_dim} event dims; the full-covariance family "
                "needs exactly one (a vector latent, dist.Normal(loc, scale).to_event(1))."
            )
        size = loc.shape[-1]
        self.log_diagonal = scale.log().clone().requires_grad_(True)
        self.lower = loc.new_zeros(loc.shape + (size,)).requires_grad_(True)
        self.parameters = [self.loc, self.log_diagonal, self.lower]

    def distribution(self) -> Distribution:
        if self.family == "factorized":
            normal = dist.Normal(self.loc, self.log_scale.exp())
            return normal.to_event(self.event_dim) if self.event_dim else normal
        scale_tril = torch.tril(self.lower, diagonal=-1) + torch.diag_embed(self.log_diagonal.exp())
        return dist.MultivariateNormal(self.loc, scale_tril=scale_tril)


class _SubstituteGuideSites(Messenger):
    """Replace the distribution of named guide sites by per-point free-parameter distributions.

    Applied between the particle plate (outside) and the guide's own plates (inside): the
    guide's plates have broadcast the site's distribution when this messenger sees it, the
    particle plate broadcasts the replacement afterwards.
    """

    def __init__(self, families: dict[str, _SiteFamily]):
        super().__init__()
        self.families = families

    def _pyro_sample(self, msg) -> None:
        family = self.families.get(msg["name"])
        if family is None or msg["is_observed"]:
            return
        replacement = family.distribution()
        batch_shape = msg["fn"].batch_shape
        if replacement.batch_shape != batch_shape:
            replacement = replacement.expand(batch_shape)
        msg["fn"] = replacement


# -- per chunk of points -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Call:
    model: Callable
    guide: Callable
    args: tuple
    kwargs: dict
    nesting: int
    vectorize: bool = True


def _site_families(
    call: _Call, family: str, start: dict[str, _SiteFamily] | None = None
) -> dict[str, _SiteFamily]:
    with poutine.block(), torch.no_grad():
        trace = poutine.trace(call.guide).get_trace(*call.args, **call.kwargs)
    trace = prune_subsample_sites(trace)
    families = {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"]:
            continue
        if not site["fn"].has_rsample:
            raise ValueError(
                f"Guide site '{name}' ({type(site['fn']).__name__}) has no rsample; the per-point "
                "fit optimizes reparameterized ELBO estimates and needs a Normal guide site."
            )
        families[name] = _SiteFamily(name, site["fn"], family, (start or {}).get(name))
    if not families:
        raise ValueError("The guide has no latent sample site: there is no gap to decompose.")
    return families


def _log_weights(call: _Call, guide: Callable, num_particles: int) -> torch.Tensor:
    weights = trace_particles(
        call.model,
        guide,
        call.args,
        call.kwargs,
        num_particles=num_particles,
        plate_nesting=call.nesting,
        vectorize=call.vectorize,
    )
    return weights.log_weights


def _elbo_draws(call: _Call, guide: Callable, num_samples: int, chunk: int) -> np.ndarray:
    """``[S, P]`` float64 log-weights of ``num_samples`` draws, in blocks of ``chunk``."""
    blocks, done = [], 0
    with torch.no_grad(), poutine.block():
        while done < num_samples:
            size = min(chunk, num_samples - done)
            blocks.append(_log_weights(call, guide, size).double().cpu().numpy())
            done += size
    return np.concatenate(blocks)


def _mean_and_se(draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return draws.mean(0), draws.std(0, ddof=1) / math.sqrt(draws.shape[0])


@dataclass(frozen=True)
class _FitSettings:
    max_steps: int
    learning_rate: float
    num_particles: int
    check_every: int
    tolerance: float
    num_rate_drops: int


class _Adam:
    r"""Adam [3]_ on a list of leaf tensors, updated in place.

    :math:`m \leftarrow \beta_1 m + (1 - \beta_1) g`, :math:`v \leftarrow \beta_2 v + (1 - \beta_2)
    g^2`, :math:`\theta \leftarrow \theta - \eta\, \hat m / (\sqrt{\hat v} + \epsilon)` with the
    bias corrections :math:`\hat m = m / (1 - \beta_1^t)`, :math:`\hat v = v / (1 - \beta_2^t)`.
    (Written out because constructing ``torch.optim.Adam`` imports ``torch._dynamo``, seconds of
    start-up for a few hundred steps on small tensors.)

    References
    ----------
    .. [3] D. P. Kingma, J. Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015.
    """

    def __init__(self, parameters: list[torch.Tensor], learning_rate: float):
        self.parameters = parameters
        self.learning_rate = learning_rate
        self.betas = (0.9, 0.999)
        self.eps = 1e-8
        self.steps = 0
        self.first = [torch.zeros_like(p) for p in parameters]
        self.second = [torch.zeros_like(p) for p in parameters]

    @torch.no_grad()
    def step(self, gradients: Sequence[torch.Tensor]) -> None:
        self.steps += 1
        beta1, beta2 = self.betas
        correction1 = 1.0 - beta1**self.steps
        correction2 = 1.0 - beta2**self.steps
        for parameter, gradient, first, second in zip(
            self.parameters, gradients, self.first, self.second, strict=True
        ):
            first.mul_(beta1).add_(gradient, alpha=1.0 - beta1)
            second.mul_(beta2).addcmul_(gradient, gradient, value=1.0 - beta2)
            denominator = (second / correction2).sqrt_().add_(self.eps)
            parameter.addcdiv_(first, denominator, value=-self.learning_rate / correction1)


def _fit(call: _Call, families: dict[str, _SiteFamily], settings: _FitSettings):
    """Maximize the per-point ELBO over the free parameters with Adam [3]_.

    Every ``check_every`` steps the ELBO averaged over the window (and over the chunk's points)
    is compared with the previous window; an improvement below ``tolerance`` nats per point is a
    plateau, met by dividing the learning rate by 10, and after ``num_rate_drops`` drops the next
    plateau ends the fit as converged. Points are independent and Adam acts per coordinate, so the
    joint fit of a chunk is the per-point fit of each of its points.

    References
    ----------
    .. [3] D. P. Kingma, J. Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015.
    """
    guide = _SubstituteGuideSites(families)(call.guide)
    parameters = [p for family in families.values() for p in family.parameters]
    adam = _Adam(parameters, settings.learning_rate)
    window: list[torch.Tensor] = []
    previous: float | None = None
    drops = 0
    # the model and guide were validated once by _check_points; per-step checks cost more than
    # the step itself on small models
    with poutine.block(), pyro.validation_enabled(False):
        for step in range(1, settings.max_steps + 1):
            per_point = _log_weights(call, guide, settings.num_particles).mean(0)
            adam.step(torch.autograd.grad(-per_point.sum(), parameters))
            window.append(per_point.detach().mean())
            if step % settings.check_every:
                continue
            current = float(torch.stack(window).mean())
            window.clear()
            if previous is not None and current - previous < settings.tolerance:
                if drops == settings.num_rate_drops:
                    return True, step
                drops += 1
                adam.learning_rate /= 10.0
            previous = current
    return False, settings.max_steps


def _chunk_args(data: torch.Tensor | Sequence[torch.Tensor], rows: slice) -> tuple:
    if isinstance(data, torch.Tensor):
        return (data[rows],)
    return tuple(tensor[rows] for tensor in data)


def _num_rows(data: torch.Tensor | Sequence[torch.Tensor]) -> int:
    tensors = (data,) if isinstance(data, torch.Tensor) else tuple(data)
    if not tensors or any(not isinstance(t, torch.Tensor) for t in tensors):
        raise ValueError("data must be a tensor or a tuple of tensors with the points on dim 0")
    sizes = {int(t.shape[0]) for t in tensors}
    if len(sizes) != 1:
        raise ValueError(f"the data tensors differ in their number of rows: {sorted(sizes)}")
    return sizes.pop()


def _check_positive_int(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def inference_gaps(
    model: Callable,
    guide: Callable,
    data: torch.Tensor | Sequence[torch.Tensor],
    *args,
    richer_family: RicherFamily | None = None,
    iw_num_particles: int | None = None,
    num_evidence_samples: int = 5000,
    num_elbo_samples: int = 1000,
    evidence_proposal: EvidenceProposal | None = None,
    max_steps: int = 3000,
    learning_rate: float = 0.02,
    num_fit_particles: int = 16,
    check_every: int = 100,
    tolerance: float = 1e-3,
    num_rate_drops: int = 2,
    point_chunk_size: int = 256,
    sample_chunk_size: int = 1000,
    check_evidence_tail: bool = True,
    max_plate_nesting: int | None = None,
    vectorize_particles: VectorizeParticles = "auto",
    **kwargs,
) -> InferenceGaps:
    r"""Decompose each data point's inference gap into approximation and amortization gaps [1]_.

    Per data point :math:`x_n` (every latent must live in the data plate, as in a VAE):

    * :math:`\log p(x_n)` by importance sampling with ``num_evidence_samples`` draws
      (:func:`pyro_vi_ext.diagnostics.log_evidence`, the IWAE bound at large ``K`` [2]_);
    * the amortized ELBO :math:`\mathbb E_{q_\phi}[\log p(x_n, z) - \log q_\phi(z \mid x_n)]` and,
      with ``iw_num_particles=K``, the amortized :math:`\mathrm{IWAE}_K`;
    * the best-in-family ELBO :math:`\max_{q \in \mathcal Q} \mathrm{ELBO}(q; x_n)`: the guide is
      traced once, each latent site's ``Normal(loc, scale)`` (or ``Independent(Normal)``) is given
      free per-point ``loc`` and ``log scale`` started at the encoder's output, and the per-point
      ELBO is maximized with Adam on ``num_fit_particles`` reparameterized draws per step, up to
      ``max_steps`` steps with a plateau test every ``check_every`` steps (see ``tolerance``);
    * optionally, with ``richer_family="full_covariance"``, the same for
      ``MultivariateNormal(loc, scale_tril)`` per point and site, started at the fitted best
      factorized member (so its fit can only improve on it, up to Monte Carlo noise).

    Then approximation gap :math:`= \log p(x_n) - \max_{\mathcal Q}`, amortization gap
    :math:`= \max_{\mathcal Q} - \mathrm{ELBO}(q_\phi)`. Each ELBO is re-estimated after the fit
    with ``num_elbo_samples`` fresh draws, and standard errors combine independent draws.

    Points are processed in chunks of ``point_chunk_size``, each chunk vectorized (all its points
    fitted jointly: they are independent, so the sum of their ELBOs is maximized point by point).
    ``data`` (a tensor, or a tuple of tensors with the points on dim 0) is sliced into chunks and
    the model and guide are called as ``model(*chunk, *args, **kwargs)``. The model's parameters
    are not changed.

    Parameters
    ----------
    model, guide
        Pyro model and amortized guide; the guide's latent sites must be Normal or
        Independent(Normal) (others are refused with the site's name).
    data
        The data points, a tensor ``[N, ...]`` or a tuple of such tensors.
    *args, **kwargs
        Further arguments of model and guide, the same for every chunk.
    richer_family
        ``None`` or ``"full_covariance"`` (vector latents only, one event dim).
    iw_num_particles
        ``K`` of the amortized IWAE bound to report (``None``: not reported).
    num_evidence_samples
        Importance samples behind :math:`\log p(x_n)`.
    num_elbo_samples
        Draws behind each reported ELBO (and ``num_elbo_samples // K`` independent IWAE bounds).
    evidence_proposal
        Proposal of the evidence estimate: ``"amortized"``, ``"family"`` or ``"richer"``; by
        default the richest fitted guide, whose weights have the least variance.
    max_steps, learning_rate, num_fit_particles, check_every, tolerance, num_rate_drops
        The per-point fit: Adam step budget, initial learning rate, draws per step, steps per
        plateau test, the improvement (nats per point, averaged over the chunk) below which a
        window counts as a plateau, and how many plateaus divide the learning rate by 10 before
        the next one ends the fit.
    point_chunk_size, sample_chunk_size
        Points per chunk, and particles per vectorized evaluation run.
    check_evidence_tail
        Also fit PSIS :math:`\hat k` to the evidence proposal's weights (up to 4000 more draws
        per point) and warn when it exceeds 0.7 for some point.
    max_plate_nesting
        The model's plate nesting (guessed from one run when omitted).
    vectorize_particles
        As in :func:`~pyro_vi_ext.diagnostics.log_evidence`, for every evaluation and the
        per-point fits (``"auto"`` settles it once, on the first chunk of points; the sequential
        path runs ``num_fit_particles`` model runs per fit step, so it is much slower).

    Returns
    -------
    InferenceGaps

    References
    ----------
    .. [1] C. Cremer, X. Li, D. Duvenaud, "Inference Suboptimality in Variational Autoencoders",
       ICML 2018.
    .. [2] Y. Burda, R. Grosse, R. Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016.

    Examples
    --------
    ::

        gaps = inference_gaps(vae.model, vae.guide, x_test[:100], richer_family="full_covariance",
                              iw_num_particles=50)
        print(gaps)            # table of means with standard errors
        gaps.plot(kind="bars")
    """
    num_points = _num_rows(data)
    _check_positive_int(
        num_evidence_samples=num_evidence_samples,
        num_elbo_samples=num_elbo_samples,
        max_steps=max_steps,
        num_fit_particles=num_fit_particles,
        check_every=check_every,
        point_chunk_size=point_chunk_size,
        sample_chunk_size=sample_chunk_size,
    )
    if num_evidence_samples < 2 or num_elbo_samples < 2:
        raise ValueError("num_evidence_samples and num_elbo_samples must be at least 2")
    if richer_family not in (None, "full_covariance"):
        raise ValueError(f"richer_family must be None or 'full_covariance', got {richer_family!r}")
    if iw_num_particles is not None:
        _check_positive_int(iw_num_particles=iw_num_particles)
        if num_elbo_samples // iw_num_particles < 2:
            raise ValueError(
                f"num_elbo_samples={num_elbo_samples} gives fewer than 2 independent IWAE bounds "
                f"at K={iw_num_particles}; raise num_elbo_samples to at least "
                f"{2 * iw_num_particles}"
            )
    if evidence_proposal is None:
        evidence_proposal = "richer" if richer_family else "family"
    if evidence_proposal not in ("amortized", "family", "richer"):
        raise ValueError(
            "evidence_proposal must be 'amortized', 'family' or 'richer', got "
            f"{evidence_proposal!r}"
        )
    if evidence_proposal == "richer" and richer_family is None:
        raise ValueError("evidence_proposal='richer' needs a richer_family")
    settings = _FitSettings(
        max_steps=max_steps,
        learning_rate=float(learning_rate),
        num_particles=num_fit_particles,
        check_every=check_every,
        tolerance=float(tolerance),
        num_rate_drops=int(num_rate_drops),
    )

    columns: dict[str, list[np.ndarray]] = {}
    for start in range(0, num_points, point_chunk_size):
        rows = slice(start, min(start + point_chunk_size, num_points))
        call_args = _chunk_args(data, rows) + tuple(args)
        nesting = (
            int(max_plate_nesting)
            if max_plate_nesting is not None
            else guess_plate_nesting(model, guide, call_args, kwargs)
        )
        if not isinstance(vectorize_particles, bool):
            vectorize_particles = settle_vectorize(
                model, guide, call_args, kwargs, nesting, vectorize_particles
            )  # settled on the first chunk, kept for the others
        call = _Call(model, guide, call_args, dict(kwargs), nesting, vectorize_particles)
        chunk = _chunk_gaps(
            call,
            rows.stop - rows.start,
            settings,
            richer_family=richer_family,
            iw_num_particles=iw_num_particles,
            num_elbo_samples=num_elbo_samples,
            num_evidence_samples=num_evidence_samples,
            evidence_proposal=evidence_proposal,
            sample_chunk_size=sample_chunk_size,
            check_evidence_tail=check_evidence_tail,
        )
        for name, values in chunk.items():
            columns.setdefault(name, []).append(np.asarray(values))
    merged = {name: np.concatenate(parts) for name, parts in columns.items()}
    khat = merged.get("evidence_khat")
    if khat is not None and np.any(khat > 0.7):
        advice = (
            "Raise num_evidence_samples, and read those points' approximation gaps as lower bounds."
            if evidence_proposal == "richer"
            else "Fit a richer family (richer_family='full_covariance'), the default proposal then."
        )
        warnings.warn(
            f"The evidence proposal ('{evidence_proposal}') has PSIS k-hat above 0.7 for "
            f"{int(np.sum(khat > 0.7))} of {len(khat)} points (see evidence_khat): log p(x), "
            f"and hence the approximation gap, is unreliable there (biased low). {advice}",
            UserWarning,
            stacklevel=2,
        )
    return InferenceGaps(
        num_evidence_samples=num_evidence_samples,
        num_elbo_samples=num_elbo_samples,
        evidence_proposal=evidence_proposal,
        richer_family=richer_family,
        iw_num_particles=iw_num_particles,
        **merged,
    )


def _iw_bounds(draws: np.ndarray, num_particles: int) -> np.ndarray:
    """``[R, P]`` independent IWAE bounds from ``[S, P]`` log-weights, ``R = S // K``."""
    repeats = draws.shape[0] // num_particles
    grouped = draws[: repeats * num_particles].reshape(repeats, num_particles, -1)
    peak = grouped.max(1, keepdims=True)
    log_sum = np.log(np.exp(grouped - peak).sum(1)) + peak[:, 0]
    return log_sum - math.log(num_particles)


def _check_points(call: _Call, expected: int) -> None:
    with torch.no_grad(), poutine.block():
        weights = trace_particles(
            call.model,
            call.guide,
            call.args,
            call.kwargs,
            num_particles=1,
            plate_nesting=call.nesting,
            vectorize=call.vectorize,
        )
    if weights.num_points != expected:
        plates = [plate.name for plate in weights.point_plates] or "none"
        raise ValueError(
            f"A chunk of {expected} data points gave {weights.num_points} per-point terms (shared "
            f"data plates: {plates}). inference_gaps needs every latent and observed site inside "
            "one data plate over the rows of data (local latents, as in a VAE); a model with "
            "global latents has no per-point gaps."
        )


def _chunk_gaps(
    call: _Call,
    num_points: int,
    settings: _FitSettings,
    *,
    richer_family: str | None,
    iw_num_particles: int | None,
    num_elbo_samples: int,
    num_evidence_samples: int,
    evidence_proposal: str,
    sample_chunk_size: int,
    check_evidence_tail: bool,
) -> dict[str, np.ndarray]:
    """Every per-point column of :class:`InferenceGaps` for one chunk of points."""
    # public names whose home module may move
    from pyro_vi_ext.diagnostics import log_evidence, psis_diagnostic

    _check_points(call, num_points)
    columns: dict[str, np.ndarray] = {}
    guides: dict[str, Callable] = {"amortized": call.guide}
    draws = _elbo_draws(call, call.guide, num_elbo_samples, sample_chunk_size)
    columns["amortized_elbo"], columns["amortized_elbo_se"] = _mean_and_se(draws)
    if iw_num_particles is not None:
        columns["iw_bound"], columns["iw_bound_se"] = _mean_and_se(
            _iw_bounds(draws, iw_num_particles)
        )
    fits = [("family", "factorized")]
    if richer_family is not None:
        fits.append(("richer", richer_family))
    fitted_family: dict[str, _SiteFamily] | None = None
    for label, family in fits:
        families = _site_families(call, family, start=fitted_family)
        converged, steps = _fit(call, families, settings)
        fitted_family = families
        fitted = _SubstituteGuideSites(families)(call.guide)
        guides[label] = fitted
        draws = _elbo_draws(call, fitted, num_elbo_samples, sample_chunk_size)
        columns[f"{label}_elbo"], columns[f"{label}_elbo_se"] = _mean_and_se(draws)
        columns[f"{label}_converged"] = np.full(num_points, converged)
        columns[f"{label}_steps"] = np.full(num_points, steps)
    with poutine.block():
        evidence = log_evidence(
            call.model,
            guides[evidence_proposal],
            *call.args,
            num_samples=num_evidence_samples,
            chunk_size=sample_chunk_size,
            max_plate_nesting=call.nesting,
            vectorize_particles=call.vectorize,
            **call.kwargs,
        )
        if check_evidence_tail:
            columns["evidence_khat"] = psis_diagnostic(
                call.model,
                guides[evidence_proposal],
                *call.args,
                num_samples=min(num_evidence_samples, 4000),
                chunk_size=sample_chunk_size,
                max_plate_nesting=call.nesting,
                vectorize_particles=call.vectorize,
                **call.kwargs,
            ).khat
    columns["log_evidence"] = evidence.per_point
    columns["log_evidence_se"] = evidence.per_point_se
    return columns
