"""Paired benchmark of the eager K = 1 step: ``ImportanceWeightedELBO`` against ``Trace_ELBO``.

The bench VAE (``bench/_vae.py``, 784-400-20, batch 128) is trained one step at a time (loss,
backward, Adam step) by the hand-written loss, Pyro's ``Trace_ELBO`` and
``ImportanceWeightedELBO(num_particles=1)`` for each estimator (iwae, stl, dreg), all through
``differentiable_loss`` and ``torch.optim.Adam`` (the step functions of ``bench/bench_iwae.py``).
Each round runs every method for ``--steps`` steps back to back, in an order that alternates
from round to round, and times them on this process's CPU time. A ratio is the median over
rounds of the per-round ratio (min-max in brackets), so every ratio compares runs made under the
same machine load.

Usage::

    python bench/bench_eager_k1.py                      # 21 rounds x 20 steps, 1 thread
    python bench/bench_eager_k1.py --rounds 5 --steps 5  # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# this checkout's package, not an installed copy
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyro  # noqa: E402
import torch  # noqa: E402
from _vae import binary_data  # noqa: E402
from bench_iwae import BATCH, _hand_step, _ours_module_step, _trace_elbo_step  # noqa: E402

ESTIMATORS = ("iwae", "stl", "dreg")


def _methods(x_batches) -> dict:
    methods = {"trace": _trace_elbo_step(1, "iwae", x_batches)}
    for estimator in ESTIMATORS:
        methods[f"hand_{estimator}"] = _hand_step(1, estimator, x_batches)
        methods[f"ours_{estimator}"] = _ours_module_step(1, estimator, x_batches)
    return methods


def _cpu_ms(step, start: int, count: int) -> float:
    begin = time.process_time()
    for i in range(start, start + count):
        step(i)
    return (time.process_time() - begin) / count * 1e3


def run(rounds: int, steps: int, warmup: int, seed: int = 0) -> dict[str, list[float]]:
    """Return ``{method: [ms per step in each round]}`` from alternating, paired rounds."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    x_batches = binary_data(BATCH * 8, seed=seed).split(BATCH)
    methods = _methods(x_batches)
    for step in methods.values():
        for i in range(warmup):
            step(i)
    names = list(methods)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            times[name].append(_cpu_ms(methods[name], warmup + r * steps, steps))
    return times


def _ratio(times: dict[str, list[float]], num: str, den: str) -> str:
    ratios = [a / b for a, b in zip(times[num], times[den], strict=True)]
    return f"{statistics.median(ratios):.3f} ({min(ratios):.2f}-{max(ratios):.2f})"


def report(times: dict[str, list[float]]) -> list[str]:
    """Return the table lines: ms per step (median over rounds) and the paired ratios."""
    trace_ms = statistics.median(times["trace"])
    lines = [
        f"Trace_ELBO: {trace_ms:.2f} ms/step",
        f"{'estimator':>9} | {'ours ms':>7} | {'ours/Trace (min-max)':>22} | "
        f"{'hand ms':>7} | {'ours/hand (min-max)':>22}",
    ]
    for estimator in ESTIMATORS:
        ours, hand = f"ours_{estimator}", f"hand_{estimator}"
        lines.append(
            f"{estimator:>9} | {statistics.median(times[ours]):7.2f} | "
            f"{_ratio(times, ours, 'trace'):>22} | {statistics.median(times[hand]):7.2f} | "
            f"{_ratio(times, ours, hand):>22}"
        )
    return lines


def main() -> None:
    """Parse arguments, run the paired rounds and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    times = run(args.rounds, args.steps, args.warmup)
    print(
        f"K=1, batch {BATCH}, {args.rounds} rounds x {args.steps} steps, "
        f"{args.threads} thread(s), CPU time"
    )
    print("\n".join(report(times)))


if __name__ == "__main__":
    main()
