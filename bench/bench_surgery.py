"""ELBO surgery at the full dSprites scale: the reference-subset mode of :func:`elbo_surgery`.

1. ``--train-steps`` steps of ``Trace_ELBO`` (Adam, lr 1e-3, batches of 128 random grid images)
   on the beta-TCVAE of :mod:`models.beta_tcvae` (MLP 4096-512-512-10, Bernoulli decoder),
   from a fixed initialisation: a *briefly trained* encoder (``--train-steps 0``: randomly
   initialised). The networks are then put in evaluation mode.
2. Subset surgery on the whole procedural dSprites grid (737,280 images): the images are
   rendered 4096 at a time by ``batch_args`` and never held together; only the per-point
   Normal parameters and codes (``N x D``) are kept. Prints wall time, terms and standard
   errors (with the subset's part).
3. Exact versus subset surgery on a fixed random subset of ``--compare-points`` grid images
   (default 20,000) with the same codes: wall time of each and the difference in units of the
   subset's standard error.

Wall time depends on the machine's load; process CPU time (all threads together) does not as
much, and both are printed.

Usage::

    nice python bench/bench_surgery.py                       # the figures of the README
    python bench/bench_surgery.py --train-steps 0 --reference-size 500
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# this checkout's package and models, not an installed copy
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyro  # noqa: E402
import torch  # noqa: E402
from pyro.infer import SVI, Trace_ELBO  # noqa: E402

from models.beta_tcvae import build_beta_tcvae  # noqa: E402
from pyro_vi_ext import elbo_surgery  # noqa: E402
from pyro_vi_ext.datasets import DSprites  # noqa: E402
from pyro_vi_ext.diagnostics import SURGERY_TERMS  # noqa: E402


def train_briefly(vae, data: DSprites, steps: int, seed: int) -> float:
    """Run ``steps`` ``Trace_ELBO`` steps on random minibatches; return the seconds taken."""
    if steps == 0:
        return 0.0
    n = len(data)
    gen = torch.Generator().manual_seed(seed)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, n, (128,), generator=gen)
        loss = svi.step(data.images(idx), idx=idx, n_data=n)
        if step % 50 == 0 or step == steps - 1:
            print(f"  train step {step}: loss/point {loss / n:.1f}", flush=True)
    return time.perf_counter() - start


def surgery(vae, data: DSprites, rows: torch.Tensor, reference_size: int | None, seed: int):
    """Run elbo_surgery over the grid rows ``rows``; return ``(result, wall s, CPU s)``."""
    n = rows.numel()

    def batch_args(idx: torch.Tensor):
        return (data.images(rows[idx]),), {"idx": idx, "n_data": n}

    pyro.set_rng_seed(seed)  # the codes: the same in exact and subset mode
    generator = None if reference_size is None else torch.Generator().manual_seed(seed + 1)
    start, cpu_start = time.perf_counter(), time.process_time()
    result = elbo_surgery(
        vae.model,
        vae.guide,
        batch_size=4096,
        batch_args=batch_args,
        dataset_size=n,
        reference_size=reference_size,
        generator=generator,
    )
    return result, time.perf_counter() - start, time.process_time() - cpu_start


def main() -> None:
    """Run the three parts and print their figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-steps", type=int, default=50)
    parser.add_argument("--reference-size", type=int, default=500)
    parser.add_argument("--compare-points", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pyro.enable_validation(False)
    pyro.clear_param_store()
    total_start, cpu_start = time.perf_counter(), time.process_time()

    data = DSprites()
    torch.manual_seed(args.seed)
    vae = build_beta_tcvae(z_dim=10, architecture="mlp", hidden_dims=(512, 512))
    print(f"1. training {args.train_steps} Trace_ELBO steps (0 = randomly initialised encoder)")
    train_seconds = train_briefly(vae, data, args.train_steps, args.seed)
    print(f"   {train_seconds:.1f} s wall")
    vae.eval()

    all_rows = torch.arange(len(data))
    print(f"\n2. subset surgery, full grid N = {len(data)}, M = {args.reference_size}")
    result, seconds, cpu = surgery(vae, data, all_rows, args.reference_size, args.seed)
    print(result.table())
    print(f"   wall time {seconds:.1f} s, process CPU time {cpu:.1f} s ({args.threads} threads)")

    print(f"\n3. exact vs subset, N = {args.compare_points} random grid images")
    rows = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))
    rows = rows[: args.compare_points]
    exact, exact_seconds, exact_cpu = surgery(vae, data, rows, None, args.seed)
    subset, subset_seconds, subset_cpu = surgery(vae, data, rows, args.reference_size, args.seed)
    print(exact.table())
    print(subset.table())
    print(f"   wall time: exact {exact_seconds:.1f} s, subset {subset_seconds:.1f} s")
    print(f"   process CPU time: exact {exact_cpu:.1f} s, subset {subset_cpu:.1f} s")
    print(f"{'term':<20}{'exact':>12}{'subset':>12}{'diff':>10}{'subset se':>11}{'diff/se':>9}")
    for term in SURGERY_TERMS:
        diff = subset.means[term] - exact.means[term]
        se = subset.reference_standard_errors[term]
        ratio = diff / se if se > 0 else 0.0
        print(
            f"{term:<20}{exact.means[term]:>12.4f}{subset.means[term]:>12.4f}{diff:>10.4f}"
            f"{se:>11.4f}{ratio:>9.2f}"
        )
    total, total_cpu = time.perf_counter() - total_start, time.process_time() - cpu_start
    print(f"\ntotal wall time {total:.1f} s, process CPU time {total_cpu:.1f} s")
    print(f"load average at the end (1, 5, 15 min): {os.getloadavg()}")


if __name__ == "__main__":
    main()
