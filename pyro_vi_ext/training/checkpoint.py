"""Checkpoints of :func:`~pyro_vi_ext.training.fit`: the format, writing, reading and restoring.

This module owns the checkpoint format: what is saved (:func:`build_checkpoint`), how it is
written and read (:func:`save_checkpoint`, :func:`load_checkpoint`) and how a run is restored
from it (:func:`restore_checkpoint`).

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(path, weights_only=True)`` (no pickled code runs). It holds:

``format``, ``version``
    ``"pyro_vi_ext.fit/1"`` (the family) and the layout version, :data:`CHECKPOINT_VERSION`.
``sha256``
    SHA-256 of the content (every other entry, walked in a canonical order: each tensor's dtype,
    shape and bytes, each number, string and key). :func:`load_checkpoint` recomputes it and
    refuses a file whose content changed (a flipped bit inside a tensor).
``step``, ``epoch``, ``step_in_epoch``, ``epoch_end_pending``
    Progress: completed optimizer steps, the current (0-based) epoch, the completed steps in it,
    and whether the end-of-epoch work for the last step is still to do.
``seed``, ``n_data``, ``batch_size``, ``steps_per_epoch``, ``total_steps``, ``world_size``
    The run's settings; a resume checks the data and batching still agree.
``optimizer``
    The optimizer's description: Pyro wrapper, torch optimizer (and scheduler) class and
    settings; a resume refuses another optimizer class and names any setting that differs.
``params``
    ``{name: unconstrained value}`` for every parameter in Pyro's param store.
``optim``
    ``PyroOptim.get_state()``: per-parameter optimizer (and scheduler) state dicts.
``rng``
    One dict per process (rank order): torch CPU and CUDA generator states, Python ``random`` and
    NumPy global states, all as tensors and numbers.
``history``, ``epoch_history``
    ``{name: tensor}``, the run's history so far.
``callbacks``
    ``{state key: state_dict}``: each callback's state under its
    :attr:`~pyro_vi_ext.training.Callback.state_key` (the class name unless it says otherwise;
    ``#2``, ``#3`` appended for repeats), so adding, removing or reordering callbacks does not
    misplace state.

A loss keeps no state of its own across steps: weight schedules are functions of the step, which
``fit`` passes to ``loss.set_step`` before every step.

Files are written atomically (to a temporary file ``.<name>.<random>.tmp`` next to the target,
then renamed over it), and never with non-finite parameters, so a crash while saving or a
diverged run cannot destroy the last good checkpoint. Temporary files left behind by a killed
write are removed by :func:`remove_orphan_temp_files` when ``fit`` starts.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import stat
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.optim import PyroOptim
from pyro.optim.lr_scheduler import PyroLRScheduler

from .callbacks import Callback

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "CheckpointError",
    "CheckpointWriteError",
    "build_checkpoint",
    "callback_state_keys",
    "check_checkpoint_path",
    "content_digest",
    "describe_optimizer",
    "load_checkpoint",
    "remove_orphan_temp_files",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "pyro_vi_ext.fit/1"
CHECKPOINT_VERSION = 2
_PSEUDO_FILESYSTEMS = ("/proc", "/sys", "/dev")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, foreign, corrupted or mismatched."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (disk full, file-size limit, permissions)."""


# ------------------------------------------------------------------------------ content hash
def _feed(hasher: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach().cpu().contiguous()
        hasher.update(f"T{tensor.dtype}{tuple(tensor.shape)};".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, Mapping):
        hasher.update(f"D{len(obj)};".encode())
        for key in sorted(obj, key=repr):
            _feed(hasher, key)
            _feed(hasher, obj[key])
    elif isinstance(obj, list | tuple):
        hasher.update(f"L{len(obj)};".encode())
        for item in obj:
            _feed(hasher, item)
    elif isinstance(obj, str):
        data = obj.encode()
        hasher.update(f"S{len(data)};".encode() + data)
    elif isinstance(obj, bool) or obj is None:
        hasher.update(f"B{obj!r};".encode())
    elif isinstance(obj, int):
        hasher.update(f"I{obj};".encode())
    elif isinstance(obj, float):
        hasher.update(f"F{obj.hex()};".encode())
    else:
        raise TypeError(f"checkpoint content of type {type(obj).__name__} cannot be hashed")


def content_digest(state: Mapping[str, Any]) -> str:
    """SHA-256 of a checkpoint's content, every entry except ``sha256`` itself.

    Parameters
    ----------
    state : Mapping
        The checkpoint dict.

    Returns
    -------
    str
        The hex digest. It depends on each tensor's dtype, shape and bytes and on every number,
        string and key, not on the order of dict entries.

    Examples
    --------
    >>> content_digest({"a": torch.ones(2)}) == content_digest({"a": torch.ones(2)})
    True
    >>> content_digest({"a": torch.ones(2)}) == content_digest({"a": torch.zeros(2)})
    False
    """
    hasher = hashlib.sha256()
    _feed(hasher, {k: v for k, v in state.items() if k != "sha256"})
    return hasher.hexdigest()


# ------------------------------------------------------------------------------ paths
def _temp_prefix(target: Path) -> str:
    return f".{target.name}."


def check_checkpoint_path(path: str | os.PathLike[str]) -> Path:
    """Check, before training, that ``path`` can hold a checkpoint; create its folder.

    The path must not lie under a pseudo-filesystem (``/proc``, ``/sys``, ``/dev``), must be a
    regular file if it exists (the atomic rename would replace a device node, FIFO or folder),
    and its folder must accept a new file (tried for real: a temporary file is created there
    and removed, so read-only mounts and permissions are both caught).

    Parameters
    ----------
    path : str or os.PathLike
        The ``checkpoint`` argument of ``fit``.

    Returns
    -------
    pathlib.Path
        The path.

    Raises
    ------
    CheckpointError
        Naming the path and what to do.
    """
    target = Path(path)
    resolved = Path(os.path.abspath(target))
    try:
        resolved = target.resolve()
    except OSError:  # pragma: no cover - unreadable components; keep the absolute path
        pass
    for root in _PSEUDO_FILESYSTEMS:
        if resolved == Path(root) or Path(root) in resolved.parents:
            raise CheckpointError(
                f"`checkpoint` {str(target)!r} lies under {root}, a pseudo-filesystem that "
                "cannot hold files; choose a path on a disk, e.g. 'runs/fit.pt'"
            )
    if target.exists() or target.is_symlink():
        mode = os.stat(target).st_mode if target.exists() else 0
        if stat.S_ISDIR(mode):
            raise CheckpointError(
                f"`checkpoint` {str(target)!r} is a folder; name a file in it, e.g. "
                f"{str(target / 'fit.pt')!r}"
            )
        if not stat.S_ISREG(mode):
            raise CheckpointError(
                f"`checkpoint` {str(target)!r} exists and is not a regular file (a device, "
                "FIFO, socket or broken link); fit replaces the file at this path, so it "
                "refuses: choose another path"
            )
    folder = target.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=_temp_prefix(target), suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise CheckpointError(
            f"`checkpoint` {str(target)!r}: cannot create files in folder {str(folder)!r} "
            f"({error.strerror or error}); choose a writable location"
        ) from None
    return target


def remove_orphan_temp_files(path: str | os.PathLike[str]) -> list[Path]:
    """Delete temporary files that killed writes of the checkpoint ``path`` left behind.

    Parameters
    ----------
    path : str or os.PathLike
        The checkpoint path; its temporaries are ``.<name>.<random>.tmp`` in the same folder.

    Returns
    -------
    list of pathlib.Path
        The files removed.
    """
    target = Path(path)
    removed = []
    if not target.parent.is_dir():
        return removed
    prefix = _temp_prefix(target)
    for candidate in target.parent.iterdir():
        if candidate.name.startswith(prefix) and candidate.name.endswith(".tmp"):
            try:
                if candidate.is_file() and not candidate.is_symlink():
                    candidate.unlink()
                    removed.append(candidate)
            except OSError:  # pragma: no cover - raced with another cleaner
                continue
    return removed


# ------------------------------------------------------------------------------ write and read
def params_are_finite(params: Mapping[str, torch.Tensor]) -> bool:
    """Whether every floating tensor in ``params`` is free of NaN and infinity.

    Parameters
    ----------
    params : Mapping of str to torch.Tensor
        Parameter values.

    Returns
    -------
    bool
        ``True`` when all are finite.
    """
    return all(bool(torch.isfinite(p).all()) for p in params.values() if p.is_floating_point())


def save_checkpoint(path: str | os.PathLike[str], state: Mapping[str, Any]) -> bool:
    """Write ``state`` to ``path`` atomically, with its content hash.

    The file is first written next to ``path`` and then renamed over it, so ``path`` always holds
    either the previous or the new complete checkpoint. ``version`` (when missing) and ``sha256``
    are added to the content.

    Parameters
    ----------
    path : str or os.PathLike
        Target file.
    state : Mapping
        The checkpoint content (see the module docstring); needs ``step`` and ``params``.

    Returns
    -------
    bool
        ``False`` (with a ``RuntimeWarning``, nothing written) when a parameter is NaN or
        infinite, else ``True``.

    Raises
    ------
    CheckpointWriteError
        When the write fails (disk full, file-size limit, permissions); the previous file is
        kept and the temporary file removed.
    """
    if not params_are_finite(state["params"]):
        warnings.warn(
            f"checkpoint at step {state['step']} not written to {os.fspath(path)}: some "
            "parameters are NaN or infinite; the previous checkpoint is kept",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    target = Path(path)
    if target.exists() and not stat.S_ISREG(os.stat(target).st_mode):
        raise CheckpointWriteError(
            f"checkpoint {os.fspath(path)!r} exists and is not a regular file (a folder, device "
            "node, FIFO or socket): the atomic rename would replace it, so nothing is written"
        )
    content = dict(state)
    content.setdefault("format", CHECKPOINT_FORMAT)
    content.setdefault("version", CHECKPOINT_VERSION)
    content["sha256"] = content_digest(content)
    tmp: str | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent)
        with os.fdopen(fd, "wb") as file:
            torch.save(content, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, target)
    except Exception as error:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        reason = str(error).strip().splitlines()
        raise CheckpointWriteError(
            f"could not write the checkpoint of step {state['step']} to {os.fspath(path)!r} "
            f"({type(error).__name__}: {reason[0] if reason else 'no detail'}); the previous "
            "file at that path, if any, is intact"
        ) from error
    except BaseException:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return True


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """Read and verify a checkpoint written by ``fit`` (``torch.load(..., weights_only=True)``).

    Parameters
    ----------
    path : str or os.PathLike
        The checkpoint file.
    map_location : optional
        As in ``torch.load``.

    Returns
    -------
    dict
        The checkpoint content (see the module docstring).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    CheckpointError
        (a ``ValueError``) naming the file, for an empty, truncated, unreadable or foreign file,
        or one whose content hash does not match (corrupted after writing).

    Examples
    --------
    >>> ckpt = load_checkpoint("run.pt")  # doctest: +SKIP
    >>> ckpt["step"], sorted(ckpt["params"])  # doctest: +SKIP
    """
    if not isinstance(path, str | os.PathLike):
        raise TypeError(
            "load_checkpoint: `path` must be a file path (str or os.PathLike); got "
            f"{type(path).__name__} {path!r}"
        )
    name = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {name!r}")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {name!r} is not a regular file")
    advice = "delete or move it to start afresh, or resume from another file"
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {name!r} is empty (0 bytes); {advice}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise CheckpointError(
            f"{name!r} is not a checkpoint written by pyro_vi_ext.fit: a weights-only load "
            f"refuses it ({first[:200]}); {advice}"
        ) from None
    except Exception as error:
        raise CheckpointError(
            f"checkpoint {name!r} cannot be read: the file is truncated or not a file written "
            f"by torch.save (torch.load raised {type(error).__name__}); {advice}"
        ) from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{name!r} is not a checkpoint written by pyro_vi_ext.fit (no "
            f"format={CHECKPOINT_FORMAT!r} entry); {advice}"
        )
    saved_digest = state.get("sha256")
    if saved_digest is None:
        warnings.warn(
            f"checkpoint {name!r} has no content hash (written before version "
            f"{CHECKPOINT_VERSION}); it is loaded unverified",
            UserWarning,
            stacklevel=2,
        )
    elif content_digest(state) != saved_digest:
        raise CheckpointError(
            f"checkpoint {name!r} is corrupted: its content does not match the SHA-256 stored "
            f"when it was written (the file changed on disk); {advice}"
        )
    return state


# ------------------------------------------------------------------------------ callbacks
def callback_state_keys(callbacks: Sequence[Callback]) -> list[str]:
    """Give the key under which each callback's state is stored.

    Parameters
    ----------
    callbacks : sequence of Callback
        The run's callbacks, in order.

    Returns
    -------
    list of str
        Each callback's :attr:`~pyro_vi_ext.training.Callback.state_key`; the second and later
        callbacks with the same key get ``#2``, ``#3``, ... appended (position only
        disambiguates repeats).
    """
    counts: dict[str, int] = {}
    keys = []
    for callback in callbacks:
        key = callback.state_key
        counts[key] = counts.get(key, 0) + 1
        keys.append(key if counts[key] == 1 else f"{key}#{counts[key]}")
    return keys


# ------------------------------------------------------------------------------ optimizer
def _setting_value(value: Any) -> Any:
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [_setting_value(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _setting_value(v) for k, v in value.items()}
    if isinstance(value, type) or callable(value):
        module = getattr(value, "__module__", "")
        return f"{module}.{getattr(value, '__qualname__', repr(value))}"
    return repr(value)


def describe_optimizer(optim: PyroOptim) -> dict[str, Any]:
    """Describe the optimizer's class and settings, as stored in a checkpoint.

    Parameters
    ----------
    optim : pyro.optim.PyroOptim
        The optimizer passed to ``fit``.

    Returns
    -------
    dict
        ``wrapper`` (the Pyro class), ``optimizer`` (the torch optimizer class), ``settings``
        (its arguments, e.g. ``{"lr": 0.01}``; ``"<callable>"`` when given per parameter),
        ``scheduler`` and ``scheduler_settings`` (for a ``PyroLRScheduler``, else ``""``/``{}``).
    """
    scheduler, scheduler_settings = "", {}
    if isinstance(optim, PyroLRScheduler):
        scheduler = _setting_value(optim.pt_scheduler_constructor)
        scheduler_settings = _setting_value(optim.kwargs)
    constructor = optim.pt_optim_constructor
    args = optim.pt_optim_args
    settings = _setting_value(args) if isinstance(args, Mapping) else "<callable>"
    return {
        "wrapper": f"{type(optim).__module__}.{type(optim).__qualname__}",
        "optimizer": _setting_value(constructor),
        "settings": settings,
        "scheduler": scheduler,
        "scheduler_settings": scheduler_settings,
    }


def _setting_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    notes = []
    for group in ("settings", "scheduler_settings"):
        old, new = saved.get(group, {}), current.get(group, {})
        if not isinstance(old, Mapping) or not isinstance(new, Mapping):
            if old != new:
                notes.append(f"{group}: {old!r} in the checkpoint, {new!r} now")
            continue
        for key in sorted(set(old) | set(new)):
            if old.get(key, "<unset>") != new.get(key, "<unset>"):
                notes.append(
                    f"{key}: {old.get(key, '<unset>')!r} in the checkpoint, "
                    f"{new.get(key, '<unset>')!r} now"
                )
    return notes


def _load_optimizer_state(optim: PyroOptim, state: Mapping[str, Any]) -> None:
    """Load per-parameter optimizer states, into existing optimizers or for lazy creation."""
    store = pyro.get_param_store()
    pending = dict(state)
    for param, optimizer in optim.optim_objs.items():
        name = store.param_name(param)
        if name is not None and name in pending:
            saved = pending.pop(name)
            if hasattr(optimizer, "optimizer"):
                optimizer.load_state_dict(saved["scheduler"])
                optimizer.optimizer.load_state_dict(saved["optimizer"])
            else:
                optimizer.load_state_dict(saved)
    optim.set_state(pending)


def optimizer_state(optim: PyroOptim) -> dict[str, Any]:
    """Per-parameter optimizer states, including those loaded but not yet consumed.

    Parameters
    ----------
    optim : pyro.optim.PyroOptim
        The optimizer.

    Returns
    -------
    dict
        ``{parameter name: state dict}``.
    """
    state = dict(optim._state_waiting_to_be_consumed)
    state.update(optim.get_state())
    return state


# ------------------------------------------------------------------------------ build, restore
def build_checkpoint(
    *,
    loop_state: Any,
    batching: Any,
    world_size: int,
    optim: PyroOptim,
    rng_states: Sequence[Mapping[str, Any]],
    callbacks: Sequence[Callback],
) -> dict[str, Any]:
    """Assemble the checkpoint content of a run.

    Parameters
    ----------
    loop_state : LoopState
        The run's progress and history (:class:`._loop.LoopState`).
    batching : Batching
        The run's minibatching (:class:`._config.Batching`).
    world_size : int
        Number of data-parallel processes.
    optim : pyro.optim.PyroOptim
        The optimizer.
    rng_states : sequence of dict
        Every process's random states (:func:`._rng.capture_rng_state`), in rank order.
    callbacks : sequence of Callback
        The callbacks.

    Returns
    -------
    dict
        The content, without ``sha256`` (added by :func:`save_checkpoint`).
    """
    keys = callback_state_keys(callbacks)
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "step": loop_state.step,
        "epoch": loop_state.epoch,
        "step_in_epoch": loop_state.step_in_epoch,
        "epoch_end_pending": loop_state.epoch_end_pending,
        "seed": loop_state.seed,
        "n_data": batching.n_data,
        "batch_size": batching.batch_size,
        "steps_per_epoch": batching.steps_per_epoch,
        "total_steps": batching.total_steps,
        "world_size": world_size,
        "optimizer": describe_optimizer(optim),
        "params": {
            name: p.detach().cpu().clone() for name, p in pyro.get_param_store().named_parameters()
        },
        "optim": optimizer_state(optim),
        "rng": [{k: _to_cpu(v) for k, v in r.items()} for r in rng_states],
        "history": loop_state.history.to_state(),
        "epoch_history": loop_state.epoch_history.to_state(),
        "callbacks": {
            key: callback.state_dict() for key, callback in zip(keys, callbacks, strict=True)
        },
    }


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value


def check_compatible(
    checkpoint: Mapping[str, Any], path: str, batching: Any, optim: PyroOptim
) -> list[str]:
    """Check that a run can resume from ``checkpoint``; list the settings that differ.

    Parameters
    ----------
    checkpoint : Mapping
        The loaded checkpoint.
    path : str
        Its file (for messages).
    batching : Batching
        This call's minibatching.
    optim : pyro.optim.PyroOptim
        This call's optimizer.

    Returns
    -------
    list of str
        Human-readable differences that do not prevent resuming (optimizer settings, the
        training length); the checkpoint's optimizer state is what is restored.

    Raises
    ------
    CheckpointError
        For another data size, batch size or steps per epoch, or another optimizer class.
    """
    for key, mine in (
        ("n_data", batching.n_data),
        ("batch_size", batching.batch_size),
        ("steps_per_epoch", batching.steps_per_epoch),
    ):
        if int(checkpoint[key]) != mine:
            raise CheckpointError(
                f"`resume` checkpoint {path!r} has {key}={checkpoint[key]}, but this call has "
                f"{mine}; use the same data and batching, or start afresh (resume=False or "
                "another checkpoint path)"
            )
    saved = checkpoint.get("optimizer")
    differences: list[str] = []
    if saved is None:
        return differences
    current = describe_optimizer(optim)
    for part in ("optimizer", "scheduler"):
        if saved[part] != current[part]:
            raise CheckpointError(
                f"`resume` checkpoint {path!r} was trained with {part} "
                f"{saved[part] or 'none'}, this call passes {current[part] or 'none'}: its "
                f"state cannot be restored into another class; pass the same {part}, or start "
                "afresh (resume=False or another checkpoint path)"
            )
    differences.extend(_setting_differences(saved, current))
    return differences


def restore_checkpoint(
    checkpoint: Mapping[str, Any],
    path: str,
    *,
    optim: PyroOptim,
    callbacks: Sequence[Callback],
) -> None:
    """Put a checkpoint's parameters, optimizer and callback states back in place.

    The loop state and random streams are restored by the caller
    (:meth:`._loop.LoopState.from_checkpoint`, :func:`._rng.restore_rng_state`).

    Parameters
    ----------
    checkpoint : Mapping
        The loaded checkpoint.
    path : str
        Its file (for messages).
    optim : pyro.optim.PyroOptim
        The optimizer to load the state into.
    callbacks : sequence of Callback
        The callbacks; each gets the state stored under its key.

    Raises
    ------
    CheckpointError
        When the parameters differ in names or shapes, or the optimizer state does not fit.
    """
    store = pyro.get_param_store()
    saved = checkpoint["params"]
    have = set(store.keys())
    if set(saved) != have:
        raise CheckpointError(
            f"`resume` checkpoint {path!r} holds parameters {sorted(saved)}, but the model "
            f"and guide create {sorted(have)}"
        )
    with torch.no_grad():
        for name, param in store.named_parameters():
            if param.shape != saved[name].shape:
                raise CheckpointError(
                    f"`resume`: parameter {name!r} has shape {tuple(param.shape)}, in the "
                    f"checkpoint {path!r} {tuple(saved[name].shape)}"
                )
            param.copy_(saved[name])
    try:
        _load_optimizer_state(optim, checkpoint["optim"])
        # Create the per-parameter optimizers now (PyroOptim makes them lazily, on its first
        # call) so that a scheduler step due before the next update (a pending end of epoch) is
        # not lost. With every gradient None, torch optimizers leave parameters and state as
        # they are.
        restored = [p for name, p in store.named_parameters() if name in checkpoint["optim"]]
        for param in restored:
            param.grad = None
        optim(restored)
    except (KeyError, ValueError, TypeError) as error:
        raise CheckpointError(
            f"`resume` checkpoint {path!r}: its optimizer state does not fit this call's "
            f"optimizer ({type(error).__name__}: {error}); pass the optimizer class the run was "
            "trained with, or start afresh (resume=False or another checkpoint path)"
        ) from None
    _restore_callbacks(checkpoint["callbacks"], path, callbacks)


def _restore_callbacks(saved: Any, path: str, callbacks: Sequence[Callback]) -> None:
    keys = callback_state_keys(callbacks)
    if isinstance(saved, list):  # version 1: by position
        if len(saved) != len(callbacks):
            raise CheckpointError(
                f"`resume` checkpoint {path!r} holds {len(saved)} callback states, but "
                f"{len(callbacks)} callbacks were given"
            )
        saved = dict(zip(keys, saved, strict=True))
    unused = [key for key in saved if key not in keys and saved[key]]
    if unused:
        warnings.warn(
            f"`resume` checkpoint {path!r} holds state for callbacks {unused} that this call "
            "does not pass; that state is not used",
            UserWarning,
            stacklevel=4,
        )
    fresh = []
    for key, callback in zip(keys, callbacks, strict=True):
        if key in saved:
            callback.load_state_dict(saved[key])
        elif callback.state_dict():
            fresh.append(key)
    if fresh:
        warnings.warn(
            f"`resume` checkpoint {path!r} has no state for callbacks {fresh}; they start afresh",
            UserWarning,
            stacklevel=4,
        )
