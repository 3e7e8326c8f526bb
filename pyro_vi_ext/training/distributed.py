"""Data-parallel plumbing for :func:`~pyro_vi_ext.training.fit` on ``torch.distributed``.

Launch the unchanged training script with ``torchrun --nproc_per_node=P script.py`` (or
``python -m torch.distributed.run --nproc_per_node=P script.py``). ``fit`` sees ``WORLD_SIZE > 1``,
joins the process group from the environment torchrun sets (backend ``gloo`` on CPU, ``nccl`` on
CUDA), and then:

* every process computes the same seeded order of each epoch and takes the share
  ``global_batch[rank::P]`` of each global minibatch of ``batch_size`` rows;
* the model and guide get the global data-set size as ``n_data``, so plates scale by N/B_r;
* after the backward pass the gradients (and the loss and its terms) are summed across processes
  with weights B_r/B in one flat all-reduce, which makes the update exactly the single-process
  update for the global minibatch;
* parameters are broadcast from rank 0 once they exist, so all processes start, and stay, equal;
* only rank 0 writes checkpoints and shows progress.

``fit`` creates the process group on its first call when none exists and leaves it up for later
calls (it is destroyed at interpreter exit); a group created by the caller is used as is.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistContext", "setup_distributed"]


@dataclass
class DistContext:
    """Rank, world size and whether ``fit`` created the process group."""

    rank: int = 0
    world_size: int = 1
    created: bool = False

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` in place over processes (no-op on one process)."""
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def broadcast_tensors_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Overwrite ``tensors`` in place with rank 0's values, through one flat buffer."""
        if not self.active or not tensors:
            return
        with torch.no_grad():
            flat = torch.cat([t.detach().reshape(-1) for t in tensors])
            dist.broadcast(flat, src=0)
            offset = 0
            for t in tensors:
                n = t.numel()
                t.copy_(flat[offset : offset + n].view_as(t))
                offset += n

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def any_flag(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any process (one tiny all-reduce)."""
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self._comm_device)
        dist.all_reduce(t)
        return bool(t.item() > 0)

    _comm_device: torch.device = torch.device("cpu")

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def _destroy_if_initialized() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def setup_distributed(distributed: bool | None, device: torch.device) -> DistContext:
    """Join (or create) the process group when asked or when launched by torchrun.

    ``distributed=None`` means: on when ``WORLD_SIZE > 1`` in the environment or a process group
    with more than one member already exists; ``False`` forces single-process training.
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
        if device.type == "cuda":
            dist.init_process_group(backend, device_id=device)
        else:
            dist.init_process_group(backend)
        # The group stays up for later fit calls in the same script (tearing it down and
        # re-creating it races on the rendezvous store) and is destroyed at interpreter exit.
        atexit.register(_destroy_if_initialized)
        created = True
    ctx = DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), created=created)
    if dist.get_backend() == "nccl":
        ctx._comm_device = device
    return ctx
