"""Data handling for :func:`~pyro_vi_ext.training.fit`: validation, order, minibatches, shards.

The training order of an epoch depends only on ``(seed, epoch)``, never on a global random number
generator, so a run resumed in the middle of an epoch sees the same minibatches as an uninterrupted
one, and every process of a data-parallel run computes the same order without communicating.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data.dataloader import default_collate

from ._rng import shuffling_seed

__all__ = ["Batch", "DataSource", "as_data_source", "epoch_order", "global_batches", "shard_batch"]


class Batch(NamedTuple):
    """One minibatch as ``fit`` passes it to the model and guide.

    Attributes
    ----------
    args : tuple
        Positional tensors, e.g. ``(x_b,)`` or ``(x_b, y_b)``.
    kwargs : Mapping
        Keyword tensors (for dict-valued data), otherwise empty.
    idx : torch.Tensor
        ``torch.long`` rows of the full data set, on the data's device.
    """

    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    idx: torch.Tensor


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """Order the rows of an ``n``-row data set for epoch ``epoch``.

    Parameters
    ----------
    n : int
        Number of rows.
    seed : int
        The run's seed.
    epoch : int
        The 0-based epoch.
    shuffle : bool
        Permute (else keep the order).

    Returns
    -------
    torch.Tensor
        A ``torch.long`` seeded permutation (the training shuffling stream of
        :mod:`._rng`) when ``shuffle``, else ``arange(n)``; the same on every process.
    """
    if not shuffle:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(shuffling_seed(seed, epoch))
    return torch.randperm(n, generator=gen)


def global_batches(order: torch.Tensor, batch_size: int, drop_last: bool) -> list[torch.Tensor]:
    """Split an epoch's order into consecutive global minibatches of ``batch_size`` rows.

    Parameters
    ----------
    order : torch.Tensor
        The epoch's row order.
    batch_size : int
        Rows per minibatch.
    drop_last : bool
        Drop an incomplete last minibatch.

    Returns
    -------
    list of torch.Tensor
        The minibatches' row indices.
    """
    n = order.shape[0]
    stop = (n // batch_size) * batch_size if drop_last else n
    return [order[i : min(i + batch_size, n)] for i in range(0, stop, batch_size)]


def steps_per_epoch(n: int, batch_size: int, drop_last: bool) -> int:
    """Count the minibatches in one epoch.

    Parameters
    ----------
    n : int
        Number of rows.
    batch_size : int
        Rows per minibatch.
    drop_last : bool
        Whether an incomplete last minibatch is dropped.

    Returns
    -------
    int
        ``n // batch_size`` when dropping, else ``ceil(n / batch_size)``.
    """
    return n // batch_size if drop_last else -(-n // batch_size)  # ceiling division


def shard_batch(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Take a process's share ``batch[rank::world_size]`` of a global minibatch.

    The shares of all processes partition the global minibatch, so the processes together see
    exactly the rows one process would see with the global batch size.

    Parameters
    ----------
    batch : torch.Tensor
        The global minibatch's row indices.
    rank : int
        The process's rank.
    world_size : int
        Number of processes.

    Returns
    -------
    torch.Tensor
        The share.
    """
    if world_size == 1:
        return batch
    return batch[rank::world_size]


def _check_tensor(name: str, t: torch.Tensor, n: int | None) -> int:
    if t.dim() == 0:
        raise ValueError(f"`{name}` must have a leading data dimension; got a 0-d tensor")
    if n is not None and t.shape[0] != n:
        raise ValueError(
            f"all tensors in `{name}` must have the same first dimension; got {t.shape[0]} and {n}"
        )
    if t.shape[0] == 0:
        raise ValueError(f"`{name}` is empty")
    if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"`{name}` contains {bad} NaN or infinite value(s)")
    return t.shape[0]


def _to_device(obj: Any, device: torch.device | None, non_blocking: bool = False) -> Any:
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device, non_blocking) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_device(v, device, non_blocking) for v in obj)
    return obj


def _split_collated(obj: Any) -> tuple[tuple[Any, ...], Mapping[str, Any]]:
    if isinstance(obj, Mapping):
        return (), dict(obj)
    if isinstance(obj, list | tuple):
        return tuple(obj), {}
    return (obj,), {}


class DataSource:
    """Uniform access to the rows of the training or evaluation data.

    Built by :func:`as_data_source`; ``n`` is the number of rows, :meth:`batches` yields
    :class:`Batch` objects for a sequence of index tensors.
    """

    n: int
    device: torch.device
    default_batch_size: int | None
    default_drop_last: bool

    def batches(
        self, index_batches: Sequence[torch.Tensor], generator_seed: int
    ) -> Iterator[Batch]:
        """Yield the minibatch of each index tensor in ``index_batches``.

        Parameters
        ----------
        index_batches : sequence of torch.Tensor
            Row indices of each minibatch (``torch.long``, on the CPU).
        generator_seed : int
            Seed of a ``DataLoader``'s own generator (see :func:`._rng.loader_seed`).

        Yields
        ------
        Batch
            The rows, as the model and guide receive them.
        """
        raise NotImplementedError


class _TensorSource(DataSource):
    def __init__(self, args: tuple[torch.Tensor, ...], kwargs: dict[str, torch.Tensor]):
        self.args = args
        self.kwargs = kwargs
        first = args[0] if args else next(iter(kwargs.values()))
        self.n = first.shape[0]
        self.device = first.device
        self.default_batch_size = None
        self.default_drop_last = False
        self._full_idx = torch.arange(self.n, device=self.device)
        self._full_idx_cpu = torch.arange(self.n)

    def batches(
        self, index_batches: Sequence[torch.Tensor], generator_seed: int
    ) -> Iterator[Batch]:
        """Yield the rows of each index tensor (the full tensors for the full index)."""
        for idx in index_batches:
            if idx.shape[0] == self.n and torch.equal(idx, self._full_idx_cpu):
                yield Batch(self.args, self.kwargs, self._full_idx)
                continue
            idx_d = idx if idx.device == self.device else idx.to(self.device)
            args = tuple(t.index_select(0, idx_d) for t in self.args)
            kwargs = {k: t.index_select(0, idx_d) for k, t in self.kwargs.items()}
            yield Batch(args, kwargs, idx_d)


class _DatasetSource(DataSource):
    def __init__(
        self,
        dataset: Dataset,
        device: torch.device,
        loader_kwargs: dict[str, Any],
        default_batch_size: int | None,
        default_drop_last: bool,
    ):
        self.dataset = dataset
        self.n = len(dataset)  # type: ignore[arg-type]
        self.device = device
        self.loader_kwargs = loader_kwargs
        self.default_batch_size = default_batch_size
        self.default_drop_last = default_drop_last

    def batches(
        self, index_batches: Sequence[torch.Tensor], generator_seed: int
    ) -> Iterator[Batch]:
        """Yield the collated rows of each index tensor through a ``DataLoader``."""
        if not index_batches:
            return
        lists = [b.tolist() for b in index_batches]
        # A generator of our own: the loader must not draw its worker seed from the global RNG,
        # or a run resumed mid-epoch would diverge from an uninterrupted one.
        gen = torch.Generator().manual_seed(generator_seed)
        loader = DataLoader(self.dataset, batch_sampler=lists, generator=gen, **self.loader_kwargs)
        non_blocking = bool(self.loader_kwargs.get("pin_memory", False))
        for idx, collated in zip(index_batches, loader, strict=True):
            args, kwargs = _split_collated(_to_device(collated, self.device, non_blocking))
            yield Batch(args, kwargs, idx.to(self.device))


_LOADER_KEYS = (
    "num_workers",
    "pin_memory",
    "timeout",
    "worker_init_fn",
    "multiprocessing_context",
    "prefetch_factor",
    "persistent_workers",
)


def as_data_source(data: Any, name: str, device: torch.device | None) -> DataSource:
    """Validate ``data`` (argument ``name`` of ``fit``) and wrap it as a :class:`DataSource`.

    Accepted: a tensor (rows along dim 0), a tuple or list of tensors with equal first dimension,
    a dict of such tensors (passed to the model as keyword arguments), a map-style ``Dataset``, or
    a ``DataLoader`` over one (its dataset, batch size, ``drop_last``, collate function and worker
    settings are used; its sampler is replaced by ``fit``'s seeded order).

    Parameters
    ----------
    data : Any
        The data as given to ``fit``.
    name : str
        The argument's name, for messages (``"data"`` or ``"eval_data"``).
    device : torch.device or None
        Device the rows are moved to.

    Returns
    -------
    DataSource
        Uniform access to the rows.

    Raises
    ------
    TypeError
        For any other type, naming the argument.
    ValueError
        For empty data, mismatched lengths, or NaN/inf in floating tensors.
    """
    if isinstance(data, torch.Tensor):
        _check_tensor(name, data, None)
        return _TensorSource((_to_device(data, device),), {})
    if isinstance(data, list | tuple):
        if not data:
            raise ValueError(f"`{name}` is an empty {type(data).__name__}")
        n = None
        for i, t in enumerate(data):
            if not isinstance(t, torch.Tensor):
                raise TypeError(
                    f"`{name}` must hold only torch.Tensor objects; element {i} is a "
                    f"{type(t).__module__}.{type(t).__name__}"
                )
            n = _check_tensor(name, t, n)
        return _TensorSource(tuple(_to_device(t, device) for t in data), {})
    if isinstance(data, Mapping):
        if not data:
            raise ValueError(f"`{name}` is an empty mapping")
        n = None
        for k, t in data.items():
            if not isinstance(k, str) or not isinstance(t, torch.Tensor):
                raise TypeError(f"`{name}` as a mapping must map str keys to torch.Tensor values")
            n = _check_tensor(name, t, n)
        return _TensorSource((), {k: _to_device(t, device) for k, t in data.items()})
    if isinstance(data, DataLoader):
        if isinstance(data.dataset, IterableDataset):
            raise TypeError(
                f"`{name}` is a DataLoader over an IterableDataset; fit needs a map-style Dataset "
                "(with __len__ and __getitem__) to know each row's index"
            )
        if data.batch_size is None:
            raise ValueError(
                f"`{name}` is a DataLoader with a custom batch_sampler; pass its dataset and "
                "`batch_size=` instead"
            )
        kw = {k: getattr(data, k) for k in _LOADER_KEYS if hasattr(data, k)}
        if kw.get("num_workers", 0) == 0:
            kw.pop("prefetch_factor", None)
            kw.pop("persistent_workers", None)
        kw["collate_fn"] = data.collate_fn
        src = _DatasetSource(
            data.dataset, device or torch.device("cpu"), kw, data.batch_size, data.drop_last
        )
        _check_dataset_len(name, src.n)
        return src
    if isinstance(data, IterableDataset):
        raise TypeError(
            f"`{name}` is an IterableDataset; fit needs a map-style Dataset (with __len__ and "
            "__getitem__) to know each row's index"
        )
    if isinstance(data, Dataset):
        if not hasattr(data, "__len__"):
            raise TypeError(f"`{name}` is a Dataset without __len__")
        src = _DatasetSource(
            data, device or torch.device("cpu"), {"collate_fn": default_collate}, None, False
        )
        _check_dataset_len(name, src.n)
        return src
    hint = " (convert it with torch.as_tensor)" if isinstance(data, np.ndarray) else ""
    raise TypeError(
        f"`{name}` must be a torch.Tensor, a tuple/list or dict of tensors, a map-style "
        f"torch Dataset or a DataLoader; got {type(data).__module__}.{type(data).__name__}{hint}"
    )


def _check_dataset_len(name: str, n: int) -> None:
    if n == 0:
        raise ValueError(f"`{name}` is empty")
