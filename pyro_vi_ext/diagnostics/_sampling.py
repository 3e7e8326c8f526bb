"""Guide draws pushed through the model in blocks of particles, vectorized or one at a time.

Every diagnostic needs the same thing: ``S`` draws ``z_s ~ q(z | x)`` and, per draw and per data
point, ``log p(x, z_s)`` and ``log q(z_s | x)``. :func:`~pyro_vi_ext.infer._weights.trace_particles`
computes them for one block of particles; this module runs it block by block (so that ``S = 10,000``
fits in memory), with the minibatch of a subsampled plate frozen across blocks, and keeps what the
ArviZ export needs (latent values, log-likelihoods, observations) in a plate-aware layout.

Particle paths (``vectorize_particles``): ``True`` runs a block on a particle plate left of the
model's plates (one run per block; the model must broadcast over that dim); ``False`` runs the model
and guide once per draw without a particle plate (any valid Pyro model, as Pyro's ``Predictive``
with ``parallel=False``); ``"auto"`` tries one small vectorized run first and, when it fails
(:class:`~pyro_vi_ext.infer._weights.ParticleVectorizationError`, or another shape error) while a
small sequential run succeeds, takes the sequential path with one :class:`ParticleFallbackWarning`
per diagnostic call. Both paths stack the
draws in the same layout, so the diagnostics read them alike.

Layout of a site's draws: a *padded* array ``[S, b_1, ..., b_L, e_1, ..., e_E]`` with exactly
``L = plate_nesting`` batch dims right of the particle dim and the site's ``E`` event dims. A batch
dim that belongs to one of the site's plates is named after the plate; any other batch dim of size
one is one of Pyro's broadcasting singletons and is dropped on export; remaining dims are named
``"{site}_dim_{k}"`` as ArviZ does.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyro.poutine as poutine
import torch
from pyro.poutine.subsample_messenger import _Subsample
from pyro.poutine.uncondition_messenger import UnconditionMessenger

from pyro_vi_ext.infer._weights import (
    ParticleVectorizationError,
    ParticleWeights,
    PointPlate,
    common_user_scale,
    guess_plate_nesting,
    latent_sites,
    particle_plate,
    sample_sites,
    site_log_prob,
    site_plate_frames,
    trace_particles,
)

VectorizeParticles = bool | Literal["auto"]
"""The ``vectorize_particles`` option of the diagnostics: ``True``, ``False`` or ``"auto"``."""


class ParticleFallbackWarning(UserWarning):
    """``vectorize_particles="auto"`` found a model that does not broadcast and ran sequentially.

    Issued once per diagnostic call. The results are the same as with ``vectorize_particles=False``
    (one run per draw, slower); pass ``vectorize_particles=False`` to skip the vectorized attempt
    and this warning, or make the model broadcast over a leftmost particle dim for speed.
    """


@dataclass(frozen=True)
class Setup:
    """A model and guide prepared for repeated particle runs on the same data (and minibatch).

    ``vectorize`` is the settled particle path: ``True`` (a particle plate per block) or ``False``
    (one run per draw).
    """

    model: Callable
    guide: Callable
    args: tuple
    kwargs: dict
    nesting: int
    subsample_indices: dict[str, np.ndarray]
    vectorize: bool = True


def check_vectorize(vectorize_particles: object) -> None:
    """Raise unless ``vectorize_particles`` is ``True``, ``False`` or ``"auto"``."""
    if not (isinstance(vectorize_particles, bool) or vectorize_particles == "auto"):
        raise ValueError(
            f"vectorize_particles must be True, False or 'auto', got {vectorize_particles!r}"
        )


def settle_vectorize(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    nesting: int,
    vectorize_particles: VectorizeParticles,
) -> bool:
    """Resolve ``"auto"``: one vectorized run of two particles decides; warn if it falls back.

    A vectorized trial that fails, while a sequential trial of the same two draws runs, means
    that the model does not broadcast over the particle dim: the sequential path is taken with a
    :class:`ParticleFallbackWarning` quoting the vectorized failure. Pyro's own shape checks do
    not always name the particle plate (e.g. ``locs[assignment]`` on a batched ``locs`` gives a
    "Shape mismatch inside plate('data')"), so any ``RuntimeError`` or ``ValueError`` of the
    vectorized trial counts. When the sequential trial fails too, its error is raised: the
    problem is not vectorization.

    Parameters
    ----------
    model, guide : callable
        The (minibatch-frozen) model and guide.
    args, kwargs : tuple, dict
        Their arguments.
    nesting : int
        The model's plate nesting.
    vectorize_particles : bool or "auto"
        The user's choice.

    Returns
    -------
    bool
        ``True`` for the vectorized path, ``False`` for the sequential one.
    """
    check_vectorize(vectorize_particles)
    if vectorize_particles != "auto":
        return bool(vectorize_particles)

    def trial(vectorize: bool) -> None:
        with torch.no_grad(), poutine.block():
            trace_particles(
                model, guide, args, kwargs, num_particles=2, plate_nesting=nesting,
                vectorize=vectorize,
            )  # fmt: skip

    try:
        trial(True)
    except (RuntimeError, ValueError) as error:
        trial(False)  # raises the model's own error if the loop fails as well
        first_line = str(error).split("\n", 1)[0]
        if not isinstance(error, ParticleVectorizationError):
            first_line = (
                "Under the vectorized particle plate the model or guide failed with "
                f"{type(error).__name__}: {first_line}"
            )
        warnings.warn(
            f"{first_line}\nvectorize_particles='auto': the model and guide run one draw at a "
            "time instead (same results, slower). Pass vectorize_particles=False to skip the "
            "vectorized attempt and this warning.",
            ParticleFallbackWarning,
            stacklevel=4,
        )
        return False
    return True


def prepare(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    max_plate_nesting: int | None,
    vectorize_particles: VectorizeParticles = True,
) -> Setup:
    """Freeze the minibatch of every self-subsampling plate, settle the plate nesting and the path.

    A ``pyro.plate(..., subsample_size=B)`` draws new indices on every run, which would pair the
    particles of different blocks with different data points. One run of the guide and the replayed
    model records those indices; both are then replayed with them in every block. The particle
    path is settled by :func:`settle_vectorize`.
    """
    check_vectorize(vectorize_particles)
    try:
        with poutine.block():
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                *args, **kwargs
            )
    except ZeroDivisionError as error:
        if "size cannot be zero" not in str(error):
            raise
        raise ValueError(
            "A pyro.plate of the model or guide got size 0 in this call: an empty batch (no data "
            "points, e.g. an empty tensor or empty subsample indices). The diagnostics need at "
            "least one data point; pass a non-empty batch."
        ) from error
    frozen = poutine.Trace()
    for trace in (guide_trace, model_trace):
        for name, site in trace.nodes.items():
            if site["type"] == "sample" and isinstance(site["fn"], _Subsample):
                if name not in frozen:
                    frozen.add_node(name, **site)
    indices = {name: frozen.nodes[name]["value"].detach().cpu().numpy() for name in frozen.nodes}
    if frozen.nodes:
        model = poutine.replay(model, trace=frozen)
        guide = poutine.replay(guide, trace=frozen)
    if max_plate_nesting is None:
        nesting = guess_plate_nesting(model, guide, args, kwargs)
    else:
        if int(max_plate_nesting) != max_plate_nesting or max_plate_nesting < 0:
            raise ValueError(
                f"max_plate_nesting must be a non-negative int, got {max_plate_nesting!r}"
            )
        nesting = int(max_plate_nesting)
    vectorize = settle_vectorize(model, guide, args, kwargs, nesting, vectorize_particles)
    return Setup(model, guide, tuple(args), dict(kwargs), nesting, indices, vectorize)


def plate_names(plates: Sequence[PointPlate]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Return the names and sizes of point plates, as the results record them."""
    return tuple(p.name for p in plates), tuple(p.size for p in plates)


def check_counts(num_samples: int, chunk_size: int, minimum: int = 1) -> None:
    for label, value, low in (("num_samples", num_samples, minimum), ("chunk_size", chunk_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
            raise ValueError(f"{label} must be an int >= {low}, got {value!r}")


def is_deterministic(site: dict) -> bool:
    return bool(site["infer"].get("_deterministic", False))


def _warn_on_tempering(weights: ParticleWeights) -> None:
    if common_user_scale((weights.model_trace, weights.guide_trace)) is None:
        warnings.warn(
            "The model or guide scales some sites by different factors (poutine.scale, e.g. "
            "KL annealing), so the log importance weights are tempered and the diagnostics refer "
            "to the tempered density. Evaluate with every scale set to 1 to diagnose the model "
            "itself.",
            UserWarning,
            stacklevel=4,
        )


class ProposalCheck:
    """Watch a guide's draws, block by block, for what makes it unusable as a proposal.

    * an empty batch: a data plate with no points in this call (raises);
    * NaN log-weights: raises, naming the model and guide sites whose log-density is NaN;
    * no spread: a guide latent whose draws are all identical (a point mass: ``Delta``,
      ``AutoDelta``, a vanishing scale); :meth:`constant_sites` lists them once all blocks are seen.
      A discrete site counts only when its identical draws have probability one.

    Examples
    --------
    ::

        check = ProposalCheck()
        for weights in particle_blocks(setup, 1000, 100, check=check):
            ...
        problem = check.problem()  # None, or a message naming the point-mass sites
    """

    def __init__(self) -> None:
        self.num_draws = 0
        self._first: dict[str, torch.Tensor] = {}
        self._varied: set[str] = set()

    def update(self, weights: ParticleWeights) -> None:
        """Check one block of particles.

        Raises
        ------
        ValueError
            For an empty batch or NaN log-weights, naming the plate or the sites.
        """
        for plate in weights.point_plates:
            if plate.size == 0:
                raise ValueError(
                    f"Plate '{plate.name}' holds no data points in this call (an empty batch): "
                    "the diagnostics need at least one data point. Pass a non-empty batch."
                )
        if weights.num_points == 0:
            raise ValueError(
                "The model and guide evaluate no data points in this call (an empty batch); "
                "pass at least one data point."
            )
        log_weights = weights.log_weights
        if bool(torch.isnan(log_weights).any()):
            raise ValueError(_nan_message(weights))
        for _, guide_trace, rows in particle_traces(weights):
            for name, site in latent_sites(guide_trace):
                if name in self._varied:
                    continue
                value = site["value"].detach()
                if _is_discrete(site) and not bool((site_log_prob(site) == 0).all()):
                    self._varied.add(name)  # a discrete draw of probability < 1: it spreads
                    continue
                # a value without the particle dim leftmost is one draw
                site_rows = rows if value.dim() and value.shape[0] == rows else 1
                flat = value.reshape(site_rows, -1)
                first = self._first.setdefault(name, flat[:1])
                if first.shape[-1] != flat.shape[-1] or bool((flat != first).any()):
                    self._varied.add(name)
        self.num_draws += weights.num_particles

    def constant_sites(self) -> list[str]:
        """Return the guide latents whose draws were all identical (none with one draw)."""
        if self.num_draws < 2:
            return []
        return [name for name in self._first if name not in self._varied]

    def problem(self) -> str | None:
        """Return a message naming the point-mass sites, or ``None`` if the guide has spread."""
        sites = self.constant_sites()
        if not sites:
            return None
        names = ", ".join(f"'{name}'" for name in sites)
        return (
            f"The guide cannot serve as an importance proposal: its draws of site(s) {names} "
            f"are identical in all {self.num_draws} draws (a point mass: a Delta, AutoDelta or "
            "a vanishing scale). Importance sampling needs a proposal with spread wherever the "
            "posterior has mass, so the weights say nothing about the posterior: standard "
            "errors are reported as NaN, effective sample sizes as 1 and k-hat as inf. Use a "
            "guide with spread (e.g. AutoNormal) to diagnose the model."
        )


def particle_traces(
    weights: ParticleWeights,
) -> list[tuple[poutine.Trace, poutine.Trace, int]]:
    """Return ``(model_trace, guide_trace, draws)`` of each run behind ``weights``.

    One entry holding all ``S`` draws on the vectorized path (the particle dim leftmost in the
    batch shape), ``S`` entries of one draw each (no particle dim) on the sequential path.
    """
    if weights.vectorized:
        return [(weights.model_trace, weights.guide_trace, weights.num_particles)]
    return [(run.model_trace, run.guide_trace, 1) for run in weights.runs]


def _is_discrete(site: dict) -> bool:
    try:
        return bool(site["fn"].support.is_discrete)
    except NotImplementedError:  # a dependent support that cannot tell: treat as continuous
        return False


def _nan_message(weights: ParticleWeights) -> str:
    log_weights = weights.log_weights
    bad_draws = int(torch.isnan(log_weights).any(-1).sum())
    sites: list[str] = []
    for model_trace, guide_trace, _ in particle_traces(weights):
        for kind, trace in (("model", model_trace), ("guide", guide_trace)):
            for name, site in sample_sites(trace):
                label = f"{kind} site '{name}'"
                if label not in sites and bool(torch.isnan(site_log_prob(site)).any()):
                    sites.append(label)
    where = ", ".join(sites) if sites else "no single site (their sum)"
    return (
        f"The log importance weights are NaN in {bad_draws} of {weights.num_particles} draws of "
        f"this block: the log-density of {where} is NaN there. The NaN comes from the model or "
        "the guide (a parameter that became NaN in a diverged fit, NaN in the data, an invalid "
        "scale), not from the diagnostic: check pyro.param values and the model's inputs, then "
        "rerun."
    )


def particle_blocks(
    setup: Setup, num_samples: int, chunk_size: int, check: ProposalCheck | None = None
) -> Iterator[ParticleWeights]:
    """Yield :class:`ParticleWeights` for consecutive blocks of at most ``chunk_size`` particles.

    Parameters
    ----------
    setup : Setup
        From :func:`prepare`.
    num_samples : int
        Total particles.
    chunk_size : int
        Particles per block.
    check : ProposalCheck, optional
        Fed every block (empty batches, NaN weights, point masses).

    Yields
    ------
    ParticleWeights
    """
    done = 0
    first: tuple[PointPlate, ...] | None = None
    while done < num_samples:
        size = min(chunk_size, num_samples - done)
        with torch.no_grad(), poutine.block():
            weights = trace_particles(
                setup.model,
                setup.guide,
                setup.args,
                setup.kwargs,
                num_particles=size,
                plate_nesting=setup.nesting,
                vectorize=setup.vectorize,
            )
        if check is not None:
            check.update(weights)
        if first is None:
            first = weights.point_plates
            _warn_on_tempering(weights)
        elif weights.point_plates != first:
            raise ValueError(
                "The data plates changed between blocks of particles "
                f"({first} then {weights.point_plates}); the model must have static structure."
            )
        yield weights
        done += size


def collect_log_weights(
    setup: Setup, num_samples: int, chunk_size: int, check: ProposalCheck | None = None
) -> tuple[np.ndarray, np.ndarray, tuple[PointPlate, ...]]:
    """Return ``[S, P]`` float64 arrays ``log p(x, z)``, ``log q(z | x)`` and the point plates."""
    log_p, log_q, plates = [], [], ()
    for weights in particle_blocks(setup, num_samples, chunk_size, check):
        log_p.append(_numpy(weights.log_p, np.float64))
        log_q.append(_numpy(weights.log_q, np.float64))
        plates = weights.point_plates
    return np.concatenate(log_p), np.concatenate(log_q), plates


def _numpy(tensor: torch.Tensor, dtype=None) -> np.ndarray:
    array = tensor.detach().cpu().numpy()
    return array.astype(dtype) if dtype is not None else array


class LogMeanExp:
    """Streaming per-point ``log (1/S) sum_s w_s`` with the moments its standard error needs.

    Keeps, per point, a shift ``m`` and ``s1 = sum_s exp(lw_s - m)``, ``s2 = sum_s exp(2 (lw_s -
    m))`` in float64, rescaling both when a later block raises the maximum.
    """

    def __init__(self) -> None:
        self.count = 0
        self.shift: np.ndarray | None = None
        self.s1: np.ndarray | None = None
        self.s2: np.ndarray | None = None

    def update(self, log_weights: np.ndarray) -> None:
        log_weights = np.asarray(log_weights, dtype=np.float64)
        if np.isnan(log_weights).any() or np.isposinf(log_weights).any():
            raise ValueError("log importance weights contain NaN or +inf")
        block_max = log_weights.max(0)
        new = block_max if self.shift is None else np.maximum(self.shift, block_max)
        new = np.where(np.isfinite(new), new, 0.0)
        scaled = np.exp(log_weights - new)
        s1, s2 = scaled.sum(0), np.square(scaled).sum(0)
        if self.shift is not None:
            with np.errstate(over="ignore"):
                factor = np.where(self.s1 > 0, np.exp(self.shift - new), 0.0)
            s1 = s1 + self.s1 * factor
            s2 = s2 + self.s2 * np.square(factor)
        self.shift, self.s1, self.s2 = new, s1, s2
        self.count += log_weights.shape[0]

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per point: log-mean-exp, its delta-method standard error, and the ESS."""
        if self.shift is None:
            raise ValueError("no log weights were added")
        n = self.count
        with np.errstate(divide="ignore", invalid="ignore"):
            value = self.shift + np.log(self.s1) - math.log(n)
            inverse_ess = self.s2 / np.square(self.s1)
            ess = 1.0 / inverse_ess
            if n > 1:
                variance = n / (n - 1) * np.clip(inverse_ess - 1.0 / n, 0.0, None)
                se = np.sqrt(variance)
            else:
                se = np.full_like(value, np.nan)
        se = np.where(self.s1 > 0, se, np.nan)
        return value, se, ess


# -- draws for export --------------------------------------------------------------------------


@dataclass
class SiteDraws:
    """The padded draws ``[S, b_1..b_L, e_1..e_E]`` of one site, with what naming them needs."""

    name: str
    event_dim: int
    plate_dims: dict[int, str]  # batch position (negative, from the right of the batch) -> plate
    blocks: list[np.ndarray] = field(default_factory=list)
    device: torch.device | None = None
    value_shape: tuple[int, ...] | None = None  # one draw's shape on the sequential path

    def one_draw(self, padded: np.ndarray) -> np.ndarray:
        """Return one padded draw ``[b_1..b_L, e_1..e_E]`` in the site's own shape.

        The sequential path replays a draw without particle plate, so the singleton batch dims
        that padding added on the left go again (a draw whose plates were broadcast by
        per-point resampling keeps them).
        """
        if self.value_shape is not None and padded.size == math.prod(self.value_shape):
            return padded.reshape(self.value_shape)
        while padded.ndim > self.event_dim and padded.shape[0] == 1:
            padded = padded[0]
        return padded

    @property
    def array(self) -> np.ndarray:
        if len(self.blocks) != 1:
            self.blocks = [np.concatenate(self.blocks)]
        return self.blocks[0]

    def layout(self, nesting: int) -> tuple[list[int], list[str]]:
        """Axes of the padded array (after the draw axis) kept on export, and their names."""
        shape = self.array.shape[1:]
        keep, names, counter = [], [], 0
        for axis, size in enumerate(shape):
            position = axis - nesting  # negative for batch dims, >= 0 for event dims
            if position < 0 and position in self.plate_dims:
                keep.append(axis)
                names.append(self.plate_dims[position])
                continue
            if position < 0 and size == 1:
                continue  # a broadcasting singleton of Pyro's plates
            keep.append(axis)
            names.append(f"{self.name}_dim_{counter}")
            counter += 1
        return keep, names

    def squeezed(self, nesting: int, array: np.ndarray | None = None) -> np.ndarray:
        array = self.array if array is None else array
        keep, _ = self.layout(nesting)
        return array.reshape((array.shape[0], *[array.shape[1 + a] for a in keep]))


def _pad(value: torch.Tensor, nesting: int, event_dim: int, size: int, name: str) -> torch.Tensor:
    batch_ndim = value.dim() - event_dim
    if batch_ndim > nesting + 1:
        raise ValueError(
            f"Site '{name}' has batch shape {tuple(value.shape[:batch_ndim])} with more dims "
            f"than the {nesting} plate dims plus the particle dim; declare every batch dim with "
            "a pyro.plate (or .to_event) or pass a larger max_plate_nesting."
        )
    value = value.reshape((1,) * (nesting + 1 - batch_ndim) + tuple(value.shape))
    if value.shape[0] != size:
        if value.shape[0] != 1:
            raise ValueError(
                f"Site '{name}': leading batch dim {value.shape[0]} is neither 1 nor the "
                f"number of particles {size}."
            )
        value = value.expand((size, *value.shape[1:]))
    return value


def _site_event_dim(site: dict, nesting: int) -> int:
    event_dim = site["fn"].event_dim
    if is_deterministic(site):
        value = site["value"]
        if event_dim == value.dim():  # pyro.deterministic's default: the whole value is event
            event_dim = max(value.dim() - (nesting + 1), 0)
    return event_dim


def _new_site(name: str, site: dict, event_dim: int) -> SiteDraws:
    plate_dims = {frame.dim: plate for plate, frame in site_plate_frames(site).items()}
    return SiteDraws(name=name, event_dim=event_dim, plate_dims=plate_dims)


@dataclass
class Draws:
    """Everything the ArviZ export reads, for ``S`` guide draws."""

    nesting: int
    point_plates: tuple[PointPlate, ...]
    plate_sizes: dict[str, int]
    latents: dict[str, SiteDraws]
    deterministic: dict[str, SiteDraws]
    log_likelihood: dict[str, SiteDraws]
    observed: dict[str, SiteDraws]
    log_p: np.ndarray
    log_q: np.ndarray

    @property
    def log_weights(self) -> np.ndarray:
        return self.log_p - self.log_q


def collect_draws(
    setup: Setup, num_samples: int, chunk_size: int, check: ProposalCheck | None = None
) -> Draws:
    """Run the guide and model in blocks and keep latents, log-likelihoods and observations."""
    nesting = setup.nesting
    latents: dict[str, SiteDraws] = {}
    deterministic: dict[str, SiteDraws] = {}
    log_likelihood: dict[str, SiteDraws] = {}
    observed: dict[str, SiteDraws] = {}
    plate_sizes: dict[str, int] = {}
    log_p, log_q = [], []
    plates: tuple[PointPlate, ...] = ()
    for weights in particle_blocks(setup, num_samples, chunk_size, check):
        size = weights.num_particles
        plates = weights.point_plates
        log_p.append(_numpy(weights.log_p, np.float64))
        log_q.append(_numpy(weights.log_q, np.float64))
        window = nesting + 1 if weights.vectorized else nesting
        for model_trace, _, size in particle_traces(weights):
            for name, site in sample_sites(model_trace):
                if site["infer"].get("_enumerate_dim") is not None:
                    continue  # summed out of log p(x, z): no draws of it exist
                for plate, frame in site_plate_frames(site).items():
                    plate_sizes[plate] = int(frame.size)
                if is_deterministic(site):
                    event_dim = _site_event_dim(site, nesting)
                    entry = deterministic.setdefault(name, _new_site(name, site, event_dim))
                    value = _pad(site["value"], nesting, event_dim, size, name)
                    entry.blocks.append(_numpy(value))
                elif site["is_observed"]:
                    entry = log_likelihood.setdefault(name, _new_site(name, site, 0))
                    log_prob = _observed_log_likelihood(site, model_trace, window)
                    log_prob = _pad(log_prob, nesting, 0, size, name)
                    entry.blocks.append(_numpy(log_prob))
                    if name not in observed:
                        observed[name] = _observed(name, site, nesting)
                else:
                    event_dim = site["fn"].event_dim
                    entry = latents.setdefault(name, _new_site(name, site, event_dim))
                    value = site["value"]
                    entry.device = value.device
                    if not weights.vectorized:
                        entry.value_shape = tuple(value.shape)
                    entry.blocks.append(_numpy(_pad(value, nesting, event_dim, size, name)))
    return Draws(
        nesting=nesting,
        point_plates=plates,
        plate_sizes=plate_sizes,
        latents=latents,
        deterministic=deterministic,
        log_likelihood=log_likelihood,
        observed=observed,
        log_p=np.concatenate(log_p),
        log_q=np.concatenate(log_q),
    )


def _observed_log_likelihood(site: dict, model_trace: poutine.Trace, window: int) -> torch.Tensor:
    r"""Pointwise log-likelihood of an observed site, enumerated model sites summed out.

    Without enumeration it is the site's log-density. With enumerated sites ``c`` (their values
    on dims left of the particle plate) it is the site's marginal
    :math:`\log \sum_c p(c \mid \cdot)\, p(x \mid c, \cdot)`: the log-densities of all
    enumerated sites are added (a normalized conditional sums to one over the values the
    observation does not depend on) and the enumeration dims are log-sum-exp'd away.
    ``window`` is the number of batch dims a site has without enumeration (the plates, plus the
    particle dim when vectorized).
    """
    log_prob = site_log_prob(site)
    enumerated = [
        other
        for _, other in sample_sites(model_trace)
        if other["infer"].get("_enumerate_dim") is not None
    ]
    if not enumerated or log_prob.dim() <= window:
        return log_prob
    total = log_prob
    for other in enumerated:
        total = total + site_log_prob(other)
    extra = total.dim() - window
    return total.logsumexp(tuple(range(extra))) if extra > 0 else total


def _observed(name: str, site: dict, nesting: int) -> SiteDraws:
    """Return the observation, broadcast to its site's plate dims, as a one-draw padded array."""
    fn, value = site["fn"], site["value"]
    event_dim = fn.event_dim
    value_batch = value.shape[: value.dim() - event_dim]
    batch = tuple(torch.broadcast_shapes(fn.batch_shape, value_batch))
    plates = batch[max(len(batch) - nesting, 0) :]  # without particle and enumeration dims
    plates = (1,) * (nesting - len(plates)) + plates
    shape = (1, *plates, *value.shape[value.dim() - event_dim :])
    entry = _new_site(name, site, event_dim)
    entry.blocks.append(_numpy(torch.broadcast_to(value, shape)))
    return entry


def gather(array: np.ndarray, index: np.ndarray, plates: tuple[PointPlate, ...], nesting: int):
    """Pick draws ``index[j, p]`` of a padded array, independently for every data point ``p``.

    ``index`` is ``[J, P]`` with ``P`` the flattened point plates (C order, plates left to right,
    as in :class:`ParticleWeights`). Whole-trace draws (``P = 1``) take whole draws.
    """
    draws = index.shape[0]
    shape = [draws] + [1] * (array.ndim - 1)
    for plate in plates:
        shape[1 + nesting + plate.dim] = plate.size
    index = index.reshape(shape)
    target = [draws, *np.broadcast_shapes(array.shape[1:], tuple(shape[1:]))]
    source = np.broadcast_to(array, [array.shape[0], *target[1:]])
    return np.take_along_axis(source, np.broadcast_to(index, target), axis=0)


def resample_indices(
    log_weights: np.ndarray, num_draws: int, smoothed: np.ndarray | None = None
) -> np.ndarray:
    """``[num_draws, P]`` multinomial resampling indices, per point, from ``[S, P]`` weights."""
    source = log_weights if smoothed is None else smoothed
    probs = torch.softmax(torch.as_tensor(source, dtype=torch.float64), dim=0)
    if not torch.isfinite(probs).all():
        raise ValueError("cannot resample: some data point has no draw with positive weight")
    index = torch.multinomial(probs.T.contiguous(), num_draws, replacement=True)
    return index.T.numpy()


class _UnconditionObserved(UnconditionMessenger):
    """Sample observed sites afresh; keep ``pyro.deterministic`` sites as computed.

    (A deterministic site is an observed ``Delta`` whose default ``event_dim`` covers the whole
    value, particle dim included; sampling it would duplicate the batch dims.)
    """

    def _pyro_sample(self, msg) -> None:
        if msg["infer"].get("_deterministic"):
            return
        super()._pyro_sample(msg)


def predictive(
    setup: Setup,
    latents: dict[str, SiteDraws],
    values: dict[str, np.ndarray],
    total: int,
    chunk_size: int,
) -> dict[str, SiteDraws]:
    """Sample every observed site of the model given ``total`` latent draws (padded arrays)."""
    nesting = setup.nesting
    out: dict[str, SiteDraws] = {}
    step = chunk_size if setup.vectorize else 1
    start = 0
    while start < total:
        size = min(step, total - start)
        trace = poutine.Trace()
        for name, array in values.items():
            site = latents[name]
            block = array[start : start + size]
            if not setup.vectorize:
                block = site.one_draw(block[0])
            tensor = torch.as_tensor(block, device=site.device)
            trace.add_node(
                name, type="sample", name=name, value=tensor, is_observed=False, infer={}
            )
        model = particle_plate(size, nesting)(setup.model) if setup.vectorize else setup.model
        with torch.no_grad(), poutine.block():
            predicted = poutine.trace(
                poutine.replay(_UnconditionObserved()(model), trace=trace)
            ).get_trace(*setup.args, **setup.kwargs)
        for name, site in predicted.nodes.items():
            if site["type"] != "sample" or not site["infer"].get("was_observed"):
                continue
            if is_deterministic(site) or isinstance(site["fn"], _Subsample):
                continue
            event_dim = site["fn"].event_dim
            entry = out.setdefault(name, _new_site(name, site, event_dim))
            entry.blocks.append(_numpy(_pad(site["value"], nesting, event_dim, size, name)))
        start += size
    return out
