"""The main job: train an example model on procedural dSprites and write a report folder.

Run from the repository root::

    python -m models --out report                    # beta-TCVAE, DecomposedELBO (MSS), beta = 6
    python -m models --loss iwae --estimator dreg --num-particles 5 --model vae
    python -m models --help

The data are rendered procedurally (:class:`pyro_vi_ext.datasets.DSprites`); nothing is
downloaded. The report folder holds:

* ``history.png``: the loss and every term the loss reports, over training;
* ``decomposition.md`` / ``decomposition.json``: the exact ELBO-surgery table over the training
  images (:func:`pyro_vi_ext.elbo_surgery`), with Monte Carlo standard errors;
* ``mig.json``: the mutual information gap of the encoder means (Chen et al. 2018: scale,
  orientation, posX, posY);
* ``traversals.png``: each latent dimension swept from -3 to 3 around one image's code;
* ``inference_data.nc``: the ArviZ export of the guide on held-out images;
* ``summary.json``: the settings, the final terms, the test log-likelihood and timings.

Every option is checked before training, and a bad one ends the job with one line on stderr and
exit code 2: among them an ``--out`` folder that cannot be written (tried for real), one under a
pseudo-filesystem (``/proc``, ``/sys``, ``/dev``), a ``--batch-size`` larger than the data, and a
``--num-particles`` whose decoder outputs alone would not fit in memory. Ctrl-C stops training
after the current step and exits with code 130 (no report is written).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

SMALL_GRID = {"orientation": 10, "posX": 8, "posY": 8}
GRID_SIZES = {"small": 3 * 6 * 10 * 8 * 8, "full": 3 * 6 * 40 * 32 * 32}
PIXELS = 64 * 64
# Floats per particle, image and pixel the training step keeps alive at once: decoder logits,
# the Bernoulli log-probabilities and their gradients (a lower bound on the real footprint).
FLOATS_PER_PIXEL = 4
INTERRUPTED = 130
LOSSES = ("decomposed", "iwae", "elbo")
ESTIMATORS = {"decomposed": ("mss", "mws"), "iwae": ("iwae", "stl", "dreg"), "elbo": ("reparam",)}
MODELS = ("beta-tcvae", "vae", "conv-vae")


class _OneLineParser(argparse.ArgumentParser):
    """Bad options end with one line on stderr, not a usage block or a traceback."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """Build the command-line parser (bad options end with one line, exit code 2).

    Returns
    -------
    argparse.ArgumentParser
        The parser of ``python -m models``.
    """
    parser = _OneLineParser(
        prog="python -m models",
        description=(
            "Train an example model on procedural dSprites with a pyro_vi_ext loss and write a "
            "report folder (history plot, exact ELBO decomposition, MIG, latent traversals, "
            "ArviZ netCDF, summary)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model",
        choices=MODELS,
        default="beta-tcvae",
        help="beta-tcvae: MLP 4096-512-512-10 VAE; vae: the same with a 20-d "
        "code; conv-vae: convolutional encoder/decoder (slow on CPU)",
    )
    parser.add_argument(
        "--loss",
        choices=LOSSES,
        default="decomposed",
        help="decomposed: DecomposedELBO (beta-TCVAE); iwae: "
        "ImportanceWeightedELBO; elbo: Pyro's Trace_ELBO",
    )
    parser.add_argument(
        "--estimator",
        default=None,
        help="decomposed: mss | mws (default mss); iwae: iwae | stl | dreg (default dreg)",
    )
    parser.add_argument(
        "--beta", type=float, default=6.0, help="weight of the total correlation (decomposed loss)"
    )
    parser.add_argument(
        "--num-particles",
        type=int,
        default=None,
        help="particles per data point (default 1; 5 for iwae)",
    )
    parser.add_argument("--steps", type=int, default=1200, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=256, help="minibatch size")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument(
        "--grid",
        choices=("small", "full"),
        default="small",
        help="small: 11,520 images (orientation 10, posX 8, posY 8); full: the "
        "737,280-image dSprites grid, rendered on demand",
    )
    parser.add_argument(
        "--surgery-points",
        type=int,
        default=None,
        help="images in the exact ELBO decomposition (default: the whole small "
        "grid, 10,000 random images of the full grid)",
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--out", type=Path, default=Path("report"), help="report folder")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--tensorboard",
        type=Path,
        default=None,
        metavar="DIR",
        help="write TensorBoard events to DIR (every history value; latent traversals each epoch)",
    )
    parser.add_argument(
        "--csv",
        type=Path,
        default=None,
        metavar="FILE",
        help="write the step history to FILE and the epoch history to FILE.epochs.csv",
    )
    return parser


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    import torch

    allowed = ESTIMATORS[args.loss]
    if args.estimator is None:
        args.estimator = {"decomposed": "mss", "iwae": "dreg", "elbo": "reparam"}[args.loss]
    if args.estimator not in allowed:
        parser.error(
            f"--estimator {args.estimator!r} does not fit --loss {args.loss}; "
            f"choose one of {', '.join(allowed)}"
        )
    if args.num_particles is None:
        args.num_particles = 5 if args.loss == "iwae" else 1
    for name in ("steps", "batch_size", "num_particles"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer")
    if args.loss == "decomposed" and args.batch_size < 2:
        parser.error(
            "--batch-size must be at least 2 for the decomposed loss (MSS/MWS need "
            "other points of the minibatch)"
        )
    if not (args.lr > 0 and math.isfinite(args.lr)):
        parser.error("--lr must be a positive number")
    if args.beta < 0 or not math.isfinite(args.beta):
        parser.error("--beta must be a non-negative number")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a torch device")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch sees no CUDA device")
    if args.surgery_points is not None and args.surgery_points < 2:
        parser.error("--surgery-points must be at least 2")
    if args.batch_size > GRID_SIZES[args.grid]:
        parser.error(
            f"--batch-size {args.batch_size} is larger than the {args.grid} grid's "
            f"{GRID_SIZES[args.grid]:,} images"
        )
    _check_memory(parser, args, device)
    _check_out(parser, args.out)
    if args.tensorboard is not None:
        _check_out(parser, args.tensorboard, "--tensorboard")
    if args.csv is not None:
        if args.csv.exists() and not args.csv.is_file():
            parser.error(f"--csv {str(args.csv)!r} exists and is not a regular file")
        _check_out(parser, Path(os.path.abspath(args.csv)).parent, "--csv")


def _available_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _check_memory(parser: argparse.ArgumentParser, args: argparse.Namespace, device) -> None:
    """Refuse particle counts whose decoder outputs alone exceed the device's memory."""
    needed = args.num_particles * args.batch_size * PIXELS * FLOATS_PER_PIXEL * 4
    available = _available_bytes(device)
    if needed > available:
        parser.error(
            f"--num-particles {args.num_particles} with --batch-size {args.batch_size} needs at "
            f"least {needed / 2**30:,.1f} GiB for the decoder outputs alone (particles x batch x "
            f"{PIXELS} pixels x {FLOATS_PER_PIXEL} floats), more than the "
            f"{available / 2**30:,.1f} GiB of {device}; lower --num-particles or --batch-size"
        )


def _check_out(parser: argparse.ArgumentParser, out: Path, option: str = "--out") -> None:
    """Check that an output folder can be created and written, before any training."""
    resolved = Path(os.path.abspath(out))
    for root in ("/proc", "/sys", "/dev"):
        if resolved == Path(root) or Path(root) in resolved.parents:
            parser.error(f"{option} {str(out)!r} lies under {root}, which cannot hold a report")
    if out.exists() and not out.is_dir():
        parser.error(f"{option} {str(out)!r} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        parser.error(f"{option} {str(out)!r} cannot be written ({error.strerror or error})")


def _build_model(args):
    from models.beta_tcvae import build_beta_tcvae

    if args.model == "beta-tcvae":
        return build_beta_tcvae(z_dim=10, architecture="mlp")
    if args.model == "vae":
        return build_beta_tcvae(z_dim=20, architecture="mlp", name="vae")
    return build_beta_tcvae(z_dim=10, architecture="conv", name="conv_vae")


def _build_loss(args):
    from pyro.infer import Trace_ELBO

    from pyro_vi_ext import DecomposedELBO, ImportanceWeightedELBO

    if args.loss == "decomposed":
        return DecomposedELBO(
            beta=args.beta, aggregate=args.estimator, num_particles=args.num_particles
        )
    if args.loss == "iwae":
        return ImportanceWeightedELBO(num_particles=args.num_particles, estimator=args.estimator)
    return Trace_ELBO(num_particles=args.num_particles, vectorize_particles=True)


def _traversals(vae, image, path: Path, steps: int = 9) -> None:
    import matplotlib.pyplot as plt

    fig = _traversal_figure(vae, image, steps)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _traversal_figure(vae, image, steps: int = 9):
    import matplotlib.pyplot as plt
    import torch

    with torch.no_grad():
        loc, scale = vae.encode(image.unsqueeze(0))
        loc, scale = loc[0], scale[0]
        # order dimensions by how far q moves from the prior (active dimensions first)
        kl = 0.5 * (loc**2 + scale**2 - 1) - scale.log()
        order = torch.argsort(kl, descending=True)
        values = torch.linspace(-3.0, 3.0, steps)
        codes = loc.repeat(len(order), steps, 1)
        for row, dim in enumerate(order):
            codes[row, :, dim] = values
        pictures = vae.decode(codes).reshape(len(order), steps, 64, 64)
    fig, axes = plt.subplots(len(order), steps, figsize=(steps * 0.9, len(order) * 0.95))
    for row, dim in enumerate(order.tolist()):
        for col in range(steps):
            ax = axes[row, col]
            ax.imshow(pictures[row, col].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(f"z{dim}\nKL {kl[dim]:.1f}", fontsize=7)
            if row == 0:
                ax.set_title(f"{values[col]:+.1f}", fontsize=7)
    fig.suptitle("Latent traversals (rows sorted by KL from the prior)", fontsize=9)
    fig.tight_layout()
    return fig


def _loggers(args: argparse.Namespace, vae, data, device) -> list:
    """The TensorBoard and CSV logger callbacks asked for by ``--tensorboard`` and ``--csv``."""
    from pyro_vi_ext.training import CSVLogger, TensorBoardLogger

    callbacks = []
    if args.tensorboard is not None:
        import torch

        probe = data.images(torch.arange(1))[0].to(device)
        callbacks.append(
            TensorBoardLogger(
                args.tensorboard,
                images=lambda info: {"traversals": _traversal_figure(vae, probe)},
            )
        )
    if args.csv is not None:
        callbacks.append(CSVLogger(args.csv, args.csv.with_suffix(".epochs.csv")))
    return callbacks


def run(args: argparse.Namespace) -> dict:
    """Train, evaluate and write the report folder.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed and checked options.

    Returns
    -------
    dict
        The content of ``summary.json``.

    Raises
    ------
    KeyboardInterrupt
        When training was interrupted (Ctrl-C); no report is written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    import pyro
    import torch

    from pyro_vi_ext import elbo_surgery, fit
    from pyro_vi_ext.datasets import DSprites
    from pyro_vi_ext.diagnostics import log_evidence, to_inference_data
    from pyro_vi_ext.metrics import mutual_information_gap
    from pyro_vi_ext.training import plot_history

    started = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    generator = torch.Generator().manual_seed(args.seed)

    data = DSprites(subgrid=SMALL_GRID if args.grid == "small" else None, flatten=True)
    n_data = len(data)
    print(
        f"dSprites ({args.grid} grid): {n_data:,} images of 64x64; model {args.model}, "
        f"loss {args.loss} ({args.estimator}), {args.steps} steps of {args.batch_size}"
    )
    if args.grid == "small":
        train = data.images(torch.arange(n_data)).to(device)
    else:
        from models.beta_tcvae import collate_images

        train = torch.utils.data.DataLoader(
            data,
            batch_size=args.batch_size,
            shuffle=True,
            collate_fn=collate_images,
            generator=generator,
        )

    vae = _build_model(args).to(device)
    loss = _build_loss(args)
    callbacks = _loggers(args, vae, data, device)
    print("training (Ctrl-C stops after the current step)", flush=True)
    result = fit(
        vae.model,
        vae.guide,
        train,
        loss,
        pyro.optim.Adam({"lr": args.lr}),
        num_steps=args.steps,
        batch_size=args.batch_size if args.grid == "small" else None,
        seed=args.seed,
        progress=False if args.no_progress else None,
        device=device,
        callbacks=callbacks,
    )
    print(result.message)
    if result.stop_reason == "interrupted":
        raise KeyboardInterrupt
    trained = time.perf_counter()

    keys = [
        k
        for k in (
            "loss",
            "reconstruction",
            "index_code_mi",
            "total_correlation",
            "dimwise_kl",
            "elbo",
            "iw_bound",
            "ess",
        )
        if k in result.history
    ]
    fig = plot_history(result, keys=keys, smooth=25)
    fig.savefig(out / "history.png", dpi=90)
    matplotlib.pyplot.close(fig)

    vae.eval()
    cpu = torch.device("cpu")
    vae.to(cpu)
    # exact decomposition over the training images (or a random subset of the full grid)
    surgery_points = args.surgery_points or (n_data if args.grid == "small" else 10_000)
    surgery_points = min(surgery_points, n_data)
    surgery_idx = (
        torch.arange(n_data)
        if surgery_points == n_data
        else torch.randperm(n_data, generator=generator)[:surgery_points]
    )
    surgery_images = data.images(surgery_idx)
    with torch.no_grad():
        surgery = elbo_surgery(
            vae.model,
            vae.guide,
            num_samples=1,
            batch_size=1024,
            dataset_size=surgery_points,
            batch_args=lambda idx: ((surgery_images[idx],), {"idx": idx, "n_data": surgery_points}),
        )
    (out / "decomposition.md").write_text(
        f"Exact ELBO decomposition over {surgery_points:,} training images "
        f"(nats per image; log N = {surgery.log_num_points:.3f}):\n\n{surgery.table()}\n"
    )
    (out / "decomposition.json").write_text(
        json.dumps(
            {
                "num_points": surgery_points,
                "means": surgery.means,
                "standard_errors": surgery.standard_errors,
            },
            indent=2,
        )
    )
    print(surgery.table())

    # MIG from the encoder means, over (scale, orientation, posX, posY) as Chen et al.
    with torch.no_grad():
        codes = torch.cat(
            [
                vae.encode(surgery_images[i : i + 2048])[0]
                for i in range(0, len(surgery_images), 2048)
            ]
        )
    factors = data.latents_classes(surgery_idx)[:, 1:]
    mig = mutual_information_gap(codes, factors, return_details=True)
    factor_names = list(data.factor_names[1:])
    (out / "mig.json").write_text(
        json.dumps(
            {
                "mig": float(mig.score),
                "factors": factor_names,
                "per_factor": [float(v) for v in np.asarray(mig.per_factor)],
                "num_points": surgery_points,
            },
            indent=2,
        )
    )
    print(f"MIG = {float(mig.score):.3f}")

    _traversals(vae, surgery_images[0], out / "traversals.png")

    # held-out images: test log-likelihood and the ArviZ export
    test_idx = torch.randint(0, n_data, (64,), generator=generator)
    test_images = data.images(test_idx)
    with torch.no_grad():
        evidence = log_evidence(vae.model, vae.guide, test_images, num_samples=500, chunk_size=100)
        idata = to_inference_data(
            vae.model,
            vae.guide,
            test_images,
            num_samples=100,
            posterior_predictive=False,
            loss=loss,
            attrs={"model": args.model, "data": "procedural dSprites"},
        )
    idata.to_netcdf(str(out / "inference_data.nc"))

    final_terms = {key: float(np.mean(result.history[key][-50:])) for key in keys}
    summary = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "num_images": n_data,
        "stop_reason": result.stop_reason,
        "final_terms_mean_last_50_steps": final_terms,
        "test_log_likelihood_per_image": float(evidence.mean),
        "test_log_likelihood_se": float(evidence.mean_se),
        "mig": float(mig.score),
        "surgery": surgery.means,
        "seconds_training": round(trained - started, 1),
        "seconds_total": round(time.perf_counter() - started, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"test log-likelihood {evidence.mean:.2f} +- {evidence.mean_se:.2f} nats per image")
    print(f"report written to {out}/ in {summary['seconds_total']:.0f} s")
    return summary


def main(argv: list[str] | None = None) -> int:
    """Run the main job.

    Parameters
    ----------
    argv : list of str, optional
        Command-line arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit code: 0, 2 for a bad option (raised as ``SystemExit``), 130 after Ctrl-C.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    try:
        run(args)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C): no report written", file=sys.stderr)
        return INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
