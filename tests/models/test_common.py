import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch

from models._common import check_positive, data_plate, standard_features


def _model(x, *, idx=None, n_data=None):
    with data_plate(x.shape[0], idx, n_data):
        pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)


def test_full_data_by_default_and_subsample_from_idx():
    x = torch.randn(5)
    site = poutine.trace(_model).get_trace(x).nodes["x"]
    (frame,) = site["cond_indep_stack"]
    assert (frame.name, frame.size, frame.full_size, site["scale"]) == ("data", 5, 5, 1.0)
    trace = poutine.trace(_model).get_trace(x, idx=torch.tensor([3, 9, 0, 1, 4]), n_data=10)
    (frame,) = trace.nodes["x"]["cond_indep_stack"]
    assert (frame.size, frame.full_size, trace.nodes["x"]["scale"]) == (5, 10, 2.0)
    assert torch.equal(trace.nodes["data"]["value"], torch.tensor([3, 9, 0, 1, 4]))
    # an int idx list is accepted and made long; n_data equal to the batch without idx is fine
    trace = poutine.trace(_model).get_trace(x, idx=torch.tensor([0, 1, 2, 3, 4], dtype=torch.int32))
    assert trace.nodes["data"]["value"].dtype == torch.long
    assert poutine.trace(_model).get_trace(x, n_data=5).nodes["x"]["scale"] == 1.0


@pytest.mark.parametrize(
    "idx, n_data, match",
    [
        (None, 10, "no idx"),
        (torch.arange(4), 10, "1-D tensor of the 5"),
        (torch.arange(5).reshape(5, 1), 10, "1-D tensor"),
        (torch.tensor([0, 1, 2, 3, 10]), 10, "outside"),
        (torch.tensor([0, 1, 2, 3, 7]), None, "outside"),  # idx without n_data
        (torch.tensor([-1, 1, 2, 3, 4]), 10, "outside"),
    ],
)
def test_inconsistent_minibatches_raise(idx, n_data, match):
    with pytest.raises(ValueError, match=match):
        _model(torch.randn(5), idx=idx, n_data=n_data)


def test_small_helpers():
    check_positive(a=1.0, b=1e-9)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="bad_value"):
            check_positive(bad_value=bad)
    generator = torch.Generator().manual_seed(0)
    x = standard_features(4, 2, generator, intercept=True, dtype=torch.float32)
    assert x.shape == (4, 3) and x.dtype == torch.float32 and torch.equal(x[:, 2], torch.ones(4))
    with pytest.raises(ValueError, match="positive"):
        standard_features(0, 2, generator, intercept=False, dtype=torch.float32)
