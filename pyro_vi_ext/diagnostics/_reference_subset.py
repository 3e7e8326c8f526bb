r"""The aggregate posterior of a factorized Normal code, estimated over random reference subsets.

For a sample :math:`z_n \sim q(z \mid x_n)` of point :math:`n` out of :math:`N`,

.. math::

    q(z_n) = \frac1N \Big[ q(z_n \mid x_n) + \sum_{m \ne n} q(z_n \mid x_m) \Big].

The own term is kept exactly (a stratum of its own: it is usually the largest term) and the sum
over the other :math:`N - 1` points is estimated from a uniform random subset :math:`R_n` of
:math:`M` of them, drawn without replacement:

.. math::

    \hat q(z_n) = \frac1N \Big[ q(z_n \mid x_n)
        + \frac{N - 1}{M} \sum_{m \in R_n} q(z_n \mid x_m) \Big],
    \qquad \mathbb E\, \hat q(z_n) = q(z_n),

and the same, with the same subset, for every marginal :math:`q(z_{n,d})`. At :math:`M = N - 1`
the subset is every other point and the estimate is exact.

Sharing of subsets. The points are split into contiguous *reference blocks*; each block draws
one uniform subset :math:`R` of :math:`M + 1` points, independently of the other blocks. A row
:math:`n` of the block uses :math:`R_n = R \setminus \{n\}` when :math:`n \in R`, and otherwise
:math:`R` without its last-drawn point; either way :math:`R_n` is a uniform :math:`M`-subset of
the other points.

Jensen bias and its correction. With :math:`\rho_{n,m} = \frac{N - 1}{N M} q(z_n \mid x_m) /
\hat q(z_n)` and :math:`y_{n,m} = M \rho_{n,m}`, the relative error is :math:`\delta_n = \hat
q(z_n) / q(z_n) - 1 \approx \bar y_n - \mathbb E \bar y_n`, a sample mean over :math:`M` of the
:math:`N - 1` columns, of variance :math:`V_n = (1 - \frac{M}{N - 1}) s_n^2 / M`, where
:math:`s_n^2` is the sample variance of :math:`y_{n,m}` over :math:`R_n` (finite-population
sampling without replacement). Since :math:`\mathbb E \log(1 + \delta) \approx -\frac12 \mathbb
E \delta^2`, :math:`\log \hat q` is biased low by :math:`V_n / 2 = O(1/M)`; the estimator returns
the delta-method corrected :math:`\log \hat q(z_n) + \hat V_n / 2` (bias :math:`o(1/M)`), and the
same per marginal.

Standard error of the subset. The error of a term's block mean :math:`T_b` (over its rows and
samples) is, to first order, :math:`\frac1M \sum_{m \in R} v_m` minus its expectation, with the
column contribution :math:`v_m = \operatorname{mean}_{n \in b} \pm y_{n,m}` (joint density for
:math:`\log q(z)`, sum over dimensions for :math:`\sum_d \log q(z_d)`, with the term's signs).
Its variance is estimated as :math:`(1 - \frac{M}{N - 1}) s_v^2 / M`, and the blocks, with
independent subsets, add: :math:`\operatorname{Var} = \sum_b (N_b / N)^2
\operatorname{Var}(T_b)`. This is the part of the error due to the subsets given the codes;
the Monte Carlo error of the codes is added by the caller.

Bias allowance. The expansion behind the correction is second order in :math:`\delta_n`, and
heavy-tailed :math:`q(z_n \mid x_m)` (nearly disjoint posteriors, MI near :math:`\log N`) leave a
bias beyond it. On Gaussian tables (N = 3000, D = 10, 10 subsets each) the bias left after the
correction stayed below the correction itself at every M tried (M = 200: 0.057 vs 0.065 nats;
500: 0.015 vs 0.033; 1000: 0.0026 vs 0.017; 2000: 0.0008 vs 0.005), so each term's size of
correction is reported as an allowance for the remaining bias and added, in quadrature, to the
subset standard error by :func:`~pyro_vi_ext.diagnostics.elbo_surgery`.

References
----------
.. [1] M. D. Hoffman, M. J. Johnson, "ELBO surgery: yet another way to carve up the variational
   evidence lower bound", NIPS 2016 Workshop on Advances in Approximate Bayesian Inference.
.. [2] W. G. Cochran, "Sampling Techniques", 3rd ed., Wiley 1977: Ch. 2 (simple random sampling
   without replacement, finite-population correction) and Ch. 6 (ratio estimators, the delta
   method's bias).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch

REFERENCE_BLOCK_ELEMENTS = 2**19
"""Bound on the elements of one ``[S, rows, D, M + 1]`` block (2 MiB in float32)."""

MAX_POINTS_PER_REFERENCE = 4096
"""At most this many points share one reference subset."""

MIN_REFERENCE_BLOCKS = 64
"""Datasets of at least this many points get at least this many independent subsets."""

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
_LOG2E = 1.0 / math.log(2.0)  # the marginals' exponentials are taken base 2 (the faster kernel)
_LN2 = math.log(2.0)
_MIN_EXP2 = -126.0  # 2^-126, the smallest normal float32: below it exp2 takes a slow path
_MIN_SHIFTED_SUM = 2.0**-40  # the fast marginal path needs row sums above this (see its use)


@dataclass(frozen=True)
class ReferenceSubsetEstimate:
    r"""The subset estimates of the aggregate posterior at every sample, and their error.

    Attributes
    ----------
    log_aggregate : torch.Tensor
        ``[S, N]``: bias-corrected :math:`\log \hat q(z_{s,n})`.
    log_marginals : torch.Tensor
        ``[S, N, D]``: bias-corrected :math:`\log \hat q(z_{s,n,d})`.
    variances : dict of str to float
        Per aggregate term (``index_code_mi``, ``total_correlation``, ``dimwise_kl``,
        ``marginal_kl``): the estimated variance of its mean over all samples due to the
        reference subsets.
    num_blocks : int
        Independent reference subsets drawn.
    bias_corrections : dict of str to float
        Per aggregate term, the size of the delta-method correction in its mean:
        :math:`\overline{\hat V_n}/2` of the joint (``index_code_mi``, ``marginal_kl``), the
        sum over dimensions of the marginals' (``dimwise_kl``), and both added
        (``total_correlation``, an upper bound since the two enter with opposite signs).
    """

    log_aggregate: torch.Tensor
    log_marginals: torch.Tensor
    variances: dict[str, float]
    num_blocks: int
    bias_corrections: dict[str, float]


def points_per_reference_block(num_points: int) -> int:
    """Points sharing one subset: ``N / 64`` rounded up, between 1 and 4096."""
    return max(1, min(MAX_POINTS_PER_REFERENCE, math.ceil(num_points / MIN_REFERENCE_BLOCKS)))


def _check_parameters(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> None:
    if z.dim() != 3 or loc.dim() != 3 or loc.shape != scale.shape:
        raise ValueError(
            f"expected z [S, N, D] and loc, scale [S', N, D]; got {tuple(z.shape)}, "
            f"{tuple(loc.shape)}, {tuple(scale.shape)}"
        )
    if loc.shape[1:] != z.shape[1:] or loc.shape[0] not in (1, z.shape[0]):
        raise ValueError(
            f"loc and scale {tuple(loc.shape)} do not match the samples {tuple(z.shape)}"
        )


def subset_log_aggregate(
    z: torch.Tensor,
    loc: torch.Tensor,
    scale: torch.Tensor,
    reference_size: int,
    generator: torch.Generator,
    chunk_size: int | None = None,
) -> ReferenceSubsetEstimate:
    r"""Estimate :math:`\log q(z_n)` and :math:`\log q(z_{n,d})` from random reference subsets.

    See the module's docstring for the estimator, its bias correction and its error.

    Parameters
    ----------
    z : torch.Tensor
        ``[S, N, D]``: samples, row :math:`n` drawn from :math:`q(z \mid x_n)`.
    loc, scale : torch.Tensor
        ``[S', N, D]`` with ``S'`` 1 or ``S``: the factorized Normal :math:`q(z \mid x_n)`.
    reference_size : int
        :math:`M`, between 2 and :math:`N - 1`.
    generator : torch.Generator
        The source of the subsets (a CPU generator).
    chunk_size : int, optional
        Rows per block of the computation (default: blocks of at most
        :data:`REFERENCE_BLOCK_ELEMENTS`).

    Returns
    -------
    ReferenceSubsetEstimate
        The estimates, their subset variance per term, and the number of subsets drawn.
    """
    _check_parameters(z, loc, scale)
    num_samples, n, dim = z.shape
    m = int(reference_size)
    if not 2 <= m <= n - 1:
        raise ValueError(f"reference_size must be between 2 and N - 1 = {n - 1}, got {m}")
    device = z.device
    work = torch.float64 if z.dtype == torch.float64 else torch.float32
    z = z.to(work)
    loc, scale = loc.to(work), scale.to(work)
    inv_scale = scale.reciprocal()
    log_norm = -scale.log() - _LOG_SQRT_2PI  # [S', N, D]
    log_n = math.log(n)
    log_ref_weight = math.log(n - 1) - math.log(m) - log_n  # (N-1)/(N M) per reference term
    keep_fraction = 1.0 - m / (n - 1)  # the finite-population correction

    log_aggregate = torch.empty(num_samples, n, dtype=work, device=device)
    log_marginals = torch.empty(num_samples, n, dim, dtype=work, device=device)
    terms = ("index_code_mi", "total_correlation", "dimwise_kl", "marginal_kl")
    variances = dict.fromkeys(terms, 0.0)

    block_points = points_per_reference_block(n)
    default_rows = max(1, REFERENCE_BLOCK_ELEMENTS // (num_samples * dim * (m + 1)))
    rows_per_chunk = int(chunk_size) if chunk_size is not None else default_rows
    estimate = partial(
        _estimate,
        own_weight_inverse=n,
        log_ref_weight=log_ref_weight,
        m=m,
        keep_fraction=keep_fraction,
    )
    num_blocks = 0
    joint_correction_sum = marginal_correction_sum = 0.0
    for start in range(0, n, block_points):
        stop = min(start + block_points, n)
        num_blocks += 1
        reference = torch.randperm(n, generator=generator)[: m + 1].to(device)
        # the column each row leaves out: itself when drawn, else the last-drawn point
        dropped = torch.full((stop - start,), m, dtype=torch.long, device=device)
        inside = (reference >= start) & (reference < stop)
        dropped[reference[inside] - start] = torch.nonzero(inside).flatten()
        columns = _ReferenceColumns(
            loc[:, reference], inv_scale[:, reference], log_norm[:, reference]
        )
        joint_columns = torch.zeros(m + 1, dtype=torch.float64, device=device)
        marginal_columns = torch.zeros(m + 1, dtype=torch.float64, device=device)
        for row in range(start, stop, rows_per_chunk):
            rows = slice(row, min(row + rows_per_chunk, stop))
            z_rows = z[:, rows]  # [S, r, D]
            own = -0.5 * ((z_rows - loc[:, rows]) * inv_scale[:, rows]).square() + log_norm[:, rows]
            drop = (
                torch.arange(z_rows.shape[1], device=device),
                dropped[row - start : rows.stop - start],
            )
            log_k = columns.joint(z_rows)  # [S, r, M+1], float64
            log_k[:, drop[0], drop[1]] = -math.inf
            joint, joint_variance, joint_rho = estimate(log_k, own.sum(-1).double())
            shifted, peak = columns.marginal_shifted(z_rows)  # [S, r, D, M+1]
            shifted[:, drop[0], :, drop[1]] = 0.0
            marginal = _estimate_shifted(shifted, peak, own, n, log_ref_weight, m, keep_fraction)
            if marginal is None:  # a row's reference terms all underflowed: the stable path
                log_k = columns.marginal_log_densities(z_rows)
                log_k[:, drop[0], :, drop[1]] = -math.inf
                marginal = estimate(log_k, own)
            marginal, marginal_variance, marginal_rho = marginal
            del log_k, shifted
            joint_correction_sum += 0.5 * float(joint_variance.sum(dtype=torch.float64))
            marginal_correction_sum += 0.5 * float(marginal_variance.sum(dtype=torch.float64))
            log_aggregate[:, rows] = joint.to(work)
            log_marginals[:, rows] = marginal
            # column contributions y_{n,m} = M rho_{n,m}, summed over the block's rows and samples
            joint_columns += m * joint_rho.double()
            marginal_columns += m * marginal_rho.double()
        count = num_samples * (stop - start)
        joint_columns /= count
        marginal_columns /= count
        term_columns = {
            "index_code_mi": -joint_columns,
            "total_correlation": joint_columns - marginal_columns,
            "dimwise_kl": marginal_columns,
            "marginal_kl": joint_columns,
        }
        weight = ((stop - start) / n) ** 2
        for term, values in term_columns.items():
            variances[term] += weight * keep_fraction * float(values.var(unbiased=True)) / m
    joint_correction = joint_correction_sum / (num_samples * n)
    marginal_correction = marginal_correction_sum / (num_samples * n)
    corrections = {
        "index_code_mi": joint_correction,
        "total_correlation": joint_correction + marginal_correction,
        "dimwise_kl": marginal_correction,
        "marginal_kl": joint_correction,
    }
    return ReferenceSubsetEstimate(log_aggregate, log_marginals, variances, num_blocks, corrections)


class _ReferenceColumns:
    r"""The Normal parameters of one reference subset, arranged for the row blocks.

    With :math:`a = 1/(\sqrt2 s)` and :math:`b = a \mu`: :math:`\log q(z_d \mid x_m) = c_{md}
    - (a_{md} z_d - b_{md})^2`, :math:`c = -\log s - \log\sqrt{2\pi}`.
    """

    def __init__(self, loc: torch.Tensor, inv_scale: torch.Tensor, log_norm: torch.Tensor):
        a = inv_scale * math.sqrt(0.5)  # [S', M+1, D]
        b = a * loc
        self.log_norm = log_norm
        # joint, as a matrix product in float64: sum_d c - a^2 z^2 + 2 a b z - b^2
        self.joint_weight = torch.cat([-a.square(), 2 * a * b], -1).double().transpose(1, 2)
        self.joint_bias = (log_norm - b.square()).sum(-1).double()[:, None]  # [S', 1, M+1]
        # marginals in base 2, shifted by the columns' largest density so nothing overflows
        self.a2 = (a * math.sqrt(_LOG2E)).transpose(1, 2)[:, None].contiguous()  # [S', 1, D, M+1]
        self.minus_b2 = -(b * math.sqrt(_LOG2E)).transpose(1, 2)[:, None].contiguous()
        log2_norm = (log_norm * _LOG2E).transpose(1, 2)[:, None]
        self.peak2 = log2_norm.amax(-1, keepdim=True)  # [S', 1, D, 1]
        self.shifted_norm2 = (log2_norm - self.peak2).contiguous()

    def joint(self, z_rows: torch.Tensor) -> torch.Tensor:
        r"""Return ``[S, r, M+1]`` (float64) :math:`\log q(z_n \mid x_m)`."""
        z = z_rows.double()
        features = torch.cat([z.square(), z], -1)  # [S, r, 2D]
        return torch.matmul(features, self.joint_weight).add_(self.joint_bias)

    def marginal_shifted(self, z_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Return :math:`q(z_{n,d} \mid x_m) / e^{p_d}` ``[S, r, D, M+1]`` and :math:`p_d`."""
        u = torch.addcmul(self.minus_b2, z_rows[..., None], self.a2)
        shifted = torch.addcmul(self.shifted_norm2, u, u, value=-1.0).clamp_min_(_MIN_EXP2)
        del u
        return shifted.exp2_(), self.peak2.squeeze(-1) * _LN2

    def marginal_log_densities(self, z_rows: torch.Tensor) -> torch.Tensor:
        r"""Return ``[S, r, D, M+1]`` :math:`\log q(z_{n,d} \mid x_m)` (the stable path)."""
        u = torch.addcmul(self.minus_b2, z_rows[..., None], self.a2)
        log2_k = torch.addcmul(self.shifted_norm2 + self.peak2, u, u, value=-1.0)
        return log2_k.mul_(_LN2)


def _estimate_shifted(
    shifted: torch.Tensor,
    peak: torch.Tensor,
    own: torch.Tensor,
    own_weight_inverse: int,
    log_ref_weight: float,
    m: int,
    keep_fraction: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """As :func:`_estimate`, from ``shifted = exp(log_k - peak)``; ``None`` on an underflow."""
    reference_sum = shifted.sum(-1)
    # rho = shifted * row_scale with row_scale <= 1 / reference_sum: below 2^-40 the squares of
    # shifted lose their precision (float32) and row_scale^2 can overflow, so take the stable path
    if not bool((reference_sum >= _MIN_SHIFTED_SUM).all()):
        return None
    log_reference = reference_sum.log_() + peak + log_ref_weight
    return _finish(
        shifted, peak, log_reference, own, own_weight_inverse, log_ref_weight, m, keep_fraction
    )


def _finish(
    shifted, peak, log_reference, own, own_weight_inverse, log_ref_weight, m, keep_fraction
):
    r"""Return the corrected :math:`\log \hat q`, :math:`\hat V_n`, the columns' sums of rho."""
    log_q = torch.logaddexp(own - math.log(own_weight_inverse), log_reference)
    # rho_{n,m} = (N-1)/(N M) q(z_n | x_m) / q_hat(z_n) = shifted * row_scale: each in [0, 1]
    row_scale = torch.exp(peak + log_ref_weight - log_q)
    rho_sum = torch.exp(log_reference - log_q)
    rho_square_sum = torch.linalg.vector_norm(shifted, dim=-1).square_() * row_scale.square()
    # V_n = (1 - M/(N-1)) s_y^2 / M with y = M rho over the M used columns
    variance = keep_fraction * (m * rho_square_sum - rho_sum.square()) / (m - 1)
    variance = variance.clamp_min(0.0)
    flat = shifted.reshape(-1, shifted.shape[-1])
    column_sums = row_scale.reshape(-1).to(flat.dtype) @ flat
    return log_q + 0.5 * variance, variance, column_sums


def _estimate(
    log_k: torch.Tensor,
    own: torch.Tensor,
    own_weight_inverse: int,
    log_ref_weight: float,
    m: int,
    keep_fraction: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Bias-corrected :math:`\log \hat q` over the last dim of ``log_k``, and more.

    ``log_k`` ``[..., M+1]`` holds the reference log-densities (the left-out column at
    ``-inf``), ``own`` ``[...]`` the own log-density, weighted ``1 / own_weight_inverse``
    (:math:`1/N`); ``log_ref_weight`` is :math:`\log \frac{N-1}{N M}`. ``log_k`` is
    overwritten. Returns the corrected :math:`\log \hat q` ``[...]``, :math:`\hat V_n`
    ``[...]`` and the column sums :math:`\sum_{\dots} \rho_{\dots, m}` ``[M+1]``.
    """
    peak = log_k.amax(-1, keepdim=True)  # finite: every row keeps M >= 2 columns
    shifted = log_k.sub_(peak).exp_()  # q(z | x_m) / exp(peak)
    peak = peak.squeeze(-1)
    log_reference = shifted.sum(-1).log_() + peak + log_ref_weight
    return _finish(
        shifted, peak, log_reference, own, own_weight_inverse, log_ref_weight, m, keep_fraction
    )
