"""Every exported loss satisfies Pyro's ELBO contract on the same model.

``loss``, ``loss_and_grads`` and ``differentiable_loss`` must agree in value under the same seed,
and ``loss_and_grads`` must accumulate exactly the autograd gradient of ``differentiable_loss``.
"""

import inspect

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import ELBO

import pyro_vi_ext
from pyro_vi_ext.infer._validation import ParticleChunkingError

N, D = 12, 3

# constructor settings covering every estimator option of every exported loss
SETTINGS = {
    "ImportanceWeightedELBO": [
        {"num_particles": 4, "estimator": estimator, "variant": variant, "num_outer": outer}
        for estimator in ("iwae", "stl", "dreg")
        for variant, outer in (("iwae", 1), ("iwae", 2), ("ciwae", 1), ("piwae", 2))
    ],
    "RenyiAlphaELBO": [
        {"num_particles": 4, "alpha": alpha, "estimator": estimator, "num_outer": outer}
        for estimator in ("iwae", "stl", "dreg")
        for alpha, outer in ((0.5, 1), (1.0, 1), (2.0, 2))
    ],
    "DecomposedELBO": [
        {"num_particles": 2, "estimator": estimator, "alpha": 1.0, "beta": beta, "gamma": 1.0}
        for estimator in ("mss", "mws")
        for beta in (1.0, 4.0)
    ],
    "ClosedFormELBO": [{"form": form, "num_particles": 3} for form in ("entropy", "kl")],
}


def exported_losses():
    """Return one pytest param per exported loss class and constructor setting."""
    classes = [
        getattr(pyro_vi_ext, name)
        for name in pyro_vi_ext.__all__
        if inspect.isclass(getattr(pyro_vi_ext, name))
        and issubclass(getattr(pyro_vi_ext, name), ELBO)
    ]
    return [
        pytest.param(cls, kwargs, id=f"{cls.__name__}-{'-'.join(map(str, kwargs.values()))}")
        for cls in classes
        for kwargs in SETTINGS[cls.__name__]
    ]


def test_every_exported_loss_has_settings():
    """Check: every exported loss has settings."""
    names = {
        name
        for name in pyro_vi_ext.__all__
        if inspect.isclass(getattr(pyro_vi_ext, name))
        and issubclass(getattr(pyro_vi_ext, name), ELBO)
    }
    assert names <= set(SETTINGS), f"add conformance settings for {names - set(SETTINGS)}"


def model(x, *, idx=None, n_data=None):
    """Toy model: linear decoder param, latent z and observed x in a data plate."""
    decoder = pyro.param("decoder", torch.eye(D) * 0.8)
    with pyro.plate("data", N if n_data is None else n_data, subsample=idx):
        z = pyro.sample("z", dist.Normal(torch.zeros(D), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ decoder, 1.0).to_event(1), obs=x)


def guide(x, *, idx=None, n_data=None):
    """Toy guide: amortized Normal for z."""
    weight = pyro.param("weight", torch.full((D, D), 0.1) + 0.3 * torch.eye(D))
    bias = pyro.param("bias", torch.zeros(D))
    scale = pyro.param("scale", torch.full((D,), 0.8), constraint=dist.constraints.positive)
    with pyro.plate("data", N if n_data is None else n_data, subsample=idx):
        pyro.sample("z", dist.Normal(x @ weight + bias, scale).to_event(1))


@pytest.fixture
def data():
    """Return a fixed dataset for the conformance model."""
    return torch.randn(N, D) * 1.5


def _grads(names):
    store = pyro.get_param_store()
    return {name: store.get_param(name).unconstrained().grad.clone() for name in names}


@pytest.mark.parametrize("cls, kwargs", exported_losses())
@pytest.mark.parametrize("subsample", [False, True], ids=["full", "minibatch"])
def test_loss_methods_agree(cls, kwargs, subsample, data):
    """Check: loss methods agree."""
    idx = torch.tensor([1, 4, 6, 7, 10]) if subsample else None
    x = data[idx] if subsample else data
    loss = cls(**kwargs)
    pyro.set_rng_seed(1)
    loss.loss(model, guide, x, idx=idx, n_data=N)  # creates the parameters
    names = ["decoder", "weight", "bias", "scale"]
    params = [pyro.get_param_store().get_param(n).unconstrained() for n in names]

    pyro.set_rng_seed(2)
    value = loss.loss(model, guide, x, idx=idx, n_data=N)
    pyro.set_rng_seed(2)
    differentiable = loss.differentiable_loss(model, guide, x, idx=idx, n_data=N)
    expected = torch.autograd.grad(differentiable, params)
    pyro.set_rng_seed(2)
    returned = loss.loss_and_grads(model, guide, x, idx=idx, n_data=N)
    grads = _grads(names)

    assert isinstance(value, float) and isinstance(returned, float)
    assert value == pytest.approx(differentiable.item(), rel=1e-5, abs=1e-4)
    assert returned == pytest.approx(differentiable.item(), rel=1e-5, abs=1e-4)
    for name, grad in zip(names, expected, strict=True):
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    assert any(g.abs().sum() > 0 for g in expected)
    assert loss.last_terms and all(isinstance(v, float) for v in loss.last_terms.values())


@pytest.mark.parametrize("cls, kwargs", exported_losses())
def test_svi_and_elbo_module(cls, kwargs, data):
    """Check: svi and elbo module."""
    loss = cls(**kwargs)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), loss=loss)
    values = [svi.step(data) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(values)))

    module = loss(model, guide)  # ELBOModule: the path of plain torch optimizers
    out = module(data)
    assert out.shape == () and out.requires_grad


# particle chunking (``particle_chunk_size`` below M K): loss and loss_and_grads keep the contract,
# differentiable_loss (and so ELBOModule) refuses by design; exactness against the unchunked loss
# on the same draws is tested in test_chunked.py
CHUNKED_SETTINGS = [
    pytest.param(cls, {**kwargs, "particle_chunk_size": 3}, id=f"{cls.__name__}-{label}")
    for cls, kwargs, label in [
        (pyro_vi_ext.ImportanceWeightedELBO, {"num_particles": 4, "estimator": e}, e)
        for e in ("iwae", "stl", "dreg")
    ]
    + [
        (
            pyro_vi_ext.ImportanceWeightedELBO,
            {"num_particles": 4, "num_outer": 2, "variant": "ciwae", "estimator": "dreg"},
            "ciwae-M2-dreg",
        ),
        (
            pyro_vi_ext.RenyiAlphaELBO,
            {"num_particles": 4, "alpha": 0.5, "estimator": "dreg"},
            "alpha0.5-dreg",
        ),
    ]
]


@pytest.mark.parametrize("cls, kwargs", CHUNKED_SETTINGS)
@pytest.mark.parametrize("subsample", [False, True], ids=["full", "minibatch"])
def test_chunked_loss_methods_agree(cls, kwargs, subsample, data):
    """Check: chunked loss and loss_and_grads agree; differentiable_loss refuses by name."""
    idx = torch.tensor([1, 4, 6, 7, 10]) if subsample else None
    x = data[idx] if subsample else data
    loss = cls(**kwargs)
    pyro.set_rng_seed(1)
    loss.loss(model, guide, x, idx=idx, n_data=N)  # creates the parameters
    names = ["decoder", "weight", "bias", "scale"]

    pyro.set_rng_seed(2)
    value = loss.loss(model, guide, x, idx=idx, n_data=N)
    pyro.set_rng_seed(2)
    returned = loss.loss_and_grads(model, guide, x, idx=idx, n_data=N)
    grads = _grads(names)
    assert isinstance(value, float) and isinstance(returned, float)
    assert returned == pytest.approx(value, rel=1e-12, abs=1e-12)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for g in grads.values())
    assert loss.last_terms and all(isinstance(v, float) for v in loss.last_terms.values())
    with pytest.raises(ParticleChunkingError, match="loss_and_grads"):
        loss.differentiable_loss(model, guide, x, idx=idx, n_data=N)


@pytest.mark.parametrize("cls, kwargs", CHUNKED_SETTINGS)
def test_chunked_svi(cls, kwargs, data):
    """Check: SVI steps with a chunked loss; ELBOModule refuses it."""
    loss = cls(**kwargs)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), loss=loss)
    values = [svi.step(data) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(values)))
    with pytest.raises(ParticleChunkingError):
        loss(model, guide)(data)
