"""The compiled path (``jit=True``) against the eager path, and the eager fast paths of issue 12.

On the same seed the compiled and the eager loss draw the same numbers, so values, gradients and
reported terms must agree (to float rounding of a reordered graph) on the call that traces and
on the calls that replay the trace.
"""

from __future__ import annotations

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyro_vi_ext import ClosedFormELBO, DecomposedELBO, ImportanceWeightedELBO, RenyiAlphaELBO
from pyro_vi_ext.infer import _weights
from pyro_vi_ext.infer._validation import ModelGuideMismatchError


class SmallVAE:
    """A 6-4-2 VAE with ``pyro.module`` networks (Normal code, Bernoulli likelihood)."""

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        self.encoder = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 4))
        self.decoder = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 6))

    def model(self, x):
        """Prior N(0, I) and Bernoulli decoder."""
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), x.new_ones(2)).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x):
        """Amortized factorized Normal."""
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            out = self.encoder(x)
            loc, scale = out[:, :2], nn.functional.softplus(out[:, 2:]) + 1e-3
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def parameters(self):
        """Return the networks' parameters."""
        return [*self.encoder.parameters(), *self.decoder.parameters()]


def _data(num: int = 8, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(num, 6, generator=generator) < 0.4).float()


def _runs(make_loss, vae: SmallVAE, batches, seeds=(0, 1, 2)):
    """Value, gradients and terms of each call, on fixed seeds."""
    loss = make_loss()
    out = []
    for seed, x in zip(seeds, batches, strict=True):
        torch.manual_seed(seed)
        value = loss.differentiable_loss(vae.model, vae.guide, x)
        grads = torch.autograd.grad(value, vae.parameters())
        out.append((value.detach(), grads, dict(loss.last_terms)))
    return loss, out


def _assert_same(eager, compiled):
    for (v1, g1, t1), (v2, g2, t2) in zip(eager, compiled, strict=True):
        torch.testing.assert_close(v2, v1, rtol=1e-5, atol=1e-5)
        for a, b in zip(g1, g2, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
        assert t1.keys() == t2.keys()
        for name in t1:
            assert t2[name] == pytest.approx(t1[name], rel=1e-5, abs=1e-5), name


LOSSES = {
    **{
        f"iw-{estimator}-K{k}": (
            lambda estimator=estimator, k=k, **kw: ImportanceWeightedELBO(
                num_particles=k, estimator=estimator, max_plate_nesting=1, **kw
            )
        )
        for estimator in ("iwae", "stl", "dreg")
        for k in (1, 3)
    },
    "miwae-dreg": lambda **kw: ImportanceWeightedELBO(
        num_particles=3, num_outer=2, estimator="dreg", max_plate_nesting=1, **kw
    ),
    "ciwae-stl": lambda **kw: ImportanceWeightedELBO(
        num_particles=3,
        variant="ciwae",
        ciwae_beta=0.3,
        estimator="stl",
        max_plate_nesting=1,
        **kw,
    ),
    "renyi-dreg": lambda **kw: RenyiAlphaELBO(
        num_particles=3, alpha=0.5, estimator="dreg", max_plate_nesting=1, **kw
    ),
    "closed-form-kl": lambda **kw: ClosedFormELBO(form="kl", max_plate_nesting=1, **kw),
    "closed-form-entropy-K2": lambda **kw: ClosedFormELBO(
        form="entropy", num_particles=2, max_plate_nesting=1, **kw
    ),
    "decomposed-mss": lambda **kw: DecomposedELBO(
        beta=4.0, aggregate="mss", dataset_size=100, max_plate_nesting=1, **kw
    ),
    "decomposed-mws-K2": lambda **kw: DecomposedELBO(
        alpha=0.5,
        gamma=2.0,
        aggregate="mws",
        num_particles=2,
        dataset_size=100,
        max_plate_nesting=1,
        **kw,
    ),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_compiled_matches_eager(name):
    """Compiled equals eager on the call that traces and on two replays."""
    make = LOSSES[name]
    batches = [_data(seed=1), _data(seed=2), _data(seed=3)]
    pyro.clear_param_store()
    _, eager = _runs(make, SmallVAE(), batches)
    pyro.clear_param_store()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no eager fallback for these
        loss, compiled = _runs(lambda: make(jit=True), SmallVAE(), batches)
    _assert_same(eager, compiled)
    assert loss._compiled.compile_count == 1  # traced once, replayed twice
    assert not loss._compiled.eager


def test_compiled_loss_and_grads_through_svi_match_eager():
    """SVI sees the parameters of a replayed graph and trains the same as eager."""
    x = _data()
    results = {}
    for jit in (False, True):
        pyro.clear_param_store()
        vae = SmallVAE()
        loss = ImportanceWeightedELBO(
            num_particles=4, estimator="dreg", max_plate_nesting=1, jit=jit
        )
        svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 0.01}), loss=loss)
        torch.manual_seed(0)
        values = [svi.step(x) for _ in range(4)]
        results[jit] = (values, [p.detach().clone() for p in vae.parameters()])
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-5)
    for a, b in zip(results[False][1], results[True][1], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_new_shapes_recompile_and_stay_exact():
    """A new batch size traces anew; the values stay those of the eager path."""
    batches = [_data(8, seed=1), _data(5, seed=2), _data(8, seed=3)]
    make = LOSSES["iw-dreg-K3"]
    pyro.clear_param_store()
    _, eager = _runs(make, SmallVAE(), batches)
    pyro.clear_param_store()
    loss, compiled = _runs(lambda: make(jit=True), SmallVAE(), batches)
    _assert_same(eager, compiled)
    assert loss._compiled.compile_count == 2  # batch 8, batch 5; the third call replays


def test_no_grad_loss_uses_its_own_trace():
    """``loss`` (no gradient) is traced separately and matches eager."""
    pyro.clear_param_store()
    vae, x = SmallVAE(), _data()
    eager = ImportanceWeightedELBO(num_particles=3, max_plate_nesting=1)
    compiled = ImportanceWeightedELBO(num_particles=3, max_plate_nesting=1, jit=True)
    for seed in (0, 1):
        torch.manual_seed(seed)
        expected = eager.loss(vae.model, vae.guide, x)
        torch.manual_seed(seed)
        assert compiled.loss(vae.model, vae.guide, x) == pytest.approx(expected, rel=1e-6)
    assert compiled._compiled.compile_count == 1


def test_untraceable_model_falls_back_with_one_warning():
    """A closure parameter cannot be traced: eager fallback, warned once."""
    # a parameter captured by closure, not through pyro.param / pyro.module: eager autograd
    # reaches it, torch.jit.trace cannot make it an input
    weight = torch.tensor(0.5, requires_grad=True)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(weight * z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(weight * x, 1.0))

    x = torch.randn(6)
    pyro.clear_param_store()
    eager = ImportanceWeightedELBO(num_particles=2, max_plate_nesting=1)
    compiled = ImportanceWeightedELBO(num_particles=2, max_plate_nesting=1, jit=True)
    with pytest.warns(UserWarning, match=r"jit=True\) runs this model and guide eagerly"):
        torch.manual_seed(0)
        got = compiled.differentiable_loss(model, guide, x)
    (got_grad,) = torch.autograd.grad(got, weight)
    torch.manual_seed(0)
    expected = eager.differentiable_loss(model, guide, x)
    (expected_grad,) = torch.autograd.grad(expected, weight)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got_grad, expected_grad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the signature now stays eager silently
        compiled.differentiable_loss(model, guide, x)
    assert compiled._compiled.compile_count == 0 and len(compiled._compiled.eager) == 1


def test_compiled_keeps_the_eager_error_of_a_broken_model():
    """A model error is raised as on the eager path, not hidden by the fallback."""

    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("w", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.zeros(x.shape[0]))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, 1.0))

    pyro.clear_param_store()
    loss = ImportanceWeightedELBO(num_particles=2, max_plate_nesting=1, jit=True)
    with pytest.raises(ModelGuideMismatchError, match="'w'"):
        loss.differentiable_loss(model, guide, torch.randn(4))


# -- eager fast paths ----------------------------------------------------------------------------
def _hierarchical(dependent: bool):
    """Guide with two latents; ``dependent``: the second's loc depends on the first latent."""

    def model(x):
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            b = pyro.sample("b", dist.Normal(a, 1.0))
            pyro.sample("x", dist.Normal(b, 1.0), obs=x)

    def guide(x):
        loc_a = pyro.param("loc_a", torch.tensor(0.3))
        loc_b = pyro.param("loc_b", torch.zeros(x.shape[0]) + 0.1)
        scale = pyro.param("scale", torch.tensor(0.8), constraint=dist.constraints.positive)
        a = pyro.sample("a", dist.Normal(loc_a, scale))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("b", dist.Normal(loc_b + (a if dependent else 0.0), scale))

    return model, guide


@pytest.mark.parametrize("dependent", [False, True])
@pytest.mark.parametrize("estimator", ["stl", "dreg"])
def test_detached_log_q_from_distributions_equals_the_replay(dependent, estimator):
    """The rebuilt detached log q equals the detached replay (value, gradients)."""
    model, guide = _hierarchical(dependent)
    x = torch.randn(5)
    out = {}
    for fast in (False, True):
        pyro.clear_param_store()
        torch.manual_seed(0)
        guide(x)  # create the params
        params = [pyro.param(n).unconstrained() for n in ("loc_a", "loc_b", "scale")]
        loss = ImportanceWeightedELBO(num_particles=4, estimator=estimator, max_plate_nesting=1)
        original = _weights.detached_guide_from_distributions
        if not fast:
            _weights.detached_guide_from_distributions = lambda *a, **k: None  # force the replay
        try:
            torch.manual_seed(1)
            value = loss.differentiable_loss(model, guide, x)
        finally:
            _weights.detached_guide_from_distributions = original
        out[fast] = (value.detach(), torch.autograd.grad(value, params))
    torch.testing.assert_close(out[True][0], out[False][0])
    for a, b in zip(out[False][1], out[True][1], strict=True):
        torch.testing.assert_close(b, a)
    cache = loss.structure_cache()
    (independence,) = [v for k, v in cache.items() if k[0] == "detach"]
    assert list(independence.values()) == [not dependent]


def test_structure_checks_rerun_for_a_new_structure():
    """Cached checks are keyed on the structure: a new structure is checked."""

    def model(x, extra):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.0, 1.0))
            if extra:
                pyro.sample("w", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)

    def guide(x, extra):
        loc = pyro.param("loc", torch.zeros(x.shape[0]))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, 1.0))

    pyro.clear_param_store()
    loss = ImportanceWeightedELBO(num_particles=2, max_plate_nesting=1)
    x = torch.randn(4)
    loss.differentiable_loss(model, guide, x, False)
    loss.differentiable_loss(model, guide, x, False)  # cached structure
    with pytest.raises(ModelGuideMismatchError, match="'w'"):
        loss.differentiable_loss(model, guide, x, True)  # new structure: checked again


def test_piwae_runs_eagerly_and_says_why():
    """PIWAE is not traced and the warning says why."""
    batches = [_data(seed=1), _data(seed=2)]

    def make(**kw):
        return ImportanceWeightedELBO(
            num_particles=3, num_outer=2, variant="piwae", max_plate_nesting=1, **kw
        )

    pyro.clear_param_store()
    _, eager = _runs(make, SmallVAE(), batches, seeds=(0, 1))
    pyro.clear_param_store()
    with pytest.warns(UserWarning, match="piwae.*torch.autograd.grad"):
        loss, compiled = _runs(lambda: make(jit=True), SmallVAE(), batches, seeds=(0, 1))
    _assert_same(eager, compiled)
    assert loss._compiled.compile_count == 0


def test_second_model_with_the_same_module_names_compiles():
    """Module names shared with another model do not prevent tracing."""
    # pyro.module("encoder", ...) of a second VAE finds the first one's tensors in the store; the
    # second VAE's networks still use their own parameters, which the trace must take as inputs
    pyro.clear_param_store()
    first, second = SmallVAE(seed=0), SmallVAE(seed=1)
    batches = [_data(seed=1), _data(seed=2)]
    make = LOSSES["iw-dreg-K3"]
    _runs(lambda: make(jit=True), first, batches, seeds=(0, 1))
    _, eager = _runs(make, second, batches, seeds=(0, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, compiled = _runs(lambda: make(jit=True), second, batches, seeds=(0, 1))
    _assert_same(eager, compiled)
    assert loss._compiled.compile_count == 1


# -- jit="inductor": loss and gradients captured with make_fx, compiled by torch inductor ---------
def _without_compiler():
    """Inductor sees no C++ compiler: the captured graph runs uncompiled (fast to test)."""
    import torch._inductor.config as inductor_config

    return inductor_config.patch({"cpp.cxx": ("no-such-cxx-compiler-for-this-test",)})


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_inductor_capture_matches_eager(name):
    """The captured loss-and-gradient graph equals eager on the capturing call and two replays."""
    make = LOSSES[name]
    batches = [_data(seed=1), _data(seed=2), _data(seed=3)]
    pyro.clear_param_store()
    _, eager = _runs(make, SmallVAE(), batches)
    pyro.clear_param_store()
    with _without_compiler(), pytest.warns(UserWarning, match="no-such-cxx") as record:
        loss, compiled = _runs(lambda: make(jit="inductor"), SmallVAE(), batches)
    assert len(record) == 1  # warned once, when capturing
    assert "captured graph uncompiled" in str(record[0].message)
    _assert_same(eager, compiled)
    assert loss._compiled.compile_count == 1 and not loss._compiled.eager
    (trace,) = loss._compiled.traces.values()
    assert not trace.compiled


def test_inductor_gradient_scales_with_the_incoming_gradient():
    """``backward`` of ``c * loss`` adds ``c`` times the graph's gradients (also via ``.grad``)."""
    x = _data()
    pyro.clear_param_store()
    vae = SmallVAE()
    loss = ImportanceWeightedELBO(num_particles=3, estimator="dreg", max_plate_nesting=1)
    torch.manual_seed(0)
    expected = torch.autograd.grad(
        loss.differentiable_loss(vae.model, vae.guide, x), vae.encoder[0].weight
    )[0]
    compiled = ImportanceWeightedELBO(
        num_particles=3, estimator="dreg", max_plate_nesting=1, jit="inductor"
    )
    with _without_compiler(), pytest.warns(UserWarning, match="uncompiled"):
        torch.manual_seed(0)
        compiled.differentiable_loss(vae.model, vae.guide, x)  # captures
    for scale in (1.0, -2.5):
        torch.manual_seed(0)
        value = compiled.differentiable_loss(vae.model, vae.guide, x)  # replays
        for param in vae.parameters():
            param.grad = None
        (scale * value).backward()
        torch.testing.assert_close(vae.encoder[0].weight.grad, scale * expected)


def test_inductor_second_backward_through_one_value_raises():
    """The gradients are handed out once, and not differentiable: both errors say what to do."""
    pyro.clear_param_store()
    vae, x = SmallVAE(), _data()
    loss = ImportanceWeightedELBO(num_particles=2, max_plate_nesting=1, jit="inductor")
    with _without_compiler(), pytest.warns(UserWarning, match="uncompiled"):
        loss.differentiable_loss(vae.model, vae.guide, x)
    value = loss.differentiable_loss(vae.model, vae.guide, x)
    value.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated twice.*call the loss again"):
        value.backward()
    value = loss.differentiable_loss(vae.model, vae.guide, x)
    with pytest.raises(RuntimeError, match="create_graph=True.*use jit=True or jit=False"):
        torch.autograd.grad(value, vae.parameters(), create_graph=True)


def test_inductor_unused_and_frozen_parameters_match_eager():
    """A parameter the value does not use gets no ``.grad``; freezing one recaptures."""

    def guide(x):
        pyro.param("unused", torch.tensor(3.0))
        _tiny_guide(x)

    x = torch.randn(5)
    for jit in (False, "inductor"):
        pyro.clear_param_store()
        loss = ImportanceWeightedELBO(num_particles=2, max_plate_nesting=1, jit=jit)
        with _without_compiler(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for frozen in (False, False, True, True):
                pyro.param("model_loc", torch.tensor(0.2)).unconstrained().requires_grad_(
                    not frozen
                )
                torch.manual_seed(0)
                loss.differentiable_loss(_tiny_model, guide, x).backward()
                grads = {
                    name: pyro.param(name).unconstrained().grad
                    for name in ("unused", "model_loc", "shift")
                }
                assert grads["unused"] is None
                assert (grads["model_loc"] is None) == frozen
                assert grads["shift"] is not None
                for name in grads:
                    pyro.param(name).unconstrained().grad = None
        if jit:
            assert loss._compiled.compile_count == 2  # recaptured once, for the frozen one


def test_inductor_warns_when_it_keeps_recompiling(monkeypatch):
    """Many signatures (here batch sizes) compile many graphs: one warning says so."""
    from pyro_vi_ext.infer import _compiled

    monkeypatch.setattr(_compiled, "INDUCTOR_MANY_COMPILES", 2)  # 8 by default; 2 is faster
    pyro.clear_param_store()
    loss = ImportanceWeightedELBO(num_particles=2, max_plate_nesting=1, jit="inductor")
    with _without_compiler(), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for size in (2, 3, 2, 4):
            loss.differentiable_loss(_tiny_model, _tiny_guide, torch.randn(size))
    messages = [str(w.message) for w in record if "keeps recompiling" in str(w.message)]
    assert len(messages) == 1 and "2 graphs compiled" in messages[0]
    assert loss._compiled.compile_count == 3


def test_inductor_through_svi_and_loss_match_eager():
    """SVI sees and updates the parameters of the replayed graph; ``loss`` has its own graph."""
    x = _data()
    results = {}
    for jit in (False, "inductor"):
        pyro.clear_param_store()
        vae = SmallVAE()
        loss = ImportanceWeightedELBO(
            num_particles=4, estimator="stl", max_plate_nesting=1, jit=jit
        )
        svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 0.01}), loss=loss)
        torch.manual_seed(0)
        with _without_compiler(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = [svi.step(x) for _ in range(3)] + [svi.evaluate_loss(x) for _ in range(2)]
        results[jit] = (values, [p.detach().clone() for p in vae.parameters()])
        if jit:
            assert loss._compiled.compile_count == 2  # with and without gradients
    assert results["inductor"][0] == pytest.approx(results[False][0], rel=1e-5)
    for a, b in zip(results[False][1], results["inductor"][1], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_inductor_closure_parameter_falls_back_to_eager():
    """A parameter the capture cannot see as an input would lose its gradient: eager instead."""
    weight = torch.tensor(0.5, requires_grad=True)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(weight * z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(weight * x, 1.0))

    x = torch.randn(6)
    pyro.clear_param_store()
    compiled = ImportanceWeightedELBO(num_particles=2, max_plate_nesting=1, jit="inductor")
    with pytest.warns(UserWarning, match=r"jit='inductor'\) runs this model and guide eagerly"):
        torch.manual_seed(0)
        got = compiled.differentiable_loss(model, guide, x)
    (got_grad,) = torch.autograd.grad(got, weight)
    torch.manual_seed(0)
    expected = ImportanceWeightedELBO(num_particles=2, max_plate_nesting=1).differentiable_loss(
        model, guide, x
    )
    (expected_grad,) = torch.autograd.grad(expected, weight)
    torch.testing.assert_close(got_grad, expected_grad)
    assert compiled._compiled.compile_count == 0 and len(compiled._compiled.eager) == 1


@pytest.mark.parametrize("jit", ["trace", "Inductor", 2, None])
def test_unknown_jit_option_is_refused(jit):
    """Only False, True and "inductor" are accepted, and the error names them."""
    with pytest.raises(ValueError, match="jit must be False, True .* or 'inductor'"):
        ImportanceWeightedELBO(jit=jit)


def test_missing_compiler_is_reported_before_compiling():
    """The compiler check names what it looked for; with g++ on the PATH it finds it."""
    from pyro_vi_ext.infer._compiled import cpp_compiler_problem

    with _without_compiler():
        problem = cpp_compiler_problem()
    assert problem is not None and "no-such-cxx" in problem and "install g++" in problem
    import shutil

    if shutil.which("g++"):
        assert cpp_compiler_problem() is None


def _tiny_model(x):
    loc = pyro.param("model_loc", torch.tensor(0.2))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(loc, 1.0))
        pyro.sample("x", dist.Normal(z, 0.5), obs=x)


def _tiny_guide(x):
    shift = pyro.param("shift", torch.tensor(0.1))
    scale = pyro.param("scale", torch.tensor(0.7), constraint=dist.constraints.positive)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x / 2 + shift, scale))


def _compiled_against_eager(make, model, guide, params, batches):
    out = {}
    for jit in (False, "inductor"):
        pyro.clear_param_store()
        loss = make(jit=jit)
        rows = []
        for seed, x in enumerate(batches):
            torch.manual_seed(seed)
            value = loss.differentiable_loss(model, guide, x)
            leaves = [pyro.param(name).unconstrained() for name in params]
            rows.append((value.detach(), torch.autograd.grad(value, leaves), dict(loss.last_terms)))
        out[jit] = (loss, rows)
    _assert_same(out[False][1], out["inductor"][1])
    return out["inductor"][0]


@pytest.mark.slow
@pytest.mark.skipif(__import__("shutil").which("g++") is None, reason="needs a C++ compiler")
def test_inductor_compiles_a_small_model():
    """Inductor really compiles (a two-site model, DReG at K = 3) and matches eager."""
    batches = [torch.randn(5) for _ in range(3)]
    loss = _compiled_against_eager(
        lambda **kw: ImportanceWeightedELBO(
            num_particles=3, estimator="dreg", max_plate_nesting=1, **kw
        ),
        _tiny_model,
        _tiny_guide,
        ["model_loc", "shift", "scale"],
        batches,
    )
    (trace,) = loss._compiled.traces.values()
    assert trace.compiled and loss._compiled.compile_count == 1


@pytest.mark.slow
@pytest.mark.skipif(__import__("shutil").which("g++") is None, reason="needs a C++ compiler")
@pytest.mark.parametrize("name", ["iw-iwae-K1", "iw-stl-K3", "renyi-dreg", "decomposed-mss"])
def test_inductor_compiled_vae_matches_eager(name):
    """The compiled kernels of the small VAE equal eager (values, gradients, terms)."""
    make = LOSSES[name]
    batches = [_data(seed=1), _data(seed=2), _data(seed=3)]
    pyro.clear_param_store()
    _, eager = _runs(make, SmallVAE(), batches)
    pyro.clear_param_store()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither fallback
        loss, compiled = _runs(lambda: make(jit="inductor"), SmallVAE(), batches)
    _assert_same(eager, compiled)
    (trace,) = loss._compiled.traces.values()
    assert trace.compiled and loss._compiled.compile_count == 1


_SUBSAMPLED_DATA = torch.linspace(-2.0, 2.0, 20)


def _subsampled_model():
    loc = pyro.param("model_loc", torch.tensor(0.1))
    with pyro.plate("data", 20, subsample_size=5) as idx:
        z = pyro.sample("z", dist.Normal(loc, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=_SUBSAMPLED_DATA[idx])


def _subsampled_guide():
    shift = pyro.param("shift", torch.zeros(20))
    with pyro.plate("data", 20, subsample_size=5) as idx:
        pyro.sample("z", dist.Normal(_SUBSAMPLED_DATA[idx] / 2 + shift[idx], 0.8))


def _subsampled_against_eager():
    """Compare on three seeds; each seed draws another minibatch inside the graph."""
    loss = _compiled_against_eager(
        lambda **kw: ImportanceWeightedELBO(
            num_particles=3, estimator="dreg", max_plate_nesting=1, **kw
        ),
        lambda x: _subsampled_model(),
        lambda x: _subsampled_guide(),
        ["model_loc", "shift"],
        [None, None, None],
    )
    return loss


def test_inductor_capture_redraws_the_subsample():
    """The minibatch indices are drawn in the graph: a replay subsamples afresh, as eager."""
    with _without_compiler(), pytest.warns(UserWarning, match="uncompiled"):
        loss = _subsampled_against_eager()
    assert loss._compiled.compile_count == 1


@pytest.mark.slow
@pytest.mark.skipif(__import__("shutil").which("g++") is None, reason="needs a C++ compiler")
def test_inductor_compiled_subsample_matches_eager():
    """The compiled kernels redraw the subsample with torch's generator, as eager."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = _subsampled_against_eager()
    (trace,) = loss._compiled.traces.values()
    assert trace.compiled


# -- what the compiled graphs must not freeze (red-team defects d2, d3, d4, d7, d8, d9) ----------
def _eager_and_compiled(jit, run):
    """``run(loss)`` with an eager and a compiled loss, each on a fresh param store."""
    out = {}
    for option in (False, jit):
        pyro.clear_param_store()
        loss = ImportanceWeightedELBO(num_particles=3, max_plate_nesting=1, jit=option)
        with _without_compiler(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[option] = run(loss)
        out[f"{option}-loss"] = loss
    return out[False], out[jit], out[f"{jit}-loss"]


def _assert_close_rows(expected, actual):
    for (v1, g1), (v2, g2) in zip(expected, actual, strict=True):
        torch.testing.assert_close(v2, v1, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("jit", [True, "inductor"])
def test_module_train_eval_switch_recaptures(jit):
    """Dropout follows ``train()`` / ``eval()``: the flags select (or capture) the graph."""
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(2, 6), nn.Dropout(0.5), nn.Linear(6, 2))
    x = torch.randn(5, 2)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[:, 0])

    def guide(x):
        pyro.module("encoder", encoder)
        out = encoder(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(out[:, 0], out[:, 1].exp()))

    def run(loss):
        rows = []
        for mode in (True, False, True, False):
            encoder.train(mode)
            torch.manual_seed(1)
            value = loss.differentiable_loss(model, guide, x)
            rows.append((value.detach(), torch.autograd.grad(value, encoder[0].weight)[0]))
        return rows

    expected, actual, loss = _eager_and_compiled(jit, run)
    assert not torch.allclose(expected[0][0], expected[1][0])  # dropout matters here
    _assert_close_rows(expected, actual)
    assert loss._compiled.compile_count == 2  # one graph per mode, each replayed once


def _module_guide(net):
    def guide(x):
        encoder = pyro.module("encoder", net["encoder"])
        out = encoder(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(out[:, :2], out[:, 2:].exp()).to_event(1))

    return guide


def _code_model(x):
    loc = pyro.param("model_loc", torch.zeros(2))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)


@pytest.mark.parametrize("change", ["new-module", "set-state", "clear-store"])
@pytest.mark.parametrize("jit", [True, "inductor"])
def test_replaced_or_cleared_parameters_recapture(jit, change):
    """A new module under the same name, a restored store, a cleared store: fresh weights."""
    x = torch.randn(4, 2)

    def run(loss):
        torch.manual_seed(5)
        net = {"encoder": nn.Linear(2, 4)}
        guide = _module_guide(net)
        torch.manual_seed(0)
        loss.differentiable_loss(_code_model, guide, x)
        if change == "new-module":
            torch.manual_seed(6)
            net["encoder"] = nn.Linear(2, 4)
        elif change == "set-state":
            state = dict(pyro.get_param_store().get_state())
            state["params"] = {
                k: (v.detach() + 1.0).requires_grad_() for k, v in state["params"].items()
            }
            pyro.get_param_store().set_state(state)
        else:
            pyro.clear_param_store()
        rows = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            value = loss.differentiable_loss(_code_model, guide, x)
            leaf = pyro.param("model_loc").unconstrained()
            rows.append((value.detach(), torch.autograd.grad(value, leaf)[0]))
        return rows

    expected, actual, loss = _eager_and_compiled(jit, run)
    _assert_close_rows(expected, actual)
    assert loss._compiled.compile_count == 2  # recaptured once, then replayed


@pytest.mark.parametrize("jit", [True, "inductor"])
def test_user_branch_on_a_tensor_value_runs_eagerly(jit):
    """``if (x > 0).all():`` in the model would be frozen: eager, and the warning says where."""

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            scale = 1.0 if (x > 0).all() else 10.0
            pyro.sample("x", dist.Normal(z, scale), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, 1.0))

    batches = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-1.0, 2.0, 3.0])]
    values = {}
    for option in (False, jit):
        pyro.clear_param_store()
        loss = ImportanceWeightedELBO(num_particles=3, max_plate_nesting=1, jit=option)
        with _without_compiler(), warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            values[option] = []
            for x in batches:
                torch.manual_seed(1)
                values[option].append(loss.loss(model, guide, x))
    assert values[jit] == pytest.approx(values[False], rel=1e-6)
    messages = [str(w.message) for w in record if "reads a tensor value" in str(w.message)]
    assert len(messages) == 1 and "test_compiled.py:" in messages[0]
    assert "freeze" in messages[0]
    assert loss._compiled.compile_count == 0 and len(loss._compiled.eager) == 1


@pytest.mark.parametrize("kind", ["float", "tensor"])
@pytest.mark.parametrize("jit", [True, "inductor"])
def test_annealing_factor_passed_as_an_argument_is_not_frozen(jit, kind):
    """KL annealing through an argument: a float recompiles per value, a tensor flows in."""
    from pyro import poutine

    x = torch.randn(4)

    def model(x, beta):
        with pyro.plate("data", 4):
            with poutine.scale(scale=beta):
                z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x, beta):
        loc = pyro.param("loc", torch.full((4,), 0.3))
        with pyro.plate("data", 4):
            with poutine.scale(scale=beta):
                pyro.sample("z", dist.Normal(loc, 1.0))

    def run(loss):
        rows = []
        for beta in (0.1, 1.0, 0.1):
            torch.manual_seed(0)
            factor = beta if kind == "float" else torch.tensor(beta)
            value = loss.differentiable_loss(model, guide, x, factor)
            rows.append((value.detach(), torch.autograd.grad(value, pyro.param("loc"))[0]))
        return rows

    expected, actual, loss = _eager_and_compiled(jit, run)
    assert not torch.allclose(expected[0][1], expected[1][1])  # the factor matters
    _assert_close_rows(expected, actual)
    assert loss._compiled.compile_count == (2 if kind == "float" else 1)


@pytest.mark.parametrize("source", ["global", "argument", "tensor"])
@pytest.mark.parametrize("jit", [True, "inductor"])
def test_a_scale_read_from_a_global_is_warned_about(jit, source):
    """A poutine.scale number the graph would freeze (not an argument) is named in a warning."""
    from pyro import poutine

    annealing = {"beta": 0.3}  # not the argument (0.25)
    x = torch.randn(4)

    def factor(beta):
        if source == "global":
            return annealing["beta"]
        return beta if source == "argument" else torch.tensor(beta)

    def model(x, beta):
        with pyro.plate("data", 4), poutine.scale(scale=factor(beta)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def guide(x, beta):
        loc = pyro.param("loc", torch.full((4,), 0.3))
        with pyro.plate("data", 4), poutine.scale(scale=factor(beta)):
            pyro.sample("z", dist.Normal(loc, 1.0))

    pyro.clear_param_store()
    loss = ImportanceWeightedELBO(num_particles=2, max_plate_nesting=1, jit=jit)
    with _without_compiler(), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            loss.differentiable_loss(model, guide, x, 0.25)
    messages = [str(w.message) for w in record if "freezes a scale" in str(w.message)]
    if source == "global":
        assert len(messages) == 1
        assert "site 'z'" in messages[0] and "0.3" in messages[0]
        assert "as an argument" in messages[0]
    else:
        assert messages == []


@pytest.mark.parametrize("jit", [True, "inductor"])
def test_autoguide_first_call_equals_eager(jit):
    """An autoguide sets itself up (drawing numbers) on its first call: same draws as eager."""
    from pyro.infer.autoguide import AutoNormal

    data = torch.randn(20, 2)

    def model(idx):
        weight = pyro.param("weight", torch.full((3, 2), 0.1))
        with pyro.plate("data", 20, subsample=idx):
            z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
            loc = (z[..., :, None] * weight).sum(-2)
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=data[idx])

    out = {}
    for option in (False, jit):
        pyro.clear_param_store()
        loss = DecomposedELBO(dataset_size=20, max_plate_nesting=1, jit=option)
        guide = AutoNormal(model)
        with _without_compiler(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows = []
            for _ in range(2):
                torch.manual_seed(0)
                value = loss.differentiable_loss(model, guide, torch.arange(8))
                rows.append((value.detach(), torch.autograd.grad(value, pyro.param("weight"))[0]))
        out[option] = rows
    _assert_close_rows(out[False], out[jit])


@pytest.mark.parametrize("jit", [True, "inductor"])
def test_fit_evaluation_under_its_own_data_plate_scale_is_not_a_stale_graph(jit):
    """fit's evaluation scales by the eval N / B: training's graph (its N / B) is not reused."""
    from pyro.infer.autoguide import AutoNormal

    from pyro_vi_ext import fit

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def run(option):
        pyro.clear_param_store()
        torch.manual_seed(0)
        train, held_out = (torch.randn(40) + 1.0,), (torch.randn(10) + 1.0,)
        loss = ImportanceWeightedELBO(num_particles=1, jit=option)
        with _without_compiler(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = fit(
                model,
                AutoNormal(model),
                train,
                loss,
                pyro.optim.Adam({"lr": 0.0}),
                num_epochs=1,
                batch_size=10,
                eval_data=held_out,
                eval_batch_size=10,
                data_plate="data",
                progress=False,
                seed=0,
            )
        return float(result.epoch_history["eval_loss"][-1])

    assert run(jit) == pytest.approx(run(False), rel=1e-5)


@pytest.mark.parametrize("jit", [True, "inductor"])
def test_a_branch_on_torch_equal_runs_eagerly(jit):
    """torch.equal returns a Python bool without Tensor.__bool__: still a frozen branch."""
    x = torch.randn(3)

    def model(x):
        loc = pyro.param("loc", torch.zeros(3))
        shift = 50.0 if torch.equal(x[:1], torch.zeros(1)) else 0.0
        pyro.sample("x", dist.Normal(loc + shift, 1.0).to_event(1), obs=x)

    def guide(x):
        pass

    pyro.clear_param_store()
    loss = ImportanceWeightedELBO(num_particles=1, jit=jit)
    with _without_compiler(), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        values = [
            loss.differentiable_loss(model, guide, data).item()
            for data in (torch.zeros(3), torch.zeros(3), x)
        ]
    assert values[2] == pytest.approx(-dist.Normal(0.0, 1.0).log_prob(x).sum().item(), rel=1e-6)
    assert any("reads a tensor value" in str(w.message) for w in record)
    assert loss._compiled.compile_count == 0
