"""TensorBoard and CSV loggers, read back with tensorboard's event reader and the csv module."""

from __future__ import annotations

import csv
import math

import matplotlib
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

from pyro_vi_ext import ImportanceWeightedELBO
from pyro_vi_ext.training import EpochInfo, FitInfo, StepInfo, fit
from pyro_vi_ext.training.loggers import CSVLogger, TensorBoardLogger

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend

# imported at collection: torch.utils.tensorboard takes about 3 s to import the first time
pytest.importorskip("torch.utils.tensorboard")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

N_DATA, BATCH = 24, 8  # 3 steps per epoch


def _model(x, *, idx=None, n_data=None):
    n_data = x.shape[0] if n_data is None else n_data
    with pyro.plate("data", size=n_data, subsample=idx):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def _guide(x, *, idx=None, n_data=None):
    n_data = x.shape[0] if n_data is None else n_data
    loc = pyro.param("loc", torch.zeros(n_data))
    scale = pyro.param("scale", torch.ones(n_data), constraint=constraints.positive)
    with pyro.plate("data", size=n_data, subsample=idx) as rows:
        pyro.sample("z", dist.Normal(loc[rows], scale[rows]))


def _fit(callbacks, num_epochs=2, **options):
    pyro.clear_param_store()
    x = torch.linspace(-2.0, 2.0, N_DATA)
    return fit(
        _model,
        _guide,
        x,
        ImportanceWeightedELBO(num_particles=3),
        pyro.optim.Adam({"lr": 0.05}),
        num_epochs=num_epochs,
        batch_size=BATCH,
        eval_data=x,
        callbacks=callbacks,
        progress=False,
        **options,
    )


def _read_events(log_dir):
    reader = event_accumulator.EventAccumulator(
        str(log_dir), size_guidance={event_accumulator.IMAGES: 0, event_accumulator.SCALARS: 0}
    )
    reader.Reload()
    return reader


def test_tensorboard_event_file_holds_every_history_value(tmp_path):
    """Every step key and term, lr, grad norm, epoch means and eval values, at their steps."""
    shown = []

    def images(info: EpochInfo):
        shown.append(info.epoch)
        fig = plt.figure(figsize=(1, 1))
        return {"figure": fig, "array": np.full((4, 5), 0.5), "chw": torch.zeros(3, 4, 5)}

    logger = TensorBoardLogger(tmp_path / "run", images=images, image_every=2)
    result = _fit([logger])
    assert logger.writer is None  # closed at fit end
    reader = _read_events(tmp_path / "run")
    tags = set(reader.Tags()["scalars"])
    steps = result.history
    step_keys = [k for k in steps if k not in ("step", "epoch")]
    assert {"loss", "lr", "grad_norm"} <= set(step_keys) and len(step_keys) > 3  # terms too
    for key in step_keys:
        events = reader.Scalars(f"train/{key}")
        assert [e.step for e in events] == list(range(1, 7))
        np.testing.assert_allclose([e.value for e in events], steps[key], rtol=1e-6)
    epochs = result.epoch_history
    for key in epochs:
        if key in ("step", "epoch"):
            continue
        tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"epoch/{key}"
        assert tag in tags
        events = reader.Scalars(tag)
        assert [e.step for e in events] == [3, 6]
        np.testing.assert_allclose([e.value for e in events], epochs[key], rtol=1e-6)
    assert "eval/loss" in tags
    assert shown == [2]  # image_every=2 over 2 epochs
    assert set(reader.Tags()["images"]) == {"figure", "array", "chw"}
    assert [e.step for e in reader.Images("array")] == [6]
    assert reader.Images("chw")[0].width == 5 and reader.Images("chw")[0].height == 4


def test_tensorboard_logs_every_nth_step_and_only_on_rank_zero(tmp_path):
    """log_every thins the step rows; other ranks open no writer."""
    logger = TensorBoardLogger(tmp_path / "run", log_every=2)
    _fit([logger])
    reader = _read_events(tmp_path / "run")
    assert [e.step for e in reader.Scalars("train/loss")] == [2, 4, 6]
    other = TensorBoardLogger(tmp_path / "other")
    other.on_fit_start(FitInfo(0, 6, 3, N_DATA, rank=1, world_size=2))
    other.on_step_end(StepInfo(1, 0, {"loss": 1.0}))
    other.on_fit_end()
    assert not (tmp_path / "other").exists()


def test_bad_images_are_refused(tmp_path):
    """A wrongly shaped image names its tag and the shapes accepted."""
    logger = TensorBoardLogger(tmp_path / "run", images=lambda info: np.zeros((2, 2, 7, 7)))
    with pytest.raises(ValueError, match="image 'images' has shape"):
        _fit([logger], num_epochs=1)
    with pytest.raises(ValueError, match="log_every"):
        TensorBoardLogger(tmp_path, log_every=0)


def _read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_csv_files_match_the_history(tmp_path):
    """Step and epoch rows, every column, eval values on evaluation epochs only."""
    logger = CSVLogger(tmp_path / "steps.csv", tmp_path / "epochs.csv")
    result = _fit([logger], num_epochs=4, eval_every=2)
    rows = _read_csv(tmp_path / "steps.csv")
    assert len(rows) == 6 * 2
    assert list(rows[0])[:2] == ["step", "epoch"]
    for key, values in result.history.items():
        np.testing.assert_allclose([float(r[key]) for r in rows], values, rtol=1e-12)
    epochs = _read_csv(tmp_path / "epochs.csv")
    assert [int(r["epoch"]) for r in epochs] == [1, 2, 3, 4]
    # eval_loss first appears at epoch 2: the file was rewritten with the column
    assert [r["eval_loss"] == "" for r in epochs] == [True, False, True, False]
    for key, values in result.epoch_history.items():
        got = [float(r[key]) if r[key] != "" else math.nan for r in epochs]
        np.testing.assert_allclose(got, values, rtol=1e-12)


def test_csv_resume_drops_rows_after_the_checkpoint(tmp_path):
    """Rows written after the last checkpoint are dropped when training resumes."""
    path = tmp_path / "steps.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "epoch", "loss"])
        writer.writerows([[s, 0, float(s)] for s in range(1, 6)])
    logger = CSVLogger(path)
    logger.on_fit_start(FitInfo(3, 6, 3, N_DATA, rank=0, world_size=1))
    logger.on_step_end(StepInfo(4, 1, {"step": 4, "epoch": 1, "loss": 40.0, "lr": 0.1}))
    logger.on_fit_end()
    rows = _read_csv(path)
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]
    assert rows[-1]["loss"] == "40.0" and rows[-1]["lr"] == "0.1" and rows[0]["lr"] == ""
    with pytest.raises(ValueError, match="needs a step file"):
        CSVLogger(None)


def test_tensorboard_resume_replaces_the_steps_after_the_checkpoint(tmp_path):
    """A resumed run's events after its start step replace those of the interrupted run."""
    first = TensorBoardLogger(tmp_path / "run")
    first.on_fit_start(FitInfo(0, 6, 3, N_DATA, rank=0, world_size=1))
    for step in range(1, 6):  # interrupted after step 5, last checkpoint at step 3
        first.on_step_end(StepInfo(step, 0, {"loss": float(step)}))
    first.on_fit_end()
    resumed = TensorBoardLogger(tmp_path / "run")
    resumed.on_fit_start(FitInfo(3, 6, 3, N_DATA, rank=0, world_size=1))
    for step in range(4, 7):
        resumed.on_step_end(StepInfo(step, 1, {"loss": 10.0 * step}))
    resumed.on_fit_end()
    events = _read_events(tmp_path / "run").Scalars("train/loss")
    assert [e.step for e in events] == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in events] == [1.0, 2.0, 3.0, 40.0, 50.0, 60.0]
