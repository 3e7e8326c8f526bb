"""Spread over training seeds of notebook 1's digits comparison.

Notebook 1 (``notebooks/01_swapping_elbos.ipynb``) trains one VAE on scikit-learn's binarized
digits with ``Trace_ELBO`` and with ``ImportanceWeightedELBO`` (K = 50; ``"iwae"``, ``"stl"``,
``"dreg"``) and compares the importance-sampled test log-likelihood. Its table quotes one run
with the Monte Carlo standard error of that run's estimate, which says nothing about how much
the number moves when the network is trained from another initialization on other minibatches.
This script reruns the same comparison, with the notebook's full-size settings and models (the
VAE of ``models.vae``), for several seeds and prints, per objective, the mean, standard
deviation and range over seeds of the test log-likelihood beside the typical Monte Carlo
standard error of one run.

Seed ``s`` sets the initial weights (``torch.manual_seed(s)``), the minibatch order
(``fit(seed=s)``) and the draws of the evaluation (``pyro.set_rng_seed(1 + 1000 s)``); seed 0 is
the notebook's own run. Each finished seed is appended to ``--out`` (JSON lines), so an
interrupted run keeps what it has and ``--summarize-only`` prints the table from that file.

Usage::

    python bench/seed_spread.py --seeds 0 1 2 3 4 --out bench/seed_spread.jsonl
    python bench/seed_spread.py --steps 300 --num-test-samples 1000   # a reduced setting
    python bench/seed_spread.py --summarize-only --out bench/seed_spread.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro.infer import Trace_ELBO
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: find `models`

from models.vae import build_vae  # noqa: E402
from pyro_vi_ext import ImportanceWeightedELBO  # noqa: E402
from pyro_vi_ext.diagnostics import iw_bound_curve, log_evidence  # noqa: E402
from pyro_vi_ext.training import fit  # noqa: E402

OBJECTIVE_KEYS = ("elbo", "iwae", "stl", "dreg")
CURVE_KS = (1, 2, 5, 10, 20, 50, 100)  # as notebook 1 at full size (its pool of draws, 20 x 100)


def digits_split() -> tuple[torch.Tensor, torch.Tensor]:
    """Notebook 1's data: digits binarized at pixel value > 7, fixed 80/20 split.

    Returns
    -------
    x_train, x_test : torch.Tensor
        ``[1437, 64]`` and ``[360, 64]`` binary images.
    """
    digits = load_digits()
    x_all = torch.tensor(digits.data > 7, dtype=torch.float32)
    train_rows, test_rows = train_test_split(np.arange(len(x_all)), test_size=0.2, random_state=0)
    return x_all[train_rows], x_all[test_rows]


def make_loss(key: str, num_particles: int) -> pyro.infer.ELBO:
    """Build the objective named ``key`` (``"elbo"``, ``"iwae"``, ``"stl"`` or ``"dreg"``).

    Parameters
    ----------
    key : str
        One of ``OBJECTIVE_KEYS``.
    num_particles : int
        K of the importance-weighted objectives.

    Returns
    -------
    pyro.infer.ELBO
        ``Trace_ELBO()`` or ``ImportanceWeightedELBO(num_particles, estimator=key)``.
    """
    if key == "elbo":
        return Trace_ELBO()
    return ImportanceWeightedELBO(num_particles=num_particles, estimator=key)


def evaluate(vae, x_test: torch.Tensor, ks: list[int], num_test_samples: int) -> dict:
    """Test ELBO, IWAE bounds and importance-sampled log-likelihood, nats per test image.

    Parameters
    ----------
    vae : models.vae.VAE
        A trained VAE.
    x_test : torch.Tensor
        Test images.
    ks : list of int
        K values of the bound curve (it contains 1, the test ELBO, and the training K).
    num_test_samples : int
        S of the test log-likelihood.

    Returns
    -------
    dict
        ``{"bounds": {K: bound}, "log_px": mean, "log_px_se": Monte Carlo standard error}``.
    """
    with torch.no_grad():
        evidence = log_evidence(
            vae.model, vae.guide, x_test, num_samples=num_test_samples, chunk_size=250
        )
        curve = iw_bound_curve(vae.model, vae.guide, x_test, ks=ks, chunk_size=250)
    per_k = (curve.bound / curve.num_points).tolist()
    return {
        "bounds": dict(zip(curve.ks.tolist(), per_k, strict=True)),
        "log_px": float(evidence.mean),
        "log_px_se": float(evidence.mean_se),
    }


def run_seed(
    seed: int,
    *,
    num_steps: int,
    num_particles: int,
    num_test_samples: int,
    batch_size: int,
    learning_rate: float,
) -> dict:
    """Train the four objectives from seed ``seed`` and evaluate each on the test images.

    Parameters
    ----------
    seed : int
        Initial weights, minibatch order and evaluation draws (seed 0 is notebook 1's run).
    num_steps, num_particles, num_test_samples, batch_size, learning_rate
        Training steps per objective, K, S of the test log-likelihood, minibatch size and
        Adam's learning rate.

    Returns
    -------
    dict
        ``{"seed", "settings", "results": {key: {"test_elbo", "test_iw_bound", "log_px",
        "log_px_se", "train_seconds"}}}``, values in nats per test image.
    """
    x_train, x_test = digits_split()
    ks = sorted({*CURVE_KS, num_particles})
    results = {}
    for key in OBJECTIVE_KEYS:
        pyro.clear_param_store()
        torch.manual_seed(seed)  # the same initial weights for every objective of this seed
        vae = build_vae(x_dim=64, hidden_dim=200, z_dim=10, likelihood="bernoulli", name=key)
        start = time.perf_counter()
        fit(
            vae.model,
            vae.guide,
            x_train,
            make_loss(key, num_particles),
            pyro.optim.Adam({"lr": learning_rate}),
            num_steps=num_steps,
            batch_size=batch_size,
            seed=seed,
            progress=False,
        )
        train_seconds = time.perf_counter() - start
        pyro.set_rng_seed(1 + 1000 * seed)  # notebook 1 evaluates every model from seed 1
        evaluation = evaluate(vae, x_test, ks, num_test_samples)
        results[key] = {
            "test_elbo": evaluation["bounds"][1],
            "test_iw_bound": evaluation["bounds"][num_particles],
            "log_px": evaluation["log_px"],
            "log_px_se": evaluation["log_px_se"],
            "train_seconds": train_seconds,
        }
        print(
            f"seed {seed} {key:<5} log p(x) {evaluation['log_px']:.3f} "
            f"+- {evaluation['log_px_se']:.3f} (trained in {train_seconds:.0f} s)",
            flush=True,
        )
    settings = {
        "num_steps": num_steps,
        "num_particles": num_particles,
        "num_test_samples": num_test_samples,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
    }
    return {"seed": seed, "settings": settings, "results": results}


def summarize(records: list[dict]) -> str:
    """Per objective: mean, sd and range over seeds of each value, and the typical MC error.

    Parameters
    ----------
    records : list of dict
        Outputs of :func:`run_seed` with the same settings.

    Returns
    -------
    str
        A Markdown table, nats per test image; ``sd`` is the sample standard deviation over
        seeds, ``MC se`` the root mean square of the per-run Monte Carlo standard errors.
    """
    settings = {json.dumps(record["settings"], sort_keys=True) for record in records}
    if len(settings) != 1:
        raise ValueError(
            f"the records mix {len(settings)} settings ({sorted(settings)}): summarize one "
            "setting at a time (one --out file per setting)"
        )
    num_particles = records[0]["settings"]["num_particles"]
    seeds = [record["seed"] for record in records]
    lines = [
        f"{len(records)} seeds ({', '.join(map(str, seeds))}), settings {records[0]['settings']}",
        "",
        f"| trained with | test ELBO | test IWAE bound (K = {num_particles}) | test log p(x) "
        "mean +- sd over seeds | min to max | MC se of one run |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key in OBJECTIVE_KEYS:
        rows = [record["results"][key] for record in records]

        def mean_sd(name: str, rows: list[dict] = rows) -> str:
            values = [row[name] for row in rows]
            sd = statistics.stdev(values) if len(values) > 1 else float("nan")
            return f"{statistics.fmean(values):.3f} +- {sd:.3f}"

        log_px = [row["log_px"] for row in rows]
        mc_se = float(np.sqrt(np.mean([row["log_px_se"] ** 2 for row in rows])))
        lines.append(
            f"| {key} | {mean_sd('test_elbo')} | {mean_sd('test_iw_bound')} | "
            f"{mean_sd('log_px')} | {min(log_px):.3f} to {max(log_px):.3f} | {mc_se:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point; see the module docstring.

    Parameters
    ----------
    argv : list of str, optional
        Arguments (default ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=1000, help="steps per objective (1000)")
    parser.add_argument("--particles", type=int, default=50, help="K (50)")
    parser.add_argument("--num-test-samples", type=int, default=5000, help="S (5000)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    parser.add_argument(
        "--out", type=Path, default=Path("bench/seed_spread.jsonl"), help="JSON lines, appended"
    )
    parser.add_argument(
        "--summarize-only", action="store_true", help="print the table of --out and stop"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.summarize_only:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        for seed in args.seeds:
            record = run_seed(
                seed,
                num_steps=args.steps,
                num_particles=args.particles,
                num_test_samples=args.num_test_samples,
                batch_size=args.batch_size,
                learning_rate=args.lr,
            )
            with args.out.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
    if not args.out.is_file():
        raise SystemExit(f"{args.out} does not exist: run without --summarize-only first")
    records = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]
    print(summarize(records))


if __name__ == "__main__":
    main()
