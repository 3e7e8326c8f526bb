"""The decomposed ELBO (beta-TCVAE loss) and the exact full-dataset decomposition (ELBO surgery)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import pyro.poutine as poutine
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from pyro.poutine.util import prune_subsample_sites

from pyro_vi_ext.infer._decomposition import (
    ESTIMATORS,
    CodeLayout,
    SampleTerms,
    check_code_sites,
    code_blocks,
    code_log_densities,
    code_scale,
    exact_log_aggregate,
    find_code_layout,
    minibatch_log_aggregate,
    user_scale,
)
from pyro_vi_ext.infer._loss_base import ParticleELBO
from pyro_vi_ext.infer._weights import ParticleWeights, guess_plate_nesting, trace_particles

Estimator = Literal["mss", "mws"]
Weight = float | Callable[[int], float]
TERMS = ("reconstruction", "index_code_mi", "total_correlation", "dimwise_kl", "elbo")


def _check_weight(name: str, weight: Weight) -> Weight:
    if callable(weight):
        return weight
    try:
        value = float(weight)
    except (TypeError, ValueError):
        raise TypeError(
            f"{name} must be a number or a callable of the step, got {weight!r}"
        ) from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {weight!r}")
    return value


class DecomposedELBO(ParticleELBO):
    r"""The ELBO split into reconstruction, index-code MI, total correlation and dimension-wise KL,
    with weights on the last three (beta-TCVAE [1]), as a Pyro loss.

    For a data point :math:`n` with code :math:`z \sim q(z \mid x_n)` (the guide's latent sites in
    the data plate, concatenated into :math:`D` scalars) and aggregate posterior
    :math:`q(z) = \frac1N \sum_n q(z \mid x_n)`, the ELBO decomposes [1, 2] as

    .. math::

        \mathcal{L}(x_n) = \underbrace{\mathbb{E}[\log p(x_n, y \mid z) - \log q(y)]}_{
            \text{reconstruction}}
        - \underbrace{\mathbb{E}[\log q(z \mid x_n) - \log q(z)]}_{\text{index-code MI}}
        - \underbrace{\mathbb{E}[\log q(z) - \textstyle\sum_d \log q(z_d)]}_{\text{TC}}
        - \underbrace{\mathbb{E}[\textstyle\sum_d \log q(z_d) - \log p(z)]}_{\text{dim-wise KL}},

    where :math:`y` stands for every other latent (its log-density ratio counts as reconstruction),
    and the loss is

    .. math::

        -\frac{N}{B} \sum_{i \in \text{batch}} \frac1S \sum_{s=1}^S
        \big[\text{rec}_i - \alpha\, \text{MI}_i - \beta\, \text{TC}_i - \gamma\, \text{DWKL}_i\big]
        ^{(s)},

    with :math:`N` the data plate's full size (or ``dataset_size``) and :math:`B` its batch size.
    :math:`\log q(z_i)` and :math:`\log q(z_{i,d})` are estimated from the batch through the
    ``[B, B, D]`` tensor :math:`\log q(z_{i,d} \mid x_j)` [1, Sec. 3, App. C]:

    * ``"mss"`` (minibatch stratified sampling): :math:`\log q(z_i) \approx \log \sum_j W_{ij}\,
      q(z_i \mid x_j)` and :math:`\log q(z_{i,d}) \approx \log \sum_j W_{ij}\, q(z_{i,d} \mid
      x_j)`, where, with :math:`M = B - 1`, :math:`W_{ii} = 1/N`, :math:`W_{i,(i+1) \bmod B} =
      (N - M)/(N M)` (the stratum sample) and :math:`W_{ij} = 1/M` otherwise; every row sums to one
      (the reference code's matrix fills a column instead of the diagonal, so its rows do not), and
      :math:`\log W` enters once per density, not once per dimension of the joint;
    * ``"mws"`` (minibatch weighted sampling), the paper's form: :math:`\log q(z_i) \approx
      \operatorname{logsumexp}_j \log q(z_i \mid x_j) - \log(N B)`, and the same per dimension.
      Its constant shifts the reported MI by :math:`+\log N` and the TC by :math:`+(D-1)\log N`
      relative to the aggregate-posterior quantities (gradients are unaffected); prefer ``"mss"``
      to report the terms.

    Special cases and properties:

    * ``alpha = beta = gamma = 1`` is the ordinary ELBO (``Trace_ELBO``) on the same samples: same
      value and gradient; the reported terms still sum to it exactly;
    * ``alpha = gamma = 1`` is beta-TCVAE [1]; ``alpha = beta = gamma`` is beta-VAE [3];
    * with MSS every sample's MI estimate is at most :math:`\log N` (the own point has weight
      :math:`1/N`); :func:`elbo_surgery` computes the terms exactly over the whole dataset.

    Weights may be schedules: a callable of the step, evaluated at the step last given to
    :meth:`set_step` (0 until then). A training loop calls ``loss.set_step(global_step)`` before
    each step; nothing is counted internally, so evaluation calls never advance a schedule.

    Validity: the guide's code sites must be reparameterizable (``rsample``) and factorized
    (``Independent`` of univariate distributions, e.g. ``dist.Normal(loc, s).to_event(1)``) or
    Gaussian (``MultivariateNormal``, ``LowRankMultivariateNormal``, whose exact 1-D marginals are
    used); anything else raises naming the site. Every other guide latent must be
    reparameterizable too. :math:`N` is the data plate's full size (``pyro.plate("data", N,
    subsample=idx)`` or ``subsample_size=B``), overridden by ``dataset_size``, which then also
    sets the loss scale :math:`N/B`; a plate that is not subsampled and no ``dataset_size`` gives
    :math:`N = B` (with a warning, since the estimators then treat the batch as the dataset).
    Batch size 1 with ``"mss"``, or :math:`B > N`, raises. Latents outside the data plate are
    allowed when the plate is not subsampled (their log-density ratio counts as reconstruction);
    with a subsampled plate they raise, as no per-point minibatch bound exists for them.
    The ``[B, B, D]`` computation is done ``chunk_size`` rows at a time and nothing of size
    :math:`B^2` is kept for the backward: a factorized Normal code goes through a fused kernel
    (chunked forward, analytic chunked backward, blocks of :math:`2^{17}` elements; at
    :math:`B = 2048, D = 10` a training step grows memory by tens of MB where the dense tensor alone
    is 168 MB); other families evaluate their ``log_prob`` on checkpointed blocks of
    :math:`2^{22}` elements. Should a density ratio within a batch exceed the float range, the
    fused kernel hands over to the log-sum-exp path.

    After each call :attr:`last_terms` holds ``reconstruction``, ``index_code_mi``,
    ``total_correlation``, ``dimwise_kl`` and ``elbo`` (nats per data point, unweighted, on the
    step's samples; ``elbo`` = reconstruction - MI - TC - dim-wise KL = -loss / N when all weights
    are 1). :meth:`loss_terms` computes them without a gradient.

    Example::

        from pyro.infer import SVI
        from pyro_vi_ext import DecomposedELBO

        loss = DecomposedELBO(beta=6.0, estimator="mss", num_particles=1)
        svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), loss=loss)
        for step, idx in enumerate(batches):          # idx: rows of the minibatch
            loss.set_step(step)
            svi.step(x[idx], idx=idx, n_data=len(x))  # plate("data", n_data, subsample=idx)
            print(loss.last_terms["total_correlation"])

        # annealing: a weight may be a callable of the step
        loss = DecomposedELBO(beta=lambda step: 1.0 + 5.0 * min(1.0, step / 10_000))

    :param alpha: weight of the index-code mutual information (number or callable of the step).
    :param beta: weight of the total correlation.
    :param gamma: weight of the dimension-wise KL.
    :param estimator: ``"mss"`` or ``"mws"``.
    :param num_particles: particles ``S`` per data point (vectorized).
    :param code_sites: names of the guide sites forming the code (default: every guide latent in
        the data plate, concatenated in trace order).
    :param data_plate: name of the plate over data points (default: the subsampled plate holding
        guide latents, or the only plate holding them).
    :param dataset_size: the dataset size ``N`` (default: the data plate's full size).
    :param chunk_size: rows of the ``[B, B, D]`` tensor per block (default: automatic).
    :param max_plate_nesting: the model's plate nesting, without the particle plate; guessed by one
        extra run of model and guide when omitted.
    :param vectorize_particles: must be True (particles are always vectorized).
    :param retain_graph: passed to ``backward`` in ``loss_and_grads``.

    References

    [1] R. T. Q. Chen, X. Li, R. Grosse, D. Duvenaud, "Isolating Sources of Disentanglement in
        Variational Autoencoders", NeurIPS 2018.
    [2] M. D. Hoffman, M. J. Johnson, "ELBO surgery: yet another way to carve up the variational
        evidence lower bound", NIPS 2016 Workshop on Advances in Approximate Bayesian Inference.
    [3] I. Higgins et al., "beta-VAE: Learning Basic Visual Concepts with a Constrained Variational
        Framework", ICLR 2017.
    """

    def __init__(
        self,
        alpha: Weight = 1.0,
        beta: Weight = 1.0,
        gamma: Weight = 1.0,
        estimator: Estimator = "mss",
        num_particles: int = 1,
        code_sites: Sequence[str] | None = None,
        data_plate: str | None = None,
        dataset_size: int | None = None,
        chunk_size: int | None = None,
        max_plate_nesting: int | None = None,
        vectorize_particles: bool = True,
        retain_graph: bool | None = None,
    ):
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if dataset_size is not None and (
            isinstance(dataset_size, bool) or int(dataset_size) != dataset_size or dataset_size < 1
        ):
            raise ValueError(f"dataset_size must be a positive int, got {dataset_size!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            retain_graph=retain_graph,
        )
        self.alpha = _check_weight("alpha", alpha)
        self.beta = _check_weight("beta", beta)
        self.gamma = _check_weight("gamma", gamma)
        self.estimator: Estimator = estimator
        self.code_sites = (code_sites,) if isinstance(code_sites, str) else code_sites
        self.data_plate = data_plate
        self.dataset_size = None if dataset_size is None else int(dataset_size)
        self.chunk_size = chunk_size
        self.step = 0
        self._warned_unsubsampled = False

    # -- schedules --------------------------------------------------------------------------
    def set_step(self, step: int) -> None:
        """Set the training step at which callable weights are evaluated."""
        self.step = int(step)

    def current_weights(self) -> dict[str, float]:
        """``{"alpha", "beta", "gamma"}`` at the current step."""
        weights = {}
        for name in ("alpha", "beta", "gamma"):
            weight = getattr(self, name)
            value = float(weight(self.step)) if callable(weight) else weight
            if not math.isfinite(value):
                raise ValueError(f"{name} schedule gave {value} at step {self.step}")
            weights[name] = value
        return weights

    # -- the Pyro contract ------------------------------------------------------------------
    def differentiable_loss(
        self, model: Callable, guide: Callable, *args, **kwargs
    ) -> torch.Tensor:
        """The negative weighted objective as a scalar tensor (reparameterized gradient)."""
        weights_now = self.current_weights()
        nesting = self._model_plate_nesting(model, guide, args, kwargs)
        num_particles = self.num_particles
        weights = trace_particles(
            model, guide, args, kwargs, num_particles=num_particles, plate_nesting=nesting
        )
        model_trace, guide_trace = weights.model_trace, weights.guide_trace
        layout = find_code_layout(model_trace, guide_trace, self.data_plate, self.code_sites)
        check_code_sites(model_trace, guide_trace, layout)
        n = self._dataset_size(layout)
        scale = self._loss_scale(weights, layout, n)
        c_code = code_scale(model_trace, guide_trace, layout)

        log_q_code, log_p_code = code_log_densities(
            model_trace, guide_trace, layout, nesting + 1, num_particles
        )
        blocks = code_blocks(guide_trace, layout, nesting + 1)
        extra = {
            "index_code_mi": 1.0 - weights_now["alpha"],
            "total_correlation": 1.0 - weights_now["beta"],
            "dimwise_kl": 1.0 - weights_now["gamma"],
        }
        needs_grad = torch.is_grad_enabled() and any(c != 0.0 for c in extra.values())
        with torch.set_grad_enabled(needs_grad):
            log_agg, log_marg = minibatch_log_aggregate(blocks, self.estimator, n, self.chunk_size)
        terms = SampleTerms(log_q_code, log_p_code, log_agg, log_marg.sum(-1))

        # objective = log w + sum_t (1 - weight_t) * term_t: exactly the ELBO when weights are 1
        log_w = weights.log_weights.sum(-1)  # [S]
        objective = log_w
        for name, coefficient in extra.items():
            if coefficient != 0.0:
                objective = objective + (c_code * coefficient) * getattr(terms, name).sum(-1)
        value = -scale * objective.mean()
        self._record_terms(terms, log_w, c_code, scale / n)
        return value

    def loss_terms(self, model: Callable, guide: Callable, *args, **kwargs) -> dict[str, float]:
        """The decomposition on one fresh batch of samples, without a gradient: a dict with keys
        ``reconstruction``, ``index_code_mi``, ``total_correlation``, ``dimwise_kl``, ``elbo``
        (nats per data point). Also sets :attr:`last_terms`."""
        with torch.no_grad():
            self.differentiable_loss(model, guide, *args, **kwargs)
        return dict(self.last_terms)

    # -- bookkeeping ------------------------------------------------------------------------
    def _dataset_size(self, layout: CodeLayout) -> int:
        if self.dataset_size is not None:
            n = self.dataset_size
        else:
            n = layout.full_size
            if not layout.subsampled and not self._warned_unsubsampled:
                self._warned_unsubsampled = True
                warnings.warn(
                    f"Data plate '{layout.plate}' is not subsampled, so DecomposedELBO takes the "
                    f"dataset size N = {n}, its size. If each call sees a minibatch of a larger "
                    "dataset, pass dataset_size=N or subsample the plate "
                    "(pyro.plate(name, N, subsample=idx)): the MI and TC estimators need N.",
                    stacklevel=3,
                )
        b = layout.size
        if b > n:
            raise ValueError(
                f"Batch size B = {b} (plate '{layout.plate}') exceeds the dataset size N = {n}"
                + (" given as dataset_size" if self.dataset_size is not None else "")
                + "; the minibatch estimators need B <= N."
            )
        if self.estimator == "mss" and b < 2:
            raise ValueError(
                f"Batch size {b} with estimator='mss': minibatch stratified sampling needs at "
                "least 2 points per batch (the aggregate posterior is estimated from the other "
                "points). Use a larger batch."
            )
        return n

    def _loss_scale(self, weights: ParticleWeights, layout: CodeLayout, n: int) -> float:
        point_plates = {p.name: p for p in weights.point_plates}
        plate = point_plates.get(layout.plate)
        if plate is None:
            # latents outside the data plate; trace_particles refuses a subsampled data plate then
            if self.dataset_size is not None and self.dataset_size != layout.size:
                raise ValueError(
                    f"dataset_size={self.dataset_size} with latents outside the data plate "
                    f"'{layout.plate}': rescaling the batch to N would also rescale those "
                    "global latents. Subsample the plate in the model instead."
                )
            return weights.scale
        return weights.scale / plate.subsample_factor * (n / layout.size)

    def _record_terms(
        self, terms: SampleTerms, log_w: torch.Tensor, c_code: float, per_point: float
    ) -> None:
        with torch.no_grad():
            mi = c_code * terms.index_code_mi.sum(-1).mean()
            tc = c_code * terms.total_correlation.sum(-1).mean()
            dwkl = c_code * terms.dimwise_kl.sum(-1).mean()
            elbo = log_w.mean()
            recon = elbo + mi + tc + dwkl
            self.last_terms = {
                "reconstruction": float(recon) * per_point,
                "index_code_mi": float(mi) * per_point,
                "total_correlation": float(tc) * per_point,
                "dimwise_kl": float(dwkl) * per_point,
                "elbo": float(elbo) * per_point,
            }


# ==================================================================================== surgery
SURGERY_TERMS = (
    "reconstruction",
    "index_code_mi",
    "total_correlation",
    "dimwise_kl",
    "marginal_kl",
    "elbo",
)


@dataclass(frozen=True)
class SurgeryResult:
    """The exact decomposition of the ELBO over a dataset, with Monte Carlo standard errors.

    ``means[t]`` and ``standard_errors[t]`` for ``t`` in :data:`SURGERY_TERMS` (nats per data
    point): ``reconstruction``, ``index_code_mi``, ``total_correlation``, ``dimwise_kl``,
    ``marginal_kl`` (= TC + dim-wise KL = KL(q(z) || p(z))) and ``elbo``. ``log_num_points`` is
    :math:`\\log N`, the upper bound of the index-code MI.
    """

    means: dict[str, float]
    standard_errors: dict[str, float]
    num_points: int
    num_samples: int
    code_sites: tuple[str, ...]
    code_dim: int
    log_num_points: float = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "log_num_points", math.log(self.num_points))

    def __getitem__(self, term: str) -> tuple[float, float]:
        """``(mean, standard error)`` of a term."""
        return self.means[term], self.standard_errors[term]

    def table(self) -> str:
        """A plain-text table of the terms with their standard errors."""
        lines = [
            f"ELBO surgery: N = {self.num_points}, {self.num_samples} sample(s) per point, "
            f"code {', '.join(self.code_sites)} (D = {self.code_dim}), log N = "
            f"{self.log_num_points:.3f}",
            f"{'term':<20}{'nats/point':>14}{'std. error':>14}",
        ]
        for term in SURGERY_TERMS:
            lines.append(f"{term:<20}{self.means[term]:>14.4f}{self.standard_errors[term]:>14.4f}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_dataframe(self):
        """A ``pandas.DataFrame`` indexed by term with columns ``mean`` and ``se``."""
        import pandas as pd

        return pd.DataFrame(
            {
                "mean": [self.means[t] for t in SURGERY_TERMS],
                "se": [self.standard_errors[t] for t in SURGERY_TERMS],
            },
            index=pd.Index(SURGERY_TERMS, name="term"),
        )


class _PlateIndices(Messenger):
    """Record, and optionally set, the indices of the subsample sites of plates."""

    def __init__(self, indices: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.indices = indices or {}
        self.seen: dict[str, tuple[int, int | None, bool]] = {}

    def _pyro_sample(self, msg) -> None:
        if not isinstance(msg["fn"], _Subsample):
            return
        fn = msg["fn"]
        self.seen.setdefault(msg["name"], (fn.size, fn.subsample_size, msg["value"] is not None))
        if msg["name"] in self.indices:
            msg["value"] = self.indices[msg["name"]]


def _standard_error(values: torch.Tensor) -> float:
    """MC standard error of the mean over ``[S, N]`` per-sample values (independent points)."""
    values = values.double()
    num_samples, num_points = values.shape
    if num_samples > 1:
        within = values.var(0, unbiased=True).sum() / num_samples
        return float(within.sqrt()) / num_points
    # one sample per point: the spread across points bounds the within-point variance from above
    return float(values[0].std(unbiased=True)) / math.sqrt(num_points)


def elbo_surgery(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int = 1,
    batch_size: int | None = None,
    batch_args: Callable[[torch.Tensor], tuple[tuple, dict]] | None = None,
    dataset_size: int | None = None,
    code_sites: Sequence[str] | None = None,
    data_plate: str | None = None,
    chunk_size: int | None = None,
    max_plate_nesting: int | None = None,
    **kwargs,
) -> SurgeryResult:
    r"""Decompose the ELBO of a trained model and guide over a whole dataset, exactly [2].

    Every point :math:`n` of the data plate gets ``num_samples`` codes :math:`z \sim q(z \mid
    x_n)`; the aggregate posterior :math:`q(z) = \frac1N \sum_{n=1}^N q(z \mid x_n)` and its
    marginals :math:`q(z_d)` are evaluated exactly at every sample, summing over all :math:`N`
    points (:math:`\log q(z) = \operatorname{logsumexp}_n \log q(z \mid x_n) - \log N`, chunked
    over blocks of samples and points, so memory stays bounded). The terms are those of
    :class:`DecomposedELBO` (plus ``marginal_kl`` = TC + dim-wise KL), averaged over points and
    samples. Their only error is Monte Carlo over the codes: with ``num_samples >= 2`` the standard
    error uses the within-point variance; with one sample per point it uses the spread across
    points, an upper bound. The exact index-code MI never exceeds :math:`\log N`.

    The points are traced ``batch_size`` at a time (all at once by default), in one of three ways:

    * ``batch_args`` given: ``batch_args(idx) -> (args, kwargs)`` builds the model's arguments for
      the rows ``idx`` of the dataset (e.g. ``lambda idx: ((x[idx],), {"idx": idx, "n_data":
      len(x)})``); ``dataset_size`` is then required and ``*args``/``**kwargs`` must be empty;
    * else ``*args``/``**kwargs`` cover the whole dataset: with ``batch_size`` smaller than the
      data plate (or a plate declared with ``subsample_size``), the plate's indices are set to
      successive blocks, which needs a model that indexes its data by the plate's indices
      (``with pyro.plate("data", N, subsample_size=B) as idx: ... x[idx]``); a plate with
      ``subsample_size=B`` forces blocks of ``B`` (the last block overlaps the previous one and
      its repeated points are counted once).

    Every sample site must lie in the data plate (no global latents). Run encoders in evaluation
    mode (dropout, batch norm) before calling. Samples come from Pyro's global RNG.

    Example::

        result = elbo_surgery(vae.model, vae.guide, x_train, num_samples=2)
        print(result.table())
        mi, mi_se = result["index_code_mi"]

    :param num_samples: codes drawn per point (vectorized).
    :param batch_size: points traced at once (default: all, or the plate's ``subsample_size``).
    :param batch_args: builds ``(args, kwargs)`` for a tensor of row indices.
    :param dataset_size: ``N``; required with ``batch_args``, else the data plate's full size.
    :param code_sites: guide sites forming the code (default: every guide latent in the plate).
    :param data_plate: the plate over data points (default: found as in :class:`DecomposedELBO`).
    :param chunk_size: sample rows per block of the pairwise computation (default: automatic).
    :param max_plate_nesting: the model's plate nesting (guessed when omitted).
    :returns: a :class:`SurgeryResult`.
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")

    with torch.no_grad():
        plan = _surgery_plan(
            model,
            guide,
            args,
            kwargs,
            batch_size,
            batch_args,
            dataset_size,
            data_plate,
            code_sites,
            max_plate_nesting,
        )
        columns, values, pieces = [], [], []
        for idx, keep, (call_args, call_kwargs), fix in plan.batches():
            blocks, per_sample = _trace_batch(
                model, guide, call_args, call_kwargs, idx, keep, fix, plan, num_samples
            )
            sample_values = [b.values for b in blocks]
            if keep is not None:
                sample_values = [v[:, keep] for v in sample_values]
                per_sample = {k: v[:, keep] for k, v in per_sample.items()}
            columns.append(blocks)
            values.append(sample_values)
            pieces.append(per_sample)

        n = plan.dataset_size
        covered = sum(p["log_w"].shape[1] for p in pieces)
        if covered != n:
            raise RuntimeError(f"elbo_surgery covered {covered} points instead of N = {n}")
        values_all = [torch.cat(v, 1) for v in zip(*values, strict=True)]
        log_agg, log_marg = exact_log_aggregate(columns, values_all, n, chunk_size)
        per_sample = {k: torch.cat([p[k] for p in pieces], 1) for k in pieces[0]}
        terms = SampleTerms(
            per_sample["log_q_code"], per_sample["log_p_code"], log_agg, log_marg.sum(-1)
        )
        log_w = per_sample["log_w"]
        samples = {
            "index_code_mi": terms.index_code_mi,
            "total_correlation": terms.total_correlation,
            "dimwise_kl": terms.dimwise_kl,
            "marginal_kl": terms.total_correlation + terms.dimwise_kl,
            "elbo": log_w,
        }
        samples["reconstruction"] = log_w + terms.log_q_code - terms.log_p_code
    means = {t: float(samples[t].double().mean()) for t in SURGERY_TERMS}
    errors = {t: _standard_error(samples[t]) for t in SURGERY_TERMS}
    return SurgeryResult(
        means=means,
        standard_errors=errors,
        num_points=n,
        num_samples=num_samples,
        code_sites=plan.layout.code_sites,
        code_dim=sum(v.shape[-1] for v in values_all),
    )


@dataclass
class _SurgeryPlan:
    layout: CodeLayout
    nesting: int
    dataset_size: int
    batch_size: int
    args: tuple
    kwargs: dict
    batch_args: Callable | None
    set_indices: bool  # set the plate's indices per batch

    def batches(self):
        """Yield ``(idx, keep, (args, kwargs), indices_to_set)`` per traced batch."""
        n, b = self.dataset_size, self.batch_size
        for start in range(0, n, b):
            stop = min(start + b, n)
            keep = None
            if self.batch_args is None and self.set_indices and self.layout.subsampled:
                # a plate declared with subsample_size: every batch has exactly b points
                if stop - start < b:
                    keep = torch.arange(n - b, n) >= start
                    start = n - b
            idx = torch.arange(start, stop if keep is None else n)
            if self.batch_args is not None:
                call = self.batch_args(idx)
                if (
                    not isinstance(call, tuple)
                    or len(call) != 2
                    or not isinstance(call[0], tuple)
                    or not isinstance(call[1], dict)
                ):
                    raise TypeError(
                        "batch_args(idx) must return a tuple (args: tuple, kwargs: dict)"
                    )
                yield idx, keep, call, None
            else:
                fix = {self.layout.plate: idx} if self.set_indices else None
                yield idx, keep, (self.args, self.kwargs), fix


def _surgery_plan(
    model,
    guide,
    args,
    kwargs,
    batch_size,
    batch_args,
    dataset_size,
    data_plate,
    code_sites,
    max_plate_nesting,
) -> _SurgeryPlan:
    """Probe the guide once (on a small batch where possible) and decide how to batch."""
    if batch_args is not None:
        if args or kwargs:
            raise ValueError(
                "elbo_surgery: with batch_args, pass the data through batch_args only "
                f"(got extra positional or keyword arguments: {list(kwargs) or len(args)})"
            )
        if dataset_size is None:
            raise ValueError("elbo_surgery: batch_args needs dataset_size (the number of points)")
        n = int(dataset_size)
        args, kwargs = batch_args(torch.arange(min(n, batch_size or n, 16)))
    recorder = _PlateIndices()
    with poutine.block():
        guide_trace = poutine.trace(recorder(guide)).get_trace(*args, **kwargs)
    guide_trace = prune_subsample_sites(guide_trace)
    layout = find_code_layout(None, guide_trace, data_plate, code_sites)
    _check_all_in_plate(guide_trace, layout.plate, "guide")

    def nesting(fix: dict | None = None) -> int:
        if max_plate_nesting is not None:
            return int(max_plate_nesting)
        if fix is None:
            return guess_plate_nesting(model, guide, args, kwargs)
        try:
            return guess_plate_nesting(
                _PlateIndices(fix)(model), _PlateIndices(fix)(guide), args, kwargs
            )
        except (ValueError, RuntimeError) as error:
            raise _plate_index_error(layout.plate, fix[layout.plate], error) from error

    if batch_args is not None:
        return _SurgeryPlan(layout, nesting(), n, batch_size or n, (), {}, batch_args, False)

    n = layout.full_size
    if dataset_size is not None and int(dataset_size) != n:
        raise ValueError(
            f"elbo_surgery: dataset_size={dataset_size} differs from the data plate's full size "
            f"{n}; without batch_args the plate's size is the dataset."
        )
    _size, declared, user_supplied = recorder.seen.get(layout.plate, (n, None, False))
    if user_supplied:
        if layout.size != n or (batch_size is not None and batch_size < n):
            raise ValueError(
                f"elbo_surgery: the arguments pass explicit subsample indices to plate "
                f"'{layout.plate}' ({layout.size} of {n} points), so elbo_surgery cannot choose "
                "the points. Pass arguments covering the whole dataset with batch_size=None, or "
                "give batch_args=lambda idx: (args, kwargs) with dataset_size."
            )
        return _SurgeryPlan(layout, nesting(), n, n, args, kwargs, None, False)
    if declared is not None and declared < n:
        if batch_size is not None and batch_size != declared:
            raise ValueError(
                f"elbo_surgery: plate '{layout.plate}' is declared with subsample_size="
                f"{declared}, so batch_size must be None or {declared}, got {batch_size}"
            )
        plate_nesting = nesting({layout.plate: torch.arange(declared)})
        return _SurgeryPlan(layout, plate_nesting, n, declared, args, kwargs, None, True)
    if batch_size is None or batch_size >= n:
        return _SurgeryPlan(layout, nesting(), n, n, args, kwargs, None, False)
    plate_nesting = nesting({layout.plate: torch.arange(min(batch_size, 16))})
    return _SurgeryPlan(layout, plate_nesting, n, batch_size, args, kwargs, None, True)


def _plate_index_error(plate: str, idx: torch.Tensor, error: Exception) -> ValueError:
    return ValueError(
        f"elbo_surgery: tracing points {int(idx[0])}..{int(idx[-1])} by setting the indices of "
        f"plate '{plate}' failed ({error}). This needs a model and guide that index their data "
        "by the plate's indices; otherwise pass batch_size=None (all points at once) or "
        "batch_args=lambda idx: (args, kwargs)."
    )


def _check_all_in_plate(trace, plate: str, kind: str) -> None:
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or isinstance(site["fn"], _Subsample):
            continue
        if not any(f.name == plate for f in site["cond_indep_stack"]):
            raise ValueError(
                f"elbo_surgery: {kind} site '{name}' lies outside the data plate '{plate}'. "
                "The exact decomposition is per data point, so every sample site must be "
                "inside the data plate (no global latents)."
            )


def _trace_batch(model, guide, args, kwargs, idx, keep, fix, plan: _SurgeryPlan, num_samples):
    layout = plan.layout
    if fix is not None:
        model_fn, guide_fn = _PlateIndices(fix)(model), _PlateIndices(fix)(guide)
    else:
        model_fn, guide_fn = model, guide
    try:
        with poutine.block():
            weights = trace_particles(
                model_fn,
                guide_fn,
                args,
                kwargs,
                num_particles=num_samples,
                plate_nesting=plan.nesting,
            )
    except (ValueError, RuntimeError) as error:
        if fix is None:
            raise
        raise _plate_index_error(layout.plate, idx, error) from error
    model_trace, guide_trace = weights.model_trace, weights.guide_trace
    _check_all_in_plate(model_trace, layout.plate, "model")
    batch_layout = find_code_layout(model_trace, guide_trace, layout.plate, layout.code_sites)
    if batch_layout.size != idx.numel():
        raise ValueError(
            f"elbo_surgery: plate '{layout.plate}' has {batch_layout.size} points in a batch of "
            f"{idx.numel()} rows; the model must put exactly the requested rows in the plate."
        )
    if not any(p.name == layout.plate for p in weights.point_plates):
        raise ValueError(
            f"elbo_surgery: not every sample site lies in the data plate '{layout.plate}'."
        )
    if _has_nonuniform_scale(weights):
        raise ValueError(
            "elbo_surgery reports the unscaled model: remove poutine.scale factors that differ "
            "between sites (e.g. set a KL annealing factor to 1)."
        )
    nesting = plan.nesting + 1
    log_q_code, log_p_code = code_log_densities(
        model_trace, guide_trace, batch_layout, nesting, num_samples
    )
    blocks = code_blocks(guide_trace, batch_layout, nesting, column_mask=keep)
    log_w = _per_point_log_weights(weights, batch_layout)
    per_sample = {"log_q_code": log_q_code, "log_p_code": log_p_code, "log_w": log_w}
    return blocks, per_sample


def _has_nonuniform_scale(weights: ParticleWeights) -> bool:
    scales = [
        user_scale(site)
        for trace in (weights.model_trace, weights.guide_trace)
        for site in trace.nodes.values()
        if site["type"] == "sample"
    ]
    return any(s is None for s in scales) or len(set(scales)) > 1


def _per_point_log_weights(weights: ParticleWeights, layout: CodeLayout) -> torch.Tensor:
    """``[S, B]``: the log-weights summed over every point plate but the data plate."""
    plates = weights.point_plates
    shape = [weights.num_particles] + [p.size for p in plates]
    log_w = weights.log_weights.reshape(shape)
    position = 1 + [p.name for p in plates].index(layout.plate)
    log_w = log_w.movedim(position, 1)
    return log_w.reshape(log_w.shape[0], log_w.shape[1], -1).sum(-1)


__all__ = [
    "SURGERY_TERMS",
    "TERMS",
    "DecomposedELBO",
    "SurgeryResult",
    "elbo_surgery",
]
