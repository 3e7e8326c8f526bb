"""Benchmark of :class:`pyro_vi_ext.ImportanceWeightedELBO` on an MLP VAE.

The VAE is 784-400-20 with batch 128, a Bernoulli likelihood and procedural binary data.

1. Correctness check: on the same random numbers our loss and gradients equal the hand-written
   PyTorch IWAE / STL / DReG losses (``bench/_vae.py``).
2. Speed: ms per training step (loss, backward, Adam step) for the hand-written loss, ours through
   ``ELBOModule`` + ``torch.optim.Adam`` (same optimizer as hand-written), ours compiled
   (``jit=True``, same optimizer), ours with ``jit="inductor"`` (loss and gradients compiled by
   torch inductor; its first step, which compiles, is reported in wall seconds), Pyro's
   ``Trace_ELBO`` (same K, same optimizer), ours through ``pyro.infer.SVI`` +
   ``pyro.optim.Adam``, and Pyro's ``RenyiELBO(alpha=0)`` (``loss_and_grads`` +
   ``torch.optim.Adam``), for K in (1, 5, 50) and each estimator. Runs alternate method by
   method in rounds after warm-up; the median over rounds of the mean step time is reported, and
   each ratio is the median over rounds of the per-round ratio (paired under the same load).
   Target: ours / hand-written within 1.05 at K = 50. On a busy machine use ``--clock cpu
   --threads 1`` (this process's CPU time) for steadier numbers.
3. Guide-gradient signal-to-noise ratio versus K on a briefly trained VAE: for each estimator and
   K, gradients of the encoder (and decoder) from repeated estimates on one fixed batch; SNR =
   |mean| / std per parameter element, averaged over elements.

Usage::

    python bench/bench_iwae.py                   # full run
    python bench/bench_iwae.py --quick           # a smoke run
    python bench/bench_iwae.py --steps 30 --rounds 5 --threads 2
"""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# this checkout's package, not an installed copy
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyro  # noqa: E402
import torch  # noqa: E402
from _vae import PyroVAE, binary_data, handwritten_iw_loss, make_networks  # noqa: E402
from pyro.infer import SVI, RenyiELBO, Trace_ELBO  # noqa: E402

from pyro_vi_ext import ImportanceWeightedELBO  # noqa: E402

ESTIMATORS = ("iwae", "stl", "dreg")
KS = (1, 5, 50)
BATCH = 128


# ------------------------------------------------------------------------------ step functions
def _hand_step(k: int, estimator: str, x_batches) -> Callable[[int], None]:
    encoder, decoder = make_networks()
    params = [*encoder.parameters(), *decoder.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-3)

    def step(i: int) -> None:
        optimizer.zero_grad()
        x = x_batches[i % len(x_batches)]
        handwritten_iw_loss(encoder, decoder, x, k, estimator).backward()
        optimizer.step()

    return step


def _ours_module_step(k: int, estimator: str, x_batches) -> Callable[[int], None]:
    encoder, decoder = make_networks()
    vae = PyroVAE(encoder, decoder, prefix="ours_module_step_")
    loss = ImportanceWeightedELBO(num_particles=k, estimator=estimator, max_plate_nesting=1)
    params = [*encoder.parameters(), *decoder.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-3)

    def step(i: int) -> None:
        optimizer.zero_grad()
        loss.differentiable_loss(vae.model, vae.guide, x_batches[i % len(x_batches)]).backward()
        optimizer.step()

    return step


def _ours_jit_step(k: int, estimator: str, x_batches) -> Callable[[int], None]:
    encoder, decoder = make_networks()
    vae = PyroVAE(encoder, decoder, prefix="ours_jit_step_")
    loss = ImportanceWeightedELBO(
        num_particles=k, estimator=estimator, max_plate_nesting=1, jit=True
    )
    params = [*encoder.parameters(), *decoder.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-3)

    def step(i: int) -> None:
        optimizer.zero_grad()
        loss.differentiable_loss(vae.model, vae.guide, x_batches[i % len(x_batches)]).backward()
        optimizer.step()

    return step


def _ours_inductor_step(k: int, estimator: str, x_batches) -> Callable[[int], None]:
    """Ours with ``jit="inductor"`` (loss and gradients as one inductor-compiled graph)."""
    encoder, decoder = make_networks()
    vae = PyroVAE(encoder, decoder, prefix="ours_inductor_step_")
    loss = ImportanceWeightedELBO(
        num_particles=k, estimator=estimator, max_plate_nesting=1, jit="inductor"
    )
    params = [*encoder.parameters(), *decoder.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-3)

    def step(i: int) -> None:
        optimizer.zero_grad()
        loss.differentiable_loss(vae.model, vae.guide, x_batches[i % len(x_batches)]).backward()
        optimizer.step()

    return step


def _trace_elbo_step(k: int, estimator: str, x_batches) -> Callable[[int], None]:
    """Pyro's ``Trace_ELBO`` (the ELBO, i.e. IWAE at K = 1; K particles averaged otherwise)."""
    encoder, decoder = make_networks()
    vae = PyroVAE(encoder, decoder, prefix="trace_elbo_step_")
    loss = Trace_ELBO(num_particles=k, vectorize_particles=k > 1, max_plate_nesting=1)
    params = [*encoder.parameters(), *decoder.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-3)

    def step(i: int) -> None:
        optimizer.zero_grad()
        loss.differentiable_loss(vae.model, vae.guide, x_batches[i % len(x_batches)]).backward()
        optimizer.step()

    return step


def _ours_svi_step(k: int, estimator: str, x_batches) -> Callable[[int], None]:
    encoder, decoder = make_networks()
    vae = PyroVAE(encoder, decoder, prefix="ours_svi_step_")
    loss = ImportanceWeightedELBO(num_particles=k, estimator=estimator, max_plate_nesting=1)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), loss=loss)

    def step(i: int) -> None:
        svi.step(x_batches[i % len(x_batches)])

    return step


def _renyi_step(k: int, estimator: str, x_batches) -> Callable[[int], None]:
    encoder, decoder = make_networks()
    vae = PyroVAE(encoder, decoder, prefix="renyi_step_")
    loss = RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True, max_plate_nesting=1)
    params = [*encoder.parameters(), *decoder.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-3)

    def step(i: int) -> None:
        optimizer.zero_grad()
        loss.loss_and_grads(vae.model, vae.guide, x_batches[i % len(x_batches)])
        optimizer.step()

    return step


METHODS = {
    "hand": _hand_step,
    "ours": _ours_module_step,
    "ours_svi": _ours_svi_step,
    "renyi": _renyi_step,
    "ours_jit": _ours_jit_step,
    "ours_ind": _ours_inductor_step,
    "trace": _trace_elbo_step,
}


CLOCK: Callable[[], float] = time.perf_counter


def time_steps(step: Callable[[int], None], start: int, count: int) -> float:
    """Mean ms per step over ``count`` steps on :data:`CLOCK` (wall or this process's CPU time)."""
    begin = CLOCK()
    for i in range(start, start + count):
        step(i)
    return (CLOCK() - begin) / count * 1e3


def speed_table(
    x_batches, steps: int, rounds: int, warmup: int, ks=KS, estimators=ESTIMATORS
) -> list[str]:
    """Return table lines: ms per step per method (median over rounds), ratios to hand-written.

    A ratio is the median over rounds of the per-round ratio (each round runs every method back
    to back, so a ratio compares runs made under the same machine load); ``lo-hi`` is the range
    of ours/hand and jit/hand over rounds. ``/Trace`` compares with Pyro's ``Trace_ELBO`` with
    the same K (the ELBO: the same objective only at K = 1) in the same rounds.
    """
    lines = [
        f"{'estimator':>9} {'K':>3} | {'hand ms':>7} | {'ours ms':>7} {'/hand':>6} {'(lo-hi)':>10}"
        f" {'/Trace':>6} | {'jit ms':>7} {'/hand':>6} {'(lo-hi)':>10} {'/Trace':>6} | "
        f"{'ind ms':>7} {'/hand':>6} {'(lo-hi)':>10} {'/Trace':>6} {'compile s':>9} | "
        f"{'SVI/hand':>8} | {'Trace ms':>8} {'/hand':>6} | {'Renyi/hand':>10}"
    ]
    print(lines[0], flush=True)
    for k in ks:
        for estimator in estimators:
            pyro.clear_param_store()
            names = ["hand", "ours", "ours_jit", "ours_ind", "ours_svi", "trace"]
            names += ["renyi"] if estimator == "iwae" else []
            steps_fns = {name: METHODS[name](k, estimator, x_batches) for name in names}
            first_step_s = {}
            for name, step in steps_fns.items():  # warm-up (the compiled losses compile here)
                begin = time.perf_counter()
                step(0)
                first_step_s[name] = time.perf_counter() - begin  # wall: compiling uses 2 cores
                time_steps(step, 1, max(warmup - 1, 0))
            times: dict[str, list[float]] = {name: [] for name in names}
            for r in range(rounds):
                order = names if r % 2 == 0 else names[::-1]  # alternate to spread drift
                for name in order:
                    times[name].append(time_steps(steps_fns[name], warmup + r * steps, steps))
            med = {name: statistics.median(values) for name, values in times.items()}

            def paired(name, ref, times=times):
                return [t / h for t, h in zip(times[name], times[ref], strict=True)]

            def median_ratio(name, ref="hand", paired=paired):
                return statistics.median(paired(name, ref))

            def spread(name, paired=paired):
                values = paired(name, "hand")
                return f"{min(values):.2f}-{max(values):.2f}"

            renyi = f"{median_ratio('renyi'):10.3f}" if "renyi" in med else f"{'-':>10}"
            lines.append(
                f"{estimator:>9} {k:>3} | {med['hand']:7.2f} | {med['ours']:7.2f} "
                f"{median_ratio('ours'):6.3f} {spread('ours'):>10} "
                f"{median_ratio('ours', 'trace'):6.3f} | {med['ours_jit']:7.2f} "
                f"{median_ratio('ours_jit'):6.3f} {spread('ours_jit'):>10} "
                f"{median_ratio('ours_jit', 'trace'):6.3f} | {med['ours_ind']:7.2f} "
                f"{median_ratio('ours_ind'):6.3f} {spread('ours_ind'):>10} "
                f"{median_ratio('ours_ind', 'trace'):6.3f} {first_step_s['ours_ind']:9.1f} | "
                f"{median_ratio('ours_svi'):8.3f} | "
                f"{med['trace']:8.2f} {median_ratio('trace'):6.3f} | {renyi}"
            )
            print(lines[-1], flush=True)
    return lines


# ------------------------------------------------------------------------------ correctness check
def check_against_handwritten(x: torch.Tensor, k: int = 5) -> list[str]:
    """Check that on the same seed value and every gradient of ours equal the hand-written loss."""
    lines = []
    for estimator in ESTIMATORS:
        pyro.clear_param_store()
        encoder, decoder = make_networks()
        vae = PyroVAE(encoder, decoder)
        params = [*encoder.parameters(), *decoder.parameters()]
        loss = ImportanceWeightedELBO(num_particles=k, estimator=estimator, max_plate_nesting=1)
        torch.manual_seed(1)
        ours_value = loss.differentiable_loss(vae.model, vae.guide, x)
        ours = torch.autograd.grad(ours_value, params)
        torch.manual_seed(1)
        hand_value = handwritten_iw_loss(encoder, decoder, x, k, estimator)
        hand = torch.autograd.grad(hand_value, params)
        ours_float, hand_float = float(ours_value.detach()), float(hand_value.detach())
        value_diff = abs(ours_float - hand_float) / abs(hand_float)
        grad_diff = max(
            float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
            for a, b in zip(ours, hand, strict=True)
        )
        ok = value_diff < 1e-5 and grad_diff < 1e-3
        lines.append(
            f"{estimator:>5} K={k}: value rel diff {value_diff:.1e}, "
            f"max grad rel diff {grad_diff:.1e} {'OK' if ok else 'MISMATCH'}"
        )
        print(lines[-1], flush=True)
        if not ok:
            raise SystemExit("ours and hand-written disagree on the same draws")
    return lines


# ------------------------------------------------------------------------------ SNR
def _snr(grads: torch.Tensor) -> float:
    """Mean over parameter elements of |mean| / std across replicates (rows)."""
    mean, std = grads.mean(0), grads.std(0)
    keep = std > 0
    return float((mean[keep].abs() / std[keep]).mean())


def snr_table(x_train, x_fixed, train_steps: int, replicates: int) -> list[str]:
    """Return table lines: guide-gradient SNR per estimator and K on a briefly trained VAE."""
    # a briefly trained VAE, shared by every row
    pyro.clear_param_store()
    encoder, decoder = make_networks()
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=1e-3)
    for i in range(train_steps):
        optimizer.zero_grad()
        handwritten_iw_loss(encoder, decoder, x_train[i % len(x_train)], 5, "iwae").backward()
        optimizer.step()
    vae = PyroVAE(encoder, decoder)
    enc_params, dec_params = list(encoder.parameters()), list(decoder.parameters())

    def collect(grad_fn) -> tuple[torch.Tensor, torch.Tensor]:
        enc, dec = [], []
        for _ in range(replicates):
            grads = grad_fn()
            enc.append(torch.cat([g.reshape(-1) for g in grads[: len(enc_params)]]))
            dec.append(torch.cat([g.reshape(-1) for g in grads[len(enc_params) :]]))
        return torch.stack(enc), torch.stack(dec)

    lines = [
        f"{'estimator':>9} {'K':>3} | {'enc SNR ours':>12} {'enc SNR hand':>12} | "
        f"{'dec SNR ours':>12} | {'bound/pt':>9}"
    ]
    torch.manual_seed(123)
    for estimator in ESTIMATORS:
        for k in KS:
            loss = ImportanceWeightedELBO(num_particles=k, estimator=estimator, max_plate_nesting=1)

            def ours_fn(loss=loss):
                value = loss.differentiable_loss(vae.model, vae.guide, x_fixed)
                return torch.autograd.grad(value, enc_params + dec_params)

            def hand_fn(k=k, estimator=estimator):
                value = handwritten_iw_loss(encoder, decoder, x_fixed, k, estimator)
                return torch.autograd.grad(value, enc_params + dec_params)

            enc_ours, dec_ours = collect(ours_fn)
            enc_hand, _ = collect(hand_fn)
            lines.append(
                f"{estimator:>9} {k:>3} | {_snr(enc_ours):12.3f} {_snr(enc_hand):12.3f} | "
                f"{_snr(dec_ours):12.3f} | {loss.last_terms['iw_bound']:9.2f}"
            )
            print(lines[-1], flush=True)
    return lines


# ------------------------------------------------------------------------------ main
def main(argv=None) -> None:
    """Parse the command line, run the checks and tables, print them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per method and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per method")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--replicates", type=int, default=50, help="gradients per SNR row")
    parser.add_argument("--snr-train-steps", type=int, default=300)
    parser.add_argument("--validate", action="store_true", help="keep Pyro/torch validation on")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: perf_counter; cpu: process CPU time (steadier on a busy machine, 1 thread)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--ks", type=int, nargs="+", default=list(KS), help="K values to time")
    parser.add_argument("--batch", type=int, default=BATCH, help="minibatch size B")
    parser.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=ESTIMATORS)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-snr", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.rounds, args.warmup = 3, 2, 1
        args.replicates, args.snr_train_steps = 8, 20

    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    pyro.enable_validation(args.validate)  # also torch.distributions' argument validation
    data = binary_data(64 * args.batch, seed=0)
    x_batches = list(data.split(args.batch))

    print("# bench_iwae: ImportanceWeightedELBO vs hand-written PyTorch IWAE/STL/DReG")
    print(f"# command: python {' '.join(shlex.quote(a) for a in sys.argv)}")
    print(
        f"# torch {torch.__version__}, pyro {pyro.__version__}, python {platform.python_version()}"
        f", threads {torch.get_num_threads()}, validation {'on' if args.validate else 'off'}, "
        f"clock {args.clock}"
    )
    print(
        f"# VAE 784-400-20, batch {args.batch}, Bernoulli likelihood, procedural binary data; "
        f"steps {args.steps} x rounds {args.rounds}, warm-up {args.warmup}"
    )
    print("\n## same random numbers: ours vs hand-written")
    check_against_handwritten(x_batches[0])
    if not args.skip_speed:
        print("\n## ms per training step (median over rounds); ratios vs hand-written (paired)")
        speed_table(x_batches, args.steps, args.rounds, args.warmup, args.ks, args.estimators)
    if not args.skip_snr:
        print(
            f"\n## guide-gradient SNR (|mean|/std per element, averaged), {args.replicates} "
            f"replicates on one fixed batch, VAE trained {args.snr_train_steps} steps (IWAE K=5)"
        )
        snr_table(x_batches, x_batches[-1], args.snr_train_steps, args.replicates)


if __name__ == "__main__":
    main()
