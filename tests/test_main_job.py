"""The main job (``python -m models``).

A short run writes every promised file; bad options fail with one line.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from models.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


def test_short_run_writes_the_report(tmp_path):
    """A three-step run writes every promised file with consistent numbers."""
    out = tmp_path / "report"
    code = main(
        [
            "--steps",
            "3",
            "--batch-size",
            "32",
            "--surgery-points",
            "128",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    expected = {
        "history.png",
        "decomposition.md",
        "decomposition.json",
        "mig.json",
        "traversals.png",
        "inference_data.nc",
        "summary.json",
    }
    assert expected <= {p.name for p in out.iterdir()}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "completed"
    terms = summary["final_terms_mean_last_50_steps"]
    assert {"reconstruction", "index_code_mi", "total_correlation", "dimwise_kl"} <= set(terms)
    decomposition = json.loads((out / "decomposition.json").read_text())
    means = decomposition["means"]
    parts = (
        means["reconstruction"]
        - means["index_code_mi"]
        - means["total_correlation"]
        - means["dimwise_kl"]
    )
    assert parts == pytest.approx(means["elbo"], abs=1e-2)
    assert 0.0 <= means["index_code_mi"] <= math.log(decomposition["num_points"]) + 1e-6
    assert 0.0 <= json.loads((out / "mig.json").read_text())["mig"] <= 1.0
    for png in ("history.png", "traversals.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inference_data_reloads(tmp_path):
    """The ArviZ export of an IWAE run reloads from netCDF."""
    import arviz as az

    out = tmp_path / "r"
    main(
        [
            "--steps",
            "2",
            "--batch-size",
            "16",
            "--surgery-points",
            "64",
            "--loss",
            "iwae",
            "--estimator",
            "stl",
            "--num-particles",
            "2",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    idata = az.from_netcdf(out / "inference_data.nc")
    assert "z" in idata.posterior and "x" in idata.log_likelihood
    assert idata.attrs["model"] == "beta-tcvae"


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--loss", "iwae", "--estimator", "mss"], "does not fit --loss iwae"),
        (["--steps", "0"], "--steps must be a positive integer"),
        (["--model", "resnet"], "invalid choice"),
        (["--batch-size", "1"], "at least 2"),
        (["--device", "cuda:notadevice"], "--device"),
    ],
)
def test_bad_options_give_one_line(argv, fragment):
    """Bad options end with one line on stderr and exit code 2."""
    proc = subprocess.run(
        [sys.executable, "-m", "models", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_describes_options():
    """--help lists the main options."""
    proc = subprocess.run(
        [sys.executable, "-m", "models", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0
    for option in ("--model", "--loss", "--estimator", "--steps", "--device", "--out"):
        assert option in proc.stdout


def test_logger_options_write_tensorboard_events_and_csv(tmp_path):
    """``--tensorboard`` and ``--csv`` write every step of the run.

    Three steps end no epoch, so the epoch-end traversal image is checked apart (below).
    """
    import csv

    from tensorboard.backend.event_processing import event_accumulator

    board, table = tmp_path / "tb", tmp_path / "history.csv"
    argv = ["--steps", "3", "--batch-size", "32", "--surgery-points", "64", "--no-progress"]
    argv += ["--out", str(tmp_path / "r"), "--tensorboard", str(board), "--csv", str(table)]
    assert main(argv) == 0
    with table.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["step"]) for row in rows] == [1, 2, 3]
    assert {"loss", "total_correlation", "lr", "grad_norm"} <= set(rows[0])
    reader = event_accumulator.EventAccumulator(
        str(board), size_guidance={event_accumulator.IMAGES: 0, event_accumulator.SCALARS: 0}
    )
    reader.Reload()
    assert [event.step for event in reader.Scalars("train/loss")] == [1, 2, 3]


def test_tensorboard_option_draws_the_traversals_of_the_trained_model(tmp_path):
    """The image source of ``--tensorboard`` returns a traversal figure of the current model."""
    from matplotlib.figure import Figure

    from models.__main__ import _build_model, _loggers, build_parser
    from pyro_vi_ext.datasets import DSprites
    from pyro_vi_ext.training import TensorBoardLogger

    args = build_parser().parse_args(["--tensorboard", str(tmp_path / "tb")])
    vae = _build_model(args)
    data = DSprites(subgrid={"orientation": 1, "posX": 1, "posY": 1}, flatten=True)
    (logger,) = _loggers(args, vae, data, "cpu")
    assert isinstance(logger, TensorBoardLogger)
    figure = logger.images(None)["traversals"]
    assert isinstance(figure, Figure) and len(figure.axes) == 10 * 9


def test_unwritable_logger_paths_fail_before_training(tmp_path):
    """A ``--csv`` path that is a folder is refused with one line before any step."""
    folder = tmp_path / "a_folder"
    folder.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "models", "--steps", "1", "--csv", str(folder)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "--csv" in result.stderr and "not a regular file" in result.stderr
    assert "training" not in result.stdout
