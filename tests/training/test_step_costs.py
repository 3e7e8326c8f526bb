"""The cheap per-step pieces of ``fit``: gradient norm, progress postfix, RNG isolation."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import torch

from pyro_vi_ext.training._loop import _HistoryBar
from pyro_vi_ext.training._rng import isolated_rng
from pyro_vi_ext.training._step import global_norm_value, total_norm


def _grads(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(64, 32), (32,), (8, 64), (8,), ()]
    return [torch.randn(shape, generator=generator) for shape in shapes]


def test_global_norm_value_is_the_norm_of_all_elements():
    """Check: equals the float64 norm of every element concatenated, and the tensor version."""
    grads = _grads()
    flat = torch.cat([g.reshape(-1).double() for g in grads])
    expected = float(torch.sqrt((flat**2).sum()))
    assert global_norm_value(grads) == pytest.approx(expected, rel=1e-6)
    assert global_norm_value(grads) == pytest.approx(float(total_norm(grads)), rel=1e-6)
    assert global_norm_value([torch.tensor([3.0]), torch.tensor([4.0])]) == 5.0
    assert global_norm_value([]) == 0.0


def test_global_norm_value_mixed_dtypes_take_the_general_path():
    """Check: float32 and float64 gradients together give the same norm."""
    grads = _grads(1)
    mixed = [g.double() if i % 2 else g for i, g in enumerate(grads)]
    assert global_norm_value(mixed) == pytest.approx(global_norm_value(grads), rel=1e-6)


@pytest.mark.parametrize("mixed", [False, True], ids=["fused", "general"])
def test_global_norm_value_is_nan_with_a_nan_and_an_inf(mixed):
    """Check: NaN and inf in different tensors give NaN (math.hypot alone would say inf)."""
    grads = [torch.tensor([math.inf]), torch.tensor([1.0, math.nan])]
    if mixed:
        grads[1] = grads[1].double()
    assert math.isnan(global_norm_value(grads))
    assert math.isnan(global_norm_value(list(reversed(grads))))
    assert global_norm_value([torch.tensor([math.inf]), torch.tensor([1.0])]) == math.inf


@pytest.mark.parametrize("mixed", [False, True], ids=["fused", "general"])
def test_global_norm_value_of_finite_float32_gradients_does_not_overflow(mixed):
    """Check: |g| ~ 1e20 in float32 overflows the squared sum; the norm is still finite, right."""
    grads = [torch.tensor([3e20, 4e20]), torch.tensor([1.0])]
    if mixed:
        grads[1] = grads[1].double()
    expected = math.sqrt(float(grads[0][0]) ** 2 + float(grads[0][1]) ** 2 + 1.0)
    assert math.isinf(float(torch.linalg.vector_norm(grads[0])))  # what float32 alone gives
    assert global_norm_value(grads) == pytest.approx(expected, rel=1e-12)


def test_global_norm_value_of_sparse_gradients_counts_their_values():
    """Check: a sparse COO gradient (uncoalesced: a repeated index adds) counts like its dense."""
    sparse = torch.sparse_coo_tensor([[0, 2, 2]], [3.0, 1.0, 3.0], (5,))
    dense = torch.tensor([1.0, 2.0])
    expected = math.sqrt(3.0**2 + 4.0**2 + 1.0 + 4.0)
    assert global_norm_value([sparse, dense]) == pytest.approx(expected, rel=1e-6)
    assert global_norm_value([sparse.double(), dense]) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_global_norm_value_is_not_finite_with_a_bad_element(bad):
    """Check: one NaN or inf element makes the norm non-finite (the step is then refused)."""
    grads = _grads()
    grads[2][3, 5] = bad
    assert not math.isfinite(global_norm_value(grads))


def test_progress_postfix_is_formatted_only_when_the_bar_draws():
    """Check: rows handed to the bar are formatted when tqdm draws, the latest one shown."""
    stream = io.StringIO()
    bar = _HistoryBar(total=3, file=stream, mininterval=3600.0, desc="fit")
    try:
        bar.latest_row = {"step": 1.0, "epoch": 0.0, "loss": 2.5, "loss_total": 25.0}
        bar.update(1)
        bar.latest_row = {"step": 2.0, "epoch": 0.0, "loss": 1.25, "loss_total": 12.5}
        bar.update(1)
        assert not bar.postfix  # nothing drawn within mininterval: nothing formatted
        text = str(bar)
        assert "loss=1.25" in text and "loss_total" not in text and "step=" not in text
        assert bar.latest_row is None  # formatted once
    finally:
        bar.close()
    assert "loss=1.25" in stream.getvalue().splitlines()[-1].split("\r")[-1]


def test_isolated_rng_restores_torch_python_and_numpy():
    """Check: draws inside the block leave every global generator where it was."""
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)  # noqa: NPY002 - the global state is what is isolated
    expected = (torch.rand(2), random.random(), np.random.rand())  # noqa: NPY002
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)  # noqa: NPY002
    with isolated_rng(cuda=False, seed=11):
        torch.rand(5), random.random(), np.random.rand(4)  # noqa: NPY002
    after = (torch.rand(2), random.random(), np.random.rand())  # noqa: NPY002
    assert torch.equal(after[0], expected[0])
    assert after[1] == expected[1] and after[2] == expected[2]


def test_clipping_a_norm_beyond_the_gradient_dtype_range_scales_instead_of_zeroing():
    """A float32 gradient norm above float32's range (finite in float64) is clipped, not zeroed."""
    import pyro
    import pyro.distributions as dist  # noqa: F401 - the model only needs a factor

    from pyro_vi_ext import ImportanceWeightedELBO, fit

    def model(x, idx=None, n_data=None):
        weight = pyro.param("weight", torch.zeros(2))
        pyro.factor("huge", (weight * 3e38).sum())

    def guide(x, idx=None, n_data=None):
        pass

    pyro.clear_param_store()
    fit(
        model,
        guide,
        (torch.zeros(4),),
        ImportanceWeightedELBO(num_particles=1),
        pyro.optim.SGD({"lr": 1.0}),
        num_epochs=1,
        batch_size=4,
        clip_norm=1.0,
        progress=False,
        seed=0,
    )
    weight = pyro.param("weight").detach()
    torch.testing.assert_close(weight, torch.full((2,), 2**-0.5), rtol=1e-5, atol=1e-6)
