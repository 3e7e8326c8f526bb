"""Particle chunking: ms per training step and peak memory, chunked against unchunked.

The bench VAE (``bench/_vae.py``: MLP 784-400-20, Bernoulli likelihood, procedural binary data)
trained with ``ImportanceWeightedELBO(num_particles=K)`` at large ``K`` (default 1000), without
chunking and with ``particle_chunk_size=C`` (default ``C`` = 50 and 100), beside the hand-written
PyTorch loss (``_vae.handwritten_iw_loss``, unchunked) as a reference.

Every configuration runs in a fresh Python subprocess, so that its peak memory is its own: the
child builds networks and data, takes one warm-up step, then ``--steps`` timed steps (loss,
backward, Adam step); it reports the median ms per step (this process's CPU time with
``--threads`` intra-op threads, and wall time) and the growth of its resident-memory high-water
mark over the resident size before the first step (``resource.getrusage(RUSAGE_SELF).ru_maxrss``).
Configurations are interleaved in ``--rounds`` rounds; ratios to the unchunked loss are medians of
per-round ratios.

Usage::

    python bench/bench_chunking.py                       # K=1000, B=64, iwae and dreg
    python bench/bench_chunking.py --k 1000 --batch 128 --chunks 50 100 --estimators dreg
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def _rss_mib() -> float:
    """Return the current resident size in MiB (Linux ``/proc/self/statm``)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def _peak_mib() -> float:
    """Return the resident-memory high-water mark in MiB (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(config: dict) -> dict:
    """Run one configuration in this process and return its figures."""
    import pyro
    import torch
    from _vae import PyroVAE, binary_data, handwritten_iw_loss, make_networks

    from pyro_vi_ext import ImportanceWeightedELBO

    torch.set_num_threads(config["threads"])
    pyro.set_rng_seed(0)
    encoder, decoder = make_networks(0)
    x = binary_data(config["batch"], seed=1)
    if config["loss"] == "handwritten":
        optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=1e-3)

        def step() -> float:
            optimizer.zero_grad()
            value = handwritten_iw_loss(encoder, decoder, x, config["k"], config["estimator"])
            value.backward()
            optimizer.step()
            return float(value)

    else:
        vae = PyroVAE(encoder, decoder)
        loss = ImportanceWeightedELBO(
            num_particles=config["k"],
            estimator=config["estimator"],
            max_plate_nesting=1,
            particle_chunk_size=config["chunk"],
        )
        svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), loss=loss)

        def step() -> float:
            return svi.step(x)

    before = _rss_mib()
    step()  # warm-up: parameters, caches, allocator pools
    cpu_ms, wall_ms = [], []
    for _ in range(config["steps"]):
        cpu, wall = time.process_time(), time.perf_counter()
        step()
        cpu_ms.append(1e3 * (time.process_time() - cpu))
        wall_ms.append(1e3 * (time.perf_counter() - wall))
    return {
        "cpu_ms": statistics.median(cpu_ms),
        "wall_ms": statistics.median(wall_ms),
        "peak_growth_mib": _peak_mib() - before,
    }


def run_in_subprocess(config: dict) -> dict:
    """Run :func:`child` for ``config`` in a fresh interpreter and parse its JSON line."""
    completed = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"configuration {config} failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _label(config: dict) -> str:
    if config["loss"] == "handwritten":
        return f"hand-written {config['estimator']} (unchunked)"
    chunk = config["chunk"]
    return f"ours {config['estimator']}, " + ("unchunked" if chunk is None else f"C = {chunk}")


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run the configurations in interleaved rounds, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=1000, help="particles per bound")
    parser.add_argument("--batch", type=int, default=64, help="minibatch size B")
    parser.add_argument("--chunks", type=int, nargs="+", default=[50, 100], help="chunk sizes C")
    parser.add_argument("--estimators", nargs="+", default=["iwae", "dreg"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child))))
        return

    common = {"k": args.k, "batch": args.batch, "steps": args.steps, "threads": args.threads}
    configs = []
    for estimator in args.estimators:
        configs.append({**common, "loss": "handwritten", "estimator": estimator, "chunk": None})
        for chunk in [None, *args.chunks]:
            configs.append({**common, "loss": "ours", "estimator": estimator, "chunk": chunk})
    results: dict[int, list[dict]] = {i: [] for i in range(len(configs))}
    for _ in range(args.rounds):
        for index, config in enumerate(configs):
            results[index].append(run_in_subprocess(config))

    def unchunked_of(estimator: str) -> int:
        return next(
            i
            for i, c in enumerate(configs)
            if c["loss"] == "ours" and c["estimator"] == estimator and c["chunk"] is None
        )

    command = "python bench/bench_chunking.py " + " ".join(argv if argv else sys.argv[1:])
    print(f"# {command.strip()}")
    print(
        f"# K = {args.k}, B = {args.batch}, MLP VAE 784-400-20, {args.threads} thread(s), "
        f"{args.steps} timed steps x {args.rounds} rounds, one subprocess per run"
    )
    print(
        "| configuration | CPU ms/step | wall ms/step | time vs unchunked | "
        "peak memory growth (MiB) | memory vs unchunked |"
    )
    print("|---|---|---|---|---|---|")
    for index, config in enumerate(configs):
        runs, reference = results[index], results[unchunked_of(config["estimator"])]
        pairs = list(zip(runs, reference, strict=True))
        time_ratio = statistics.median(run["cpu_ms"] / ref["cpu_ms"] for run, ref in pairs)
        memory_ratio = statistics.median(
            run["peak_growth_mib"] / ref["peak_growth_mib"] for run, ref in pairs
        )
        print(
            f"| {_label(config)} | {statistics.median(r['cpu_ms'] for r in runs):.0f} | "
            f"{statistics.median(r['wall_ms'] for r in runs):.0f} | {time_ratio:.2f} | "
            f"{statistics.median(r['peak_growth_mib'] for r in runs):.0f} | {memory_ratio:.2f} |"
        )


if __name__ == "__main__":
    main()
