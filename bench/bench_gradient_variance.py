r"""Gradient variance of every estimator of the ELBO (and of the IWAE bound), per parameter group.

For one fixed minibatch, each estimator's gradient of the guide (and model) parameters is drawn
``R`` times; per parameter group the table reports

* ``tr Cov``: the trace of the covariance of the gradient over the draws (the summed variance of
  its elements), the noise an optimizer step sees;
* ``|mean|^2``: the squared norm of the mean gradient (the signal), so rows compare as SNR;
* ``Var(value)``: the variance of the loss value itself.

Estimators (one particle unless K is given):

* ``score function``: ``Trace_ELBO`` with a guide whose Normal has no ``rsample``
  (REINFORCE; Pyro adds no baseline);
* ``reparam MC``: ``Trace_ELBO`` with the reparameterized guide;
* ``closed-form KL``: ``ClosedFormELBO(form="kl")`` (SGVB with analytic KL);
* ``closed-form entropy``: ``ClosedFormELBO(form="entropy")``;
* ``STL K``, ``DReG K``, ``IWAE K``: ``ImportanceWeightedELBO(num_particles=K, estimator=...)``;
  for K > 1 these estimate the gradient of the IWAE bound, not of the ELBO.

Problems: the linear-Gaussian toy of the IWAE tests (z ~ N(mu, I), x | z ~ N(z, I), guide
N(A x + b, s^2)) at three guide states (the exact posterior, a mis-fit guide, an under-dispersed
guide), and an MLP VAE on scikit-learn's digits trained briefly with the ELBO.

Usage::

    python bench/bench_gradient_variance.py            # full: R = 500 on the toy, 200 on the VAE
    python bench/bench_gradient_variance.py --quick    # R = 50 / 20, a short VAE training

The computation is importable (``gradient_variance_table``, ``toy_problem``, ``vae_problem``),
as notebook 4 does.

References
----------
.. [1] D. P. Kingma, M. Welling, "Auto-Encoding Variational Bayes", ICLR 2014.
.. [2] G. Roeder, Y. Wu, D. Duvenaud, "Sticking the Landing", NeurIPS 2017.
.. [3] G. Tucker, D. Lawson, S. Gu, C. Maddison, "Doubly Reparameterized Gradient Estimators for
   Monte Carlo Objectives", ICLR 2019.
"""

from __future__ import annotations

import argparse
import math
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from pyro.distributions import constraints  # noqa: E402
from pyro.infer import ELBO, Trace_ELBO  # noqa: E402

from models._common import data_plate  # noqa: E402
from models.vae import VAE, build_vae  # noqa: E402
from pyro_vi_ext import ClosedFormELBO, ImportanceWeightedELBO  # noqa: E402

__all__ = [
    "Problem",
    "VarianceRow",
    "format_table",
    "gradient_variance",
    "gradient_variance_table",
    "toy_problem",
    "vae_problem",
]


class ScoreNormal(dist.Normal):
    """A Normal whose samples carry no gradient: ``Trace_ELBO`` uses the score function."""

    has_rsample = False


@dataclass
class Problem:
    """A model, a reparameterized guide, its score-function twin, data and parameter groups."""

    name: str
    model: Callable
    guide: Callable
    score_guide: Callable
    args: tuple
    kwargs: dict
    groups: dict[str, Callable[[], list[torch.Tensor]]]  # group name -> its leaf tensors


@dataclass(frozen=True)
class VarianceRow:
    """Gradient statistics of one estimator on one problem (per group: trace Cov, |mean|^2)."""

    estimator: str
    value_variance: float
    trace_covariance: dict[str, float]
    mean_sq_norm: dict[str, float]


def gradient_variance(
    problem: Problem, loss: ELBO, guide: Callable, num_repeats: int, label: str
) -> VarianceRow:
    r"""Draw the gradient ``num_repeats`` times and summarize it per parameter group.

    :math:`\operatorname{tr}\operatorname{Cov}[g] = \sum_i \widehat{\operatorname{Var}}[g_i]`
    over the elements of the group, with the unbiased sample variance over the repeats.
    """
    leaves = {name: get() for name, get in problem.groups.items()}
    flat = [leaf for group in leaves.values() for leaf in group]
    draws: dict[str, list[torch.Tensor]] = {name: [] for name in leaves}
    values = []
    for _ in range(num_repeats):
        value = loss.differentiable_loss(problem.model, guide, *problem.args, **problem.kwargs)
        grads = torch.autograd.grad(value, flat, allow_unused=True)
        values.append(float(value.detach()))
        position = 0
        for name, group in leaves.items():
            parts = grads[position : position + len(group)]
            position += len(group)
            draws[name].append(
                torch.cat(
                    [
                        (g if g is not None else torch.zeros_like(leaf)).reshape(-1)
                        for g, leaf in zip(parts, group, strict=True)
                    ]
                )
            )
    trace, signal = {}, {}
    for name, rows in draws.items():
        stacked = torch.stack(rows).double()
        trace[name] = float(stacked.var(0).sum())
        signal[name] = float(stacked.mean(0).square().sum())
    return VarianceRow(label, float(torch.tensor(values).var()), trace, signal)


def estimators(ks: tuple[int, ...]) -> list[tuple[str, Callable[[], ELBO], bool]]:
    """``(label, loss factory, uses the score-function guide)`` for every estimator."""
    rows: list[tuple[str, Callable[[], ELBO], bool]] = [
        ("score function", lambda: Trace_ELBO(max_plate_nesting=1), True),
        ("reparam MC", lambda: Trace_ELBO(max_plate_nesting=1), False),
        ("closed-form KL", lambda: ClosedFormELBO("kl", max_plate_nesting=1), False),
        ("closed-form entropy", lambda: ClosedFormELBO("entropy", max_plate_nesting=1), False),
    ]
    for k in ks:
        for estimator in ("stl", "dreg", "iwae"):
            if k == 1 and estimator == "iwae":
                continue  # IWAE at K = 1 is reparam MC
            rows.append(
                (
                    f"{estimator.upper() if estimator != 'iwae' else 'IWAE'} K={k}",
                    lambda k=k, estimator=estimator: ImportanceWeightedELBO(
                        num_particles=k, estimator=estimator, max_plate_nesting=1
                    ),
                    False,
                )
            )
    return rows


def gradient_variance_table(
    problem: Problem, num_repeats: int, ks: tuple[int, ...] = (1, 10), seed: int = 0
) -> list[VarianceRow]:
    """One :class:`VarianceRow` per estimator of :func:`estimators`, same seed for each."""
    rows = []
    for label, make_loss, score in estimators(ks):
        pyro.set_rng_seed(seed)
        guide = problem.score_guide if score else problem.guide
        rows.append(gradient_variance(problem, make_loss(), guide, num_repeats, label))
    return rows


def format_table(rows: list[VarianceRow], title: str) -> str:
    """Rows as an aligned text table: value variance, then per group trace Cov and |mean|^2."""
    groups = list(rows[0].trace_covariance)
    header = f"{'estimator':<20} {'Var(value)':>11}" + "".join(
        f" {'tr Cov ' + g:>18} {'|mean|^2 ' + g:>18}" for g in groups
    )
    lines = [f"### {title}", header]
    for row in rows:
        line = f"{row.estimator:<20} {row.value_variance:11.4g}"
        for g in groups:
            line += f" {row.trace_covariance[g]:18.4g} {row.mean_sq_norm[g]:18.4g}"
        lines.append(line)
    return "\n".join(lines)


# -- problems ------------------------------------------------------------------------------------
TOY_DIM, TOY_POINTS = 3, 10
TOY_MU = torch.tensor([0.5, -1.0, 2.0])
TOY_STATES = {
    # (A, b offset from mu/2, s): q = N(A x + b, s^2); exact: A = 1/2, b = mu/2, s = sqrt(1/2)
    "exact posterior": (0.5, 0.0, math.sqrt(0.5)),
    "mis-fit guide": (0.8, -0.6, 1.1),
    "under-dispersed guide": (0.5, 0.0, 0.1),
}


def _toy_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(TOY_MU, 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)


def _make_toy_guide(a0: float, b_offset: float, s0: float, normal: type) -> Callable:
    def guide(x):
        a = pyro.param("A", torch.full((TOY_DIM,), a0))
        b = pyro.param("b", TOY_MU / 2 + b_offset)
        s = pyro.param("s", torch.full((TOY_DIM,), s0), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", normal(a * x + b, s).to_event(1))

    return guide


def toy_problem(state: str = "mis-fit guide", seed: int = 0) -> Problem:
    """Build the linear-Gaussian toy at one of :data:`TOY_STATES` (clears the param store)."""
    pyro.clear_param_store()
    generator = torch.Generator().manual_seed(seed)
    x = TOY_MU + math.sqrt(2.0) * torch.randn(TOY_POINTS, TOY_DIM, generator=generator)
    a0, b_offset, s0 = TOY_STATES[state]
    guide = _make_toy_guide(a0, b_offset, s0, dist.Normal)
    score_guide = _make_toy_guide(a0, b_offset, s0, ScoreNormal)
    guide(x)  # create the parameters

    def guide_leaves() -> list[torch.Tensor]:
        store = pyro.get_param_store()
        return [store.get_param(n).unconstrained() for n in ("A", "b", "s")]

    return Problem(
        f"toy, {state}", _toy_model, guide, score_guide, (x,), {}, {"guide": guide_leaves}
    )


def digits_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Binarized scikit-learn digits (pixel > 7), split 80/20 as in notebook 01."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_all = torch.tensor(digits.data > 7, dtype=torch.float32)
    train_rows, test_rows = train_test_split(range(len(x_all)), test_size=0.2, random_state=0)
    return x_all[list(train_rows)], x_all[list(test_rows)]


def _score_vae_guide(vae: VAE) -> Callable:
    def guide(x, *, idx=None, n_data=None):
        pyro.module(f"{vae.name}_encoder", vae.encoder)
        with data_plate(x.shape[0], idx, n_data):
            loc, scale = vae.encoder(x)
            pyro.sample("z", ScoreNormal(loc, scale).to_event(1))

    return guide


def train_digits_vae(num_steps: int, loss: ELBO | None = None, name: str = "vae") -> VAE:
    """Train the notebook-01 VAE (64-200-10, Bernoulli) for ``num_steps`` steps on digits."""
    from pyro_vi_ext.training import fit

    x_train, _ = digits_data()
    torch.manual_seed(0)
    vae = build_vae(x_dim=64, hidden_dim=200, z_dim=10, likelihood="bernoulli", name=name)
    fit(
        vae.model,
        vae.guide,
        x_train,
        loss if loss is not None else Trace_ELBO(),
        pyro.optim.Adam({"lr": 1e-3}),
        num_steps=num_steps,
        batch_size=100,
        seed=0,
        progress=False,
    )
    return vae


def vae_problem(vae: VAE, batch: torch.Tensor) -> Problem:
    """Gradient variance of a trained VAE on one fixed batch (groups: encoder, decoder)."""
    return Problem(
        "digits VAE",
        vae.model,
        vae.guide,
        _score_vae_guide(vae),
        (batch,),
        {},
        {
            "encoder": lambda: list(vae.encoder.parameters()),
            "decoder": lambda: list(vae.decoder.parameters()),
        },
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=500, help="gradient draws on the toy")
    parser.add_argument("--vae-repeats", type=int, default=200, help="gradient draws on the VAE")
    parser.add_argument("--vae-steps", type=int, default=1000, help="VAE training steps")
    parser.add_argument("--k", type=int, default=10, help="K of the importance-weighted rows")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.vae_repeats, args.vae_steps = 50, 20, 100
    torch.set_num_threads(args.threads)
    pyro.enable_validation(False)
    print("# bench_gradient_variance: gradient variance of ELBO / IWAE estimators")
    print(f"# command: python {' '.join(shlex.quote(a) for a in sys.argv)}")
    print(
        f"# torch {torch.__version__}, pyro {pyro.__version__}, python "
        f"{platform.python_version()}, threads {torch.get_num_threads()}"
    )
    ks = (1, args.k)
    start = time.perf_counter()
    for state in TOY_STATES:
        problem = toy_problem(state)
        rows = gradient_variance_table(problem, args.repeats, ks)
        print()
        print(format_table(rows, f"{problem.name} (D={TOY_DIM}, N={TOY_POINTS}), R={args.repeats}"))
    pyro.clear_param_store()
    vae = train_digits_vae(args.vae_steps)
    _, x_test = digits_data()
    rows = gradient_variance_table(vae_problem(vae, x_test[:100]), args.vae_repeats, ks)
    print()
    print(
        format_table(
            rows,
            f"digits VAE 64-200-10 trained {args.vae_steps} ELBO steps, batch of 100 test "
            f"images, R={args.vae_repeats}",
        )
    )
    print(f"\n# {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
