"""Run by test_distributed.py as ``torchrun --nproc_per_node=2 _ddp_worker.py OUT_DIR``.

Each process trains with the same ``fit`` calls and saves what it saw to OUT_DIR/rank<r>.pt.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path

import pyro
import torch
from pyro.infer import Trace_ELBO

import pyro_vi_ext.training.checkpoint as fit_module
from pyro_vi_ext.training import fit
from tests.training._problems import (
    delta_guide,
    regression_data,
    regression_guide,
    regression_model,
)

N, BATCH, EPOCHS, SEED = 50, 8, 3, 3


def main(out: Path) -> None:
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    x, y, _, _ = regression_data(n=N, d=3)
    record = {}

    saves = []
    real_save = fit_module.save_checkpoint

    def counting_save(path, state):
        saves.append(int(state["step"]))
        return real_save(path, state)

    fit_module.save_checkpoint = counting_save

    # A: point-mass guide, so the loss is deterministic and comparable with one process
    seen = []

    def recording_guide(x, y=None, *, idx=None, n_data=None):
        seen.append((idx.tolist(), n_data))
        delta_guide(x, y, idx=idx, n_data=n_data)

    a = fit(regression_model, recording_guide, (x, y), Trace_ELBO(), pyro.optim.Adam({"lr": 0.05}),
            num_epochs=EPOCHS, batch_size=BATCH, seed=SEED, eval_data=(x[:11], y[:11]))  # fmt: skip
    record["a"] = {
        "params": dict(a.params),
        "loss": torch.from_numpy(a.history["loss"].copy()),
        "eval_loss": torch.from_numpy(a.epoch_history["eval_loss"].copy()),
        "world_size": a.world_size,
        "train_idx": [s[0] for s in seen if s[1] == N][-a.num_steps :],
    }

    # B: stochastic guide, checkpoint at the end, progress bar (rank 0 only)
    def run_b(**kw):
        pyro.clear_param_store()
        return fit(regression_model, regression_guide, (x, y), Trace_ELBO(),
                   pyro.optim.Adam({"lr": 0.05}), num_epochs=EPOCHS, batch_size=BATCH, seed=SEED,
                   **kw)  # fmt: skip

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        b = run_b(checkpoint=out / "b.pt", progress=True)
    record["b"] = {"params": dict(b.params), "stderr": err.getvalue()}

    # C: a callback on rank 1 only stops the run after step 10; all processes stop there,
    # and resuming from the checkpoint ends exactly where B ended.
    state = {"armed": True}

    def stop_on_rank1(info):
        return state["armed"] and rank == 1 and info.step == 10

    c1 = run_b(checkpoint=out / "c.pt", callbacks=[stop_on_rank1])
    state["armed"] = False
    c2 = run_b(checkpoint=out / "c.pt", callbacks=[stop_on_rank1], resume=True)
    record["c"] = {
        "stop_reason": c1.stop_reason,
        "stopped_at": c1.num_steps,
        "final_steps": c2.num_steps,
        "params": dict(c2.params),
    }
    record["saves"] = saves
    torch.save(record, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
