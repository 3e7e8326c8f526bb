"""Cost growth: ms per training step and peak memory against K, B and the latent dimension D.

MLP VAE 784-400-D (Bernoulli likelihood, procedural binary data, ``bench/_vae.py``'s layout with
the code size as a parameter). For each grid point every loss runs ``--steps`` timed training
steps (loss, backward, Adam step), interleaved with the others in ``--rounds`` rounds, on this
process's CPU time (``--clock cpu``, the default here) with ``--threads`` intra-op threads; the
table gives the median ms per step, the ratio to the hand-written IWAE loss (median of per-round
ratios) and the peak resident-memory growth of one step (Linux ``VmHWM`` after resetting it
through ``/proc/self/clear_refs``, minus the resident size before the step).

Losses: the hand-written PyTorch IWAE (``_vae.handwritten_iw_loss``), ours
``ImportanceWeightedELBO`` (iwae, dreg; eager and ``jit=True``) and ``DecomposedELBO``
(beta = 4, MSS; eager, K particles) and Pyro's ``Trace_ELBO`` (K particles, vectorized).

Usage::

    python bench/bench_cost_growth.py                # default grid, a few minutes
    python bench/bench_cost_growth.py --full         # K 1..1000, B 32..2048, D 5..50 (long)
    python bench/bench_cost_growth.py --ks 1 10 --batches 64 --dims 20
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from _vae import X_DIM, binary_data, handwritten_iw_loss  # noqa: E402
from pyro.infer import Trace_ELBO  # noqa: E402
from torch import nn  # noqa: E402

from pyro_vi_ext import DecomposedELBO, ImportanceWeightedELBO  # noqa: E402

HIDDEN = 400
DEFAULT_GRID = {"ks": [1, 10, 100], "batches": [32, 256], "dims": [20]}
FULL_GRID = {"ks": [1, 10, 100, 1000], "batches": [32, 128, 512, 2048], "dims": [5, 20, 50]}


class Encoder(nn.Module):
    """784-400-(D, D): loc and softplus scale."""

    def __init__(self, dim: int):
        super().__init__()
        self.hidden = nn.Linear(X_DIM, HIDDEN)
        self.loc = nn.Linear(HIDDEN, dim)
        self.scale = nn.Linear(HIDDEN, dim)

    def forward(self, x):
        """Return ``(loc, scale)``."""
        h = torch.tanh(self.hidden(x))
        return self.loc(h), nn.functional.softplus(self.scale(h)) + 1e-4


class VAE:
    """Pyro model and guide over an encoder and a D-784 decoder (``pyro.module`` registered)."""

    def __init__(self, dim: int, name: str):
        torch.manual_seed(0)
        self.dim, self.name = dim, name
        self.encoder = Encoder(dim)
        self.decoder = nn.Sequential(nn.Linear(dim, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, X_DIM))

    def model(self, x, n_data=None):
        """Prior N(0, I_D) and Bernoulli decoder, data plate of size ``n_data``."""
        pyro.module(f"{self.name}_decoder", self.decoder)
        with pyro.plate("data", n_data or x.shape[0], subsample=torch.arange(x.shape[0])):
            prior = dist.Normal(x.new_zeros(self.dim), x.new_ones(self.dim)).to_event(1)
            z = pyro.sample("z", prior)
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x, n_data=None):
        """Amortized factorized Normal."""
        pyro.module(f"{self.name}_encoder", self.encoder)
        with pyro.plate("data", n_data or x.shape[0], subsample=torch.arange(x.shape[0])):
            loc, scale = self.encoder(x)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def parameters(self):
        """Return the encoder's and decoder's parameters."""
        return [*self.encoder.parameters(), *self.decoder.parameters()]


def _steppers(k: int, dim: int, n_data: int) -> dict[str, Callable[[torch.Tensor], None]]:
    """One training step per loss at K particles and code size ``dim``."""
    losses = {
        "iwae": ImportanceWeightedELBO(num_particles=k, max_plate_nesting=1),
        "iwae jit": ImportanceWeightedELBO(num_particles=k, max_plate_nesting=1, jit=True),
        "dreg": ImportanceWeightedELBO(num_particles=k, estimator="dreg", max_plate_nesting=1),
        "decomposed": DecomposedELBO(
            beta=4.0, aggregate="mss", num_particles=k, max_plate_nesting=1
        ),
        "Trace_ELBO": Trace_ELBO(num_particles=k, vectorize_particles=k > 1, max_plate_nesting=1),
    }
    steppers = {}
    hand_vae = VAE(dim, "hand")
    hand_opt = torch.optim.Adam(hand_vae.parameters(), lr=1e-3)

    def hand_step(x):
        hand_opt.zero_grad()
        handwritten_iw_loss(hand_vae.encoder, hand_vae.decoder, x, k, "iwae").backward()
        hand_opt.step()

    steppers["hand iwae"] = hand_step
    for name, loss in losses.items():
        vae = VAE(dim, name.replace(" ", "_"))
        optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)

        def step(x, loss=loss, vae=vae, optimizer=optimizer):
            optimizer.zero_grad()
            loss.differentiable_loss(vae.model, vae.guide, x, n_data).backward()
            optimizer.step()

        steppers[name] = step
    return steppers


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def peak_growth_mb(step: Callable[[torch.Tensor], None], x: torch.Tensor) -> float:
    """Peak resident-memory growth (MB) of one call of ``step`` (Linux only; NaN elsewhere)."""
    try:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        before = _status_kb("VmRSS")
        step(x)
        return (_status_kb("VmHWM") - before) / 1024
    except (OSError, KeyError):
        return math.nan


def run_grid(ks, batches, dims, rounds: int, steps: int, clock) -> list[str]:
    """Time every loss on every grid point; return the table lines."""
    header = (
        f"| {'K':>5} | {'B':>5} | {'D':>3} | loss | ms/step | vs hand (min-max) | peak MB |\n"
        "|---:|---:|---:|---|---:|---:|---:|"
    )
    lines = [header]
    print(header, flush=True)
    data = binary_data(max(batches) * 4, seed=0)
    n_data = data.shape[0]
    for dim in dims:
        for batch in batches:
            x_batches = list(data[: 4 * batch].split(batch))
            for k in ks:
                pyro.clear_param_store()
                steppers = _steppers(k, dim, n_data)
                names = list(steppers)
                memory = {}
                for name in names:  # warm-up, then memory; the compiled loss traces, then
                    for i in range(4):  # torch's profiling executor optimizes on the third call
                        steppers[name](x_batches[i % len(x_batches)])
                    memory[name] = peak_growth_mb(steppers[name], x_batches[0])
                times = {name: [] for name in names}
                for r in range(rounds):
                    for name in names if r % 2 == 0 else names[::-1]:
                        begin = clock()
                        for i in range(steps):
                            steppers[name](x_batches[i % len(x_batches)])
                        times[name].append((clock() - begin) / steps * 1e3)
                for name in names:
                    ratios = [a / b for a, b in zip(times[name], times["hand iwae"], strict=True)]
                    line = (
                        f"| {k:>5} | {batch:>5} | {dim:>3} | {name} | "
                        f"{statistics.median(times[name]):.2f} | {statistics.median(ratios):.3f} "
                        f"({min(ratios):.2f}-{max(ratios):.2f}) | {memory[name]:.0f} |"
                    )
                    lines.append(line)
                    print(line, flush=True)
    return lines


def main(argv=None) -> None:
    """Parse the command line and print the cost-growth table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the full grid (long)")
    parser.add_argument("--ks", type=int, nargs="+")
    parser.add_argument("--batches", type=int, nargs="+")
    parser.add_argument("--dims", type=int, nargs="+")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="cpu")
    args = parser.parse_args(argv)
    grid = dict(FULL_GRID if args.full else DEFAULT_GRID)
    for key in ("ks", "batches", "dims"):
        if getattr(args, key):
            grid[key] = getattr(args, key)
    torch.set_num_threads(args.threads)
    pyro.enable_validation(False)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print("# bench_cost_growth: ms per step and peak memory against K, B, D")
    print(f"# command: python {' '.join(shlex.quote(a) for a in sys.argv)}")
    print(
        f"# torch {torch.__version__}, pyro {pyro.__version__}, threads {args.threads}, "
        f"clock {args.clock}, rounds {args.rounds} x steps {args.steps}; grid {grid}"
    )
    run_grid(grid["ks"], grid["batches"], grid["dims"], args.rounds, args.steps, clock)


if __name__ == "__main__":
    main()
