"""Entropy and mutual-information estimators behind the MIG metric (private)."""

from __future__ import annotations

import math

import numpy as np
import torch


def discrete_entropy(labels: np.ndarray) -> float:
    """Plug-in entropy (nats) of integer labels ``0..C-1``, shape ``[N]``."""
    p = np.bincount(labels).astype(np.float64)
    p = p[p > 0] / labels.shape[0]
    return float(-(p * np.log(p)).sum())


def discretize(codes: np.ndarray, num_bins: int, binning: str) -> np.ndarray:
    """Bin every column of ``codes`` ``[N, D]`` into integers ``0..num_bins-1``.

    ``"uniform"``: ``num_bins`` equal-width bins between the column's min and max (numpy's
    ``histogram`` edges, the disentanglement_lib convention). ``"quantile"``: equal-mass bins from
    mid-ranks, so equal values share a bin and any strictly monotone map of a column (increasing or
    decreasing) gives the same partition of the data.
    """
    n, d = codes.shape
    out = np.empty((n, d), dtype=np.int64)
    for j in range(d):
        x = codes[:, j]
        if binning == "uniform":
            edges = np.histogram_bin_edges(x, bins=num_bins)
            out[:, j] = np.digitize(x, edges[1:-1])
        else:
            _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
            mid = np.cumsum(counts) - counts / 2.0
            bins = np.minimum(np.floor(mid * num_bins / n), num_bins - 1).astype(np.int64)
            out[:, j] = bins[inverse.reshape(-1)]
    return out


def discrete_mutual_information(binned: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Plug-in mutual information (nats) between each code column and each factor column.

    Parameters
    ----------
    binned : ndarray of int, shape ``[N, D]``
        Discretized codes with values in ``0..B-1``.
    labels : ndarray of int, shape ``[N, K]``
        Factor classes, each column with values in ``0..C_k-1``.

    Returns
    -------
    ndarray, shape ``[D, K]``
    """
    n, d = binned.shape
    num_bins = int(binned.max()) + 1
    mi = np.zeros((d, labels.shape[1]))
    dims = np.arange(d, dtype=np.int64)
    for k in range(labels.shape[1]):
        c = int(labels[:, k].max()) + 1
        cell = (dims[None, :] * num_bins + binned) * c + labels[:, k, None]
        joint = np.bincount(cell.reshape(-1), minlength=d * num_bins * c)
        joint = joint.reshape(d, num_bins, c).astype(np.float64) / n
        pb = joint.sum(axis=2, keepdims=True)
        pc = joint.sum(axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(joint > 0, joint * np.log(joint / (pb * pc)), 0.0)
        mi[:, k] = terms.sum(axis=(1, 2))
    return np.maximum(mi, 0.0)  # clip float round-off; the plug-in MI is a KL divergence


def _log_mixture_density(
    samples: torch.Tensor, means: torch.Tensor, stds: torch.Tensor
) -> torch.Tensor:
    """``log q(z_sj)`` with ``q(z_j) = (1/M) sum_m Normal(z_j; mu_mj, sd_mj)``, shape ``[S, D]``.

    The densities are evaluated in float32 as ``[D, chunk, M]`` blocks reduced over the
    contiguous last axis (about 16 MB each); the result is float64.
    """
    s, d = samples.shape
    m = means.shape[0]
    mu = means.T.to(torch.float32).contiguous()[:, None, :]  # [D, 1, M]
    inv = (1.0 / stds).T.to(torch.float32).contiguous()[:, None, :]
    log_norm = (-torch.log(stds) - 0.5 * math.log(2.0 * math.pi)).T.to(torch.float32)
    log_norm = log_norm.contiguous()[:, None, :]
    z_all = samples.T.to(torch.float32).contiguous()  # [D, S]
    chunk = max(1, (1 << 22) // max(1, m * d))
    out = torch.empty(d, s, dtype=torch.float64)
    for start in range(0, s, chunk):
        z = z_all[:, start : start + chunk, None]  # [D, c, 1]
        log_q = ((z - mu) * inv).square_().mul_(-0.5).add_(log_norm)  # [D, c, M]
        out[:, start : start + chunk] = torch.logsumexp(log_q, dim=2)
    return out.T - math.log(m)


def gaussian_mutual_information(
    means: np.ndarray,
    stds: np.ndarray,
    labels: np.ndarray,
    num_samples: int,
    generator: torch.Generator | None,
) -> np.ndarray:
    """MI(z_j; v_k) under the encoder's factorized Gaussian ``q(z | x_n)`` (Chen et al., 2018).

    ``MI = H(z_j) - H(z_j | v_k) = E[log q(z_j | v_k) - log q(z_j)]`` where ``q(z_j)`` is the
    mixture of the ``q(z_j | x_n)`` over all data points and ``q(z_j | v_k = c)`` the mixture over
    the points with ``v_k = c``. The expectation is over a data point ``n`` drawn uniformly and
    ``z ~ q(z | x_n)``: ``num_samples`` points (all when ``N`` is smaller) are drawn without
    replacement, one ``z`` each, and both densities are exact mixtures over the data. Evaluating
    the two log-densities at the same draws (the reference code draws separate subsets for each
    entropy) makes their Monte Carlo noise cancel in the difference. Estimates below zero are
    clipped to zero, as in the reference code. Returns ``[D, K]`` in nats.
    """
    mu = torch.as_tensor(means, dtype=torch.float64)
    sd = torch.as_tensor(stds, dtype=torch.float64)
    n, d = mu.shape
    take = torch.randperm(n, generator=generator)[: min(num_samples, n)]
    z = mu[take] + sd[take] * torch.randn(take.numel(), d, generator=generator, dtype=torch.float64)
    log_marginal = _log_mixture_density(z, mu, sd)  # [S, D]
    mi = np.zeros((d, labels.shape[1]))
    for k in range(labels.shape[1]):
        lab = torch.as_tensor(labels[:, k])
        lab_take = lab[take]
        log_conditional = torch.empty_like(log_marginal)
        for c in torch.unique(lab_take):
            rows = torch.nonzero(lab == c).squeeze(1)
            here = torch.nonzero(lab_take == c).squeeze(1)
            log_conditional[here] = _log_mixture_density(z[here], mu[rows], sd[rows])
        mi[:, k] = (log_conditional - log_marginal).mean(dim=0).clamp_min(0.0).numpy()
    return mi
