r"""Estimators of the aggregate posterior :math:`q(z) = \frac1N \sum_n q(z \mid x_n)` of a code.

The decomposed ELBO needs :math:`\log q(z_i)` and, per dimension, :math:`\log q(z_{i,d})` at
every sample :math:`z_i \sim q(z \mid x_i)` of a batch of :math:`B` points out of :math:`N`.

* Minibatch estimators [1, Sec. 3, App. C] (:func:`minibatch_log_aggregate`), from the
  ``[S, B, B, D]`` log-densities :math:`\log q(z_{i,d} \mid x_j)`:

  - ``"mss"`` (minibatch stratified sampling): :math:`\log \sum_j W_{ij}\, q(z_i \mid x_j)`
    with the weights of :func:`mss_log_weights` (each row sums to one);
  - ``"mws"`` (minibatch weighted sampling), the paper's form
    :math:`\operatorname{logsumexp}_j \log q(z_i \mid x_j) - \log(N B)`; relative to the batch
    average :math:`\log \frac1B \sum_j q(z_i \mid x_j)` it is shifted by :math:`-\log N`
    (:func:`mws_term_shifts` gives what that does to the reported terms).

* The exact aggregate over a whole dataset (:func:`exact_log_aggregate`), for ELBO surgery [2].

:class:`SampleTerms` turns the aggregates into the per-sample index-code MI, total correlation and
dimension-wise KL. Memory is bounded by evaluating ``chunk_size`` rows at a time; factorized
Normal codes take the fused kernels of :mod:`pyro_vi_ext.infer._kernels`.

References
----------
.. [1] R. T. Q. Chen, X. Li, R. Grosse, D. Duvenaud, "Isolating Sources of Disentanglement in
   Variational Autoencoders", NeurIPS 2018.
.. [2] M. D. Hoffman, M. J. Johnson, "ELBO surgery: yet another way to carve up the variational
   evidence lower bound", NIPS 2016 Workshop on Advances in Approximate Bayesian Inference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.distributions import Normal
from torch.utils.checkpoint import checkpoint

from pyro_vi_ext.infer._kernels import (
    EXACT_BLOCK_ELEMENTS,
    FAST_BLOCK_ELEMENTS,
    NormalMinibatchAggregate,
    canonical_normal,
    normal_columns,
    normal_row_block,
    normal_row_block_stable,
)

if TYPE_CHECKING:
    from pyro_vi_ext.infer._code_layout import CodeBlock

DEFAULT_BLOCK_ELEMENTS = 2**22
"""Default bound on the elements of one ``[rows, S, columns, D]`` block (16 MiB in float32)."""

AGGREGATE_ESTIMATORS = ("mss", "mws")
"""The minibatch estimators of the aggregate posterior."""


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


@dataclass(frozen=True)
class NormalCode:
    r"""A factorized Normal code of one traced batch as plain tensors.

    Row ``i`` and column ``i`` are the same point: ``values[s, i]`` is the sample of point ``i``
    and ``loc[:, j]``, ``scale[:, j]`` the parameters of :math:`q(z \mid x_j)`.

    Attributes
    ----------
    values : torch.Tensor
        ``[S, B, D]`` samples (code sites concatenated in trace order).
    loc, scale : torch.Tensor
        ``[S', B, D]`` column parameters, ``S'`` = 1 when shared by the particles.
    """

    values: torch.Tensor
    loc: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def from_blocks(cls, blocks: Sequence[CodeBlock]) -> NormalCode | None:
        """Return the code of ``blocks`` when every block is an unmasked factorized Normal."""
        if any(b.column_log_mask is not None for b in blocks):
            return None
        params = canonical_normal(blocks)
        if params is None:
            return None
        values = torch.cat([b.values for b in blocks], -1) if len(blocks) > 1 else blocks[0].values
        return cls(values, *params)

    def detached_copy(self) -> NormalCode:
        """Return a copy that shares no memory and no graph with this code.

        The parameters of a guide (an autoguide's ``loc``) may be views of ``pyro.param``
        tensors that an optimizer step changes in place; the copy keeps this step's values.
        """
        return NormalCode(*(x.detach().clone() for x in (self.values, self.loc, self.scale)))

    def log_density(self) -> torch.Tensor:
        r"""Return :math:`\log q(z_i \mid x_i)`, ``[S, B]``: each row under its own column."""
        normal = Normal(self.loc, self.scale, validate_args=False)
        return normal.log_prob(self.values).sum(-1)

    def as_block(self) -> CodeBlock:
        """Return the code as one :class:`~pyro_vi_ext.infer._code_layout.CodeBlock`."""
        from pyro_vi_ext.infer._code_layout import CodeBlock

        density = Normal(self.loc, self.scale, validate_args=False).to_event(1)
        return CodeBlock("code", self.values, density, data_pos=1)


def _fused_normal_aggregate(
    code: NormalCode, estimator: str, dataset_size: int, chunk_size: int | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Return the fused kernel's estimates (``None`` if a density ratio left the float range)."""
    num_particles, size = code.values.shape[:2]
    step = chunk_size or max(1, FAST_BLOCK_ELEMENTS // (num_particles * size))
    joint, marginal = NormalMinibatchAggregate.apply(
        code.values, code.loc, code.scale, dataset_size, estimator == "mss", step
    )
    if bool(torch.isfinite(joint).all()) and bool(torch.isfinite(marginal).all()):
        return joint, marginal
    return None


def normal_minibatch_log_aggregate(
    code: NormalCode, estimator: str, dataset_size: int, chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""As :func:`minibatch_log_aggregate` for a :class:`NormalCode` (fused kernel first).

    Parameters
    ----------
    code : NormalCode
        Samples and column parameters of the batch.
    estimator : {"mss", "mws"}
        The aggregate-posterior estimator.
    dataset_size : int
        :math:`N`.
    chunk_size : int, optional
        Rows per block (default: automatic).

    Returns
    -------
    joint : torch.Tensor
        ``[S, B]``: the estimate of :math:`\log q(z_i)`.
    marginal : torch.Tensor
        ``[S, B, D]``: the estimates of :math:`\log q(z_{i,d})`.
    """
    result = _fused_normal_aggregate(code, estimator, dataset_size, chunk_size)
    if result is not None:
        return result
    # a density ratio beyond the float range: the log-sum-exp path is exact
    return _generic_minibatch_log_aggregate([code.as_block()], estimator, dataset_size, chunk_size)


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

    Factorized Normal codes go through :class:`NormalMinibatchAggregate` (chunked forward,
    analytic chunked backward, nothing of size ``B^2`` kept); other guides evaluate their
    ``log_prob`` on ``[rows, S, B, D]`` blocks, ``chunk_size`` rows at a time (default: blocks of
    at most :data:`DEFAULT_BLOCK_ELEMENTS`), each checkpointed under autograd. ``fast=False``
    forces the general path.
    """
    if fast:
        code = NormalCode.from_blocks(blocks)
        if code is not None:
            result = _fused_normal_aggregate(code, estimator, dataset_size, chunk_size)
            if result is not None:
                return result
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


def exact_log_aggregate(
    columns: Sequence[Sequence[CodeBlock]],
    values: Sequence[torch.Tensor],
    dataset_size: int,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Evaluate the exact aggregate posterior of a whole dataset at given samples.

    With :math:`q(z) = \frac1N \sum_n q(z \mid x_n)` over the columns (every traced batch's code
    blocks, all :math:`N` points together): :math:`\log q(z_r)` and :math:`\log q(z_{r,d})` at
    each sample row :math:`z_r`. No gradient.

    Parameters
    ----------
    columns : sequence of sequence of CodeBlock
        Per traced batch, its code blocks (the points' densities).
    values : sequence of torch.Tensor
        Per code site, the samples ``[S, R, D_site]``.
    dataset_size : int
        :math:`N`, the number of columns (points) in all batches together.
    chunk_size : int, optional
        Sample rows per block (default: automatic).

    Returns
    -------
    joint : torch.Tensor
        ``[S, R]``: :math:`\log q(z_r)`.
    marginal : torch.Tensor
        ``[S, R, D]``: :math:`\log q(z_{r,d})`.

    Notes
    -----
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
            fast = normal_columns(batch)
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
                    result = normal_row_block(fast, z_all[:, rows], col, col_stop)
                    if result is None:  # every term of some row underflowed: log-sum-exp
                        result = normal_row_block_stable(fast, z_all[:, rows], col, col_stop)
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
