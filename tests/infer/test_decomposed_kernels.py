"""Tests of the aggregate-posterior estimators and their fused Normal kernels.

``infer/_aggregate.py`` and ``infer/_kernels.py``: the MSS weights, the log N bound of the MI, the
kernel against the general path (values and gradients), gradcheck, and the overflow fallback.
"""

from __future__ import annotations

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_vi_ext.infer import _aggregate, _code_layout, _kernels

ESTIMATORS = ("mss", "mws")


@pytest.fixture(autouse=True)
def _single_intra_op_thread():
    """One intra-op thread: the kernels run many mid-sized ops (see test_decomposed.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_mss_weight_matrix_rows_sum_to_one():
    """Make every row of the MSS weight matrix sum to one (unlike the reference code's)."""
    b, n = 9, 1000
    log_w = _aggregate.mss_log_weights(torch.arange(b), b, n, torch.float64)
    w = log_w.exp()
    torch.testing.assert_close(w.sum(-1), torch.ones(b, dtype=torch.float64))
    torch.testing.assert_close(w.diagonal(), torch.full((b,), 1.0 / n, dtype=torch.float64))
    stratum = w[torch.arange(b), (torch.arange(b) + 1) % b]
    torch.testing.assert_close(stratum, torch.full((b,), (n - b + 1) / (n * (b - 1.0))).double())
    # the reference code fills the first column instead of the diagonal: rows then do not sum to 1
    reference = torch.full((b, b), 1.0 / (b - 1))
    reference.view(-1)[::b] = 1.0 / n
    assert not torch.allclose(reference.sum(-1), torch.ones(b))


@pytest.mark.parametrize("fast", [True, False], ids=["normal-kernel", "general"])
def test_mss_index_code_mi_never_exceeds_log_n(fast):
    """Keep every sample's MSS estimate of the MI at most log N.

    The own point has weight 1/N, so this holds even for a guide whose posteriors do not overlap
    (where the popular per-dimension bug exceeds it).
    """
    n, b, d = 5000, 64, 6
    loc = torch.randn(b, d) * 50.0
    scale = torch.full((b, d), 0.01)
    fn = dist.Normal(loc.expand(2, b, d), scale.expand(2, b, d)).to_event(1)
    z = fn.rsample()
    block = _code_layout.CodeBlock("z", z, fn, 1)
    joint, marg = _aggregate.minibatch_log_aggregate([block], "mss", n, fast=fast)
    mi = fn.log_prob(z) - joint
    assert float(mi.max()) <= math.log(n) + 1e-4
    assert float(mi.min()) > math.log(n) - 0.01  # posteriors disjoint: MI is log N
    # the popular bug adds log W to every dimension of the joint: MI far above log N
    pair = dist.Normal(loc, scale).log_prob(z[:, :, None, :])
    log_w = _aggregate.mss_log_weights(torch.arange(b), b, n, z.dtype)
    buggy_joint = torch.logsumexp((pair + log_w[..., None]).sum(-1), -1)
    assert float((fn.log_prob(z) - buggy_joint).min()) > math.log(n) + 10


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("num_particles, chunk", [(1, None), (3, 5)])
def test_normal_kernel_matches_general_path_values_and_gradients(estimator, num_particles, chunk):
    """Match the general path's values and gradients with the fused Normal kernel."""
    torch.set_default_dtype(torch.float64)
    b, d, n = 23, 4, 300
    loc0 = torch.randn(b, d, requires_grad=True)
    log_scale0 = (0.3 * torch.randn(b, d) - 0.7).requires_grad_(True)
    grads = []
    for fast in (True, False):
        fn = dist.Normal(
            loc0.expand(num_particles, b, d), log_scale0.exp().expand(num_particles, b, d)
        ).to_event(1)
        pyro.set_rng_seed(3)
        z = fn.rsample()
        joint, marg = _aggregate.minibatch_log_aggregate(
            [_code_layout.CodeBlock("z", z, fn, 1)], estimator, n, chunk, fast=fast
        )
        weights = torch.linspace(-1, 2, joint.numel()).reshape(joint.shape)
        objective = (joint * weights).sum() + (marg * marg.detach().sin()).sum()
        grads.append((joint, marg, *torch.autograd.grad(objective, [loc0, log_scale0])))
    for fast_value, general_value in zip(*grads, strict=True):
        torch.testing.assert_close(fast_value, general_value, rtol=1e-9, atol=1e-9)


def test_normal_kernel_gradcheck():
    """Pass gradcheck with the analytic backward of the fused kernel."""
    torch.set_default_dtype(torch.float64)
    z = torch.randn(2, 6, 3, requires_grad=True)
    loc = torch.randn(1, 6, 3, requires_grad=True)  # shared by the particles
    scale = (torch.rand(1, 6, 3) + 0.3).requires_grad_(True)
    for mss in (True, False):
        assert torch.autograd.gradcheck(
            lambda z, m, s, mss=mss: _kernels.NormalMinibatchAggregate.apply(z, m, s, 40, mss, 4),
            (z, loc, scale),
        )


def test_overflowing_density_ratio_falls_back_to_log_sum_exp():
    """Hand an overflowing density ratio over to the general log-sum-exp path.

    Point 1's sample lies 13 standard deviations from its own mean, right on the narrow point 0:
    ``q(z_1 | x_0) / q(z_1 | x_1)`` ~ e^95 overflows the shifted sums of the Normal kernel, so the
    general path must take over (finite, equal to brute force).
    """
    n, b = 100, 4
    loc = torch.tensor([[0.0], [390.0], [5.0], [9.0]])
    scale = torch.tensor([[1e-3], [30.0], [1.0], [1.0]])
    z = torch.tensor([[[0.0], [0.0], [5.0], [9.0]]])
    fn = dist.Normal(loc.expand(1, b, 1), scale.expand(1, b, 1)).to_event(1)
    block = _code_layout.CodeBlock("z", z, fn, 1)
    columns = _kernels.canonical_normal([block])
    raw, _ = _kernels.NormalMinibatchAggregate.apply(z, *columns, n, True, b)
    assert not torch.isfinite(raw).all()  # the kernel alone overflows here
    joint, marg = _aggregate.minibatch_log_aggregate([block], "mss", n)
    pair = dist.Normal(loc.double(), scale.double()).log_prob(z.double()[:, :, None, :])
    log_w = _aggregate.mss_log_weights(torch.arange(b), b, n, torch.float64)
    expected = torch.logsumexp(pair.sum(-1) + log_w, -1)
    assert torch.isfinite(joint).all() and torch.isfinite(marg).all()
    torch.testing.assert_close(joint.double(), expected, rtol=1e-5, atol=1e-4)


def test_parameters_shared_by_the_particles_stay_shared_under_jit_trace():
    """A traced graph passes ``[1, B, D]`` parameters to the kernel, not ``[S, B, D]`` copies.

    Under ``torch.jit.trace`` sizes are tensors; comparing them by identity would expand the
    shared parameters to every particle (S times the work of the kernel's column sums).
    """

    def columns(loc, scale):
        value = (loc + scale).expand(5, 4, 3)
        density = dist.Normal(loc, scale).to_event(1).expand([5, 4])
        return _kernels.canonical_normal([_code_layout.CodeBlock("z", value, density, data_pos=1)])

    loc, scale = torch.randn(4, 3), torch.rand(4, 3) + 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(columns, (loc, scale), check_trace=False)
    for fn in (columns, traced):
        traced_loc, traced_scale = fn(loc, scale)
        assert traced_loc.shape == traced_scale.shape == (1, 4, 3)
        torch.testing.assert_close(traced_loc[0], loc)
        torch.testing.assert_close(traced_scale[0], scale)
