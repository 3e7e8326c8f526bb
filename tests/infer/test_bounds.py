"""The pure bound functions of ``_bounds.py`` against hand-written torch on the same numbers.

Values and gradients (with respect to the log-weights) are checked against the naive formulas
written with ``exp`` / ``log`` in float64, and the per-particle coefficients of :class:`Bound`
against autograd's first and second derivatives of the bound's value.
"""

from __future__ import annotations

import math

import pytest
import torch

from pyro_vi_ext.infer._bounds import (
    Bound,
    ciwae_bound,
    effective_sample_size,
    elbo_bound,
    iwae_bound,
    log_mean_exp,
    miwae_bound,
    normalized_weights,
    renyi_bound,
)


def _log_weights(outer=3, particles=5, points=4, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (2.0 * torch.randn(outer, particles, points, generator=generator)).double()


def _naive_renyi(lw: torch.Tensor, alpha: float) -> torch.Tensor:
    return torch.log((lw.exp() ** (1.0 - alpha)).mean(1)) / (1.0 - alpha)


def _value_and_grad(fn, lw):
    leaf = lw.clone().requires_grad_()
    value = fn(leaf)
    (grad,) = torch.autograd.grad(value.sum(), leaf)
    return value.detach(), grad


def _assert_same_value_and_grad(ours, naive, lw):
    value, grad = _value_and_grad(ours, lw)
    expected_value, expected_grad = _value_and_grad(naive, lw)
    torch.testing.assert_close(value, expected_value)
    torch.testing.assert_close(grad, expected_grad)


def test_log_mean_exp_is_the_naive_formula_and_stable():
    """Check: log mean exp is the naive formula and stable."""
    lw = _log_weights()
    _assert_same_value_and_grad(log_mean_exp, lambda v: torch.log(v.exp().mean(1)), lw)
    # stable where exp over- or underflows
    big = torch.tensor([[[1000.0], [1000.0]]], dtype=torch.float64)
    assert float(log_mean_exp(big)) == pytest.approx(1000.0)
    assert float(log_mean_exp(-big)) == pytest.approx(-1000.0)


def test_elbo_iwae_miwae_ciwae_are_their_formulas():
    """Check: elbo iwae miwae ciwae are their formulas."""
    lw = _log_weights()
    _assert_same_value_and_grad(elbo_bound, lambda v: v.mean(1), lw)
    _assert_same_value_and_grad(iwae_bound, lambda v: torch.log(v.exp().mean(1)), lw)
    _assert_same_value_and_grad(miwae_bound, lambda v: torch.log(v.exp().mean(1)).mean(0), lw)
    beta = 0.3
    _assert_same_value_and_grad(
        lambda v: ciwae_bound(v, beta),
        lambda v: beta * v.mean(1) + (1 - beta) * torch.log(v.exp().mean(1)),
        lw,
    )
    assert iwae_bound(lw).shape == (3, 4) and miwae_bound(lw).shape == (4,)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.9, 2.5])
def test_renyi_bound_is_its_formula(alpha):
    """Check: renyi bound is its formula."""
    _assert_same_value_and_grad(
        lambda v: renyi_bound(v, alpha), lambda v: _naive_renyi(v, alpha), _log_weights()
    )


def test_renyi_bound_special_cases_and_monotonicity():
    """Check: renyi bound special cases and monotonicity."""
    lw = _log_weights()
    torch.testing.assert_close(renyi_bound(lw, 0.0), iwae_bound(lw))
    torch.testing.assert_close(renyi_bound(lw, 1.0), elbo_bound(lw))
    for near_one in (1.0 - 1e-6, 1.0 + 1e-6):
        torch.testing.assert_close(renyi_bound(lw, near_one), elbo_bound(lw), atol=1e-4, rtol=0)
    alphas = [0.0, 0.25, 0.5, 1.0, 1.5, 3.0]
    values = torch.stack([renyi_bound(lw, a) for a in alphas])
    assert (values[1:] <= values[:-1] + 1e-12).all()
    # equal weights: every alpha gives the common log-weight
    flat = torch.full((1, 6, 2), -3.2, dtype=torch.float64)
    for alpha in alphas:
        torch.testing.assert_close(renyi_bound(flat, alpha), torch.full((1, 2), -3.2).double())


def test_normalized_weights_and_effective_sample_size():
    """Check: normalized weights and effective sample size."""
    lw = _log_weights()
    weights = lw.exp()
    torch.testing.assert_close(normalized_weights(lw), weights / weights.sum(1, keepdim=True))
    tilted = weights**0.4
    torch.testing.assert_close(normalized_weights(lw, 0.4), tilted / tilted.sum(1, keepdim=True))
    _assert_same_value_and_grad(
        effective_sample_size, lambda v: v.exp().sum(1) ** 2 / (v.exp() ** 2).sum(1), lw
    )
    assert (effective_sample_size(lw) >= 1).all() and (effective_sample_size(lw) <= 5).all()


def _autograd_first_and_second(bound: Bound, lw: torch.Tensor):
    """Per particle: d f / d lw_k and d^2 f / d lw_k^2 (diagonal), by autograd."""
    leaf = lw.clone().requires_grad_()
    (first,) = torch.autograd.grad(bound.value(leaf).sum(), leaf, create_graph=True)
    second = torch.zeros_like(lw)
    outer, particles, points = lw.shape
    if not first.requires_grad:  # a linear bound (the ELBO): zero second derivative
        return first.detach(), second
    for k in range(particles):
        (row,) = torch.autograd.grad(first[:, k, :].sum(), leaf, retain_graph=True)
        second[:, k, :] = row[:, k, :]
    return first.detach(), second


@pytest.mark.parametrize(
    "bound",
    [Bound.iwae(), Bound.ciwae(0.4), Bound.renyi(0.5), Bound.renyi(1.0), Bound.renyi(2.0)],
    ids=lambda b: f"{b.name}-{b.alpha}-{b.elbo_weight}",
)
def test_bound_coefficients_are_its_first_and_second_derivatives(bound):
    """Check: bound coefficients are its first and second derivatives."""
    lw = _log_weights(outer=2, particles=4, points=3, seed=1)
    first, second = _autograd_first_and_second(bound, lw)
    torch.testing.assert_close(bound.particle_weights(lw), first)
    torch.testing.assert_close(bound.path_weights(lw), first - second)


def test_iwae_path_weight_is_the_squared_normalized_weight():
    """Check: iwae path weight is the squared normalized weight."""
    lw = _log_weights()
    torch.testing.assert_close(Bound.iwae().path_weights(lw), normalized_weights(lw) ** 2)
    torch.testing.assert_close(
        Bound.renyi(1.0).path_weights(lw), torch.full_like(lw, 1.0 / lw.shape[1])
    )
    assert math.isclose(float(Bound.renyi(0.0).value(lw).sum()), float(iwae_bound(lw).sum()))
