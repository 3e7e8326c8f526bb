r"""Fused, row-blocked kernels for the aggregate posterior of a factorized Normal code.

The decomposed ELBO needs, for every sample :math:`z_i` of a batch, sums over the batch's points
:math:`j` of :math:`W_{ij}\, q(z_i \mid x_j)` and, per dimension, of :math:`W_{ij}\, q(z_{i,d}
\mid x_j)` (:mod:`pyro_vi_ext.infer._aggregate` says which :math:`W`). For the common code
:math:`q(z \mid x_j) = \prod_d \mathcal N(z_d \mid m_{jd}, s_{jd})` this module computes them
without ever holding the ``[S, B, B, D]`` tensor:

* :class:`NormalMinibatchAggregate` (training): one ``[S, rows, B]`` block per dimension at a
  time, in place, with base-2 exponentials shifted by each row's own term, and an analytic
  backward that recomputes the blocks, so only ``O(S B D)`` is kept between forward and backward;
* :func:`normal_columns` and :func:`normal_row_block` (exact evaluation over a whole dataset):
  matrix-vector sums over the points with weights that are at most one, so nothing overflows;
  :func:`normal_row_block_stable` is the log-sum-exp fallback when a block underflows.

With :math:`u = (z - m)/s`, :math:`\log \mathcal N(z \mid m, s) = -u^2/2 - \log s - \log
\sqrt{2\pi}`, and its derivatives are :math:`-u/s` in :math:`z`, :math:`u/s` in :math:`m` and
:math:`(u^2 - 1)/s` in :math:`s`.

References
----------
.. [1] R. T. Q. Chen, X. Li, R. Grosse, D. Duvenaud, "Isolating Sources of Disentanglement in
   Variational Autoencoders", NeurIPS 2018, Appendix C.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.distributions import Normal

if TYPE_CHECKING:
    from pyro_vi_ext.infer._code_layout import CodeBlock

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


def canonical_normal(blocks: Sequence[CodeBlock]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Return the columns' ``(loc, scale)``, ``[S', B, D]``, of a factorized Normal code.

    ``S'`` is 1 when the parameters are shared by the particles. ``None`` when some block is not
    a factorized Normal.
    """
    locs, scales = [], []
    for block in blocks:
        if block.joint is not None or not isinstance(block.marginal, Normal):
            return None
        loc, scale = torch.broadcast_tensors(block.marginal.loc, block.marginal.scale)
        for x, out in ((loc, locs), (scale, scales)):
            missing = 2 + len(block.rest_shape) - x.dim()  # a value padded with a particle dim
            if missing > 0:
                x = x.reshape((1,) * missing + tuple(x.shape))
            x = x.movedim(block.data_pos, 1)
            out.append(_shared_over_particles(x.reshape(x.shape[0], block.size, block.dim)))
    # int(): under torch.jit.trace sizes are tensors, which a set would not deduplicate
    if len({int(x.shape[0]) for x in locs + scales}) > 1:
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
    """Return views into a ``[S, r, B]`` block of rows ``start:stop``.

    The own entries ``(k, start + k)`` (``[S, r]``) and the stratum entries
    ``(k, (start + k + 1) mod B)`` (a list of views).
    """
    size = block.shape[-1]
    own = torch.diagonal(block[:, :, start:stop], dim1=1, dim2=2)
    if stop < size:
        return own, [torch.diagonal(block[:, :, start + 1 : stop + 1], dim1=1, dim2=2)]
    return own, [torch.diagonal(block[:, :, start + 1 : stop], dim1=1, dim2=2), block[:, -1:, 0]]


def _own_shifted_sum(
    log2_density: torch.Tensor, start: int, stop: int, dataset_size: int, mss: bool
) -> torch.Tensor:
    """Return ``log sum_j W_ij exp(L_ij)`` (natural log) for ``L`` given in base 2.

    ``L`` is ``[S, r, B]`` (overwritten), rows ``start:stop`` of the batch. Shifting by the own
    term ``L_ii`` keeps the sum at least its weight, so nothing underflows.
    """
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


class NormalMinibatchAggregate(torch.autograd.Function):
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
        a_t, loc_t, const_t = NormalMinibatchAggregate._columns(loc, scale)
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
        a_t, loc_t, const_t = NormalMinibatchAggregate._columns(loc, scale)
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
class NormalColumns:
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


def normal_columns(blocks: Sequence[CodeBlock]) -> NormalColumns | None:
    """Fast-path parameters when every block is a factorized Normal, else ``None``."""
    params = canonical_normal(blocks)
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
    return NormalColumns(
        a=a.transpose(1, 2).contiguous(),
        loc=loc.transpose(1, 2).contiguous(),
        log_scale=log_scale.transpose(1, 2).contiguous(),
        weight=weight.transpose(1, 2).contiguous(),
        log_scale_min=log_scale_min,
        joint_weight=joint_weight.contiguous(),
        joint_max=joint_max,
    )


def normal_row_block(
    columns: NormalColumns, z_rows: torch.Tensor, start: int, stop: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Sum the densities of columns ``start:stop`` at rows ``z_rows`` ``[S, r, D]``, in log space.

    In place and without gradient. Returns the joint ``[S, r]`` and the marginals ``[S, r, D]``,
    or ``None`` if a sum underflowed (then use :func:`normal_row_block_stable`).
    """
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


def normal_row_block_stable(
    columns: NormalColumns, z_rows: torch.Tensor, start: int, stop: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`normal_row_block`, with log-sum-exp (no underflow; slower)."""
    u = torch.sub(z_rows[:, :, :, None], columns.loc[:, None, :, start:stop])
    u = u * columns.a[:, None, :, start:stop]  # [S, r, D, c]
    log_density = -0.5 * u.square() - columns.log_scale[:, None, :, start:stop] - _LOG_SQRT_2PI
    return torch.logsumexp(log_density.sum(2), -1), torch.logsumexp(log_density, -1)
