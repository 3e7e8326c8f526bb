"""Benchmark of :func:`pyro_vi_ext.fit`.

1. Overhead: ``fit`` against a hand-written loop (``pyro.infer.SVI.step`` on the same seeded
   minibatches, same loss and optimizer), time per step after the first, on three models: a
   one-parameter model without latents (the step is almost all loop and Pyro machinery, the
   worst case for relative overhead), a Bayesian linear regression (``AutoNormal``) and an
   amortized latent-variable model (MLP encoder and decoder). Each round runs both back to back
   (alternating the order) with one torch thread and gives a ratio; the median ratio over rounds
   and its interquartile range are reported for process CPU time and wall-clock time (CPU time
   is less sensitive to other load on a shared machine). Target: ratio within 1.05.
2. Data-parallel throughput: the same ``fit`` call launched with ``torchrun`` on 1 and 2 CPU
   processes (gloo), same global batch, reported as data points per second and the ratio.

Usage::

    python bench/bench_fit.py                 # both parts
    python bench/bench_fit.py --part overhead
    python bench/bench_fit.py --part ddp --ddp-steps 300
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# this checkout's package, not an installed copy
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from pyro.infer import SVI, Trace_ELBO  # noqa: E402
from pyro.infer.autoguide import AutoNormal  # noqa: E402
from torch import nn  # noqa: E402

from pyro_vi_ext.training import fit  # noqa: E402


# ----------------------------------------------------------------------------------- models
def regression_problem(n: int = 20_000, d: int = 10):
    """Bayesian linear regression with an AutoNormal guide (model, data, guide factory)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen)
    w = torch.randn(d, generator=gen)
    y = x @ w + 0.5 * torch.randn(n, generator=gen)

    def model(x, y=None, *, idx=None, n_data=None):
        n_data = x.shape[0] if n_data is None else n_data
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        with pyro.plate("data", size=n_data, subsample=idx):
            pyro.sample("y", dist.Normal(x @ w + b, 0.5), obs=y)

    return model, (x, y), lambda: AutoNormal(model)


class _Decoder(nn.Module):
    def __init__(self, z: int, h: int, d: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(z, h), nn.Tanh(), nn.Linear(h, d))

    def forward(self, z):
        return self.net(z)


class _Encoder(nn.Module):
    def __init__(self, d: int, h: int, z: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, 2 * z))

    def forward(self, x):
        loc, s = self.net(x).chunk(2, -1)
        return loc, nn.functional.softplus(s) + 1e-3


def amortized_problem(n: int = 20_000, d: int = 64, h: int = 256, z: int = 8):
    """Amortized latent-variable model with MLP encoder and decoder (model, data, guide factory)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, z, generator=gen) @ torch.randn(z, d, generator=gen)
    x = x + 0.1 * torch.randn(n, d, generator=gen)
    torch.manual_seed(1)
    dec, enc = _Decoder(z, h, d), _Encoder(d, h, z)

    def model(x, *, idx=None, n_data=None):
        pyro.module("dec", dec)
        n_data = x.shape[0] if n_data is None else n_data
        with pyro.plate("data", size=n_data, subsample=idx):
            zz = pyro.sample("z", dist.Normal(0.0, 1.0).expand([z]).to_event(1))
            pyro.sample("x", dist.Normal(dec(zz), 0.1).to_event(1), obs=x)

    def guide(x, *, idx=None, n_data=None):
        pyro.module("enc", enc)
        n_data = x.shape[0] if n_data is None else n_data
        with pyro.plate("data", size=n_data, subsample=idx):
            loc, scale = enc(x)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    dec_state = {k: v.clone() for k, v in dec.state_dict().items()}
    enc_state = {k: v.clone() for k, v in enc.state_dict().items()}

    def reset_guide():
        dec.load_state_dict(dec_state)
        enc.load_state_dict(enc_state)
        return guide

    return model, (x,), reset_guide


def minimal_problem(n: int = 20_000):
    """One parameter, no latent variable: the step is nearly all loop and Pyro machinery."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(2))

    def model(x, *, idx=None, n_data=None):
        loc = pyro.param("loc", torch.zeros(()))
        with pyro.plate("data", size=n_data or x.shape[0], subsample=idx):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    def guide(x, *, idx=None, n_data=None):
        pass

    return model, (x,), lambda: guide


PROBLEMS: dict[str, Callable] = {
    "minimal": minimal_problem,
    "regression": regression_problem,
    "amortized": amortized_problem,
}


# ----------------------------------------------------------------------------------- overhead
def hand_loop(model, guide, data, steps: int, batch_size: int, seed: int) -> float:
    """Time the loop a user would write: a seeded permutation per epoch, SVI.step per batch."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    n = data[0].shape[0]
    gen = torch.Generator().manual_seed(seed)
    losses = []
    # first step outside the clock (lazy parameter creation), as fit does it in its set-up
    perm = torch.randperm(n, generator=gen)
    idx = perm[:batch_size]
    svi.step(*(t.index_select(0, idx) for t in data), idx=idx, n_data=n)
    done, start, cpu = 0, time.perf_counter(), time.process_time()
    while done < steps:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            losses.append(svi.step(*(t.index_select(0, idx) for t in data), idx=idx, n_data=n))
            done += 1
            if done == steps:
                break
    return (time.perf_counter() - start) / steps, (time.process_time() - cpu) / steps


def fit_loop(model, guide, data, steps: int, batch_size: int, seed: int) -> float:
    """Steady-state time per step of ``fit``, clocked like the hand loop (after step 1)."""
    pyro.clear_param_store()
    stamps: list[tuple[float, float]] = []

    def clock(info):
        if info.step == 1 or info.step == steps + 1:
            stamps.append((time.perf_counter(), time.process_time()))

    fit(
        model,
        guide,
        data,
        Trace_ELBO(),
        pyro.optim.Adam({"lr": 1e-3}),
        num_steps=steps + 1,
        batch_size=batch_size,
        seed=seed,
        drop_last=True,
        progress=False,
        callbacks=[clock],
    )
    return (stamps[1][0] - stamps[0][0]) / steps, (stamps[1][1] - stamps[0][1]) / steps


def bench_overhead(steps: int, repeats: int, batch_size: int) -> list[dict]:
    """Compare fit with the hand loop in paired rounds.

    Each round runs the hand loop and fit back to back (alternating which goes first) and gives
    one ratio; the median ratio over rounds is robust to slow changes in the load of a shared
    machine. Wall-clock and process CPU time, one torch thread.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for name, make in PROBLEMS.items():
            model, data, make_guide = make()
            hand_t, fit_t = [], []
            for r in range(repeats):
                order = (("hand", hand_loop), ("fit", fit_loop))
                for kind, fn in order if r % 2 == 0 else order[::-1]:
                    t = fn(model, make_guide(), data, steps, batch_size, seed=0)
                    (hand_t if kind == "hand" else fit_t).append(t)
            row = {"model": name, "steps": steps, "batch_size": batch_size, "rounds": repeats}
            for j, clock in enumerate(("wall", "cpu")):
                ratios = [f[j] / h[j] for h, f in zip(hand_t, fit_t, strict=True)]
                q1, med, q3 = statistics.quantiles(ratios, n=4)
                row[f"hand_ms_per_step_{clock}"] = 1e3 * statistics.median(h[j] for h in hand_t)
                row[f"fit_ms_per_step_{clock}"] = 1e3 * statistics.median(f[j] for f in fit_t)
                row[f"ratio_{clock}_median"] = med
                row[f"ratio_{clock}_iqr"] = (q1, q3)
            rows.append(row)
            print(
                f"overhead  {name:10s} batch {batch_size:4d}, {repeats} rounds: "
                f"hand {row['hand_ms_per_step_cpu']:7.3f} / fit {row['fit_ms_per_step_cpu']:7.3f}"
                f" ms/step (CPU); fit/hand median ratio: CPU {row['ratio_cpu_median']:.3f} "
                f"(IQR {row['ratio_cpu_iqr'][0]:.3f}-{row['ratio_cpu_iqr'][1]:.3f}), wall "
                f"{row['ratio_wall_median']:.3f} (IQR {row['ratio_wall_iqr'][0]:.3f}-"
                f"{row['ratio_wall_iqr'][1]:.3f})",
                flush=True,
            )
    finally:
        torch.set_num_threads(threads)
    return rows


# ----------------------------------------------------------------------------------- DDP
def ddp_worker(problem: str, steps: int, batch_size: int, out: str) -> None:
    """Train under torchrun and write rank 0's elapsed time to ``out``."""
    model, data, make_guide = PROBLEMS[problem]()
    guide = make_guide()
    warm = fit(
        model,
        guide,
        data,
        Trace_ELBO(),
        pyro.optim.Adam({"lr": 1e-3}),
        num_steps=5,
        batch_size=batch_size,
        progress=False,
    )
    del warm
    pyro.clear_param_store()
    guide = make_guide()
    result = fit(
        model,
        guide,
        data,
        Trace_ELBO(),
        pyro.optim.Adam({"lr": 1e-3}),
        num_steps=steps,
        batch_size=batch_size,
        progress=False,
        drop_last=True,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out, "w") as f:
            json.dump(
                {
                    "elapsed": result.elapsed,
                    "steps": result.num_steps,
                    "world_size": result.world_size,
                    "threads": torch.get_num_threads(),
                },
                f,
            )


def _launch(nproc: int, problem: str, steps: int, batch_size: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            "--standalone",
            os.path.abspath(__file__),
            "--worker",
            problem,
            str(steps),
            str(batch_size),
            out,
        ]
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        with open(out) as f:
            return json.load(f)


def bench_ddp(steps: int, batch_size: int) -> list[dict]:
    """Throughput (data points per second) of 1 process (2 or 1 threads) and 2 processes x 1."""
    rows = []
    for problem in PROBLEMS:
        runs = []
        for nproc, threads in ((1, 2), (1, 1), (2, 1)):
            r = _launch(nproc, problem, steps, batch_size, threads)
            runs.append((nproc, threads, r["steps"] * batch_size / r["elapsed"]))
        best_single = max(thr for nproc, _, thr in runs if nproc == 1)
        for nproc, threads, thr in runs:
            rows.append(
                {
                    "model": problem,
                    "processes": nproc,
                    "threads_per_process": threads,
                    "global_batch": batch_size,
                    "points_per_s": thr,
                    "ratio_vs_best_1proc": thr / best_single,
                }
            )
            print(
                f"ddp       {problem:10s} {nproc} proc x {threads} thread(s), global batch "
                f"{batch_size}: {thr:9.0f} points/s, ratio vs best 1-process run "
                f"{thr / best_single:.2f}",
                flush=True,
            )
    return rows


def main() -> None:
    """Parse the options and run the benchmark parts."""
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, problem, steps, batch_size, out = sys.argv
        ddp_worker(problem, int(steps), int(batch_size), out)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["overhead", "ddp", "all"], default="all")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=10, help="paired rounds")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--ddp-steps", type=int, default=300)
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()
    print(
        f"torch {torch.__version__}, pyro {pyro.__version__}, {os.cpu_count()} CPU(s), "
        f"{torch.get_num_threads()} torch threads",
        flush=True,
    )
    figures: dict[str, list[dict]] = {}
    if args.part in ("overhead", "all"):
        figures["overhead"] = bench_overhead(args.steps, args.repeats, args.batch_size)
    if args.part in ("ddp", "all"):
        figures["ddp"] = bench_ddp(args.ddp_steps, args.batch_size)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
