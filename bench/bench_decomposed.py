"""Benchmark of :class:`pyro_vi_ext.DecomposedELBO` (and of :func:`elbo_surgery`).

1. Step time on the same MLP VAE (Bernoulli decoder, Normal encoder; default 784-400-10, or
   ``--arch large`` for 4096-1200-1200-10), batch 256, D = 10, one step = loss forward + backward
   + ``torch.optim.Adam`` step over the same parameters, in one process, interleaved rounds,
   median per-step time:

   * ``Trace_ELBO`` (Pyro, through its ``ELBOModule``; with ``K`` vectorized particles),
   * ``DecomposedELBO(beta=6, aggregate="mss")`` (through its ``ELBOModule``), eager and with
     ``jit=True``, and with all weights 1 (the ELBO; its terms are then computed only when
     ``last_terms`` is read, which this loop never does), eager and with ``jit=True``,
   * a hand-written PyTorch beta-TCVAE loss (MSS, the same maths written directly on tensors,
     dense ``[K, B, B, D]`` tensor, as in the public implementations but with the weight matrix
     corrected), and a hand-written plain VAE loss (analytic KL) for reference.

   ``--ks`` gives the particles per point ``K``, one table each: every loss draws ``K`` codes
   per point; the hand-written beta-TCVAE takes each particle's aggregate over the batch's
   columns (the estimator of ``DecomposedELBO(num_particles=K)``) and averages the objective
   over the particles, the hand-written VAE averages its reconstruction over them.

   Pyro validation is off (``pyro.enable_validation(False)``); the model and guide use the VAE's
   ``nn.Module`` parameters directly. Targets (issue 12): with unit weights, eager, within 1.05x
   ``Trace_ELBO`` at K = 1; compiled at most 1.00x the hand-written loss at K = 5 and 50.
2. Peak memory at B = 2048: peak resident set size during one training step at B = 2048 minus
   the resident set size just before it (Linux: freed heap returned with ``malloc_trim``, the
   peak reset through ``/proc/self/clear_refs``, then ``VmHWM - VmRSS`` from
   ``/proc/self/status``), after a warm-up step at B = 64, each variant in a fresh subprocess.
3. ``--surgery N``: time of :func:`elbo_surgery` on a table of N Normal posteriors (D = 10).

Usage::

    python bench/bench_decomposed.py                      # parts 1 and 2, 1 intra-op thread
    python bench/bench_decomposed.py --part time --ks 1 5 50 --rounds 4 --steps 2
    python bench/bench_decomposed.py --threads 2 --arch large
    python bench/bench_decomposed.py --part surgery --surgery 50000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# this checkout's package, not an installed copy
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from pyro.infer import Trace_ELBO  # noqa: E402
from torch import nn  # noqa: E402

from pyro_vi_ext import DecomposedELBO, elbo_surgery  # noqa: E402

ARCHS = {"small": (784, (400,), 10), "large": (4096, (1200, 1200), 10)}
BETA = 6.0


def mlp(sizes) -> nn.Sequential:
    """Return a ReLU multilayer perceptron with the given layer widths."""
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class VAE(nn.Module):
    """MLP VAE with a Bernoulli decoder and a factorized Normal encoder, as a Pyro model/guide."""

    def __init__(self, x_dim: int, hidden: tuple[int, ...], z_dim: int):
        super().__init__()
        self.z_dim = z_dim
        self.encoder = mlp((x_dim, *hidden, 2 * z_dim))
        self.decoder = mlp((z_dim, *reversed(hidden), x_dim))

    def encode(self, x):
        """Return the encoder's ``(loc, scale)`` for a batch ``x``."""
        loc, log_var = self.encoder(x).chunk(2, -1)
        return loc, (0.5 * log_var).exp()

    # -- Pyro model and guide ------------------------------------------------------------
    def model(self, x, idx, n_data):
        """Pyro model over the rows ``idx`` of a dataset of ``n_data`` points."""
        with pyro.plate("data", n_data, subsample=idx):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x, idx, n_data):
        """Pyro guide: the encoder's factorized Normal over the code ``z``."""
        loc, scale = self.encode(x)
        with pyro.plate("data", n_data, subsample=idx):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


# -------------------------------------------------------------------------- hand-written losses
_LOG_2PI = math.log(2 * math.pi)


def log_normal(x, loc, log_scale):
    """Return the elementwise log-density of ``N(loc, exp(log_scale))`` at ``x``."""
    return -0.5 * ((x - loc) / log_scale.exp()) ** 2 - log_scale - 0.5 * _LOG_2PI


def mss_log_weights(b: int, n: int) -> torch.Tensor:
    """Return the log of the ``[b, b]`` MSS weight matrix (rows summing to one, Chen et al.)."""
    m = b - 1
    w = torch.full((b, b), 1.0 / m)
    index = torch.arange(b)
    w[index, (index + 1) % b] = (n - m) / (n * m)
    w[index, index] = 1.0 / n
    return w.log()


def hand_tcvae_loss(vae: VAE, x, n_data: int, log_w: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Return the beta-TCVAE loss (MSS) written directly on tensors, with a dense ``[K, B, B, D]``.

    ``K`` samples per point; each particle's aggregate is taken over the batch's columns (the
    same estimator as ``DecomposedELBO(num_particles=K)``) and the objective averaged over them.
    """
    b = x.shape[0]
    loc, scale = vae.encode(x)
    log_scale = scale.log()
    z = loc + scale * torch.randn(k, *loc.shape)  # [K, B, D]
    logits = vae.decoder(z)
    bce = nn.functional.binary_cross_entropy_with_logits(
        logits, x.expand_as(logits), reduction="none"
    )
    recon = -bce.sum(-1)
    log_qzx = log_normal(z, loc, log_scale).sum(-1)
    log_pz = log_normal(z, torch.zeros_like(z), torch.zeros_like(z)).sum(-1)
    pair = log_normal(z[:, :, None, :], loc, log_scale)  # [K, B, B, D]
    log_qz = torch.logsumexp(pair.sum(-1) + log_w, -1)
    log_qz_product = torch.logsumexp(pair + log_w[..., None], -2).sum(-1)
    objective = (
        recon - (log_qzx - log_qz) - BETA * (log_qz - log_qz_product) - (log_qz_product - log_pz)
    )
    return -(n_data / b) * objective.mean(0).sum()


def hand_vae_loss(vae: VAE, x, n_data: int, k: int = 1) -> torch.Tensor:
    """Return the plain VAE loss (analytic KL, ``K`` reconstruction samples) on tensors."""
    b = x.shape[0]
    loc, scale = vae.encode(x)
    z = loc + scale * torch.randn(k, *loc.shape)
    logits = vae.decoder(z)
    bce = nn.functional.binary_cross_entropy_with_logits(
        logits, x.expand_as(logits), reduction="none"
    )
    recon = -bce.sum(-1).mean(0)
    kl = 0.5 * (loc**2 + scale**2 - 1.0 - 2 * scale.log()).sum(-1)
    return -(n_data / b) * (recon - kl).sum()


# -------------------------------------------------------------------------------- step timing
def make_data(n: int, x_dim: int, seed: int = 0) -> torch.Tensor:
    """Return ``n`` binary vectors from a random low-rank threshold model."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(16, x_dim, generator=gen)
    codes = torch.randn(n, 16, generator=gen)
    return (codes @ basis > 0.5).float()


def make_steppers(arch: str, batch: int, n_data: int, k: int = 1, inductor: bool = False):
    """Return, per loss, a function running one optimizer step on a random minibatch.

    ``k`` is the number of particles per point of every loss (``Trace_ELBO`` vectorized);
    ``inductor`` adds the two decomposed losses with ``jit="inductor"`` (compiled in the warm-up).
    """
    x_dim, hidden, z_dim = ARCHS[arch]
    torch.manual_seed(0)
    vae = VAE(x_dim, hidden, z_dim)
    data = make_data(n_data, x_dim)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    log_weights: dict[int, torch.Tensor] = {}

    def log_w(b: int) -> torch.Tensor:
        if b not in log_weights:
            log_weights[b] = mss_log_weights(b, n_data)
        return log_weights[b]

    def decomposed(**kwargs):
        loss = DecomposedELBO(aggregate="mss", max_plate_nesting=1, num_particles=k, **kwargs)
        return loss(vae.model, vae.guide)

    if k == 1:
        trace_module = Trace_ELBO()(vae.model, vae.guide)
    else:
        trace_elbo = Trace_ELBO(num_particles=k, vectorize_particles=True, max_plate_nesting=1)
        trace_module = trace_elbo(vae.model, vae.guide)
    modules = {
        "Trace_ELBO (Pyro)": trace_module,
        "DecomposedELBO mss (Pyro)": decomposed(beta=BETA),
        "DecomposedELBO mss jit=True": decomposed(beta=BETA, jit=True),
        "DecomposedELBO w=1 (Pyro)": decomposed(),
        "DecomposedELBO w=1 jit=True": decomposed(jit=True),
    }
    if inductor:
        modules["DecomposedELBO mss jit=inductor"] = decomposed(beta=BETA, jit="inductor")
        modules["DecomposedELBO w=1 jit=inductor"] = decomposed(jit="inductor")

    def step(loss_fn):
        def run(batch_size: int = batch):
            idx = torch.randint(0, n_data, (batch_size,), generator=gen)
            x = data[idx]
            optimizer.zero_grad()
            loss = loss_fn(x, idx)
            loss.backward()
            optimizer.step()

        return run

    steppers = {
        name: step(lambda x, idx, module=module: module(x, idx, n_data))
        for name, module in modules.items()
    }
    steppers[HAND_TCVAE] = step(lambda x, idx: hand_tcvae_loss(vae, x, n_data, log_w(len(idx)), k))
    steppers[HAND_VAE] = step(lambda x, idx: hand_vae_loss(vae, x, n_data, k))
    return steppers


HAND_TCVAE = "hand-written beta-TCVAE (torch)"
HAND_VAE = "hand-written VAE ELBO (torch)"


def time_steps(
    arch: str,
    batch: int,
    rounds: int,
    steps: int,
    n_data: int,
    k: int = 1,
    inductor: bool = False,
):
    """Return, per loss, the mean step time of each interleaved round, in seconds."""
    steppers = make_steppers(arch, batch, n_data, k, inductor)
    for name, run in steppers.items():  # warm-up (compiles the compiled losses)
        start = time.perf_counter()
        for _ in range(3):
            run()
        if "inductor" in name:
            print(f"{name}: warm-up (compile) {time.perf_counter() - start:.1f} s wall")
    times = {name: [] for name in steppers}
    names = list(steppers)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:  # alternate to spread drift
            start = CLOCK()
            for _ in range(steps):
                steppers[name]()
            times[name].append((CLOCK() - start) / steps)
    return times


CLOCK = time.perf_counter


def paired_ratio(times: dict, name: str, reference: str) -> tuple[float, float, float]:
    """Median, min and max over rounds of the per-round ratio ``name / reference``."""
    ratios = [a / b for a, b in zip(times[name], times[reference], strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


# ------------------------------------------------------------------------------ peak memory
_MEMORY_CHILD = """
import json, sys, time, torch, pyro
sys.path.insert(0, {root!r})
from bench.bench_decomposed import make_steppers, peak_rss_reset, peak_rss_growth_mb
torch.set_num_threads({threads})
pyro.enable_validation(False)
run = make_steppers({arch!r}, 2048, {n_data})[{name!r}]
run(64)
baseline = peak_rss_reset()
start = time.perf_counter()
run(2048)
seconds = time.perf_counter() - start
print(json.dumps({{"growth_mb": peak_rss_growth_mb(baseline), "seconds": seconds}}))
"""


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def peak_rss_reset() -> int:
    """Reset the peak RSS and return the current RSS in kB.

    Freed heap pages go back to the OS first and the peak is reset through Linux's
    ``/proc/self/clear_refs``; the result is the baseline of :func:`peak_rss_growth_mb`.
    """
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _proc_status_kb("VmRSS")


def peak_rss_growth_mb(baseline_kb: int) -> float:
    """Return the peak RSS since :func:`peak_rss_reset` minus its baseline, in MB."""
    return (_proc_status_kb("VmHWM") - baseline_kb) / 1024


def peak_memory(name: str, arch: str, n_data: int, threads: int) -> dict:
    """Run one B = 2048 step of loss ``name`` in a fresh subprocess; its peak RSS growth."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = _MEMORY_CHILD.format(root=root, threads=threads, name=name, arch=arch, n_data=n_data)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------------- surgery
def time_surgery(n: int, d: int = 10, num_samples: int = 1) -> tuple[float, str]:
    """Time :func:`elbo_surgery` on a table of ``n`` Normal posteriors; return time and table."""
    gen = torch.Generator().manual_seed(0)
    cov = 0.3 * torch.eye(d) + 0.7 * torch.ones(d, d)
    loc = torch.randn(n, d, generator=gen) @ torch.linalg.cholesky(cov).T
    scale = 0.3 * (0.5 + torch.rand(n, d, generator=gen))
    x = loc + 0.5 * torch.randn(n, d, generator=gen)

    def model():
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([d]).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def guide():
        with pyro.plate("data", n):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    start = time.perf_counter()
    result = elbo_surgery(model, guide, num_samples=num_samples, max_plate_nesting=1)
    return time.perf_counter() - start, result.table()


# ----------------------------------------------------------------------------------- main
def main() -> None:
    """Parse the command line and run the chosen parts."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["all", "time", "memory", "surgery"], default="all")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="small")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--ks", type=int, nargs="+", default=[1], help="particles per point, one table each"
    )
    parser.add_argument("--n-data", type=int, default=60000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--surgery", type=int, default=50000, help="N for --part surgery")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument(
        "--inductor",
        action="store_true",
        help='also time the decomposed losses with jit="inductor" (a compile per K: minutes)',
    )
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    pyro.enable_validation(False)
    x_dim, hidden, z_dim = ARCHS[args.arch]
    arch = "-".join(str(s) for s in (x_dim, *hidden, z_dim))
    print(
        f"torch {torch.__version__}, pyro {pyro.__version__}, {args.threads} intra-op thread(s), "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; MLP VAE {arch}, "
        f"N = {args.n_data}"
    )

    if args.part in ("all", "time"):
        references = (HAND_TCVAE, HAND_VAE, "Trace_ELBO (Pyro)")
        for k in args.ks:
            times = time_steps(
                args.arch, args.batch, args.rounds, args.steps, args.n_data, k, args.inductor
            )
            print(
                f"\nStep time, batch {args.batch}, K = {k} particles per point (median of "
                f"{args.rounds} interleaved rounds x {args.steps} steps, clock {args.clock}); "
                "ratios: median (min-max) of per-round ratios"
            )
            print(
                "| loss | ms/step | IQR (ms) | vs hand-written beta-TCVAE | "
                "vs hand-written VAE ELBO | vs Trace_ELBO |"
            )
            print("|---|---:|---:|---:|---:|---:|")
            for name, values in times.items():
                q = statistics.quantiles(values, n=4)
                median = statistics.median(values)
                cells = []
                for reference in references:
                    mid, lo, hi = paired_ratio(times, name, reference)
                    cells.append(f"{mid:.3f}x ({lo:.2f}-{hi:.2f})")
                print(
                    f"| {name} | {1e3 * median:.2f} | {1e3 * q[0]:.2f}-{1e3 * q[2]:.2f} | "
                    + " | ".join(cells)
                    + " |"
                )

    if args.part in ("all", "memory"):
        print("\nOne training step at B = 2048, D = 10 (fresh subprocess each; peak RSS growth)")
        print("| loss | peak RSS growth (MB) | step time (s) |")
        print("|---|---:|---:|")
        for name in (
            "Trace_ELBO (Pyro)",
            "DecomposedELBO mss (Pyro)",
            HAND_TCVAE,
        ):
            result = peak_memory(name, args.arch, args.n_data, args.threads)
            print(f"| {name} | {result['growth_mb']:.0f} | {result['seconds']:.2f} |")

    if args.part == "surgery":
        baseline = peak_rss_reset()
        seconds, table = time_surgery(args.surgery)
        growth = peak_rss_growth_mb(baseline)
        print(
            f"\nelbo_surgery, N = {args.surgery}, D = 10, 1 sample per point: {seconds:.1f} s, "
            f"peak RSS growth {growth:.0f} MB"
        )
        print(table)


if __name__ == "__main__":
    main()
