"""Run by test_training_reliability.py as ``torchrun --nproc_per_node=2 ... OUT FAULT``.

Rank 1 stops itself (SIGSTOP) or dies (SIGKILL) after step 6; rank 0 must fail within the
configured ``distributed_timeout`` with a message, the checkpoint of step 4 kept.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pyro
import torch
from pyro.infer import Trace_ELBO

from pyro_vi_ext.training import fit
from pyro_vi_ext.training.distributed import PeerFailure
from tests.training._problems import regression_data, regression_guide, regression_model


def main(out: Path, fault: str) -> int:
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    x, y, _, _ = regression_data(n=64)

    last_step = [time.monotonic()]

    def misbehave(info):
        last_step[0] = time.monotonic()
        if rank == 1 and info.step == 6:
            os.kill(os.getpid(), getattr(signal, fault))

    try:
        fit(regression_model, regression_guide, (x, y), Trace_ELBO(),
            pyro.optim.Adam({"lr": 0.05}), num_steps=40, batch_size=8, checkpoint=out / "run.pt",
            checkpoint_every=4, callbacks=[misbehave], distributed_timeout=4,
            progress=False)  # fmt: skip
    except PeerFailure as failure:
        waited = time.monotonic() - last_step[0]
        (out / f"rank{rank}-message.txt").write_text(str(failure))
        (out / f"rank{rank}-waited.txt").write_text(f"{waited:.3f}")
        print(f"rank {rank}: {failure}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2]))
