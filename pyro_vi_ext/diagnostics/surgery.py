r"""ELBO surgery: the decomposition of a trained model's ELBO over a whole dataset.

After training, every point :math:`n` of the data plate gets codes :math:`z \sim q(z \mid x_n)`
and the aggregate posterior :math:`q(z) = \frac1N \sum_n q(z \mid x_n)` is evaluated exactly at
every sample [1]_, so the reconstruction, index-code MI, total correlation and dimension-wise KL
of :class:`~pyro_vi_ext.DecomposedELBO` carry only Monte Carlo error over the codes. For large
:math:`N` (the 737,280 dSprites images) ``reference_size=M`` estimates :math:`q(z)` from random
reference subsets instead, in :math:`O(N M D)`, with the subset's error in the standard errors.

References
----------
.. [1] M. D. Hoffman, M. J. Johnson, "ELBO surgery: yet another way to carve up the variational
   evidence lower bound", NIPS 2016 Workshop on Advances in Approximate Bayesian Inference.
.. [2] R. T. Q. Chen, X. Li, R. Grosse, D. Duvenaud, "Isolating Sources of Disentanglement in
   Variational Autoencoders", NeurIPS 2018.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pyro.poutine as poutine
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from pyro.poutine.util import prune_subsample_sites

from pyro_vi_ext.diagnostics._reference_subset import subset_log_aggregate
from pyro_vi_ext.diagnostics._repr import short_repr
from pyro_vi_ext.infer._aggregate import SampleTerms, exact_log_aggregate
from pyro_vi_ext.infer._code_layout import (
    CodeLayout,
    code_blocks,
    code_log_densities,
    code_sources,
    find_code_layout,
)
from pyro_vi_ext.infer._kernels import canonical_normal
from pyro_vi_ext.infer._weights import (
    ParticleWeights,
    common_user_scale,
    guess_plate_nesting,
    sample_sites,
    site_plate_frames,
    trace_particles,
)

NEARLY_DISJOINT_NATS = 1.0
r"""Subset mode warns when the MI comes this close to :math:`\log N` (:func:`elbo_surgery`)."""

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
    r"""The decomposition of the ELBO over a dataset, with standard errors.

    Exact mode (:attr:`reference_size` ``None``): the errors are Monte Carlo over the codes.
    Subset mode: they also include the reference subsets' error (see :func:`elbo_surgery`).

    Attributes
    ----------
    means, standard_errors : dict of str to float
        Per term ``t`` in :data:`SURGERY_TERMS` (nats per data point): ``reconstruction``,
        ``index_code_mi``, ``total_correlation``, ``dimwise_kl``, ``marginal_kl`` (= TC +
        dim-wise KL = KL(q(z) || p(z))) and ``elbo``.
    num_points : int
        :math:`N`, the points decomposed.
    num_samples : int
        Codes drawn per point.
    code_sites : tuple of str
        The code's sites.
    code_dim : int
        :math:`D`, the code's scalars per point.
    log_num_points : float
        :math:`\log N`, the upper bound of the index-code MI.
    reference_size : int or None
        ``None`` for the exact aggregate posterior (every point); else :math:`M`, the size of the
        random reference subsets of :func:`elbo_surgery`'s subset mode.
    reference_standard_errors : dict of str to float or None
        Subset mode: the part of each standard error due to the reference subsets (zero for
        ``reconstruction`` and ``elbo``); :attr:`standard_errors` already includes it.
    num_reference_subsets : int or None
        Subset mode: the independent reference subsets drawn (one per block of points).
    """

    means: dict[str, float]
    standard_errors: dict[str, float]
    num_points: int
    num_samples: int
    code_sites: tuple[str, ...]
    code_dim: int
    log_num_points: float = field(init=False)
    reference_size: int | None = None
    reference_standard_errors: dict[str, float] | None = None
    num_reference_subsets: int | None = None

    def __repr__(self) -> str:
        """Return a one-line summary that starts with the :attr:`mode`."""
        text = short_repr(self)
        name = type(self).__name__
        return f"{name}(mode={self.mode!r}, {text[len(name) + 1 :]}"

    def __post_init__(self):
        """Set :attr:`log_num_points` from :attr:`num_points`."""
        object.__setattr__(self, "log_num_points", math.log(self.num_points))

    @property
    def mode(self) -> str:
        """``"exact"`` (every point in the aggregate) or ``"subset"`` (random reference subsets)."""
        return "exact" if self.reference_size is None else "subset"

    def __getitem__(self, term: str) -> tuple[float, float]:
        """``(mean, standard error)`` of a term."""
        return self.means[term], self.standard_errors[term]

    def table(self) -> str:
        """Return a plain-text table of the terms with their standard errors."""
        lines = [
            f"ELBO surgery: N = {self.num_points}, {self.num_samples} sample(s) per point, "
            f"code {', '.join(self.code_sites)} (D = {self.code_dim}), log N = "
            f"{self.log_num_points:.3f}",
        ]
        if self.reference_standard_errors is None:
            lines.append("aggregate posterior: exact (all N points)")
            lines.append(f"{'term':<20}{'nats/point':>14}{'std. error':>14}")
            for term in SURGERY_TERMS:
                mean, error = self.means[term], self.standard_errors[term]
                lines.append(f"{term:<20}{mean:>14.4f}{error:>14.4f}")
            return "\n".join(lines)
        lines.append(
            f"aggregate posterior: reference subsets of M = {self.reference_size} points "
            f"({self.num_reference_subsets} independent subsets, delta-method bias correction); "
            "the std. error includes the subset error"
        )
        lines.append(f"{'term':<20}{'nats/point':>14}{'std. error':>14}{'of which subset':>17}")
        for term in SURGERY_TERMS:
            mean, error = self.means[term], self.standard_errors[term]
            subset = self.reference_standard_errors[term]
            lines.append(f"{term:<20}{mean:>14.4f}{error:>14.4f}{subset:>17.4f}")
        return "\n".join(lines)

    def __str__(self) -> str:
        """Return :meth:`table`."""
        return self.table()

    def to_dataframe(self):
        """Return a ``pandas.DataFrame`` indexed by term with columns ``mean`` and ``se``."""
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
    reference_size: int | None = None,
    generator: torch.Generator | None = None,
    **kwargs,
) -> SurgeryResult:
    r"""Decompose the ELBO of a trained model and guide over a whole dataset, exactly [1]_.

    Every point :math:`n` of the data plate gets ``num_samples`` codes :math:`z \sim q(z \mid
    x_n)`; the aggregate posterior :math:`q(z) = \frac1N \sum_{n=1}^N q(z \mid x_n)` and its
    marginals :math:`q(z_d)` are evaluated exactly at every sample, summing over all :math:`N`
    points (:math:`\log q(z) = \operatorname{logsumexp}_n \log q(z \mid x_n) - \log N`, chunked
    over blocks of samples and points, so memory stays bounded). The terms are those of
    :class:`~pyro_vi_ext.DecomposedELBO` (plus ``marginal_kl`` = TC + dim-wise KL), averaged over
    points and samples. Their only error is Monte Carlo over the codes: with ``num_samples >= 2``
    the standard error uses the within-point variance; with one sample per point it uses the
    spread across points, an upper bound. The exact index-code MI never exceeds :math:`\log N`.
    This costs :math:`O(N^2 D)` (N = 50,000 in about two minutes here).

    **Subset mode** (``reference_size=M``, for large :math:`N`; factorized Normal codes). For
    a sample :math:`z_n` of point :math:`n`, :math:`q(z_n) = \frac1N [q(z_n \mid x_n) +
    \sum_{m \ne n} q(z_n \mid x_m)]`; the own term is kept and the sum is estimated from a
    uniform subset :math:`R_n` of :math:`M` of the other points, without replacement,

    .. math::

        \hat q(z_n) = \frac1N \Big[ q(z_n \mid x_n) + \frac{N-1}{M} \sum_{m \in R_n}
        q(z_n \mid x_m) \Big], \qquad \mathbb E\, \hat q(z_n) = q(z_n),

    and the same, on the same subset, for each marginal :math:`q(z_{n,d})`; the cost is
    :math:`O(N M D)`. Contiguous blocks of points (at most 4096, at least 64 blocks when
    :math:`N \ge 64`) share one subset, drawn independently per block. :math:`\log \hat q`
    is biased low by :math:`V_n/2 = O(1/M)` (Jensen), with :math:`V_n = (1 - \frac{M}{N-1})
    s_n^2 / M` the relative variance of :math:`\hat q(z_n)` (:math:`s_n^2`: the sample
    variance over :math:`R_n` of the terms' shares of :math:`\hat q`, times :math:`M`); the
    estimate adds :math:`\hat V_n / 2` back (delta method). The standard errors then add, in
    quadrature, to the Monte Carlo error of the codes: the subset error of each term's mean
    (first order, from the spread of the columns' contributions within each block, blocks
    independent) and an allowance for the bias left after the correction, equal to the
    correction's size (in tests the remaining bias stayed below it); the subset part alone is
    :attr:`SurgeryResult.reference_standard_errors`. ``reconstruction`` and ``elbo`` need no
    aggregate and equal the exact mode's on the same codes; ``M = N - 1`` reproduces the exact
    mode. Validity: when the posteriors barely overlap (MI within a nat of :math:`\log N`),
    :math:`q(z_n)` rests on a few neighbours a subset mostly misses and the bias can exceed the
    allowance; a :class:`UserWarning` says so. The module
    :mod:`pyro_vi_ext.diagnostics._reference_subset` gives the derivation.

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
    mode (dropout, batch norm) before calling. Samples come from Pyro's global RNG. An
    :class:`~pyro.infer.autoguide.AutoNormal` guide is read through its unconstrained samples, as
    in :class:`~pyro_vi_ext.DecomposedELBO`.

    Parameters
    ----------
    model, guide : callable
        The trained Pyro model and guide.
    *args, **kwargs
        The model's arguments covering the whole dataset (empty with ``batch_args``).
    num_samples : int
        Codes drawn per point (vectorized).
    batch_size : int, optional
        Points traced at once (default: all, or the plate's ``subsample_size``).
    batch_args : callable, optional
        Builds ``(args, kwargs)`` for a tensor of row indices.
    dataset_size : int, optional
        :math:`N`; required with ``batch_args``, else the data plate's full size.
    code_sites : sequence of str, optional
        Guide sites forming the code (default: every guide latent in the plate).
    data_plate : str, optional
        The plate over data points (default: found as in :class:`~pyro_vi_ext.DecomposedELBO`).
    chunk_size : int, optional
        Sample rows per block of the pairwise computation (default: automatic).
    max_plate_nesting : int, optional
        The model's plate nesting (guessed when omitted).
    reference_size : int, optional
        ``None`` (default): the exact aggregate posterior. Else :math:`M`, from 2 to
        :math:`N - 1`: the subset mode above.
    generator : torch.Generator, optional
        Subset mode: the source of the reference subsets. Without it, one integer is drawn from
        torch's global RNG after the codes (so the codes are those of the exact mode under the
        same seed) to seed a private generator; with it, the global RNG is used for the codes
        only, exactly as in the exact mode.

    Returns
    -------
    SurgeryResult
        Means and standard errors of the terms, nats per point.

    Raises
    ------
    ValueError
        Naming the site, plate or argument: a latent outside the data plate, a ``dataset_size``
        that differs from the plate's full size, a model that does not index its data by the
        plate's indices when blocks are needed, a ``reference_size`` below 2 or above
        :math:`N - 1`, a ``generator`` without ``reference_size``, a subset mode on a code that
        is not factorized Normal.
    TypeError
        A ``reference_size`` that is not an int, a ``generator`` that is not a
        ``torch.Generator``.

    Warns
    -----
    UserWarning
        Subset mode, when the MI is within a nat of :math:`\log N` (see above).

    References
    ----------
    .. [1] M. D. Hoffman, M. J. Johnson, "ELBO surgery: yet another way to carve up the
       variational evidence lower bound", NIPS 2016 Workshop on Advances in Approximate Bayesian
       Inference.
    .. [2] R. T. Q. Chen, X. Li, R. Grosse, D. Duvenaud, "Isolating Sources of Disentanglement in
       Variational Autoencoders", NeurIPS 2018.
    .. [3] W. G. Cochran, "Sampling Techniques", 3rd ed., Wiley 1977, Ch. 2 and 6 (sampling
       without replacement; the delta method for a ratio's bias).

    Examples
    --------
    ::

        result = elbo_surgery(vae.model, vae.guide, x_train, num_samples=2)
        print(result.table())
        mi, mi_se = result["index_code_mi"]

        # the full dSprites grid: images rendered per batch, subsets of M = 1000 points
        data = DSprites()
        result = elbo_surgery(
            vae.model, vae.guide, batch_size=4096, dataset_size=len(data),
            batch_args=lambda idx: ((data.images(idx),), {"idx": idx, "n_data": len(data)}),
            reference_size=1000, generator=torch.Generator().manual_seed(0),
        )
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    _check_subset_arguments(reference_size, generator)

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
        n = plan.dataset_size
        if reference_size is not None and reference_size > n - 1:
            raise ValueError(
                f"elbo_surgery: reference_size={reference_size} exceeds N - 1 = {n - 1}, the "
                "other points of the dataset; pass at most N - 1 (N - 1 gives the exact value) "
                "or reference_size=None for the exact mode."
            )
        columns, values, normal_parameters, pieces = [], [], [], []
        for idx, keep, (call_args, call_kwargs), fix in plan.batches():
            blocks, per_sample = _trace_batch(
                model, guide, call_args, call_kwargs, idx, keep, fix, plan, num_samples
            )
            sample_values = [b.values for b in blocks]
            if keep is not None:
                sample_values = [v[:, keep] for v in sample_values]
                per_sample = {k: v[:, keep] for k, v in per_sample.items()}
            if reference_size is None:
                columns.append(blocks)
            else:  # keep only the per-point Normal parameters, not the traced blocks
                normal_parameters.append(_normal_parameters(blocks, keep))
            values.append(sample_values)
            pieces.append(per_sample)

        covered = sum(p["log_w"].shape[1] for p in pieces)
        if covered != n:
            raise RuntimeError(f"elbo_surgery covered {covered} points instead of N = {n}")
        values_all = [torch.cat(v, 1) for v in zip(*values, strict=True)]
        subset = None
        if reference_size is None:
            log_agg, log_marg = exact_log_aggregate(columns, values_all, n, chunk_size)
        else:
            if generator is None:  # one draw from the global RNG, after the codes
                seed = int(torch.randint(0, 2**62, (), dtype=torch.long))
                generator = torch.Generator().manual_seed(seed)
            z_all = torch.cat(values_all, -1) if len(values_all) > 1 else values_all[0]
            loc_all = torch.cat([p[0] for p in normal_parameters], 1)
            scale_all = torch.cat([p[1] for p in normal_parameters], 1)
            del normal_parameters
            subset = subset_log_aggregate(
                z_all, loc_all, scale_all, reference_size, generator, chunk_size
            )
            log_agg = subset.log_aggregate.to(z_all.dtype)
            log_marg = subset.log_marginals.to(z_all.dtype)
        per_sample = {k: torch.cat([p[k] for p in pieces], 1) for k in pieces[0]}
        log_jacobian = per_sample["log_jacobian"]
        terms = SampleTerms(
            per_sample["log_q_code"],
            per_sample["log_p_code"],
            log_agg + log_jacobian,
            log_marg.sum(-1) + log_jacobian,
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
    subset_errors = None
    if subset is not None:
        subset_errors = {
            t: math.sqrt(subset.variances.get(t, 0.0) + subset.bias_corrections.get(t, 0.0) ** 2)
            for t in SURGERY_TERMS
        }
        errors = {t: math.hypot(errors[t], subset_errors[t]) for t in SURGERY_TERMS}
        if math.log(n) - means["index_code_mi"] < NEARLY_DISJOINT_NATS:
            warnings.warn(
                f"elbo_surgery: the index-code MI ({means['index_code_mi']:.3f}) is within "
                f"{NEARLY_DISJOINT_NATS:g} nat of log N ({math.log(n):.3f}): the posteriors "
                "barely overlap, so q(z_n) rests on a few neighbours that a random subset of "
                f"M = {reference_size} mostly misses, and the subset's bias may exceed its "
                "standard error. Raise reference_size or use reference_size=None (exact).",
                UserWarning,
                stacklevel=2,
            )
    return SurgeryResult(
        means=means,
        standard_errors=errors,
        num_points=n,
        num_samples=num_samples,
        code_sites=plan.layout.code_sites,
        code_dim=sum(v.shape[-1] for v in values_all),
        reference_size=reference_size,
        reference_standard_errors=subset_errors,
        num_reference_subsets=None if subset is None else subset.num_blocks,
    )


def _check_subset_arguments(reference_size: int | None, generator: torch.Generator | None) -> None:
    if reference_size is None:
        if generator is not None:
            raise ValueError(
                "elbo_surgery: generator draws the reference subsets, so it needs reference_size "
                "(the exact mode, reference_size=None, draws no subsets)"
            )
        return
    if isinstance(reference_size, bool) or not isinstance(reference_size, int):
        raise TypeError(
            f"elbo_surgery: reference_size must be an int or None, got {reference_size!r}"
        )
    if reference_size < 2:
        raise ValueError(
            f"elbo_surgery: reference_size must be at least 2 (the subset's own spread gives its "
            f"bias correction and standard error), got {reference_size}"
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            "elbo_surgery: generator must be a torch.Generator or None, got "
            f"{type(generator).__name__}"
        )


def _normal_parameters(blocks, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the code's per-point ``(loc, scale)`` ``[S', B, D]`` for the subset mode."""
    params = canonical_normal(blocks)
    if params is None:
        names = ", ".join(f"'{b.name}'" for b in blocks)
        raise ValueError(
            f"elbo_surgery: reference_size needs a factorized Normal code (an Independent of "
            f"Normal, or an AutoNormal guide); code site(s) {names} are not. Use "
            "reference_size=None for the exact decomposition of other families."
        )
    loc, scale = params
    if keep is not None:
        loc, scale = loc[:, keep], scale[:, keep]
    return loc.detach(), scale.detach()


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
    for name, site in sample_sites(trace):
        if plate not in site_plate_frames(site):
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
    sources = code_sources(guide, guide_trace, batch_layout, model_trace)
    log_q_code, log_p_code, log_jacobian = code_log_densities(
        model_trace, sources, batch_layout, nesting, num_samples
    )
    if log_jacobian is None:
        log_jacobian = torch.zeros_like(log_q_code)
    blocks = code_blocks(sources, batch_layout, nesting, column_mask=keep)
    log_w = _per_point_log_weights(weights, batch_layout)
    per_sample = {
        "log_q_code": log_q_code,
        "log_p_code": log_p_code,
        "log_jacobian": log_jacobian,
        "log_w": log_w,
    }
    return blocks, per_sample


def _has_nonuniform_scale(weights: ParticleWeights) -> bool:
    return common_user_scale((weights.model_trace, weights.guide_trace)) is None


def _per_point_log_weights(weights: ParticleWeights, layout: CodeLayout) -> torch.Tensor:
    """``[S, B]``: the log-weights summed over every point plate but the data plate."""
    plates = weights.point_plates
    shape = [weights.num_particles] + [p.size for p in plates]
    log_w = weights.log_weights.reshape(shape)
    position = 1 + [p.name for p in plates].index(layout.plate)
    log_w = log_w.movedim(position, 1)
    return log_w.reshape(log_w.shape[0], log_w.shape[1], -1).sum(-1)


__all__ = ["SURGERY_TERMS", "SurgeryResult", "elbo_surgery"]
