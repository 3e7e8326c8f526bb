"""The training loop of :func:`~pyro_vi_ext.training.fit` and the state it carries.

Three objects hold everything a run knows:

* :class:`TrainingSession`: what does not change during the run (configuration, minibatching,
  processes, data sources, the callbacks sorted by hook) and two caches (the current epoch's
  minibatches, the parameters of the last step);
* :class:`LoopState`: the progress and history, i.e. everything a checkpoint saves besides the
  parameter, optimizer and random states;
* :class:`RunStatus`: how the run is going (who asked to stop, which checkpoints were written,
  which writes failed), reported in the result's message.

:func:`run_training` sets them up, restores a checkpoint, runs the steps and assembles the
:class:`~pyro_vi_ext.training.FitResult`.
"""

from __future__ import annotations

import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import pyro
import torch
from tqdm.auto import tqdm

from . import checkpoint as checkpoint_io
from ._config import Batching, FitConfig, resolve_batching
from ._data_plate import DataPlateScaling
from ._evaluation import evaluate, warm_up
from ._rng import (
    capture_rng_state,
    derive_seed,
    loader_seed,
    restore_rng_state,
    seed_model_sampling,
)
from ._step import StepOutcome, optimizer_step
from .callbacks import Callback, EarlyStopping, EpochInfo, FitInfo, StepInfo
from .data import Batch, DataSource, as_data_source, epoch_order, global_batches, shard_batch
from .distributed import DistContext, PeerFailure, setup_distributed
from .result import FitResult, HistoryTable, StopReason

__all__ = ["LoopState", "RunStatus", "TrainingSession", "run_training"]


@dataclass
class LoopState:
    """Progress and history of a run: what a checkpoint saves besides parameters and RNGs.

    Attributes
    ----------
    seed : int
        The run's seed.
    step : int
        Completed optimizer steps.
    epoch : int
        The current 0-based epoch.
    step_in_epoch : int
        Completed steps in the current epoch.
    epoch_end_pending : bool
        Whether the last step ended an epoch whose end-of-epoch work (evaluation, schedules,
        callbacks) is still to do (a checkpoint written in between).
    lr : float
        Learning rate of the first parameter's optimizer after the last step.
    history, epoch_history : HistoryTable
        Per-step and per-epoch rows so far.
    """

    seed: int
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    epoch_end_pending: bool = False
    lr: float = math.nan
    history: HistoryTable = field(default_factory=HistoryTable)
    epoch_history: HistoryTable = field(default_factory=HistoryTable)

    @property
    def epoch_start_row(self) -> int:
        """Row of ``history`` where the current epoch starts."""
        return self.history.n - self.step_in_epoch

    @classmethod
    def from_checkpoint(cls, checkpoint: Mapping[str, Any]) -> LoopState:
        """Rebuild the loop state saved in a checkpoint.

        Parameters
        ----------
        checkpoint : Mapping
            A loaded checkpoint.

        Returns
        -------
        LoopState
            The progress and history at the checkpoint's step.
        """
        history = HistoryTable.from_state(checkpoint["history"])
        lr = history.cols["lr"][-1] if history.n and "lr" in history.cols else math.nan
        return cls(
            seed=int(checkpoint["seed"]),
            step=int(checkpoint["step"]),
            epoch=int(checkpoint["epoch"]),
            step_in_epoch=int(checkpoint["step_in_epoch"]),
            epoch_end_pending=bool(checkpoint["epoch_end_pending"]),
            lr=lr,
            history=history,
            epoch_history=HistoryTable.from_state(checkpoint["epoch_history"]),
        )


@dataclass
class RunStatus:
    """How a run is going; not checkpointed.

    Attributes
    ----------
    stopper : Callback or None
        The first callback that asked to stop.
    last_save_step : int
        Step of the last checkpoint attempt (``-1``: none).
    checkpoint_step : int
        Step of the last checkpoint written (``-1``: none).
    checkpoint_written : str or None
        Path of the last checkpoint written or kept.
    failed_saves : list of int
        Steps whose checkpoint could not be written.
    resumed_from : str or None
        The checkpoint this run resumed from.
    """

    stopper: Callback | None = None
    last_save_step: int = -1
    checkpoint_step: int = -1
    checkpoint_written: str | None = None
    failed_saves: list[int] = field(default_factory=list)
    resumed_from: str | None = None


@dataclass
class TrainingSession:
    """What a run works with: configuration, minibatching, processes and data.

    Attributes
    ----------
    config : FitConfig
        The validated arguments.
    batching : Batching
        Minibatch sizes and step counts.
    context : DistContext
        Rank, world size and collectives.
    device : torch.device
        Device of the data.
    train_source, eval_source : DataSource
        Training and (optional) evaluation rows.
    step_callbacks, epoch_callbacks : tuple of Callback
        Callbacks overriding ``on_step_end`` / ``on_epoch_end``.
    sync_stops : bool
        Whether a stop request must be shared across processes every step.
    loss_has_set_step : bool
        Whether the loss has a ``set_step`` method, called before every step (looked up once).
    term_keys : list of str or None
        Names of the loss terms (fixed by the first step).
    last_params : list of torch.Tensor
        Parameters touched by the last step.
    """

    config: FitConfig
    batching: Batching
    context: DistContext
    device: torch.device
    train_source: DataSource
    eval_source: DataSource | None
    step_callbacks: tuple[Callback, ...]
    epoch_callbacks: tuple[Callback, ...]
    sync_stops: bool
    loss_has_set_step: bool = False
    term_keys: list[str] | None = None
    last_params: list[torch.Tensor] = field(default_factory=list)
    data_plate_checked: bool = False
    _epoch_cache: tuple[int, list[torch.Tensor], list[torch.Tensor]] | None = None

    @property
    def cuda(self) -> bool:
        """Whether the data live on a CUDA device."""
        return self.device.type == "cuda"

    def call_context(
        self, batch: Batch, n_data: int | None = None
    ) -> AbstractContextManager[tuple[tuple[Any, ...], dict[str, Any]]]:
        """Arguments for the model and guide on ``batch``, under the data-plate scaling if any.

        Parameters
        ----------
        batch : Batch
            The minibatch.
        n_data : int, optional
            Full size of the data set the batch comes from (default: the training set).

        Returns
        -------
        contextlib.AbstractContextManager
            Entering it gives ``(args, kwargs)``: with the minibatch convention ``kwargs`` holds
            ``idx`` and ``n_data`` (a plain ``nullcontext``, nothing to undo); with
            ``data_plate`` the call runs under :class:`DataPlateScaling`.
        """
        full_size = self.batching.n_data if n_data is None else n_data
        plate = self.config.data_plate
        if plate is None:
            return nullcontext(
                (batch.args, {**batch.kwargs, "idx": batch.idx, "n_data": full_size})
            )
        return self._data_plate_call(batch, plate, full_size)

    @contextmanager
    def _data_plate_call(
        self, batch: Batch, plate: str, full_size: int
    ) -> Iterator[tuple[tuple[Any, ...], dict[str, Any]]]:
        scaling = DataPlateScaling(plate, full_size, batch.idx.shape[0])
        with scaling:
            yield batch.args, dict(batch.kwargs)
        if not self.data_plate_checked:
            scaling.check_found()
            if batch.idx.shape[0] < full_size:
                _check_no_autoguide_over_rows(self.config.guide, plate)
            self.data_plate_checked = True

    def check_consistent(self, what: str, obj: Any) -> None:
        """Raise when the data-parallel processes disagree on ``obj``.

        Parameters
        ----------
        what : str
            What ``obj`` is (for the message).
        obj : Any
            A picklable value that must be equal on every process.
        """
        everyone = self.context.all_gather_object(obj)
        if any(o != everyone[0] for o in everyone):
            raise RuntimeError(f"data-parallel processes disagree on {what}: {everyone}")

    def epoch_batches(self, seed: int, epoch: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Global minibatches of an epoch and this process's shares of them.

        Parameters
        ----------
        seed : int
            The run's seed.
        epoch : int
            The 0-based epoch.

        Returns
        -------
        tuple of list of torch.Tensor
            ``(global_batches, local_shares)``.
        """
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            batching, context = self.batching, self.context
            order = epoch_order(batching.n_data, seed, epoch, batching.shuffle)
            batches = global_batches(order, batching.batch_size, batching.drop_last)
            shares = [shard_batch(b, context.rank, context.world_size) for b in batches]
            self._epoch_cache = (epoch, batches, shares)
        return self._epoch_cache[1], self._epoch_cache[2]

    def iterate_batches(
        self, seed: int, epoch: int, start: int
    ) -> Iterator[tuple[int, int, Batch | None]]:
        """Yield ``(global size, local size, batch)`` for the steps of an epoch from ``start``.

        Parameters
        ----------
        seed : int
            The run's seed.
        epoch : int
            The 0-based epoch.
        start : int
            Steps of the epoch already done.

        Yields
        ------
        tuple
            The global and local minibatch sizes and this process's batch (``None`` for an
            empty share).
        """
        batches, shares = self.epoch_batches(seed, epoch)
        nonempty = [b for b in shares[start:] if b.shape[0] > 0]
        rows = self.train_source.batches(nonempty, loader_seed(seed, epoch, self.context.rank))
        for whole, share in zip(batches[start:], shares[start:], strict=True):
            yield whole.shape[0], share.shape[0], (next(rows) if share.shape[0] > 0 else None)


class _SigintFlag:
    """Turn the first Ctrl-C into a flag checked between steps (the second one raises)."""

    def __init__(self) -> None:
        self.set = False
        self._previous: Any = None
        self._installed = False

    def _handler(self, signum: int, frame: Any) -> None:
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __enter__(self) -> _SigintFlag:
        if threading.current_thread() is threading.main_thread():
            try:
                self._previous = signal.signal(signal.SIGINT, self._handler)
                self._installed = True
            except ValueError:  # pragma: no cover - e.g. embedded interpreters
                self._installed = False
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)


#: seconds between redraws of the progress bar (tqdm's ``mininterval``; tqdm's dynamic
#: ``miniters`` then skips even the clock reading on most steps)
_BAR_MININTERVAL = 0.25
_NOT_IN_BAR = frozenset({"step", "epoch", "loss_total"})


class _HistoryBar(tqdm):
    """The progress bar: its postfix shows the latest history row, formatted only when drawn.

    The loop hands every row to :attr:`latest_row` (one assignment); tqdm decides when to draw
    (its ``mininterval`` and dynamic ``miniters``), and only then is the row formatted, in
    :attr:`format_dict`, which tqdm's terminal and notebook front ends both read to draw.
    """

    latest_row: Mapping[str, float] | None = None

    @property
    def format_dict(self) -> dict[str, Any]:
        """Tqdm's drawing inputs, the postfix first refreshed from :attr:`latest_row`."""
        row = self.latest_row
        if row is not None:
            self.latest_row = None
            self.set_postfix(
                {k: f"{v:.4g}" for k, v in row.items() if k not in _NOT_IN_BAR}, refresh=False
            )
        return super().format_dict


def _resolve_device(device: str | torch.device | None, data: Any) -> torch.device:
    if device is not None:
        resolved = torch.device(device)
    else:
        first = data
        if isinstance(data, list | tuple) and data:
            first = data[0]
        elif isinstance(data, Mapping) and data:
            first = next(iter(data.values()))
        resolved = first.device if isinstance(first, torch.Tensor) else torch.device("cpu")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"`device` is {resolved} but CUDA is not available")
        if resolved.index is None:
            local = os.environ.get("LOCAL_RANK")
            resolved = torch.device(
                "cuda", int(local) if local is not None else torch.cuda.current_device()
            )
        torch.cuda.set_device(resolved)
    return resolved


def _optimizer_of(optim: Any, param: torch.Tensor) -> torch.optim.Optimizer | None:
    optimizer = optim.optim_objs.get(param)
    if optimizer is None:
        return None
    return optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer


# ------------------------------------------------------------------------------ set-up
def _make_session(config: FitConfig, data: Any, eval_data: Any) -> TrainingSession:
    device = _resolve_device(config.device, data)
    context = setup_distributed(config.distributed, device, config.distributed_timeout)
    train_source = as_data_source(data, "data", device)
    eval_source = None if eval_data is None else as_data_source(eval_data, "eval_data", device)
    batching = resolve_batching(
        config,
        train_source.n,
        train_source.default_batch_size,
        train_source.default_drop_last,
        context.world_size,
        None if eval_source is None else eval_source.n,
        None if eval_source is None else eval_source.default_batch_size,
    )
    callbacks = config.callbacks
    return TrainingSession(
        config=config,
        batching=batching,
        context=context,
        device=device,
        train_source=train_source,
        eval_source=eval_source,
        step_callbacks=tuple(
            c for c in callbacks if type(c).on_step_end is not Callback.on_step_end
        ),
        epoch_callbacks=tuple(
            c for c in callbacks if type(c).on_epoch_end is not Callback.on_epoch_end
        ),
        sync_stops=context.active and any(not c.rank_consistent for c in callbacks),
        loss_has_set_step=config.loss_has_set_step,
    )


def _create_parameters(session: TrainingSession, state: LoopState) -> None:
    """Run the loss once without gradients so that every parameter exists (lazy creation)."""
    config = session.config
    _, shares = session.epoch_batches(state.seed, 0)
    (batch,) = list(session.train_source.batches([shares[0]], 0))
    if config.loss_has_set_step:
        config.loss.set_step(state.step)
    with torch.no_grad(), session.call_context(batch) as (args, kwargs):
        config.loss.loss(config.model, config.guide, *args, **kwargs)


def _refuse_overwriting_foreign_file(path: os.PathLike[str]) -> None:
    """Raise if a fresh run would overwrite a non-empty file that is not a fit checkpoint."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return
    try:
        checkpoint_io.load_checkpoint(path)
    except checkpoint_io.CheckpointError as error:
        raise checkpoint_io.CheckpointError(
            f"`checkpoint` {os.fspath(path)!r} exists and is not a valid pyro_vi_ext checkpoint "
            f"({error}); fit would overwrite it. Choose another `checkpoint` path, or move or "
            "delete the file."
        ) from None


def _resume_path(config: FitConfig) -> str | None:
    if config.resume is True:
        assert config.checkpoint is not None
        return os.fspath(config.checkpoint) if config.checkpoint.exists() else None
    if config.resume is False:
        return None
    return os.fspath(config.resume)


def _restore(
    session: TrainingSession, checkpoint: Mapping[str, Any], path: str
) -> tuple[LoopState, list[str]]:
    config, context = session.config, session.context
    differences = checkpoint_io.check_compatible(checkpoint, path, session.batching, config.optim)
    checkpoint_io.restore_checkpoint(
        checkpoint, path, optim=config.optim, callbacks=config.callbacks
    )
    state = LoopState.from_checkpoint(checkpoint)
    rng_states = checkpoint["rng"]
    if len(rng_states) == context.world_size:
        restore_rng_state(rng_states[context.rank])
    else:
        warnings.warn(
            f"checkpoint {path!r} was written by {len(rng_states)} process(es), this run has "
            f"{context.world_size}: random streams are reseeded, so the continuation is not "
            "bit-identical to an uninterrupted run",
            RuntimeWarning,
            stacklevel=4,
        )
        pyro.set_rng_seed(derive_seed(state.seed, context.rank, state.step) % 2**32)
    return state, differences


def _announce_resume(path: str, state: LoopState, total_steps: int, differences: list[str]) -> None:
    """Warn when a resume ignores settings of this call (the checkpoint's optimizer state wins)."""
    if not differences:
        return
    finished = (
        f"holds a finished run ({state.step} steps, this call asks for {total_steps}): nothing "
        "is trained and the result holds the checkpoint's parameters"
        if state.step >= total_steps
        else f"is continued from step {state.step}"
    )
    warnings.warn(
        f"`resume`: the run in {path!r} {finished}. This call's optimizer settings differ from "
        "the checkpoint's, and the checkpoint's optimizer state, with its values, is what is "
        "restored: " + "; ".join(differences) + ". Start afresh (resume=False or another "
        "checkpoint path) to train with the new settings.",
        UserWarning,
        stacklevel=4,
    )


# ------------------------------------------------------------------------------ checkpoints
def _save(session: TrainingSession, state: LoopState, status: RunStatus) -> None:
    config, context = session.config, session.context
    if config.checkpoint is None:
        return
    rng_states = context.all_gather_object(capture_rng_state(session.cuda))
    status.last_save_step = state.step
    path = os.fspath(config.checkpoint)
    if not context.is_main:
        status.checkpoint_written, status.checkpoint_step = path, state.step
        return
    content = checkpoint_io.build_checkpoint(
        loop_state=state,
        batching=session.batching,
        world_size=context.world_size,
        optim=config.optim,
        rng_states=rng_states,
        callbacks=config.callbacks,
    )
    try:
        written = checkpoint_io.save_checkpoint(config.checkpoint, content)
    except checkpoint_io.CheckpointWriteError as error:
        status.failed_saves.append(state.step)
        kept = (
            f"the file holds step {status.checkpoint_step}"
            if status.checkpoint_step >= 0
            else "no checkpoint was written"
        )
        warnings.warn(
            f"{error}. Training goes on with its state in memory and fit returns its result; "
            f"{kept}. Free space or fix the path to have later checkpoints written.",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    if written:
        status.checkpoint_written, status.checkpoint_step = path, state.step


def _checkpoint_note(status: RunStatus) -> str:
    note = f"; checkpoint: {status.checkpoint_written}" if status.checkpoint_written else ""
    if status.failed_saves:
        note += (
            f"; checkpoint writes FAILED at steps {status.failed_saves} (see the warnings): the "
            f"file holds step {status.checkpoint_step}"
        )
    return note


# ------------------------------------------------------------------------------ epochs
def _scheduler_step(session: TrainingSession, row: Mapping[str, float]) -> None:
    config = session.config
    monitor = config.scheduler_monitor
    if monitor is None:
        config.optim.step()
        return
    if monitor not in row:
        raise KeyError(
            f"`scheduler_monitor` {monitor!r} is not in the {config.scheduler_interval} history; "
            f"available: {sorted(row)}"
        )
    value = row[monitor]
    if not math.isnan(value):
        config.optim.step(value)


def _end_epoch(session: TrainingSession, state: LoopState, status: RunStatus) -> bool:
    """Epoch means, evaluation, schedules and epoch callbacks; whether to stop."""
    config = session.config
    row: dict[str, float] = {"epoch": state.epoch + 1, "step": state.step}
    start = state.epoch_start_row
    for key, column in state.history.cols.items():
        if key in ("step", "epoch"):
            continue
        values = [v for v in column[start:] if not math.isnan(v)]
        row[key] = math.fsum(values) / len(values) if values else math.nan
    row["lr"] = state.lr
    if session.eval_source is not None and (state.epoch + 1) % config.eval_every == 0:
        row.update(evaluate(session, state.epoch, state.seed))
    state.epoch_history.append(row)
    if config.is_scheduler and config.scheduler_interval == "epoch":
        _scheduler_step(session, row)
    state.epoch += 1
    state.step_in_epoch = 0
    state.epoch_end_pending = False
    stop = False
    info = EpochInfo(state.epoch, state.step, row)
    for callback in session.epoch_callbacks:
        if callback.on_epoch_end(info):
            stop = True
            status.stopper = status.stopper or callback
    return stop


def _non_finite_message(state: LoopState, status: RunStatus, config: FitConfig, what: str) -> str:
    failing = state.step + 1
    message = (
        f"non-finite {what} at step {failing} (epoch {state.epoch}): training stopped; the "
        f"parameters are those after step {failing - 1}"
    )
    if status.checkpoint_written:
        message += (
            f"; the last checkpoint ({status.checkpoint_written}, step "
            f"{status.checkpoint_step}) is kept"
        )
    elif config.checkpoint is not None:
        message += "; no checkpoint was written"
    return message


# ------------------------------------------------------------------------------ the loop
def _history_row(state: LoopState, outcome: StepOutcome, n_data: int) -> dict[str, float]:
    row: dict[str, float] = {
        "step": state.step,
        "epoch": state.epoch,
        "loss": outcome.loss_total / n_data,
        "loss_total": outcome.loss_total,
        "grad_norm": outcome.grad_norm,
        "lr": state.lr,
    }
    row.update(outcome.terms)
    return row


def _train(
    session: TrainingSession,
    state: LoopState,
    status: RunStatus,
    bar: Any,
    sigint: _SigintFlag,
) -> tuple[StopReason, str]:
    config, context, batching = session.config, session.context, session.batching
    per_step_schedule = config.is_scheduler and config.scheduler_interval == "step"
    distributed = context.active
    show_progress = not bar.disable
    batches = None
    stop = False
    interrupted = False

    if state.epoch_end_pending:  # resumed from a checkpoint written before the end of epoch
        stop = _end_epoch(session, state, status)
        if stop:
            _save(session, state, status)
    while not stop and state.step < batching.total_steps:
        if batches is None:
            batches = session.iterate_batches(state.seed, state.epoch, state.step_in_epoch)
        global_size, local_size, batch = next(batches)
        outcome = optimizer_step(session, batch, global_size, local_size, state.step, sigint.set)
        if outcome.failure is not None:
            return "non_finite", _non_finite_message(state, status, config, outcome.failure)
        interrupted = outcome.interrupt_requested
        state.step += 1
        state.step_in_epoch += 1
        first_optimizer = _optimizer_of(config.optim, outcome.params[0]) if outcome.params else None
        if first_optimizer is not None:
            state.lr = first_optimizer.param_groups[0]["lr"]
        row = _history_row(state, outcome, batching.n_data)
        state.history.append(row)
        if state.step_in_epoch == batching.steps_per_epoch:
            state.epoch_end_pending = True
            batches = None
        if show_progress:
            bar.latest_row = row
            bar.update(1)
        if session.step_callbacks:
            info = StepInfo(state.step, state.epoch, row)
            for callback in session.step_callbacks:
                if callback.on_step_end(info):
                    stop = True
                    status.stopper = status.stopper or callback
        if per_step_schedule:
            _scheduler_step(session, row)
        if state.epoch_end_pending and _end_epoch(session, state, status):
            stop = True
        if session.sync_stops:
            stop = context.any_flag(stop)
        if not distributed:
            interrupted = sigint.set
        stop = stop or interrupted
        if (
            stop
            or state.step >= batching.total_steps
            or (config.checkpoint_every is not None and state.step % config.checkpoint_every == 0)
        ):
            _save(session, state, status)

    note = _checkpoint_note(status)
    if not stop:
        if status.last_save_step != state.step:
            _save(session, state, status)
            note = _checkpoint_note(status)
        epochs = f" ({state.epoch} epochs)" if state.step_in_epoch == 0 else ""
        return "completed", f"completed {state.step} steps{epochs}" + note
    if interrupted:
        return "interrupted", f"interrupted after step {state.step}" + note
    if isinstance(status.stopper, EarlyStopping):
        return "early_stopping", status.stopper.message + note
    who = repr(status.stopper) if status.stopper is not None else "a callback on another process"
    return "callback", f"stopped by {who} after step {state.step}" + note


def run_training(config: FitConfig, data: Any, eval_data: Any) -> FitResult:
    """Run one ``fit`` call: set up, resume, train, and assemble the result.

    Parameters
    ----------
    config : FitConfig
        The validated arguments.
    data, eval_data
        Training and (optional) held-out data, as given to ``fit``.

    Returns
    -------
    FitResult
        The result.
    """
    started = time.perf_counter()
    session = _make_session(config, data, eval_data)
    context = session.context
    if config.checkpoint is not None and context.is_main:
        checkpoint_io.check_checkpoint_path(config.checkpoint)
        checkpoint_io.remove_orphan_temp_files(config.checkpoint)
    resume_path = _resume_path(config)
    if config.checkpoint is not None and context.is_main:
        if resume_path != os.fspath(config.checkpoint):  # not read by this run: written over
            _refuse_overwriting_foreign_file(config.checkpoint)
    checkpoint = checkpoint_io.load_checkpoint(resume_path) if resume_path is not None else None
    if checkpoint is not None:
        if config.seed is not None and config.seed != int(checkpoint["seed"]):
            warnings.warn(
                f"`seed`={config.seed} ignored: resuming the run with seed {checkpoint['seed']}",
                UserWarning,
                stacklevel=3,
            )
        seed = int(checkpoint["seed"])
    elif config.seed is None:
        seed = int(context.broadcast_object(random.SystemRandom().randrange(2**32)))
    else:
        seed = config.seed

    seed_model_sampling(seed, context.rank)
    state = LoopState(seed=seed)
    _create_parameters(session, state)
    status = RunStatus()
    store = pyro.get_param_store()
    if checkpoint is not None:
        assert resume_path is not None
        state, differences = _restore(session, checkpoint, resume_path)
        status.resumed_from = resume_path
        status.last_save_step = status.checkpoint_step = state.step
        _announce_resume(resume_path, state, session.batching.total_steps, differences)
    if context.active:
        session.check_consistent(
            "the parameters", [(k, tuple(v.shape)) for k, v in store.named_parameters()]
        )
        if checkpoint is None:
            context.broadcast_tensors_([p for _, p in store.named_parameters()])
    warm_up(session)

    info = FitInfo(
        state.step,
        session.batching.total_steps,
        session.batching.steps_per_epoch,
        session.batching.n_data,
        context.rank,
        context.world_size,
    )
    for callback in config.callbacks:
        callback.on_fit_start(info)
    show = context.is_main and (
        sys.stderr.isatty() if config.progress is None else bool(config.progress)
    )
    bar = _HistoryBar(
        total=session.batching.total_steps,
        initial=state.step,
        disable=not show,
        desc="fit",
        unit="step",
        dynamic_ncols=True,
        mininterval=_BAR_MININTERVAL,
    )
    reason: StopReason = "completed"
    try:
        with _SigintFlag() as sigint:
            reason, message = _train(session, state, status, bar, sigint)
    except KeyboardInterrupt:
        for param in session.last_params:
            param.grad = None
        reason = "interrupted"
        message = f"interrupted (KeyboardInterrupt) after step {state.step}"
        if config.checkpoint is not None and not context.active:
            _save(session, state, status)
        message += _checkpoint_note(status)
    except PeerFailure as failure:
        kept = (
            f"the last checkpoint ({status.checkpoint_written}, step {status.checkpoint_step}) "
            "is kept"
            if status.checkpoint_written
            else "no checkpoint was written"
        )
        raise PeerFailure(f"{failure} after step {state.step}; {kept}") from failure
    finally:
        bar.close()

    for callback in config.callbacks:
        callback.on_fit_end()
    if reason == "non_finite":
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    if status.resumed_from is not None:
        nothing = "; nothing left to train" if info.start_step >= info.total_steps else ""
        message = (
            f"resumed from {status.resumed_from} at step {info.start_step}{nothing}; " + message
        )
    params = {name: store[name].detach().clone() for name in store.keys()}
    context.barrier()  # the last checkpoint is on disk before any process returns
    return FitResult(
        params=MappingProxyType(params),
        history=state.history.to_numpy(),
        epoch_history=state.epoch_history.to_numpy(),
        num_steps=state.step,
        num_epochs=state.epoch,
        seed=seed,
        stop_reason=reason,
        message=message,
        checkpoint=status.checkpoint_written,
        world_size=context.world_size,
        elapsed=time.perf_counter() - started,
        resumed_from=status.resumed_from,
    )


def _check_no_autoguide_over_rows(guide: Any, plate: str) -> None:
    """Refuse an autoguide over per-row latents of the ``data_plate`` (it would be silently wrong).

    An autoguide sizes its parameters for those latents on its first call, which under
    ``data_plate`` sees a minibatch of ``B`` rows: all ``N`` rows would then share ``B`` rows of
    guide parameters.
    """
    trace = getattr(guide, "prototype_trace", None)  # set by an AutoGuide's first call
    if trace is None:
        return
    local = sorted(
        name
        for name, site in trace.iter_stochastic_nodes()
        if not site["infer"].get("enumerate")
        and any(frame.name == plate for frame in site["cond_indep_stack"])
    )
    if local:
        names = ", ".join(repr(name) for name in local)
        raise ValueError(
            f"`data_plate={plate!r}` with {type(guide).__name__}: the latent site(s) {names} "
            f"have one value per row of plate {plate!r}, and the autoguide would size their "
            "parameters by the first minibatch (all rows sharing those of one batch). Use an "
            "amortized guide (an encoder), or the idx/n_data minibatch convention with a plate "
            "of the full size (e.g. AutoNormal(model, create_plates=...)), or full-batch training."
        )
