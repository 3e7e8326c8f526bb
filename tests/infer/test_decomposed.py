"""Tests of DecomposedELBO: the loss, its terms, the Pyro contract and its errors.

Identity with the ELBO, the minibatch estimators against dense brute force, the Pyro contract,
schedules, gradients, memory and the errors of every bad input.

The synthetic problem is an amortized guide given as a fixed table of per-point Gaussian
posteriors ``q(z | x_n) = N(loc_n, diag scale_n^2)`` whose means are correlated across dimensions
(so the aggregate posterior has a large total correlation), with ``z ~ N(0, I)`` and
``x_n | z ~ N(z, I)`` in the model. Statistical checks use fixed seeds and tolerances of a few
standard errors.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.elbo import ELBOModule

from pyro_vi_ext.infer import _aggregate
from pyro_vi_ext.infer.decomposed import TERMS, DecomposedELBO

ESTIMATORS = ("mss", "mws")


@pytest.fixture(autouse=True)
def _single_intra_op_thread():
    """Run each test with one intra-op thread.

    The pairwise kernels run many mid-sized ops, and on a shared 2-core box OpenMP threads waiting
    on each other slow them down by an order of magnitude.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------- problems
def table_problem(n: int, d: int, rho: float = 0.7, scale: float = 0.3, seed: int = 0):
    """Return ``(loc [n, d], scale [n, d], x [n, d])`` of a table of Gaussian posteriors.

    Posterior means with correlation ``rho`` between every pair of dimensions, scales in
    ``scale * [0.5, 1.5)``, data near the means.
    """
    gen = torch.Generator().manual_seed(seed)
    cov = (1 - rho) * torch.eye(d) + rho * torch.ones(d, d)
    loc = torch.randn(n, d, generator=gen) @ torch.linalg.cholesky(cov).T
    scales = scale * (0.5 + torch.rand(n, d, generator=gen))
    x = loc + 0.5 * torch.randn(n, d, generator=gen)
    return loc, scales, x


def make_table_model(loc, scale, x, capture: list | None = None, learnable: bool = False):
    """Model and guide over the table; the guide appends ``(indices, z)`` to ``capture``."""
    n, d = loc.shape

    def plate(batch_size, idx):
        if idx is not None:
            return pyro.plate("data", n, subsample=idx)
        return pyro.plate("data", n, subsample_size=batch_size)

    def model(batch_size=None, idx=None):
        with plate(batch_size, idx) as ind:
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([d]).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x[ind])

    def guide(batch_size=None, idx=None):
        table_loc = pyro.param("table_loc", loc.clone()) if learnable else loc
        with plate(batch_size, idx) as ind:
            z = pyro.sample("z", dist.Normal(table_loc[ind], scale[ind]).to_event(1))
        if capture is not None:
            capture.append((ind.clone(), z.detach().clone()))

    return model, guide


def dense_terms(z, loc, scale, n_data: int, estimator: str) -> dict[str, float]:
    """Compute the minibatch decomposition by brute force, per data point.

    ``z`` ``[S, B, D]`` is drawn for the batch whose posteriors are ``loc``, ``scale`` ``[B, D]``;
    the full dense ``[S, B, B, D]`` tensor and the dense ``B x B`` weight matrix are used. Terms
    are means over points and particles.
    """
    num_particles, b, d = z.shape
    pair = torch.distributions.Normal(loc, scale).log_prob(z[:, :, None, :]).double()
    if estimator == "mss":
        m = b - 1
        w = torch.full((b, b), 1.0 / m, dtype=torch.float64)
        for i in range(b):
            w[i, (i + 1) % b] = (n_data - m) / (n_data * m)
            w[i, i] = 1.0 / n_data
        log_w = w.log()
        joint = torch.logsumexp(pair.sum(-1) + log_w, -1)
        marg = torch.logsumexp(pair + log_w[..., None], -2)
    else:
        joint = torch.logsumexp(pair.sum(-1), -1) - math.log(n_data * b)
        marg = torch.logsumexp(pair, -2) - math.log(n_data * b)
    cond = torch.distributions.Normal(loc, scale).log_prob(z).sum(-1).double()
    prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1).double()
    return {
        "index_code_mi": float((cond - joint).mean()),
        "total_correlation": float((joint - marg.sum(-1)).mean()),
        "dimwise_kl": float((marg.sum(-1) - prior).mean()),
    }


# ------------------------------------------------------------------------------------ identity
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("batch_size", [None, 7], ids=["full", "minibatch"])
def test_unit_weights_is_trace_elbo_on_the_same_samples(estimator, batch_size):
    """Equal Trace_ELBO in value and gradient with unit weights on the same draws."""
    loc, scale, x = table_problem(30, 4)
    model, guide = make_table_model(loc, scale, x, learnable=True)
    loss = DecomposedELBO(aggregate=estimator, max_plate_nesting=1, dataset_size=30)
    pyro.set_rng_seed(5)
    value = loss.differentiable_loss(model, guide, batch_size=batch_size)
    (grad,) = torch.autograd.grad(value, [pyro.param("table_loc").unconstrained()])
    pyro.set_rng_seed(5)
    expected = Trace_ELBO().differentiable_loss(model, guide, batch_size=batch_size)
    (expected_grad,) = torch.autograd.grad(expected, [pyro.param("table_loc").unconstrained()])
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(grad, expected_grad)
    terms = loss.last_terms
    assert set(terms) == set(TERMS)
    parts = (
        terms["reconstruction"]
        - terms["index_code_mi"]
        - terms["total_correlation"]
        - terms["dimwise_kl"]
    )
    assert parts == pytest.approx(terms["elbo"], abs=1e-4)
    assert terms["elbo"] == pytest.approx(-value.item() / 30, rel=1e-5)


def test_unit_weights_give_trace_elbo_in_expectation():
    """Independent draws: the mean of DecomposedELBO(1, 1, 1) matches Trace_ELBO's within SEs."""
    loc, scale, x = table_problem(40, 3)
    model, guide = make_table_model(loc, scale, x)
    ours = DecomposedELBO(num_particles=50, max_plate_nesting=1)
    theirs = Trace_ELBO(num_particles=50, vectorize_particles=True, max_plate_nesting=1)
    values = {"ours": [], "theirs": []}
    for seed in range(40):
        pyro.set_rng_seed(1000 + seed)
        values["ours"].append(ours.loss(model, guide, batch_size=10))
        pyro.set_rng_seed(2000 + seed)
        values["theirs"].append(theirs.loss(model, guide, batch_size=10))
    a, b = torch.tensor(values["ours"]), torch.tensor(values["theirs"])
    se = math.sqrt(a.var() / len(a) + b.var() / len(b))
    assert abs(float(a.mean() - b.mean())) < 4 * se


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_weighted_loss_is_the_weighted_sum_of_the_reported_terms(estimator):
    """Make the loss the weighted sum of the reported terms."""
    loc, scale, x = table_problem(50, 3)
    model, guide = make_table_model(loc, scale, x)
    loss = DecomposedELBO(alpha=0.5, beta=4.0, gamma=2.0, aggregate=estimator, num_particles=3)
    value = loss.loss(model, guide, batch_size=12)
    t = loss.last_terms
    weighted = (
        t["reconstruction"]
        - 0.5 * t["index_code_mi"]
        - 4.0 * t["total_correlation"]
        - 2.0 * t["dimwise_kl"]
    )
    assert -value / 50 == pytest.approx(weighted, rel=1e-5, abs=1e-4)
    parts = t["reconstruction"] - t["index_code_mi"] - t["total_correlation"] - t["dimwise_kl"]
    assert parts == pytest.approx(t["elbo"], abs=1e-4)


# --------------------------------------------------------------- estimators vs dense brute force
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_minibatch_terms_match_dense_brute_force(estimator, chunk_size):
    """Match the dense brute force of both estimators, chunked or not."""
    n, b = 200, 16
    loc, scale, x = table_problem(n, 4)
    capture = []
    model, guide = make_table_model(loc, scale, x, capture=capture)
    loss = DecomposedELBO(
        aggregate=estimator, num_particles=3, chunk_size=chunk_size, max_plate_nesting=1
    )
    loss.loss(model, guide, batch_size=b)
    idx, z = capture[-1]
    expected = dense_terms(z, loc[idx], scale[idx], n, estimator)
    for name, value in expected.items():
        assert loss.last_terms[name] == pytest.approx(value, rel=1e-4, abs=1e-4), name


# ------------------------------------------------------------------------ guides and layouts
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_multivariate_normal_guide_uses_exact_marginals(estimator):
    """Check MultivariateNormal codes against the factorized Normal and brute force.

    A diagonal MultivariateNormal draws the same samples as the factorized Normal and must give
    the same terms; a full-covariance one matches brute force with Normal(loc, sqrt(Sigma_dd)).
    """
    n, b, d = 60, 10, 3
    loc, scale, x = table_problem(n, d)
    model, guide = make_table_model(loc, scale, x)
    tril = torch.linalg.cholesky(
        torch.diag_embed(scale**2) + 0.05 * torch.ones(d, d).expand(n, d, d)
    )
    capture = []

    def diagonal_guide(batch_size=None):
        with pyro.plate("data", n, subsample_size=batch_size) as i:
            pyro.sample("z", dist.MultivariateNormal(loc[i], scale_tril=torch.diag_embed(scale[i])))

    def full_guide(batch_size=None):
        with pyro.plate("data", n, subsample_size=batch_size) as i:
            z = pyro.sample("z", dist.MultivariateNormal(loc[i], scale_tril=tril[i]))
        capture.append((i, z.detach()))

    loss = DecomposedELBO(aggregate=estimator, num_particles=2, max_plate_nesting=1)
    pyro.set_rng_seed(7)
    loss.loss(model, guide, batch_size=b)
    factorized = dict(loss.last_terms)
    pyro.set_rng_seed(7)
    loss.loss(model, diagonal_guide, batch_size=b)
    for name in TERMS:
        assert loss.last_terms[name] == pytest.approx(factorized[name], rel=1e-4, abs=1e-4)

    loss.loss(model, full_guide, batch_size=b)
    idx, z = capture[-1]
    mvn = torch.distributions.MultivariateNormal(loc[idx], scale_tril=tril[idx])
    pair_joint = mvn.log_prob(z[:, :, None, :])  # [S, B, B]
    sd = tril[idx].pow(2).sum(-1).sqrt()
    pair = torch.distributions.Normal(loc[idx], sd).log_prob(z[:, :, None, :])
    if estimator == "mss":
        log_w = _aggregate.mss_log_weights(torch.arange(b), b, n, z.dtype)
        joint = torch.logsumexp(pair_joint + log_w, -1)
        marg = torch.logsumexp(pair + log_w[..., None], -2).sum(-1)
    else:
        joint = torch.logsumexp(pair_joint, -1) - math.log(n * b)
        marg = (torch.logsumexp(pair, -2) - math.log(n * b)).sum(-1)
    assert loss.last_terms["total_correlation"] == pytest.approx(
        float((joint - marg).mean()), rel=1e-4, abs=1e-4
    )
    assert loss.last_terms["index_code_mi"] == pytest.approx(
        float((mvn.log_prob(z) - joint).mean()), rel=1e-4, abs=1e-4
    )


def test_low_rank_multivariate_normal_guide_matches_brute_force():
    """Match brute force for a LowRankMultivariateNormal code."""
    n, b, d = 40, 8, 3
    loc, scale, x = table_problem(n, d)
    model, _ = make_table_model(loc, scale, x)
    factor = 0.3 * torch.randn(n, d, 1, generator=torch.Generator().manual_seed(1))
    capture = []

    def guide(batch_size=None):
        with pyro.plate("data", n, subsample_size=batch_size) as i:
            z = pyro.sample("z", dist.LowRankMultivariateNormal(loc[i], factor[i], scale[i] ** 2))
        capture.append((i, z.detach()))

    loss = DecomposedELBO(max_plate_nesting=1)
    loss.loss(model, guide, batch_size=b)
    idx, z = capture[-1]
    z = z.reshape(-1, b, d)  # [S, B, D]: one particle is drawn without particle plate
    q = torch.distributions.LowRankMultivariateNormal(loc[idx], factor[idx], scale[idx] ** 2)
    log_w = _aggregate.mss_log_weights(torch.arange(b), b, n, z.dtype)
    joint = torch.logsumexp(q.log_prob(z[:, :, None, :]) + log_w, -1)
    pair = torch.distributions.Normal(loc[idx], q.variance.sqrt()).log_prob(z[:, :, None, :])
    marg = torch.logsumexp(pair + log_w[..., None], -2).sum(-1)
    assert loss.last_terms["total_correlation"] == pytest.approx(
        float((joint - marg).mean()), rel=1e-4, abs=1e-4
    )


def test_several_code_sites_are_concatenated_in_any_plate_layout():
    """Concatenate two code sites into one code of D1 + D2 dims.

    ``a`` has a [D1] event and ``b`` is univariate, in an inner plate over dims, with the data
    plate at dim -2 in the model.
    """
    n, bsz, d1, d2 = 80, 12, 2, 3
    gen = torch.Generator().manual_seed(3)
    loc_a, loc_b = torch.randn(n, d1, generator=gen), torch.randn(n, d2, generator=gen)
    loc_b = loc_b + loc_a[:, :1]  # correlated with a
    s_a, s_b = 0.4 * torch.ones(n, d1), 0.3 + 0.2 * torch.rand(n, d2, generator=gen)
    capture = []

    def model(batch_size=None):
        with pyro.plate("data", n, subsample_size=batch_size, dim=-2):
            pyro.sample("a", dist.Normal(0.0, 1.0).expand([1, d1]).to_event(1))
            with pyro.plate("dims", d2, dim=-1):
                pyro.sample("b", dist.Normal(0.0, 1.0))

    def guide(batch_size=None):
        with pyro.plate("data", n, subsample_size=batch_size, dim=-2) as i:
            a = pyro.sample("a", dist.Normal(loc_a[i, None], s_a[i, None]).to_event(1))
            with pyro.plate("dims", d2, dim=-1):
                b = pyro.sample("b", dist.Normal(loc_b[i], s_b[i]))
        capture.append((i, torch.cat([a.detach()[..., 0, :], b.detach()], -1)))

    loss = DecomposedELBO(num_particles=2, max_plate_nesting=2)
    loss.loss(model, guide, batch_size=bsz)
    idx, z = capture[-1]  # [S, B, d1 + d2]
    loc, scale = torch.cat([loc_a, loc_b], -1)[idx], torch.cat([s_a, s_b], -1)[idx]
    expected = dense_terms(z, loc, scale, n, "mss")
    for name in ("index_code_mi", "total_correlation", "dimwise_kl"):
        assert loss.last_terms[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-4), name


def test_dataset_size_overrides_the_plate_size():
    """An unsubsampled plate over a minibatch with dataset_size=N equals the subsampled plate."""
    n, b = 100, 10
    loc, scale, x = table_problem(n, 3)
    model, guide = make_table_model(loc, scale, x)
    idx = torch.arange(20, 30)

    def batch_model():
        with pyro.plate("data", b):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x[idx])

    def batch_guide():
        with pyro.plate("data", b):
            pyro.sample("z", dist.Normal(loc[idx], scale[idx]).to_event(1))

    loss = DecomposedELBO(beta=3.0, max_plate_nesting=1)
    pyro.set_rng_seed(1)
    expected = loss.loss(model, guide, idx=idx)
    expected_terms = dict(loss.last_terms)
    loss = DecomposedELBO(beta=3.0, dataset_size=n, max_plate_nesting=1)
    pyro.set_rng_seed(1)
    assert loss.loss(batch_model, batch_guide) == pytest.approx(expected, rel=1e-6)
    assert loss.last_terms == pytest.approx(expected_terms, rel=1e-6)


def test_unsubsampled_plate_warns_once_that_n_is_the_batch():
    """Warn once that N is the batch size when the plate is not subsampled."""
    loc, scale, x = table_problem(20, 2)
    model, guide = make_table_model(loc, scale, x)
    loss = DecomposedELBO(max_plate_nesting=1)
    with pytest.warns(UserWarning, match="not subsampled"):
        loss.loss(model, guide)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss.loss(model, guide)


def test_global_latents_without_subsampling_count_as_reconstruction():
    """Count global latents as reconstruction when the plate is not subsampled."""
    n, d = 25, 2
    loc, scale, x = table_problem(n, d)

    def model():
        shift = pyro.sample("shift", dist.Normal(0.0, 1.0))
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([d]).to_event(1))
            pyro.sample("x", dist.Normal(z + shift, 1.0).to_event(1), obs=x)

    def guide():
        pyro.sample("shift", dist.Normal(0.1, 0.2))
        with pyro.plate("data", n):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    loss = DecomposedELBO(max_plate_nesting=1)
    pyro.set_rng_seed(2)
    with pytest.warns(UserWarning):
        value = loss.loss(model, guide)
    pyro.set_rng_seed(2)
    assert value == pytest.approx(Trace_ELBO().loss(model, guide), rel=1e-6)
    with pytest.raises(ValueError, match="outside the data plate"):
        DecomposedELBO(dataset_size=100, max_plate_nesting=1).loss(model, guide)


# ------------------------------------------------------------------------------ Pyro contract
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("beta", [1.0, 4.0])
def test_loss_methods_agree(estimator, beta):
    """Agree between loss, loss_and_grads and differentiable_loss."""
    n = 40
    loc, scale, x = table_problem(n, 3)
    model, guide = make_table_model(loc, scale, x, learnable=True)
    loss = DecomposedELBO(beta=beta, gamma=2.0, aggregate=estimator, num_particles=2)
    idx = torch.arange(5, 17)
    loss.loss(model, guide, idx=idx)  # creates the parameter
    param = pyro.param("table_loc").unconstrained()

    pyro.set_rng_seed(2)
    value = loss.loss(model, guide, idx=idx)
    pyro.set_rng_seed(2)
    differentiable = loss.differentiable_loss(model, guide, idx=idx)
    (expected,) = torch.autograd.grad(differentiable, [param])
    pyro.set_rng_seed(2)
    returned = loss.loss_and_grads(model, guide, idx=idx)

    assert isinstance(value, float) and isinstance(returned, float)
    assert value == pytest.approx(differentiable.item(), rel=1e-6)
    assert returned == pytest.approx(differentiable.item(), rel=1e-6)
    torch.testing.assert_close(param.grad, expected)
    assert expected.abs().sum() > 0


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_svi_elbo_module_and_torch_optimizer(estimator):
    """Train through SVI and through ELBOModule with a torch optimizer."""
    n = 30
    loc, scale, x = table_problem(n, 3)
    model, guide = make_table_model(loc, scale, x, learnable=True)
    loss = DecomposedELBO(beta=5.0, aggregate=estimator, num_particles=4)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), loss=loss)
    values = []
    for step in range(3):
        loss.set_step(step)
        values.append(svi.step(batch_size=10))
        assert set(loss.last_terms) == set(TERMS)
    assert all(math.isfinite(v) for v in values)

    module = loss(model, guide)
    assert isinstance(module, ELBOModule)
    out = module(batch_size=10)
    assert out.shape == () and out.requires_grad
    param = pyro.param("table_loc").unconstrained()
    optimizer = torch.optim.SGD([param], lr=1e-3)
    before = param.detach().clone()
    optimizer.zero_grad()
    out.backward()
    optimizer.step()
    assert not torch.equal(before, param.detach())


def test_loss_terms_returns_the_terms_without_gradients():
    """Return the terms without building a graph."""
    loc, scale, x = table_problem(30, 3)
    model, guide = make_table_model(loc, scale, x, learnable=True)
    loss = DecomposedELBO(beta=2.0)
    terms = loss.loss_terms(model, guide, batch_size=8)
    assert list(terms) == list(TERMS)
    assert all(isinstance(v, float) and math.isfinite(v) for v in terms.values())
    assert terms == loss.last_terms
    assert pyro.param("table_loc").unconstrained().grad is None


def test_weights_can_be_schedules_of_the_step():
    """Evaluate callable weights at the step given to set_step."""
    loc, scale, x = table_problem(30, 3)
    model, guide = make_table_model(loc, scale, x)
    loss = DecomposedELBO(beta=lambda step: 1.0 + step, gamma=2.0, max_plate_nesting=1)
    assert loss.current_weights() == {"alpha": 1.0, "beta": 1.0, "gamma": 2.0}
    loss.set_step(5)
    assert loss.current_weights()["beta"] == 6.0

    plain = DecomposedELBO(beta=6.0, gamma=2.0, max_plate_nesting=1)
    pyro.set_rng_seed(4)
    expected = plain.loss(model, guide, batch_size=10)
    pyro.set_rng_seed(4)
    assert loss.loss(model, guide, batch_size=10) == pytest.approx(expected, rel=1e-6)
    loss.loss_terms(model, guide, batch_size=10)
    assert loss.step == 5  # evaluation does not advance the schedule


# ----------------------------------------------------------------------------------- gradients
def _rotation_problem(n: int = 256, seed: int = 0):
    """Return a model and a guide whose posterior means are correlated by ``rho``.

    Posterior means ``(u1, rho u1 + sqrt(1 - rho^2) u2)`` with ``rho = tanh(theta)``: the
    aggregate posterior's TC grows with ``|rho|``; ``theta`` is the guide's only parameter.
    """
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(n, 2, generator=gen)
    x = torch.randn(n, 2, generator=gen)

    def mean(theta):
        rho = torch.tanh(theta)
        return torch.stack([u[:, 0], rho * u[:, 0] + torch.sqrt(1 - rho**2) * u[:, 1]], -1)

    def model(batch_size=None):
        with pyro.plate("data", n, subsample_size=batch_size) as i:
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            pyro.sample("x", dist.Normal(z, 2.0).to_event(1), obs=x[i])

    def guide(batch_size=None):
        theta = pyro.param("theta", torch.tensor(1.0))
        with pyro.plate("data", n, subsample_size=batch_size) as i:
            pyro.sample("z", dist.Normal(mean(theta)[i], 0.2).to_event(1))

    return model, guide


def test_total_correlation_gradient_pushes_a_correlated_guide_toward_independence():
    """Push a correlated guide toward independence through the TC gradient."""
    model, guide = _rotation_problem()
    pyro.param("theta", torch.tensor(1.0))  # rho = 0.76
    theta = pyro.param("theta").unconstrained()
    differences = []
    for seed in range(8):
        grads = []
        for beta in (6.0, 1.0):
            pyro.set_rng_seed(seed)
            value = DecomposedELBO(beta=beta, max_plate_nesting=1).differentiable_loss(
                model, guide, batch_size=64
            )
            grads.append(torch.autograd.grad(value, [theta])[0])
        differences.append(float(grads[0] - grads[1]))  # = 5 * N * d TC / d theta
    diff = torch.tensor(differences)
    assert diff.mean() > 4 * diff.std() / math.sqrt(len(diff))  # descent lowers |rho|

    # and training with beta > 1 ends less correlated than the plain ELBO
    final = {}
    for beta in (8.0, 1.0):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        loss = DecomposedELBO(beta=beta, max_plate_nesting=1)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), loss=loss)
        for _ in range(60):
            svi.step(batch_size=64)
        final[beta] = abs(math.tanh(pyro.param("theta").item()))
    assert final[8.0] < 0.3 < final[1.0]


# -------------------------------------------------------------------------------------- memory
def test_batch_2048_dim_10_step_fits_well_under_a_gigabyte():
    """Bound the peak resident memory of one loss_and_grads step at B = 2048, D = 10.

    Measured over the resident memory just before the step (a dense [B, B, D] float32 tensor alone
    is 168 MB, and autograd through a dense log-sum-exp keeps several; see
    bench/bench_decomposed.py).
    """
    code = textwrap.dedent(
        """
        import ctypes, gc, torch, pyro, pyro.distributions as dist
        from pyro_vi_ext.infer.decomposed import DecomposedELBO

        def status(key):
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith(key + ":"))

        torch.set_num_threads(1)
        N, D = 50000, 10
        loc = torch.randn(N, D)
        def model(b):
            with pyro.plate("data", N, subsample_size=b):
                pyro.sample("z", dist.Normal(0.0, 1.0).expand([D]).to_event(1))
        def guide(b):
            table = pyro.param("table", loc)
            with pyro.plate("data", N, subsample_size=b) as i:
                pyro.sample("z", dist.Normal(table[i], 0.3).to_event(1))
        loss = DecomposedELBO(beta=6.0, max_plate_nesting=1)
        loss.loss_and_grads(model, guide, 64)
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS
        before = status("VmRSS")
        loss.loss_and_grads(model, guide, 2048)
        print((status("VmHWM") - before) / 1024)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    growth_mb = float(out.stdout.strip().splitlines()[-1])
    assert growth_mb < 100, growth_mb


# --------------------------------------------------------------------------------------- errors
def test_non_factorized_guide_site_is_named():
    """Name a code site whose distribution has no per-dimension marginals."""
    n = 20
    x = torch.rand(n, 3)

    def model(batch_size=None):
        with pyro.plate("data", n, subsample_size=batch_size) as i:
            p = pyro.sample("mix", dist.Dirichlet(torch.ones(3)))
            pyro.sample("x", dist.Normal(p, 1.0).to_event(1), obs=x[i])

    def guide(batch_size=None):
        with pyro.plate("data", n, subsample_size=batch_size):
            pyro.sample("mix", dist.Dirichlet(2 * torch.ones(3)))

    with pytest.raises(ValueError, match="Code site 'mix'.*factorized.*Dirichlet"):
        DecomposedELBO().loss(model, guide, batch_size=5)


def test_code_site_without_rsample_is_named():
    """Name a code site without rsample."""
    x = torch.randn(20)

    def model(batch_size=None):
        with pyro.plate("data", 20, subsample_size=batch_size) as i:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[i])

    def guide(batch_size=None):
        with pyro.plate("data", 20, subsample_size=batch_size) as i:
            pyro.sample("z", dist.Normal(x[i] / 2, 0.7).has_rsample_(False))

    with pytest.raises(ValueError, match="Code site 'z'.*no rsample"):
        DecomposedELBO().loss(model, guide, batch_size=5)


def test_batch_of_one_is_an_error_for_both_estimators():
    """Refuse a batch of one with either estimator.

    MSS needs the other points; MWS on one point reports only the paper's constants (issue 13: a
    negative dimension-wise KL).
    """
    loc, scale, x = table_problem(20, 2)
    model, guide = make_table_model(loc, scale, x)
    with pytest.raises(ValueError, match="Batch size 1 with estimator='mss'"):
        DecomposedELBO(aggregate="mss").loss(model, guide, batch_size=1)
    with pytest.raises(ValueError, match="Batch size 1 with estimator='mws'"):
        DecomposedELBO(aggregate="mws").loss(model, guide, batch_size=1)


def test_batch_larger_than_dataset_is_an_error():
    """Refuse a batch larger than the dataset, naming both sizes."""
    loc, scale, x = table_problem(20, 2)
    model, guide = make_table_model(loc, scale, x)
    with pytest.raises(ValueError, match="B = 20 .* exceeds the dataset size N = 10"):
        DecomposedELBO(dataset_size=10).loss(model, guide)


def test_no_code_site_is_an_error():
    """Refuse a guide without a code, or unknown code sites and plates."""
    x = torch.randn(10)

    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 10):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def guide():
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="No code site found"):
        DecomposedELBO().loss(model, guide)
    loc, scale, x = table_problem(20, 2)
    model, guide = make_table_model(loc, scale, x)
    with pytest.raises(ValueError, match="code site 'nope' is not a latent sample site"):
        DecomposedELBO(code_sites=["nope"]).loss(model, guide, batch_size=4)
    with pytest.raises(ValueError, match="data_plate='pixels' is not a vectorized plate"):
        DecomposedELBO(data_plate="pixels").loss(model, guide, batch_size=4)


def test_latent_outside_a_subsampled_data_plate_is_an_error():
    """Refuse latents outside a subsampled data plate, naming them."""
    loc, scale, x = table_problem(20, 2)

    def model(batch_size=None):
        shift = pyro.sample("shift", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 20, subsample_size=batch_size) as i:
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            pyro.sample("x", dist.Normal(z + shift, 1.0).to_event(1), obs=x[i])

    def guide(batch_size=None):
        pyro.sample("shift", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 20, subsample_size=batch_size) as i:
            pyro.sample("z", dist.Normal(loc[i], scale[i]).to_event(1))

    with pytest.raises(ValueError, match="Plate 'data' is subsampled.*'shift'"):
        DecomposedELBO().loss(model, guide, batch_size=5)
    with pytest.raises(ValueError, match="code site 'shift' lies outside the data plate"):
        DecomposedELBO(code_sites="shift", data_plate="data").loss(model, guide)


@pytest.mark.parametrize("num_particles", [1])
def test_refusal_of_a_global_latent_under_subsampling_is_worded_for_the_decomposition(
    num_particles,
):
    """Check: the message says why DecomposedELBO refuses it and offers no setting already used."""
    loc, scale, x = table_problem(20, 2)

    def model():
        shift = pyro.sample("shift", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 20, subsample_size=5) as i:
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            pyro.sample("x", dist.Normal(z + shift, 1.0).to_event(1), obs=x[i])

    def guide():
        pyro.sample("shift", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 20, subsample_size=5) as i:
            pyro.sample("z", dist.Normal(loc[i], scale[i]).to_event(1))

    with pytest.raises(ValueError) as caught:
        DecomposedELBO(num_particles=num_particles).loss(model, guide)
    message = str(caught.value)
    assert "guide site 'shift', model site 'shift' lie outside it" in message
    assert "DecomposedELBO computes its loss per point of the data plate" in message
    assert f"whatever the number of particles (num_particles={num_particles})" in message
    assert "Trace_ELBO or ImportanceWeightedELBO(num_particles=1)" in message
    assert "K > 1" not in message
    assert "or use num_particles=1" not in message


def test_masked_code_site_is_an_error():
    """Refuse a masked code site."""
    loc, scale, x = table_problem(20, 2)
    model, _ = make_table_model(loc, scale, x)

    def guide(batch_size=None):
        with pyro.plate("data", 20, subsample_size=batch_size) as i:
            with pyro.poutine.mask(mask=i > 3):
                pyro.sample("z", dist.Normal(loc[i], scale[i]).to_event(1))

    with pytest.raises(ValueError, match="code site 'z' is masked"):
        DecomposedELBO().loss(model, guide, batch_size=6)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"estimator": "iwae"}, ValueError, "estimator must be one of"),
        ({"aggregate": "iwae"}, ValueError, "aggregate must be one of"),
        ({"beta": float("nan")}, ValueError, "beta must be finite"),
        ({"gamma": "big"}, TypeError, "gamma must be a number or a callable"),
        ({"dataset_size": 0}, ValueError, "dataset_size must be a positive int"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be a positive int"),
        ({"num_particles": 0}, ValueError, "num_particles must be a positive int"),
        ({"vectorize_particles": False}, ValueError, "vectorize_particles=True"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    """Refuse bad constructor arguments, naming them."""
    with pytest.raises(error, match=match):
        DecomposedELBO(**kwargs)


def test_schedule_giving_a_non_finite_weight_is_an_error():
    """Refuse a schedule that gives a non-finite weight, naming the step."""
    loc, scale, x = table_problem(20, 2)
    model, guide = make_table_model(loc, scale, x)
    loss = DecomposedELBO(alpha=lambda step: float("inf") if step > 2 else 1.0)
    loss.set_step(3)
    with pytest.raises(ValueError, match="alpha schedule gave inf at step 3"):
        loss.loss(model, guide, batch_size=4)
