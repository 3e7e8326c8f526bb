"""Loggers for :func:`~pyro_vi_ext.training.fit`: TensorBoard and CSV, as callbacks.

Both are :class:`~pyro_vi_ext.training.Callback` subclasses built on its public hooks only, so
they go in ``fit(..., callbacks=[...])`` beside early stopping. Every step row (``loss``,
``lr``, ``grad_norm`` and every term the loss reports) and every epoch row (epoch means,
``eval_*`` on evaluation epochs) is written. Under data-parallel training only rank 0 writes
(the history is the same on every rank). On resume (``fit(..., resume=True)``) rows after the
checkpoint's step are dropped, so a run interrupted after its last checkpoint leaves no
duplicate steps.

Example
-------
::

    from pyro_vi_ext.training import fit
    from pyro_vi_ext.training.loggers import CSVLogger, TensorBoardLogger

    fit(model, guide, x, loss, optim, num_epochs=20, eval_data=x_test,
        callbacks=[TensorBoardLogger("runs/iwae"), CSVLogger("steps.csv", "epochs.csv")])
    # tensorboard --logdir runs
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pyro_vi_ext.training.callbacks import Callback, EpochInfo, FitInfo, StepInfo

__all__ = ["CSVLogger", "TensorBoardLogger"]

ImageSource = Callable[[EpochInfo], Any]
"""``fn(info) -> image``: a matplotlib figure, an array, or a dict ``{tag: figure or array}``."""

_INDEX_KEYS = ("step", "epoch")


def _scalar_items(values: Mapping[str, float]) -> list[tuple[str, float]]:
    """Return the loggable (non-index, numeric) entries of a history row."""
    items = []
    for key, value in values.items():
        if key in _INDEX_KEYS:
            continue
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().item()
        items.append((str(key), float(value)))
    return items


def _image_dataformats(array: np.ndarray, tag: str) -> str:
    if array.ndim == 2:
        return "HW"
    if array.ndim == 3 and array.shape[-1] in (1, 3, 4):
        return "HWC"
    if array.ndim == 3 and array.shape[0] in (1, 3, 4):
        return "CHW"
    raise ValueError(
        f"image {tag!r} has shape {array.shape}; give a figure, an [H, W] array, or [H, W, C] / "
        "[C, H, W] with C in (1, 3, 4)"
    )


class TensorBoardLogger(Callback):
    r"""Write the training history to TensorBoard with ``torch.utils.tensorboard``.

    Tags: ``train/<key>`` for every step quantity (``train/loss``, ``train/lr``,
    ``train/grad_norm``, ``train/<term>``) at the step number; ``epoch/<key>`` for the epoch
    means and ``eval/<key>`` for the evaluation values (``eval_loss`` becomes ``eval/loss``),
    also at the step number so that curves line up; images under their tags.

    Parameters
    ----------
    log_dir
        Directory of the event files (``tensorboard --logdir`` its parent).
    log_every
        Write step rows every ``log_every`` steps (epoch rows are always written).
    images
        Optional ``fn(info: EpochInfo)`` returning a matplotlib figure, an image array
        (``[H, W]``, ``[H, W, C]`` or ``[C, H, W]``, floats in [0, 1] or uint8; numpy or torch),
        or a dict ``{tag: figure or array}``; called every ``image_every`` epochs. A single
        result is written under the tag ``"images"``. Figures are closed after writing.
    image_every
        Epochs between two calls of ``images``.
    flush_secs
        How often the writer flushes to disk, in seconds.

    Raises
    ------
    ImportError
        At the start of training when the ``tensorboard`` package is missing.

    Examples
    --------
    Traversals of a VAE's code every 5 epochs::

        def traversals(info):
            return {"traversals": plot_traversals(vae, x_test[0])}   # a matplotlib figure

        logger = TensorBoardLogger("runs/beta_tcvae", images=traversals, image_every=5)
        fit(vae.model, vae.guide, x, DecomposedELBO(...), optim, num_epochs=50,
            callbacks=[logger])
    """

    rank_consistent = True

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        *,
        log_every: int = 1,
        images: ImageSource | None = None,
        image_every: int = 1,
        flush_secs: int = 30,
    ):
        for name, value in (("log_every", log_every), ("image_every", image_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TensorBoardLogger: {name} must be a positive int, got {value!r}")
        if images is not None and not callable(images):
            raise TypeError(
                f"TensorBoardLogger: images must be a function of EpochInfo, got {type(images)}"
            )
        self.log_dir = os.fspath(log_dir)
        self.log_every = log_every
        self.images = images
        self.image_every = image_every
        self.flush_secs = flush_secs
        self._writer: Any = None

    @property
    def writer(self) -> Any:
        """The ``SummaryWriter`` while training runs on rank 0, else ``None``."""
        return self._writer

    def on_fit_start(self, info: FitInfo) -> None:
        """Open the writer on rank 0, dropping events after ``info.start_step`` on resume."""
        if info.rank != 0:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError(
                "TensorBoardLogger needs the tensorboard package: pip install tensorboard"
            ) from error
        purge_step = info.start_step + 1 if info.start_step > 0 else None
        self._writer = SummaryWriter(
            self.log_dir, purge_step=purge_step, flush_secs=self.flush_secs
        )

    def on_step_end(self, info: StepInfo) -> bool | None:
        """Write the step row as ``train/<key>``."""
        if self._writer is None or info.step % self.log_every:
            return None
        for key, value in _scalar_items(info.values):
            self._writer.add_scalar(f"train/{key}", value, info.step)
        return None

    def on_epoch_end(self, info: EpochInfo) -> bool | None:
        """Write the epoch row (``epoch/<key>``, ``eval/<key>``) and the images, if due."""
        if self._writer is None:
            return None
        for key, value in _scalar_items(info.values):
            if key.startswith("eval_"):
                tag = f"eval/{key[len('eval_') :]}"
            else:
                tag = f"epoch/{key}"
            if not math.isnan(value):
                self._writer.add_scalar(tag, value, info.step)
        if self.images is not None and info.epoch % self.image_every == 0:
            self._write_images(self.images(info), info.step)
        self._writer.flush()
        return None

    def _write_images(self, result: Any, step: int) -> None:
        items = result.items() if isinstance(result, Mapping) else [("images", result)]
        for tag, image in items:
            if hasattr(image, "savefig"):  # a matplotlib figure
                self._writer.add_figure(str(tag), image, step, close=True)
                continue
            if isinstance(image, torch.Tensor):
                image = image.detach().cpu().numpy()
            array = np.asarray(image)
            self._writer.add_image(
                str(tag), array, step, dataformats=_image_dataformats(array, str(tag))
            )

    def on_fit_end(self) -> None:
        """Flush and close the event file."""
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None

    def __repr__(self) -> str:
        """Show the log directory and the step interval."""
        return f"TensorBoardLogger({self.log_dir!r}, log_every={self.log_every})"


class _CSVTable:
    """Rows written to one CSV file; rewritten whole when a new column appears."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.columns: list[str] = []
        self.rows: list[dict[str, Any]] = []
        self._file: Any = None
        self._writer: Any = None

    def start(self, resume_step: int) -> None:
        """Keep the rows up to ``resume_step`` of an existing file (none when 0)."""
        self.rows, self.columns = [], []
        if resume_step > 0 and os.path.exists(self.path):
            with open(self.path, newline="") as handle:
                reader = csv.DictReader(handle)
                self.columns = list(reader.fieldnames or [])
                self.rows = [row for row in reader if float(row["step"]) <= resume_step]
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._rewrite()

    def _rewrite(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = open(self.path, "w", newline="")  # noqa: SIM115 - kept open while training
        self._writer = csv.DictWriter(self._file, fieldnames=self.columns, restval="")
        if self.columns:
            self._writer.writeheader()
            self._writer.writerows(self.rows)

    def append(self, values: Mapping[str, float]) -> None:
        row = {key: values[key] for key in _INDEX_KEYS if key in values}
        row.update(dict(_scalar_items(values)))
        self.rows.append(row)
        new = [key for key in row if key not in self.columns]
        if new:
            self.columns.extend(new)
            self._rewrite()
        else:
            self._writer.writerow(row)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class CSVLogger(Callback):
    """Write the step history, and optionally the epoch history, to CSV files (stdlib ``csv``).

    The step file has the columns ``step``, ``epoch`` and then every quantity in the order it
    first appeared (``loss``, ``grad_norm``, ``lr``, terms); the epoch file ``step``, ``epoch``,
    the epoch means and the ``eval_*`` values (empty on epochs without evaluation). A column
    that first appears later in training (e.g. ``eval_loss`` with ``eval_every > 1``) rewrites
    the file with the new header, so every file is a valid CSV at any time.

    Parameters
    ----------
    path
        The step file (one row per ``log_every`` steps), or ``None`` for none.
    epoch_path
        The epoch file (one row per epoch), or ``None`` for none.
    log_every
        Write every ``log_every``-th step row.
    flush_every
        Flush the step file every ``flush_every`` written rows (always at epoch and fit end).

    Raises
    ------
    ValueError
        When both paths are ``None`` or a count is not a positive int.

    Examples
    --------
    ::

        logger = CSVLogger("run/steps.csv", epoch_path="run/epochs.csv")
        fit(model, guide, data, loss, optim, num_epochs=10, callbacks=[logger])
        import pandas as pd
        pd.read_csv("run/steps.csv").plot(x="step", y="loss")
    """

    rank_consistent = True

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        epoch_path: str | os.PathLike[str] | None = None,
        *,
        log_every: int = 1,
        flush_every: int = 50,
    ):
        if path is None and epoch_path is None:
            raise ValueError("CSVLogger needs a step file (path) or an epoch file (epoch_path)")
        for name, value in (("log_every", log_every), ("flush_every", flush_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CSVLogger: {name} must be a positive int, got {value!r}")
        self.path = None if path is None else os.fspath(path)
        self.epoch_path = None if epoch_path is None else os.fspath(epoch_path)
        self.log_every = log_every
        self.flush_every = flush_every
        self._steps: _CSVTable | None = None
        self._epochs: _CSVTable | None = None
        self._written = 0

    def on_fit_start(self, info: FitInfo) -> None:
        """Open the files on rank 0 (keeping rows up to the resumed step)."""
        if info.rank != 0:
            return
        if self.path is not None:
            self._steps = _CSVTable(self.path)
            self._steps.start(info.start_step)
        if self.epoch_path is not None:
            self._epochs = _CSVTable(self.epoch_path)
            self._epochs.start(info.start_step)

    def on_step_end(self, info: StepInfo) -> bool | None:
        """Append the step row."""
        if self._steps is None or info.step % self.log_every:
            return None
        self._steps.append({"step": info.step, "epoch": info.epoch, **info.values})
        self._written += 1
        if self._written % self.flush_every == 0:
            self._steps.flush()
        return None

    def on_epoch_end(self, info: EpochInfo) -> bool | None:
        """Append the epoch row and flush both files."""
        if self._epochs is not None:
            self._epochs.append({"epoch": info.epoch, "step": info.step, **info.values})
        for table in (self._steps, self._epochs):
            if table is not None:
                table.flush()
        return None

    def on_fit_end(self) -> None:
        """Close the files."""
        for table in (self._steps, self._epochs):
            if table is not None:
                table.close()
        self._steps = self._epochs = None

    def __repr__(self) -> str:
        """Show the two paths."""
        return f"CSVLogger({self.path!r}, epoch_path={self.epoch_path!r})"
