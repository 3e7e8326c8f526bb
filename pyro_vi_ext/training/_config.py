"""The validated configuration of one :func:`~pyro_vi_ext.training.fit` call.

:class:`FitConfig` is built from ``fit``'s arguments by :meth:`FitConfig.from_arguments`, which
checks each of them and raises ``TypeError`` / ``ValueError`` naming the argument before anything
is trained. :class:`Batching` is what follows once the data and the number of processes are known:
minibatch sizes, steps per epoch and the total number of steps.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pyro.optim import PyroOptim
from pyro.optim.lr_scheduler import PyroLRScheduler

from .callbacks import Callback, EarlyStopping, StepInfo, as_callback
from .data import steps_per_epoch

__all__ = ["Batching", "FitConfig", "resolve_batching"]

DEFAULT_DISTRIBUTED_TIMEOUT = 600.0


def _positive_int(name: str, value: Any, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer; got {value!r}")
    return int(value)


def _positive_number(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not (
        isinstance(value, int | float) and value > 0 and math.isfinite(value)
    ):
        raise ValueError(f"`{name}` must be a positive finite number; got {value!r}")
    return float(value)


def accepts_batch_keywords(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` can be called with the keyword arguments ``idx`` and ``n_data``.

    Parameters
    ----------
    fn : callable
        A model or guide.

    Returns
    -------
    bool
        ``True`` when its signature has both keywords or ``**kwargs`` (or cannot be read).
    """
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return True  # cannot tell (e.g. a builtin); let the call decide
    kinds = inspect.Parameter
    params = signature.parameters.values()
    if any(p.kind == kinds.VAR_KEYWORD for p in params):
        return True
    names = {p.name for p in params if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)}
    return {"idx", "n_data"} <= names


def _is_plateau(optim: PyroOptim) -> bool:
    constructor = getattr(optim, "pt_scheduler_constructor", None)
    return isinstance(constructor, type) and issubclass(
        constructor, torch.optim.lr_scheduler.ReduceLROnPlateau
    )


def _check_loss(name: str, loss: Any) -> None:
    if isinstance(loss, type):
        raise TypeError(
            f"`{name}` must be an ELBO instance; got the class {loss.__name__}: "
            f"write {loss.__name__}() (with its options)"
        )
    if not (
        callable(getattr(loss, "loss_and_grads", None)) and callable(getattr(loss, "loss", None))
    ):
        raise TypeError(
            f"`{name}` must be a pyro.infer.ELBO (with loss and loss_and_grads); "
            f"got {type(loss).__name__}"
        )


@dataclass(frozen=True)
class FitConfig:
    """Every argument of :func:`~pyro_vi_ext.training.fit` except the data, validated.

    Attributes
    ----------
    model, guide : callable
        The Pyro model and guide.
    loss, eval_loss : pyro.infer.ELBO
        Training loss and evaluation loss (``eval_loss`` is ``loss`` unless given).
    optim : pyro.optim.PyroOptim
        The optimizer (a ``PyroLRScheduler`` is stepped by ``fit``).
    num_steps, num_epochs : int or None
        Exactly one is set: the training length.
    batch_size, eval_batch_size : int or None
        Requested minibatch sizes (``None``: the loader's or the full data).
    shuffle : bool
        Visit rows in a seeded random order each epoch.
    drop_last : bool or None
        Drop an incomplete last minibatch (``None``: the loader's setting, else ``False``).
    seed : int or None
        The run's seed (``None``: drawn at random).
    eval_every : int
        Epochs between evaluations.
    callbacks : tuple of Callback
        The callbacks, plain functions wrapped.
    scheduler_interval : {"epoch", "step"}
        When a scheduler is stepped.
    scheduler_monitor : str or None
        History key passed to the scheduler's ``step``.
    clip_norm, clip_value : float or None
        Gradient clipping.
    checkpoint : pathlib.Path or None
        Checkpoint file.
    checkpoint_every : int or None
        Steps between checkpoints.
    resume : bool or pathlib.Path
        ``True``: resume from ``checkpoint`` when it exists; a path: resume from that file.
    progress : bool or None
        Progress bar (``None``: when stderr is a terminal).
    device : str, torch.device or None
        Device of the data.
    distributed : bool or None
        Data-parallel training (``None``: when launched by torchrun).
    distributed_timeout : float
        Seconds a collective operation waits for a peer before failing.
    data_plate : str or None
        Name of a plate that ``fit`` turns into a subsampled plate of the full data size, for
        models and guides that take only their data.
    """

    model: Callable[..., Any]
    guide: Callable[..., Any]
    loss: Any
    eval_loss: Any
    optim: PyroOptim
    num_steps: int | None
    num_epochs: int | None
    batch_size: int | None
    shuffle: bool
    drop_last: bool | None
    seed: int | None
    has_eval_data: bool
    eval_every: int
    eval_batch_size: int | None
    callbacks: tuple[Callback, ...]
    scheduler_interval: Literal["epoch", "step"]
    scheduler_monitor: str | None
    clip_norm: float | None
    clip_value: float | None
    checkpoint: Path | None
    checkpoint_every: int | None
    resume: bool | Path
    progress: bool | None
    device: str | torch.device | None
    distributed: bool | None
    distributed_timeout: float
    data_plate: str | None

    @property
    def is_scheduler(self) -> bool:
        """Whether ``optim`` is a ``PyroLRScheduler`` that ``fit`` steps."""
        return isinstance(self.optim, PyroLRScheduler)

    @property
    def loss_has_set_step(self) -> bool:
        """Whether the loss has a ``set_step(int)`` method (weight schedules)."""
        return callable(getattr(self.loss, "set_step", None))

    @classmethod
    def from_arguments(
        cls,
        *,
        model: Callable[..., Any],
        guide: Callable[..., Any],
        loss: Any,
        optim: Any,
        num_steps: int | None,
        num_epochs: int | None,
        batch_size: int | None,
        shuffle: bool,
        drop_last: bool | None,
        seed: int | None,
        has_eval_data: bool,
        eval_loss: Any,
        eval_every: int,
        eval_batch_size: int | None,
        callbacks: Sequence[Callback | Callable[[StepInfo], bool | None]],
        scheduler_interval: str,
        scheduler_monitor: str | None,
        clip_norm: float | None,
        clip_value: float | None,
        checkpoint: str | os.PathLike[str] | None,
        checkpoint_every: int | None,
        resume: bool | str | os.PathLike[str] | None,
        progress: bool | None,
        device: str | torch.device | None,
        distributed: bool | None,
        distributed_timeout: float | None,
        data_plate: str | None,
    ) -> FitConfig:
        """Validate ``fit``'s arguments and build the configuration.

        Parameters
        ----------
        model, guide, loss, optim, num_steps, num_epochs, batch_size, shuffle, drop_last, seed, \
eval_loss, eval_every, eval_batch_size, callbacks, scheduler_interval, scheduler_monitor, \
clip_norm, clip_value, checkpoint, checkpoint_every, resume, progress, device, distributed, \
distributed_timeout, data_plate
            As in :func:`~pyro_vi_ext.training.fit`.
        has_eval_data : bool
            Whether ``eval_data`` was given.

        Returns
        -------
        FitConfig
            The configuration.

        Raises
        ------
        TypeError
            For a model, guide, loss, optimizer or callback of the wrong kind.
        ValueError
            For inconsistent or out-of-range arguments.
        """
        if not callable(model):
            raise TypeError(f"`model` must be callable; got {type(model).__name__}")
        if not callable(guide):
            raise TypeError(f"`guide` must be callable; got {type(guide).__name__}")
        if data_plate is not None and (not isinstance(data_plate, str) or not data_plate):
            raise TypeError(f"`data_plate` must be a plate name (str); got {data_plate!r}")
        if data_plate is None:
            for name, fn in (("model", model), ("guide", guide)):
                if not accepts_batch_keywords(fn):
                    raise TypeError(
                        f"`{name}` must accept the keyword arguments `idx` and `n_data` (or "
                        "**kwargs): fit calls it as fn(*batch, idx=idx, n_data=n_data); see "
                        "pyro_vi_ext.training. For a model that takes only its data, name its "
                        "data plate instead: fit(..., data_plate='data')"
                    )
        _check_loss("loss", loss)
        if eval_loss is not None:
            _check_loss("eval_loss", eval_loss)
        if not isinstance(optim, PyroOptim):
            hint = ""
            if isinstance(optim, torch.optim.Optimizer) or (
                isinstance(optim, type) and issubclass(optim, torch.optim.Optimizer)
            ):
                hint = "; wrap the torch optimizer class, e.g. pyro.optim.Adam({'lr': 1e-3})"
            raise TypeError(
                f"`optim` must be a pyro.optim.PyroOptim; got {type(optim).__name__}{hint}"
            )
        if num_steps is None and num_epochs is None:
            raise ValueError(
                "give the training length: `num_steps` or `num_epochs` (both are None)"
            )
        if num_steps is not None and num_epochs is not None:
            raise ValueError("give only one of `num_steps` and `num_epochs`")
        num_steps = _positive_int("num_steps", num_steps)
        num_epochs = _positive_int("num_epochs", num_epochs)
        batch_size = _positive_int("batch_size", batch_size)
        eval_batch_size = _positive_int("eval_batch_size", eval_batch_size)
        eval_every = _positive_int("eval_every", eval_every, allow_none=False)  # type: ignore[assignment]
        checkpoint_every = _positive_int("checkpoint_every", checkpoint_every)
        clip_norm = _positive_number("clip_norm", clip_norm)
        clip_value = _positive_number("clip_value", clip_value)
        timeout = _positive_number("distributed_timeout", distributed_timeout)
        if seed is not None and (
            isinstance(seed, bool)
            or not isinstance(seed, int | np.integer)
            or not 0 <= seed < 2**32
        ):
            raise ValueError(f"`seed` must be an integer in [0, 2**32) or None; got {seed!r}")
        if eval_loss is not None and not has_eval_data:
            raise ValueError("`eval_loss` is given but `eval_data` is None")
        if checkpoint is not None and not isinstance(checkpoint, str | os.PathLike):
            raise TypeError(
                "`checkpoint` must be a file path (str or os.PathLike) or None; got "
                f"{type(checkpoint).__name__} {checkpoint!r}"
            )
        if not isinstance(resume, bool | str | os.PathLike | None):
            raise TypeError(
                "`resume` must be True, False, None or a checkpoint path (str or os.PathLike); "
                f"got {type(resume).__name__} {resume!r}"
            )
        if checkpoint_every is not None and checkpoint is None:
            raise ValueError("`checkpoint_every` needs a `checkpoint` path")
        if resume is True and checkpoint is None:
            raise ValueError("`resume=True` resumes from `checkpoint`, which is None")
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(
                f"`scheduler_interval` must be 'epoch' or 'step'; got {scheduler_interval!r}"
            )
        is_scheduler = isinstance(optim, PyroLRScheduler)
        if scheduler_monitor is not None and not is_scheduler:
            raise ValueError(
                "`scheduler_monitor` is set but `optim` is not a pyro.optim.PyroLRScheduler"
            )
        if is_scheduler and _is_plateau(optim) and scheduler_monitor is None:
            raise ValueError("a ReduceLROnPlateau `optim` needs `scheduler_monitor` (e.g. 'loss')")
        if scheduler_monitor is not None and scheduler_monitor.startswith("eval_"):
            if not has_eval_data:
                raise ValueError(
                    f"`scheduler_monitor` is {scheduler_monitor!r} but `eval_data` is None"
                )
            if scheduler_interval == "step":
                raise ValueError(
                    "an `eval_*` `scheduler_monitor` needs `scheduler_interval='epoch'`"
                )
        wrapped = tuple(as_callback(c) for c in callbacks)
        for callback in wrapped:
            if isinstance(callback, EarlyStopping) and callback.monitor.startswith("eval_"):
                if not has_eval_data:
                    raise ValueError(
                        f"{callback!r} monitors an evaluation quantity but `eval_data` is None"
                    )
                if callback.interval == "step":
                    raise ValueError(
                        f"{callback!r} monitors an `eval_*` key, which needs interval='epoch'"
                    )
        if resume in (None, False):
            resume_setting: bool | Path = False
        elif resume is True:
            resume_setting = True
        else:
            resume_setting = Path(resume)
            if not resume_setting.exists():
                raise FileNotFoundError(
                    f"`resume` checkpoint {str(resume_setting)!r} does not exist"
                )
        return cls(
            model=model,
            guide=guide,
            loss=loss,
            eval_loss=eval_loss if eval_loss is not None else loss,
            optim=optim,
            num_steps=num_steps,
            num_epochs=num_epochs,
            batch_size=batch_size,
            shuffle=bool(shuffle),
            drop_last=drop_last,
            seed=None if seed is None else int(seed),
            has_eval_data=has_eval_data,
            eval_every=eval_every,
            eval_batch_size=eval_batch_size,
            callbacks=wrapped,
            scheduler_interval=scheduler_interval,  # type: ignore[arg-type]
            scheduler_monitor=scheduler_monitor,
            clip_norm=clip_norm,
            clip_value=clip_value,
            checkpoint=None if checkpoint is None else Path(checkpoint),
            checkpoint_every=checkpoint_every,
            resume=resume_setting,
            progress=progress,
            device=device,
            distributed=distributed,
            distributed_timeout=DEFAULT_DISTRIBUTED_TIMEOUT if timeout is None else timeout,
            data_plate=data_plate,
        )


@dataclass(frozen=True)
class Batching:
    """Minibatching of one run, resolved against the data and the number of processes.

    Attributes
    ----------
    n_data : int
        Rows in the (global) training set, the ``N`` of the plate scale ``N/B``.
    batch_size : int
        Global minibatch size ``B`` (summed over processes).
    drop_last : bool
        Whether the last incomplete minibatch of an epoch is dropped.
    shuffle : bool
        Whether rows are visited in a seeded random order (off for full-batch training).
    steps_per_epoch : int
        Optimizer steps in one epoch.
    total_steps : int
        The step count training runs to.
    eval_batch_size : int or None
        Rows per evaluation minibatch (``None`` without evaluation data).
    """

    n_data: int
    batch_size: int
    drop_last: bool
    shuffle: bool
    steps_per_epoch: int
    total_steps: int
    eval_batch_size: int | None


def resolve_batching(
    config: FitConfig,
    n_data: int,
    default_batch_size: int | None,
    default_drop_last: bool,
    world_size: int,
    n_eval: int | None,
    default_eval_batch_size: int | None,
) -> Batching:
    """Resolve batch sizes and step counts, checking them against the data.

    Parameters
    ----------
    config : FitConfig
        The validated arguments.
    n_data : int
        Rows in the training data.
    default_batch_size : int or None
        The training ``DataLoader``'s batch size, if any.
    default_drop_last : bool
        The training ``DataLoader``'s ``drop_last``.
    world_size : int
        Number of data-parallel processes.
    n_eval : int or None
        Rows in the evaluation data (``None`` without).
    default_eval_batch_size : int or None
        The evaluation ``DataLoader``'s batch size, if any.

    Returns
    -------
    Batching
        The resolved minibatching.

    Raises
    ------
    ValueError
        When the batch size exceeds the data or is smaller than the number of processes, or
        when the loss's ``check_batching(num_points, batch_size, drop_last)`` (if it has one)
        refuses the minibatches of an epoch.
    """
    if n_data < world_size:
        raise ValueError(f"`data` has {n_data} rows, fewer than the {world_size} processes")
    batch_size = config.batch_size or default_batch_size or n_data
    if batch_size > n_data:
        raise ValueError(
            f"`batch_size` ({batch_size}) exceeds the number of rows in `data` ({n_data})"
        )
    if batch_size < world_size:
        raise ValueError(
            f"`batch_size` ({batch_size}) is smaller than the number of processes ({world_size})"
        )
    drop_last = default_drop_last if config.drop_last is None else bool(config.drop_last)
    per_epoch = steps_per_epoch(n_data, batch_size, drop_last)
    total = config.num_steps if config.num_steps is not None else config.num_epochs * per_epoch  # type: ignore[operator]
    eval_batch_size = None
    if n_eval is not None:
        eval_batch_size = min(config.eval_batch_size or default_eval_batch_size or n_eval, n_eval)
    check_batching = getattr(config.loss, "check_batching", None)
    if callable(check_batching) and world_size == 1:
        # e.g. DecomposedELBO: every minibatch needs two points; catch a short last batch now
        check_batching(n_data, batch_size, drop_last)
        if eval_batch_size is not None:
            check_batching(n_eval, eval_batch_size, False)
    return Batching(
        n_data=n_data,
        batch_size=batch_size,
        drop_last=drop_last,
        shuffle=config.shuffle and batch_size < n_data,
        steps_per_epoch=per_epoch,
        total_steps=total,
        eval_batch_size=eval_batch_size,
    )
