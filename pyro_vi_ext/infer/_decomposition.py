"""Shared machinery of the decomposed ELBO: the code, its per-point encoder distributions, and the
chunked ``[rows, S, columns, D]`` log-density computations behind the aggregate posterior.

Vocabulary
----------
* The *data plate* is the plate over data points ``n``; the *code* is the concatenation of the
  guide's latent sites inside it (``D`` scalars per point).
* A :class:`CodeBlock` holds one code site of one traced batch of ``B`` points in a canonical
  layout: ``values`` is ``[S, B, D_site]`` (particles, points, flattened per-point dims), and the
  site's distribution evaluates ``log q(z_i | x_j)`` for rows ``z_i`` against every column ``j``.
* Per-dimension marginals ``q(z_{i,d} | x_j)`` need a factorized guide (an ``Independent`` of a
  univariate family) or a Gaussian with known 1-D marginals (``MultivariateNormal``,
  ``LowRankMultivariateNormal``: ``Normal(loc_d, sqrt(Sigma_dd))``).
* Row-chunking bounds memory. A factorized Normal code (the common case) takes fused kernels:
  :class:`_NormalMinibatchAggregate` (minibatch; one ``[S, rows, B]`` block per dimension at a
  time, in place, base-2 exponentials, and an analytic backward that recomputes the blocks) and
  :func:`_normal_row_block` (exact evaluator; matrix-vector sums over the points). Other families
  evaluate ``log_prob`` on ``[rows, S, B, D]`` blocks, checkpointed under autograd. Either way only
  ``O(S B D)`` is kept between forward and backward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pyro.poutine import Trace
from torch.distributions import (
    Distribution,
    Independent,
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
)
from torch.utils.checkpoint import checkpoint

from pyro_vi_ext.infer._weights import (
    PARTICLE_PLATE,
    latent_sites,
    sample_sites,
    site_log_prob,
    site_subsample_factor,
)

DEFAULT_BLOCK_ELEMENTS = 2**22
"""Default bound on the elements of one ``[rows, S, columns, D]`` block (16 MiB in float32)."""

ESTIMATORS = ("mss", "mws")


# ------------------------------------------------------------------------------ the data plate
@dataclass(frozen=True)
class CodeLayout:
    """Where the code lives: the data plate and the guide sites that form the code."""

    plate: str
    dim: int
    size: int
    full_size: int
    code_sites: tuple[str, ...]

    @property
    def subsampled(self) -> bool:
        return self.full_size != self.size


def _plate_frames(site: dict) -> dict[str, object]:
    return {
        f.name: f for f in site["cond_indep_stack"] if f.vectorized and f.name != PARTICLE_PLATE
    }


def find_code_layout(
    model_trace: Trace | None,
    guide_trace: Trace,
    data_plate: str | None = None,
    code_sites: Sequence[str] | None = None,
) -> CodeLayout:
    """Find the data plate and the code sites of a (pruned) model/guide trace pair.

    The data plate is ``data_plate`` when given; otherwise the subsampled plate holding guide
    latents, or, with no subsampling, the only plate holding guide latents (when several do, the
    one shared by every sample site). The code is ``code_sites`` when given, otherwise every guide
    latent site inside the data plate, in trace order. ``model_trace=None`` checks the guide only.
    """
    guide_latents = dict(latent_sites(guide_trace))
    traces = (guide_trace,) if model_trace is None else (model_trace, guide_trace)
    frames: dict[str, object] = {}
    for trace in traces:
        for _, site in sample_sites(trace):
            frames.update(_plate_frames(site))

    if data_plate is not None:
        if data_plate not in frames:
            raise ValueError(
                f"data_plate='{data_plate}' is not a vectorized plate of the model or guide; "
                f"plates found: {sorted(frames) or 'none'}"
            )
        plate = data_plate
    else:
        with_latents: dict[str, object] = {}
        for site in guide_latents.values():
            with_latents.update(_plate_frames(site))
        subsampled = [
            name
            for name, f in with_latents.items()
            if f.full_size is not None and f.full_size != f.size
        ]
        if len(subsampled) == 1:
            plate = subsampled[0]
        elif len(subsampled) > 1:
            raise ValueError(
                f"Several subsampled plates hold guide latents ({', '.join(sorted(subsampled))}); "
                "pass data_plate= to name the plate over data points."
            )
        elif len(with_latents) == 1:
            plate = next(iter(with_latents))
        elif not with_latents:
            names = ", ".join(f"'{n}'" for n in guide_latents) or "none"
            raise ValueError(
                "No code site found: no guide latent site lies inside a plate (guide latents: "
                f"{names}). The decomposed ELBO needs per-data-point latents sampled inside the "
                "data plate, e.g. `with pyro.plate('data', N, subsample=idx): pyro.sample('z', "
                "dist.Normal(loc, scale).to_event(1))` in the guide."
            )
        else:
            shared = [
                name
                for name in with_latents
                if all(
                    name in _plate_frames(site)
                    for trace in traces
                    for _, site in sample_sites(trace)
                )
            ]
            if len(shared) != 1:
                raise ValueError(
                    "Cannot tell which plate is the data plate: guide latents lie in plates "
                    f"{', '.join(sorted(with_latents))}. Pass data_plate= (and code_sites= if "
                    "needed)."
                )
            plate = shared[0]
    frame = frames[plate]

    if code_sites is not None:
        if isinstance(code_sites, str):
            code_sites = (code_sites,)
        names = tuple(code_sites)
        if not names:
            raise ValueError("code_sites is empty; name at least one guide latent site")
        for name in names:
            if name not in guide_latents:
                raise ValueError(
                    f"code site '{name}' is not a latent sample site of the guide; guide latents: "
                    f"{', '.join(guide_latents) or 'none'}"
                )
            if plate not in _plate_frames(guide_latents[name]):
                raise ValueError(
                    f"code site '{name}' lies outside the data plate '{plate}'; the code must be "
                    "per data point (sampled inside the data plate)."
                )
    else:
        names = tuple(n for n, s in guide_latents.items() if plate in _plate_frames(s))
        if not names:
            raise ValueError(
                f"No code site found: the guide samples no latent inside the data plate '{plate}'. "
                "The decomposed ELBO needs per-data-point latents (an encoder) in that plate."
            )
    for name in names if model_trace is not None else ():
        model_site = model_trace.nodes.get(name)
        if model_site is None or model_site["type"] != "sample" or model_site["is_observed"]:
            raise ValueError(f"code site '{name}' of the guide has no latent site in the model")
        if plate not in _plate_frames(model_site):
            raise ValueError(
                f"code site '{name}' lies inside plate '{plate}' in the guide but not in the model"
            )
    full_size = frame.full_size if frame.full_size is not None else frame.size
    return CodeLayout(
        plate=plate,
        dim=int(frame.dim),
        size=int(frame.size),
        full_size=int(full_size),
        code_sites=names,
    )


# -------------------------------------------------------------------------------- code blocks
def _marginals(name: str, fn: Distribution) -> tuple[Distribution, Distribution | None]:
    """``(marginal, joint)``: a univariate distribution over every scalar of the site's value
    (batch shape = the value's shape), and the joint when it is not the product of the marginals."""
    base = fn
    while isinstance(base, Independent):
        base = base.base_dist
    if base.event_shape == torch.Size():
        return base, None
    if isinstance(base, (MultivariateNormal, LowRankMultivariateNormal)):
        marginal = Normal(base.loc, base.variance.sqrt(), validate_args=False)
        return marginal, fn
    raise ValueError(
        f"Code site '{name}': the decomposed ELBO needs the per-dimension marginals "
        "q(z_d | x) of the guide, so the site's distribution must be factorized (an Independent "
        "of univariate distributions, e.g. dist.Normal(loc, scale).to_event(1)) or a "
        "MultivariateNormal / LowRankMultivariateNormal (exact Normal marginals). Got "
        f"{type(fn).__name__} with event_shape {tuple(fn.event_shape)}"
        + (f" around {type(base).__name__}" if base is not fn else "")
        + "."
    )


class CodeBlock:
    """One code site over a traced batch of points, in the canonical ``[S, B, D_site]`` layout.

    :param name: the site's name (for messages).
    :param value: the site's value, shape ``[S, ..., B, ..., event]`` (particle dim first).
    :param fn: the site's distribution, batch shape ``value.shape[:-event_dim]``.
    :param data_pos: position of the data dim in ``value.shape``.
    :param column_mask: optional boolean ``[B]``: columns to leave out of the aggregate (points
        traced twice by an overlapping batch).
    """

    def __init__(
        self,
        name: str,
        value: torch.Tensor,
        fn: Distribution,
        data_pos: int,
        column_mask: torch.Tensor | None = None,
    ):
        if data_pos < 1 or data_pos >= value.dim() - len(fn.event_shape):
            raise ValueError(f"code site '{name}': data dim {data_pos} is not a batch dim")
        self.name = name
        self.data_pos = data_pos
        self.num_particles = value.shape[0]
        self.size = value.shape[data_pos]
        shape = list(value.shape)
        self.rest_shape = tuple(shape[1:data_pos] + shape[data_pos + 1 :])
        self.dim = math.prod(self.rest_shape)
        self.values = value.movedim(data_pos, 1).reshape(self.num_particles, self.size, self.dim)
        self.marginal, self.joint = _marginals(name, fn)
        self.column_log_mask = None
        if column_mask is not None:
            zero = torch.zeros((), dtype=value.dtype, device=value.device)
            self.column_log_mask = torch.where(column_mask, zero, zero - math.inf)

    def _rows(self, z_rows: torch.Tensor) -> torch.Tensor:
        """``[S, c, D_site]`` -> ``[c, S, ..., 1, ..., event]``: rows against every column."""
        num_rows = z_rows.shape[1]
        native = z_rows.reshape(z_rows.shape[0], num_rows, *self.rest_shape).movedim(1, 0)
        return native.unsqueeze(self.data_pos + 1)

    def _pairs(self, log_prob: torch.Tensor) -> torch.Tensor:
        """``[c, S, ..., B, ...]`` -> ``[c, S, B, rest]``."""
        log_prob = log_prob.movedim(self.data_pos + 1, 2)
        return log_prob.reshape(log_prob.shape[0], log_prob.shape[1], self.size, -1)

    def pairwise(self, z_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For rows ``z_i`` (``[S, c, D_site]``): ``log q(z_i | x_j)`` ``[c, S, B]`` and the
        per-dimension ``log q(z_{i,d} | x_j)`` ``[c, S, B, D_site]`` (masked columns at -inf)."""
        rows = self._rows(z_rows)
        marginal = self._pairs(self.marginal.log_prob(rows))
        if self.joint is None:
            joint = marginal.sum(-1)
        else:
            joint = self._pairs(self.joint.log_prob(rows)).sum(-1)
        if self.column_log_mask is not None:
            joint = joint + self.column_log_mask
            marginal = marginal + self.column_log_mask[:, None]
        return joint, marginal


def data_position(site: dict, plate: str, batch_len: int) -> int:
    """Position of ``plate``'s dim in a site value padded to ``batch_len`` batch dims."""
    frame = _plate_frames(site)[plate]
    return batch_len + frame.dim


def code_blocks(
    guide_trace: Trace,
    layout: CodeLayout,
    nesting: int,
    column_mask: torch.Tensor | None = None,
) -> list[CodeBlock]:
    """The code sites of a traced batch as :class:`CodeBlock` s (``nesting`` counts the particle
    plate)."""
    blocks = []
    for name in layout.code_sites:
        site = guide_trace.nodes[name]
        fn, value = site["fn"], site["value"]
        event_dim = len(fn.event_shape)
        if value.dim() != nesting + event_dim:
            raise ValueError(
                f"code site '{name}': value of shape {tuple(value.shape)} has "
                f"{value.dim() - event_dim} batch dims, expected {nesting} (particle plate "
                "included); set max_plate_nesting to the model's plate nesting."
            )
        blocks.append(
            CodeBlock(name, value, fn, data_position(site, layout.plate, nesting), column_mask)
        )
    return blocks


def per_point(
    log_prob: torch.Tensor, site: dict, plate: str, nesting: int, num_particles: int, size: int
) -> torch.Tensor:
    """Sum a site's batch log-density to ``[S, B]`` (particles, points of the data plate)."""
    while log_prob.dim() < nesting:
        log_prob = log_prob.unsqueeze(0)
    log_prob = log_prob.movedim(data_position(site, plate, nesting), 1)
    log_prob = log_prob.reshape(log_prob.shape[0], log_prob.shape[1], -1).sum(-1)
    return log_prob.expand(num_particles, size)


def check_code_sites(model_trace: Trace, guide_trace: Trace, layout: CodeLayout) -> None:
    """Reparameterization and masks: what the minibatch estimator needs of every guide latent."""
    for name, site in latent_sites(guide_trace):
        if not site["fn"].has_rsample:
            role = "code site" if name in layout.code_sites else "guide site"
            raise ValueError(
                f"{role.capitalize()} '{name}' ({type(site['fn']).__name__}) has no rsample: the "
                "decomposed ELBO differentiates through reparameterized samples (its aggregate-"
                "posterior terms couple the points of a batch, so no per-point score-function "
                "term exists). Use a reparameterizable guide distribution."
            )
    for name in layout.code_sites:
        for kind, trace in (("guide", guide_trace), ("model", model_trace)):
            mask = trace.nodes[name]["mask"]
            if mask is not None and mask is not True:
                raise ValueError(
                    f"code site '{name}' is masked in the {kind}: masked points cannot be left out "
                    "of the aggregate posterior q(z); drop them from the batch instead."
                )


def user_scale(site: dict) -> float | None:
    """A site's scale without its plates' subsampling factors (``None`` if not one number)."""
    scale = site["scale"]
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            return None
        scale = float(scale)
    return float(scale) / site_subsample_factor(site)


def code_scale(model_trace: Trace, guide_trace: Trace, layout: CodeLayout) -> float:
    """The factor ``trace_particles`` left on the code sites' log-densities inside the log-weights:
    1 when every site shares one user scale (it is then part of ``ParticleWeights.scale``), else
    the code sites' own (common) user scale."""
    scales = [user_scale(site) for t in (model_trace, guide_trace) for _, site in sample_sites(t)]
    if all(s is not None for s in scales) and len(set(scales)) <= 1:
        return 1.0
    code = {
        user_scale(trace.nodes[name])
        for trace in (model_trace, guide_trace)
        for name in layout.code_sites
    }
    if len(code) != 1 or None in code:
        raise ValueError(
            "The code sites carry different poutine.scale factors (model vs guide, or between "
            f"sites: {sorted(map(str, code))}); the decomposition needs one scale for the code. "
            "Anneal with DecomposedELBO's alpha/beta/gamma instead."
        )
    return code.pop()


# --------------------------------------------------------------------- aggregate log-densities
def mss_log_weights(
    rows: torch.Tensor, num_columns: int, dataset_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """Rows ``[c, B]`` of the log of Chen et al.'s stratified-sampling weight matrix.

    With ``M = B - 1``: ``W[i, i] = 1/N``, ``W[i, (i + 1) mod B] = (N - M) / (N M)`` (the stratum
    sample), every other entry ``1/M``; each row sums to one.
    """
    m = num_columns - 1
    n = dataset_size
    log_w = torch.full((rows.numel(), num_columns), -math.log(m), dtype=dtype, device=rows.device)
    arange = torch.arange(rows.numel(), device=rows.device)
    log_w[arange, (rows + 1) % num_columns] = math.log(n - m) - math.log(n) - math.log(m)
    log_w[arange, rows] = -math.log(n)
    return log_w


def _row_block(
    blocks: Sequence[CodeBlock], z_rows: Sequence[torch.Tensor], log_w: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-sum-exp over columns for one chunk of rows: joint ``[c, S]``, marginals ``[c, S, D]``."""
    joint = None
    marginals = []
    for block, rows in zip(blocks, z_rows, strict=True):
        block_joint, block_marginal = block.pairwise(rows)
        joint = block_joint if joint is None else joint + block_joint
        if log_w is not None:
            block_marginal = block_marginal + log_w[:, None, :, None]
        marginals.append(torch.logsumexp(block_marginal, dim=2))
        del block_marginal
    if log_w is not None:
        joint = joint + log_w[:, None, :]
    return torch.logsumexp(joint, dim=2), torch.cat(marginals, dim=-1)


def rows_per_chunk(chunk_size: int | None, num_particles: int, columns: int, dim: int) -> int:
    if chunk_size is not None:
        return int(chunk_size)
    return max(1, DEFAULT_BLOCK_ELEMENTS // max(1, num_particles * columns * dim))


def minibatch_log_aggregate(
    blocks: Sequence[CodeBlock],
    estimator: str,
    dataset_size: int,
    chunk_size: int | None = None,
    fast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minibatch estimates of ``log q(z_i)`` ``[S, B]`` and ``log q(z_{i,d})`` ``[S, B, D]``.

    ``"mws"``: ``logsumexp_j log q(z_i | x_j) - log(N B)`` (Chen et al.'s form, also per dim).
    ``"mss"``: ``logsumexp_j (log W_ij + log q(z_i | x_j))`` and per dim with the same ``W``.

    Factorized Normal codes go through :class:`_NormalMinibatchAggregate` (chunked forward,
    analytic chunked backward, nothing of size ``B^2`` kept); other guides evaluate their
    ``log_prob`` on ``[rows, S, B, D]`` blocks, ``chunk_size`` rows at a time (default: blocks of
    at most :data:`DEFAULT_BLOCK_ELEMENTS`), each checkpointed under autograd. ``fast=False``
    forces the general path.
    """
    if fast:
        params = None
        if all(b.column_log_mask is None for b in blocks):
            params = _canonical_normal(blocks)
        if params is not None:
            z = torch.cat([b.values for b in blocks], -1) if len(blocks) > 1 else blocks[0].values
            loc, scale = params
            size = z.shape[1]
            step = chunk_size or max(1, FAST_BLOCK_ELEMENTS // (z.shape[0] * size))
            joint, marginal = _NormalMinibatchAggregate.apply(
                z, loc, scale, dataset_size, estimator == "mss", step
            )
            if bool(torch.isfinite(joint).all()) and bool(torch.isfinite(marginal).all()):
                return joint, marginal
            # a density ratio beyond the float range: the log-sum-exp path below is exact
    return _generic_minibatch_log_aggregate(blocks, estimator, dataset_size, chunk_size)


def _generic_minibatch_log_aggregate(
    blocks: Sequence[CodeBlock], estimator: str, dataset_size: int, chunk_size: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    num_particles, size = blocks[0].num_particles, blocks[0].size
    dim = sum(b.dim for b in blocks)
    step = rows_per_chunk(chunk_size, num_particles, size, dim)
    values = [b.values for b in blocks]
    use_checkpoint = (
        step < size and torch.is_grad_enabled() and any(v.requires_grad for v in values)
    )

    def run(rows: torch.Tensor, *z_rows: torch.Tensor):
        log_w = None
        if estimator == "mss":
            log_w = mss_log_weights(rows, size, dataset_size, z_rows[0].dtype)
        return _row_block(blocks, z_rows, log_w)

    joints, marginals = [], []
    for start in range(0, size, step):
        rows = torch.arange(start, min(start + step, size), device=values[0].device)
        z_rows = [v[:, start : start + step] for v in values]
        if use_checkpoint:
            joint, marginal = checkpoint(run, rows, *z_rows, use_reentrant=False)
        else:
            joint, marginal = run(rows, *z_rows)
        joints.append(joint)
        marginals.append(marginal)
    joint = torch.cat(joints, 0).transpose(0, 1)  # [S, B]
    marginal = torch.cat(marginals, 0).transpose(0, 1)  # [S, B, D]
    if estimator == "mws":
        offset = math.log(dataset_size) + math.log(size)
        joint, marginal = joint - offset, marginal - offset
    return joint, marginal


FAST_BLOCK_ELEMENTS = 2**17
"""Elements of one ``[S, rows, B]`` block of the minibatch fast path (512 KiB in float32)."""

EXACT_BLOCK_ELEMENTS = 2**18
"""Elements of one ``[S, rows, columns]`` block of the exact evaluator's fast path (1 MiB)."""

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
_LOG2E = 1.0 / math.log(2.0)  # exponentials are taken base 2 (torch's exp2 is the faster kernel)
_LN2 = math.log(2.0)
_MIN_EXP2 = -126.0  # exponents are clamped here: 2^-126 is the smallest normal float32; below it
# exp2 takes a slow path, and such terms are negligible next to the terms every sum keeps


def _shared_over_particles(x: torch.Tensor) -> torch.Tensor:
    """``x[:1]`` when ``x`` is expanded along its particle dim (stride 0), else ``x``."""
    return x[:1] if x.shape[0] > 1 and x.stride(0) == 0 else x


def _canonical_normal(blocks: Sequence[CodeBlock]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(loc, scale)`` ``[S', B, D]`` (``S'`` is 1 when shared by the particles) when every
    block is a factorized Normal, else ``None``."""
    locs, scales = [], []
    for block in blocks:
        if block.joint is not None or not isinstance(block.marginal, Normal):
            return None
        loc, scale = torch.broadcast_tensors(block.marginal.loc, block.marginal.scale)
        for x, out in ((loc, locs), (scale, scales)):
            x = x.movedim(block.data_pos, 1)
            out.append(_shared_over_particles(x.reshape(x.shape[0], block.size, block.dim)))
    if len({x.shape[0] for x in locs + scales}) > 1:
        locs = [x.expand(blocks[0].num_particles, *x.shape[1:]) for x in locs]
        scales = [x.expand(blocks[0].num_particles, *x.shape[1:]) for x in scales]
    if len(blocks) == 1:
        return locs[0], scales[0]
    return torch.cat(locs, -1), torch.cat(scales, -1)


def _matvec(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``[S, r, C] @ [S', C] -> [S, r]`` with matrix-vector kernels (faster than ``bmm`` here)."""
    if w.shape[0] == 1:
        return torch.mv(x.reshape(-1, x.shape[-1]), w[0]).reshape(x.shape[:-1])
    return torch.stack([torch.mv(x[k], w[k]) for k in range(x.shape[0])])


def _own_and_stratum(block: torch.Tensor, start: int, stop: int):
    """Views into a ``[S, r, B]`` block for rows ``start:stop``: the own entries ``(k, start + k)``
    (``[S, r]``) and the stratum entries ``(k, (start + k + 1) mod B)`` (a list of views)."""
    size = block.shape[-1]
    own = torch.diagonal(block[:, :, start:stop], dim1=1, dim2=2)
    if stop < size:
        return own, [torch.diagonal(block[:, :, start + 1 : stop + 1], dim1=1, dim2=2)]
    return own, [torch.diagonal(block[:, :, start + 1 : stop], dim1=1, dim2=2), block[:, -1:, 0]]


def _own_shifted_sum(
    log2_density: torch.Tensor, start: int, stop: int, dataset_size: int, mss: bool
) -> torch.Tensor:
    """``log sum_j W_ij exp(L_ij)`` (natural log) for ``L`` given in base 2, ``[S, r, B]``
    (overwritten), rows ``start:stop`` of the batch. Shifting by the own term ``L_ii`` keeps the
    sum at least its weight, so nothing underflows."""
    size = log2_density.shape[-1]
    own2, _ = _own_and_stratum(log2_density, start, stop)
    own = own2 * _LN2  # [S, r], natural log (a copy)
    ratio = log2_density.sub_(own2.clone()[:, :, None]).clamp_min_(_MIN_EXP2).exp2_()
    if not mss:
        return ratio.sum(-1).log_() + own - (math.log(dataset_size) + math.log(size))
    m = size - 1
    own_ratio, stratum = _own_and_stratum(ratio, start, stop)
    stratum_ratio = torch.cat([view.clone() for view in stratum], 1)
    own_ratio.zero_()
    for view in stratum:
        view.zero_()
    total = ratio.sum(-1).div_(m).add_(1.0 / dataset_size)
    total.add_(stratum_ratio, alpha=(dataset_size - m) / (dataset_size * m))
    return total.log_() + own


def _apply_weights(
    ratio: torch.Tensor, start: int, stop: int, dataset_size: int, mss: bool
) -> None:
    """Multiply ``[S, r, B]`` (rows ``start:stop``) in place by the estimator's weights ``W``."""
    size = ratio.shape[-1]
    if not mss:
        ratio.mul_(1.0 / (dataset_size * size))
        return
    m = size - 1
    ratio.mul_(1.0 / m)
    own, stratum = _own_and_stratum(ratio, start, stop)
    own.mul_(m / dataset_size)
    for view in stratum:
        view.mul_((dataset_size - m) / dataset_size)


class _NormalMinibatchAggregate(torch.autograd.Function):
    """``log sum_j W_ij q(z_i | x_j)`` and per dimension, for a factorized Normal code.

    Inputs: ``z`` ``[S, B, D]`` and the columns' ``loc``, ``scale`` ``[S', B, D]`` (``S'`` = 1
    when shared by the particles); row ``i`` and column ``i`` are the same point. Forward and
    backward run over ``rows`` rows at a time with in-place arithmetic on one ``[S, rows, B]``
    block per dimension; only the inputs and the ``[S, B(, D)]`` outputs are kept for the
    backward, which recomputes each block and applies the analytic gradient of ``log N(z | m, s)``:
    ``d/dz = -u/s``, ``d/dm = u/s``, ``d/ds = (u^2 - 1)/s`` with ``u = (z - m)/s``.
    """

    @staticmethod
    def _columns(loc, scale):
        a = scale.reciprocal()
        a_t = a.transpose(1, 2).contiguous()  # [S', D, B]
        loc_t = loc.transpose(1, 2).contiguous()
        # per-column constant of log2 N(z | m, s): -(log s + log sqrt(2 pi)) / ln 2
        const_t = ((-scale.log() - _LOG_SQRT_2PI) * _LOG2E).transpose(1, 2).contiguous()
        return a_t, loc_t, const_t

    @staticmethod
    def forward(ctx, z, loc, scale, dataset_size, mss, rows_per_block):
        num_particles, size, dim = z.shape
        a_t, loc_t, const_t = _NormalMinibatchAggregate._columns(loc, scale)
        z_t = z.transpose(1, 2).contiguous()  # [S, D, B]: contiguous rows per dimension
        joint_const = const_t.sum(1)  # [S', B]
        joint = z.new_empty(num_particles, size)
        marginal = z.new_empty(num_particles, size, dim)
        for start in range(0, size, rows_per_block):
            stop = min(start + rows_per_block, size)
            acc = None
            for d in range(dim):
                u = torch.sub(z_t[:, d, start:stop, None], loc_t[:, None, d]).mul_(a_t[:, None, d])
                acc = u * u if acc is None else acc.addcmul_(u, u)
                log2_density = torch.addcmul(const_t[:, None, d], u, u, value=-0.5 * _LOG2E)
                marginal[:, start:stop, d] = _own_shifted_sum(
                    log2_density, start, stop, dataset_size, mss
                )
            log2_density = acc.mul_(-0.5 * _LOG2E).add_(joint_const[:, None, :])
            joint[:, start:stop] = _own_shifted_sum(log2_density, start, stop, dataset_size, mss)
        ctx.save_for_backward(z, loc, scale, joint, marginal)
        ctx.settings = (dataset_size, mss, rows_per_block)
        return joint, marginal

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_joint, grad_marginal):
        z, loc, scale, joint, marginal = ctx.saved_tensors
        dataset_size, mss, rows_per_block = ctx.settings
        num_particles, size, dim = z.shape
        shared = loc.shape[0] != num_particles
        a_t, loc_t, const_t = _NormalMinibatchAggregate._columns(loc, scale)
        z_t = z.transpose(1, 2).contiguous()
        joint_const = const_t.sum(1)
        if grad_joint is None:
            grad_joint = torch.zeros_like(joint)
        if grad_marginal is None:
            grad_marginal = torch.zeros_like(marginal)
        grad_z = torch.zeros_like(z)
        grad_loc_t = torch.zeros_like(a_t)  # [S', D, B]
        grad_scale_t = torch.zeros_like(a_t)

        def column_sum(x):  # [S, r, B] -> [S', B]
            return x.sum((0, 1))[None] if shared else x.sum(1)

        for start in range(0, size, rows_per_block):
            stop = min(start + rows_per_block, size)
            z_rows = z_t[:, :, start:stop]  # [S, D, r]
            acc = None
            for d in range(dim):
                u = torch.sub(z_rows[:, d, :, None], loc_t[:, None, d]).mul_(a_t[:, None, d])
                acc = u * u if acc is None else acc.addcmul_(u, u)
            # d joint_i / d log q(z_i,d | x_j) = W_ij q(z_i | x_j) / q(z_i), the same for every d
            joint_weight = acc.mul_(-0.5 * _LOG2E).add_(joint_const[:, None, :])
            joint_weight.sub_(joint[:, start:stop, None] * _LOG2E).clamp_min_(_MIN_EXP2).exp2_()
            _apply_weights(joint_weight, start, stop, dataset_size, mss)
            joint_weight.mul_(grad_joint[:, start:stop, None])
            for d in range(dim):
                u = torch.sub(z_rows[:, d, :, None], loc_t[:, None, d]).mul_(a_t[:, None, d])
                weight = torch.addcmul(const_t[:, None, d], u, u, value=-0.5 * _LOG2E)
                weight.sub_(marginal[:, start:stop, d, None] * _LOG2E)
                weight.clamp_min_(_MIN_EXP2).exp2_()
                _apply_weights(weight, start, stop, dataset_size, mss)
                # g = d loss / d log q(z_i,d | x_j)
                g = weight.mul_(grad_marginal[:, start:stop, d, None]).add_(joint_weight)
                col_g = column_sum(g)
                gu = g.mul_(u)
                grad_z[:, start:stop, d] = -_matvec(gu, a_t[:, d])
                grad_loc_t[:, d] += column_sum(gu)
                grad_scale_t[:, d] += column_sum(gu.mul_(u)).sub_(col_g)
        grad_loc = (grad_loc_t * a_t).transpose(1, 2)
        grad_scale = (grad_scale_t * a_t).transpose(1, 2)
        return grad_z, grad_loc, grad_scale, None, None, None


@dataclass
class _NormalColumns:
    """The columns of a traced batch whose code is factorized Normal, prepared for the fast path.

    With ``a = 1 / scale`` and ``u = (z - loc) a``: ``log q(z_d | x_n) = -u^2 / 2 - log s_nd -
    log sqrt(2 pi)``. Sums over columns are taken as matrix-vector products with weights
    ``w = exp(min_n log s - log s)`` (and ``exp(C_n - max C)`` for the joint, ``C_n = -sum_d log
    s_nd``), all at most 1, so no exponent is positive and nothing overflows.
    """

    a: torch.Tensor  # [S', D, C]
    loc: torch.Tensor  # [S', D, C]
    log_scale: torch.Tensor  # [S', D, C], +inf on masked columns
    weight: torch.Tensor  # [S', D, C]
    log_scale_min: torch.Tensor  # [S', 1, D]
    joint_weight: torch.Tensor  # [S', C]
    joint_max: torch.Tensor  # [S', 1]

    @property
    def size(self) -> int:
        return self.a.shape[-1]


def _normal_columns(blocks: Sequence[CodeBlock]) -> _NormalColumns | None:
    """Fast-path parameters when every block is a factorized Normal, else ``None``."""
    params = _canonical_normal(blocks)
    if params is None:
        return None
    loc, scale = params  # [S', C, D]
    log_scale = scale.log()
    log_scale_min = log_scale.amin(1, keepdim=True)  # [S', 1, D]
    weight = torch.exp(log_scale_min - log_scale)
    joint_log = -log_scale.sum(-1)  # [S', C]
    joint_max = joint_log.amax(-1, keepdim=True)
    joint_weight = torch.exp(joint_log - joint_max)
    if blocks[0].column_log_mask is not None:
        keep = blocks[0].column_log_mask == 0  # [C]
        weight = weight * keep[:, None]
        joint_weight = joint_weight * keep
        log_scale = log_scale.masked_fill(~keep[:, None], math.inf)
    a = scale.reciprocal()
    return _NormalColumns(
        a=a.transpose(1, 2).contiguous(),
        loc=loc.transpose(1, 2).contiguous(),
        log_scale=log_scale.transpose(1, 2).contiguous(),
        weight=weight.transpose(1, 2).contiguous(),
        log_scale_min=log_scale_min,
        joint_weight=joint_weight.contiguous(),
        joint_max=joint_max,
    )


def _normal_row_block(
    columns: _NormalColumns, z_rows: torch.Tensor, start: int, stop: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Log-sum-exp over columns ``start:stop`` for rows ``z_rows`` ``[S, r, D]`` (in-place,
    no gradient): joint ``[S, r]`` and marginals ``[S, r, D]``; ``None`` if a sum underflowed."""
    num_particles, num_rows, dim = z_rows.shape
    acc = None
    sums = z_rows.new_empty(num_particles, num_rows, dim)
    for d in range(dim):
        u = torch.sub(z_rows[:, :, d, None], columns.loc[:, None, d, start:stop])
        u.mul_(columns.a[:, None, d, start:stop])  # [S, r, c]
        u.square_()
        acc = u.clone() if acc is None else acc.add_(u)
        u.mul_(-0.5 * _LOG2E).clamp_min_(_MIN_EXP2).exp2_()
        sums[:, :, d] = _matvec(u, columns.weight[:, d, start:stop])
    acc.mul_(-0.5 * _LOG2E).clamp_min_(_MIN_EXP2).exp2_()
    joint = _matvec(acc, columns.joint_weight[:, start:stop])
    tiny = torch.finfo(z_rows.dtype).tiny * 2**24
    if bool((sums < tiny).any()) or bool((joint < tiny).any()):
        return None
    marginal = sums.log_() - columns.log_scale_min - _LOG_SQRT_2PI
    joint = joint.log_() + columns.joint_max - dim * _LOG_SQRT_2PI
    return joint, marginal


def _normal_row_block_stable(
    columns: _NormalColumns, z_rows: torch.Tensor, start: int, stop: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`_normal_row_block`, with log-sum-exp (no underflow; slower)."""
    u = torch.sub(z_rows[:, :, :, None], columns.loc[:, None, :, start:stop])
    u = u * columns.a[:, None, :, start:stop]  # [S, r, D, c]
    log_density = -0.5 * u.square() - columns.log_scale[:, None, :, start:stop] - _LOG_SQRT_2PI
    return torch.logsumexp(log_density.sum(2), -1), torch.logsumexp(log_density, -1)


def exact_log_aggregate(
    columns: Sequence[Sequence[CodeBlock]],
    values: Sequence[torch.Tensor],
    dataset_size: int,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``log q(z)`` ``[S, R]`` and ``log q(z_d)`` ``[S, R, D]`` for the samples ``values``
    (per code site ``[S, R, D_site]``) under ``q(z) = (1/N) sum_n q(z | x_n)``, the columns being
    every traced batch's code blocks (all ``N`` points together). No gradient.

    Factorized Normal codes take a fast path (cache-sized blocks, in-place exponentials,
    matrix-vector sums over the points); other families evaluate their ``log_prob`` on
    ``[rows, S, columns, D]`` blocks. A block whose every term underflows falls back to the
    log-sum-exp of the general path.
    """
    num_particles, num_rows = values[0].shape[:2]
    dim = sum(v.shape[-1] for v in values)
    z_all = torch.cat(values, -1) if len(values) > 1 else values[0]
    joint_acc = z_all.new_full((num_particles, num_rows), -math.inf)
    marginal_acc = z_all.new_full((num_particles, num_rows, dim), -math.inf)

    def accumulate(rows: slice, joint: torch.Tensor, marginal: torch.Tensor) -> None:
        joint_acc[:, rows] = torch.logaddexp(joint_acc[:, rows], joint)
        marginal_acc[:, rows] = torch.logaddexp(marginal_acc[:, rows], marginal)

    with torch.no_grad():
        for batch in columns:
            fast = _normal_columns(batch)
            if fast is None:
                step = rows_per_chunk(chunk_size, num_particles, batch[0].size, dim)
                for start in range(0, num_rows, step):
                    rows = slice(start, start + step)
                    joint, marginal = _row_block(batch, [v[:, rows] for v in values], None)
                    accumulate(rows, joint.transpose(0, 1), marginal.transpose(0, 1))
                continue
            width = min(fast.size, 8192)
            step = chunk_size or max(1, EXACT_BLOCK_ELEMENTS // (num_particles * width))
            for col in range(0, fast.size, width):
                col_stop = min(col + width, fast.size)
                for start in range(0, num_rows, step):
                    rows = slice(start, start + step)
                    result = _normal_row_block(fast, z_all[:, rows], col, col_stop)
                    if result is None:  # every term of some row underflowed: log-sum-exp
                        result = _normal_row_block_stable(fast, z_all[:, rows], col, col_stop)
                    accumulate(rows, *result)
    log_n = math.log(dataset_size)
    return joint_acc - log_n, marginal_acc - log_n


# ------------------------------------------------------------------------- per-sample terms
@dataclass
class SampleTerms:
    """Per particle and point ``[S, B]``: the code's log-densities and the decomposition."""

    log_q_code: torch.Tensor  # log q(z_i | x_i)
    log_p_code: torch.Tensor  # log p(z_i)
    log_q_aggregate: torch.Tensor  # log q(z_i)
    log_q_marginals: torch.Tensor  # sum_d log q(z_{i,d})

    @property
    def index_code_mi(self) -> torch.Tensor:
        return self.log_q_code - self.log_q_aggregate

    @property
    def total_correlation(self) -> torch.Tensor:
        return self.log_q_aggregate - self.log_q_marginals

    @property
    def dimwise_kl(self) -> torch.Tensor:
        return self.log_q_marginals - self.log_p_code


def code_log_densities(
    model_trace: Trace, guide_trace: Trace, layout: CodeLayout, nesting: int, num_particles: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log q(z_i | x_i)`` and ``log p(z_i)`` of the code, ``[S, B]`` each (unscaled)."""
    totals = []
    for trace in (guide_trace, model_trace):
        total = None
        for name in layout.code_sites:
            site = trace.nodes[name]
            value = per_point(
                site_log_prob(site), site, layout.plate, nesting, num_particles, layout.size
            )
            total = value if total is None else total + value
        totals.append(total)
    return totals[0], totals[1]


__all__ = [
    "DEFAULT_BLOCK_ELEMENTS",
    "ESTIMATORS",
    "CodeBlock",
    "CodeLayout",
    "SampleTerms",
    "check_code_sites",
    "code_blocks",
    "code_log_densities",
    "code_scale",
    "exact_log_aggregate",
    "find_code_layout",
    "minibatch_log_aggregate",
    "mss_log_weights",
    "per_point",
    "user_scale",
]
