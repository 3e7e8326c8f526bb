"""Data-parallel plumbing for :func:`~pyro_vi_ext.training.fit` on ``torch.distributed``.

Launch the unchanged training script with ``torchrun --nproc_per_node=P script.py`` (or
``python -m torch.distributed.run --nproc_per_node=P script.py``). ``fit`` sees ``WORLD_SIZE > 1``,
joins the process group from the environment torchrun sets (backend ``gloo`` on CPU, ``nccl`` on
CUDA), and then:

* every process computes the same seeded order of each epoch and takes the share
  ``global_batch[rank::P]`` of each global minibatch of ``batch_size`` rows;
* the model and guide get the global data-set size as ``n_data``, so plates scale by N/B_r;
* after the backward pass the gradients (and the loss and its terms) are summed across processes
  with weights B_r/B in one flat all-reduce. With a deterministic guide (a point mass) this is
  exactly the single-process update for the global minibatch; with a stochastic guide each
  process draws its own latents, so the update is a valid, lower-variance estimate of the same
  gradient but the run follows a different trajectory from the single-process one;
* parameters are broadcast from rank 0 once they exist, so all processes start, and stay, equal;
* only rank 0 writes checkpoints and shows progress.

Every collective operation waits at most ``distributed_timeout`` seconds (an argument of ``fit``,
passed to ``init_process_group(timeout=...)``) for the other processes: a stalled (e.g. SIGSTOP)
or dead peer makes every other process raise :class:`PeerFailure` with a message naming the
operation and the timeout, instead of blocking for gloo's default 30 minutes. The last good
checkpoint is kept. A process group created by the caller keeps the timeout it was made with.

``fit`` creates the process group on its first call when none exists and leaves it up for later
calls (it is destroyed at interpreter exit); a group created by the caller is used as is.
"""

from __future__ import annotations

import atexit
import datetime
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = ["DistContext", "PeerFailure", "setup_distributed"]

_Result = TypeVar("_Result")


class PeerFailure(RuntimeError):
    """A data-parallel collective failed: a peer stalled past the timeout, died or hung up."""


@dataclass
class DistContext:
    """Rank, world size, collective timeout and whether ``fit`` created the process group.

    Attributes
    ----------
    rank : int
        This process's rank.
    world_size : int
        Number of processes.
    created : bool
        Whether ``fit`` created the process group.
    timeout : float
        Seconds a collective waits for the other processes (0: a group made by the caller,
        with its own timeout).
    comm_device : torch.device
        Device of the buffers sent through collectives (CPU for gloo, the GPU for nccl).
    """

    rank: int = 0
    world_size: int = 1
    created: bool = False
    timeout: float = 0.0
    comm_device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def active(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (which writes checkpoints and shows progress)."""
        return self.rank == 0

    def _collective(self, what: str, operation: Callable[[], _Result]) -> _Result:
        limit = (
            f"distributed_timeout={self.timeout:g} s"
            if self.timeout > 0
            else "the timeout of the caller's process group"
        )
        try:
            return operation()
        except PeerFailure:
            raise
        except (RuntimeError, ConnectionError) as error:
            first = str(error).strip().splitlines()
            raise PeerFailure(
                f"rank {self.rank} of {self.world_size}: the {what} across data-parallel "
                f"processes failed ({first[0][:300] if first else type(error).__name__}); a "
                f"peer stalled for more than {limit} or died"
            ) from error

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` in place over processes (no-op on one process).

        Parameters
        ----------
        tensor : torch.Tensor
            The buffer.

        Returns
        -------
        torch.Tensor
            The same tensor, now the sum.
        """
        if self.active:
            self._collective("all-reduce", lambda: dist.all_reduce(tensor, op=dist.ReduceOp.SUM))
        return tensor

    def broadcast_tensors_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Overwrite ``tensors`` in place with rank 0's values, through one flat buffer.

        Parameters
        ----------
        tensors : sequence of torch.Tensor
            The tensors (e.g. every parameter).
        """
        if not self.active or not tensors:
            return
        with torch.no_grad():
            flat = torch.cat([t.detach().reshape(-1) for t in tensors])
            self._collective("broadcast", lambda: dist.broadcast(flat, src=0))
            offset = 0
            for tensor in tensors:
                size = tensor.numel()
                tensor.copy_(flat[offset : offset + size].view_as(tensor))
                offset += size

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order.

        Parameters
        ----------
        obj : Any
            A picklable object.

        Returns
        -------
        list
            One object per rank.
        """
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        self._collective("all-gather", lambda: dist.all_gather_object(out, obj))
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process.

        Parameters
        ----------
        obj : Any
            A picklable object.

        Returns
        -------
        Any
            Rank 0's object.
        """
        if not self.active:
            return obj
        box = [obj]
        self._collective("broadcast", lambda: dist.broadcast_object_list(box, src=0))
        return box[0]

    def any_flag(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any process (one tiny all-reduce).

        Parameters
        ----------
        flag : bool
            This process's flag.

        Returns
        -------
        bool
            The logical or over processes.
        """
        if not self.active:
            return flag
        tensor = torch.tensor([1.0 if flag else 0.0], device=self.comm_device)
        self.all_reduce_(tensor)
        return bool(tensor.item() > 0)

    def barrier(self) -> None:
        """Wait for every process."""
        if self.active:
            self._collective("barrier", dist.barrier)


def _destroy_if_initialized() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def setup_distributed(
    distributed: bool | None, device: torch.device, timeout: float = 600.0
) -> DistContext:
    """Join (or create) the process group when asked or when launched by torchrun.

    Parameters
    ----------
    distributed : bool or None
        ``None``: on when ``WORLD_SIZE > 1`` in the environment or a process group with more
        than one member already exists; ``False`` forces single-process training.
    device : torch.device
        The training device (``nccl`` for CUDA, else ``gloo``).
    timeout : float
        Seconds each collective waits for the others (``init_process_group(timeout=...)``).

    Returns
    -------
    DistContext
        Rank, world size and collectives.

    Raises
    ------
    RuntimeError
        When data-parallel training is asked for without a process group or torchrun.
    """
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    initialized = dist.is_available() and dist.is_initialized()
    if distributed is None:
        distributed = env_world > 1 or (initialized and dist.get_world_size() > 1)
    if not distributed:
        return DistContext()
    if not dist.is_available():
        raise RuntimeError("`distributed=True` but torch.distributed is not available")
    created = False
    if not initialized:
        if "MASTER_ADDR" not in os.environ or "RANK" not in os.environ:
            raise RuntimeError(
                "`distributed=True` needs a process group: launch with "
                "`torchrun --nproc_per_node=P script.py` or call "
                "torch.distributed.init_process_group() before fit"
            )
        backend = "nccl" if device.type == "cuda" else "gloo"
        wait = datetime.timedelta(seconds=timeout)
        if device.type == "cuda":
            dist.init_process_group(backend, device_id=device, timeout=wait)
        else:
            dist.init_process_group(backend, timeout=wait)
        # The group stays up for later fit calls in the same script (tearing it down and
        # re-creating it races on the rendezvous store) and is destroyed at interpreter exit.
        atexit.register(_destroy_if_initialized)
        created = True
    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        created=created,
        timeout=timeout if created else 0.0,
        comm_device=device if dist.get_backend() == "nccl" else torch.device("cpu"),
    )
