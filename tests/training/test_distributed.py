"""Data-parallel fit: two CPU processes (gloo) launched with torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO
from torch.distributions import constraints

from pyro_vi_ext.training import fit, load_checkpoint
from tests.training._ddp_worker import BATCH, EPOCHS, SEED, N
from tests.training._problems import delta_guide, regression_data, regression_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run the two-process worker once and load what each rank saw."""
    out = tmp_path_factory.mktemp("ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).with_name("_ddp_worker.py")), str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_ranks_end_with_identical_parameters(ranks):
    """Both ranks end with the same parameters and one global history."""
    _, (r0, r1) = ranks
    for run in ("a", "b", "c"):
        for name in r0[run]["params"]:
            assert torch.equal(r0[run]["params"][name], r1[run]["params"][name]), (run, name)
    assert r0["a"]["world_size"] == 2
    assert np.array_equal(r0["a"]["loss"], r1["a"]["loss"])  # one global history


def test_matches_one_process_with_the_global_batch(ranks):
    """Same seed, global batch 8 on 1 process: same minibatches, losses and parameters."""
    _, (r0, r1) = ranks
    x, y, _, _ = regression_data(n=N, d=3)
    seen = []

    def recording_guide(x, y=None, *, idx=None, n_data=None):
        seen.append((idx.tolist(), n_data))
        delta_guide(x, y, idx=idx, n_data=n_data)

    ref = fit(regression_model, recording_guide, (x, y), Trace_ELBO(),
              pyro.optim.Adam({"lr": 0.05}), num_epochs=EPOCHS, batch_size=BATCH, seed=SEED,
              eval_data=(x[:11], y[:11]))  # fmt: skip
    ref_idx = [s[0] for s in seen if s[1] == N][-ref.num_steps :]
    assert len(ref_idx) == len(r0["a"]["train_idx"]) == EPOCHS * 7
    shards = zip(r0["a"]["train_idx"], r1["a"]["train_idx"], ref_idx, strict=True)
    for step, (i0, i1, both) in enumerate(shards):
        assert not set(i0) & set(i1), step  # distinct shards
        assert sorted(i0 + i1) == sorted(both), step  # together: the global minibatch
        assert abs(len(i0) - len(i1)) <= 1
    # float32 sums in a different order: agreement to rounding error, not bit for bit
    np.testing.assert_allclose(r0["a"]["loss"].numpy(), ref.history["loss"], rtol=2e-5)
    np.testing.assert_allclose(r0["a"]["eval_loss"].numpy(), ref.epoch_history["eval_loss"],
                               rtol=2e-5)  # fmt: skip
    for name, value in ref.params.items():
        torch.testing.assert_close(r0["a"]["params"][name], value, rtol=1e-4, atol=1e-5)


def test_only_rank0_writes_checkpoints_and_shows_progress(ranks):
    """Only rank 0 writes checkpoints and draws the bar."""
    out, (r0, r1) = ranks
    assert r1["saves"] == [] and len(r0["saves"]) >= 3
    assert "21/21" in r0["b"]["stderr"] and r1["b"]["stderr"] == ""
    ckpt = load_checkpoint(out / "b.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2  # each process's random state
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])
    # the checkpoint holds unconstrained values
    assert torch.equal(ckpt["params"]["loc"], r0["b"]["params"]["loc"])
    to_tril = torch.distributions.transform_to(constraints.lower_cholesky)
    assert torch.equal(to_tril(ckpt["params"]["scale_tril"]), r0["b"]["params"]["scale_tril"])


def test_a_stop_on_one_rank_stops_all_and_resume_is_exact(ranks):
    """A stop on rank 1 stops both; the resume ends where run B ended."""
    _, (r0, r1) = ranks
    for r in (r0, r1):
        assert r["c"]["stop_reason"] == "callback" and r["c"]["stopped_at"] == 10
        assert r["c"]["final_steps"] == EPOCHS * 7
        for name, value in r["b"]["params"].items():
            assert torch.equal(r["c"]["params"][name], value), name
