"""Regression suite for fit under faults: resume, corrupted checkpoints, bad paths, full disks.

Every test here failed on the runner before the reliability pass (issue 13) and injects its
fault for real: signals through ``os.kill``, bytes flipped and files truncated on disk, read-only
and full filesystems through small ``tmpfs`` mounts (skipped, with the reason, where the
environment cannot mount), device nodes and FIFOs made with ``mknod`` / ``mkfifo``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyro_vi_ext.training import EarlyStopping, fit, load_checkpoint
from pyro_vi_ext.training.checkpoint import CheckpointError
from tests.training._problems import (
    LocalLatentModel,
    regression_data,
    regression_guide,
    regression_model,
)

ROOT = Path(__file__).resolve().parents[2]
N_STEPS = 30  # 3 epochs of 10 steps


class _Run:
    """A stochastic-guide run with a separate evaluation loss, rebuilt as a new process would."""

    def __init__(self):
        self.lm = LocalLatentModel()
        self.x = self.lm.data(n=80)
        self.x_test = self.lm.data(n=16, seed=5)
        self.init = {k: v.clone() for k, v in self.lm.encoder.state_dict().items()}

    def __call__(self, callbacks=(), lr=0.02, optim=None, **kw):
        pyro.clear_param_store()
        self.lm.encoder.load_state_dict(self.init)
        optim = optim or pyro.optim.Adam({"lr": lr})
        # no max_plate_nesting: Pyro's ELBO probes the model once on its first call
        eval_loss = Trace_ELBO(num_particles=3, vectorize_particles=True)
        return fit(self.lm.model, self.lm.guide, self.x, Trace_ELBO(), optim,
                   num_steps=N_STEPS, batch_size=8, seed=4, eval_data=self.x_test,
                   eval_loss=eval_loss, callbacks=list(callbacks), progress=False,
                   **kw)  # fmt: skip


def _interrupt_at(step):
    state = {"armed": True}

    def interrupt(info):
        if state["armed"] and info.step == step:
            state["armed"] = False
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C

    return interrupt


@pytest.fixture(scope="module")
def run():
    """Build the run configuration shared by the module's tests."""
    return _Run()


@pytest.fixture(scope="module")
def reference(run, tmp_path_factory):
    """Train the uninterrupted run and keep its final checkpoint."""
    path = tmp_path_factory.mktemp("reference") / "ref.pt"
    return run(checkpoint=path), path


# ------------------------------------------------------------------------------ 1. resume
@pytest.mark.parametrize("k", [7, 15])
def test_resumed_evaluation_history_is_bit_identical(run, reference, tmp_path, k):
    """The first held-out evaluation after a resume equals the uninterrupted run's."""
    full, _ = reference
    path = tmp_path / "c.pt"
    partial = run(callbacks=[_interrupt_at(k)], checkpoint=path, checkpoint_every=3)
    assert partial.stop_reason == "interrupted"
    resumed = run(callbacks=[_interrupt_at(k)], checkpoint=path, resume=True)
    assert resumed.num_steps == N_STEPS
    for key in full.epoch_history:
        np.testing.assert_array_equal(resumed.epoch_history[key], full.epoch_history[key], key)
    for key in full.params:
        assert torch.equal(resumed.params[key], full.params[key]), key


# ------------------------------------------------------------------------------ 2. resume notes
def test_resuming_a_finished_run_with_a_new_learning_rate_says_so(run, reference, tmp_path):
    """A finished run resumed with a new lr warns, naming lr and both values."""
    _, finished = reference
    path = tmp_path / "done.pt"
    shutil.copy(finished, path)
    with pytest.warns(UserWarning, match=r"finished run.*lr: 0\.02 in the checkpoint, 0\.5 now"):
        again = run(lr=0.5, checkpoint=path, resume=True)
    assert again.num_steps == N_STEPS
    assert "resumed from" in again.message and "nothing left to train" in again.message
    assert again.resumed_from == str(path)


def test_resuming_mid_run_with_a_new_learning_rate_says_so(run, tmp_path):
    """A run resumed mid-way with a new lr warns, naming lr and both values."""
    path = tmp_path / "c.pt"
    run(callbacks=[_interrupt_at(5)], checkpoint=path)
    with pytest.warns(UserWarning, match=r"continued from step 5.*lr: 0\.02 .* 0\.1 now"):
        resumed = run(lr=0.1, checkpoint=path, resume=True)
    assert resumed.num_steps == N_STEPS and "resumed from" in resumed.message


def test_resuming_with_another_optimizer_class_is_refused(run, reference, tmp_path):
    """Adam state resumed into SGD: a CheckpointError naming both classes."""
    _, finished = reference
    with pytest.raises(CheckpointError, match=r"torch\.optim\.adam\.Adam.*SGD"):
        run(optim=pyro.optim.SGD({"lr": 0.01}), checkpoint=finished, resume=True)


# ------------------------------------------------------------------------------ 3. corruption
def _tensor_payload_offset(path: Path) -> tuple[int, int]:
    """Offset and length of the largest tensor's bytes inside a torch zip checkpoint."""
    with zipfile.ZipFile(path) as archive:
        entries = [i for i in archive.infolist() if "/data/" in i.filename]
        entry = max(entries, key=lambda i: i.file_size)
    with open(path, "rb") as file:
        file.seek(entry.header_offset)
        header = file.read(30)
    name_length = int.from_bytes(header[26:28], "little")
    extra_length = int.from_bytes(header[28:30], "little")
    return entry.header_offset + 30 + name_length + extra_length, entry.file_size


def test_a_flipped_byte_inside_a_tensor_is_refused(reference, tmp_path):
    """One flipped bit in a tensor's bytes fails the SHA-256 check."""
    _, finished = reference
    path = tmp_path / "flipped.pt"
    shutil.copy(finished, path)
    offset, size = _tensor_payload_offset(path)
    with open(path, "r+b") as file:
        file.seek(offset + size // 2)
        byte = file.read(1)
        file.seek(offset + size // 2)
        file.write(bytes([byte[0] ^ 0x40]))
    torch.load(path, weights_only=True)  # torch itself reads the damaged file without a word
    with pytest.raises(CheckpointError, match=rf"{path.name}.*corrupted.*SHA-256"):
        load_checkpoint(path)


@pytest.mark.parametrize("damage", ["empty", "truncated", "random bytes", "foreign pickle"])
def test_unreadable_checkpoints_name_the_file(reference, tmp_path, damage):
    """Empty, truncated, random and foreign files: a clear error naming the file."""
    _, finished = reference
    path = tmp_path / "bad.pt"
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(finished.read_bytes()[: finished.stat().st_size // 2])
    elif damage == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(5000))
    else:
        torch.save({"weights": [torch.ones(3)], 101: "x"}, path)
    with pytest.raises(CheckpointError, match=rf"{path.name}.*(delete|move)") as error:
        load_checkpoint(path)
    assert "Errno" not in str(error.value)


def test_a_corrupted_checkpoint_stops_a_resume_before_training(run, reference, tmp_path):
    """Resuming from a truncated checkpoint raises before any step."""
    _, finished = reference
    path = tmp_path / "trunc.pt"
    path.write_bytes(finished.read_bytes()[:1000])
    steps = []
    with pytest.raises(CheckpointError, match="trunc.pt"):
        run(callbacks=[lambda info: steps.append(info.step)], checkpoint=path, resume=True)
    assert steps == []


# ------------------------------------------------------------------------------ 4. paths
@contextlib.contextmanager
def _tmpfs(path: Path, size: str, read_only: bool = False):
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); needs CAP_SYS_ADMIN")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _short_fit(checkpoint, callbacks=(), **kw):
    x, y, _, _ = regression_data(n=40)
    pyro.clear_param_store()
    return fit(regression_model, regression_guide, (x, y), Trace_ELBO(),
               pyro.optim.Adam({"lr": 0.05}), num_steps=10, batch_size=8, progress=False,
               checkpoint=checkpoint, callbacks=list(callbacks), **kw)  # fmt: skip


def _bad_paths(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    device = tmp_path / "null-device"
    os.mknod(device, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # the node /dev/null is
    (tmp_path / "folder").mkdir()
    return {
        "a folder": (tmp_path / "folder", "is a folder"),
        "a FIFO": (fifo, "not a regular file"),
        "a device node": (device, "not a regular file"),
        "under /proc": (Path("/proc/self/fit.pt"), "pseudo-filesystem"),
        "an existing file under /proc": (Path("/proc/self/oom_score_adj"), "pseudo-filesystem"),
    }


@pytest.mark.parametrize(
    "kind", ["a folder", "a FIFO", "a device node", "under /proc", "an existing file under /proc"]
)
def test_unusable_checkpoint_paths_fail_before_step_1(tmp_path, kind):
    """Folders, FIFOs, device nodes and /proc paths are refused before step 1."""
    path, fragment = _bad_paths(tmp_path)[kind]
    steps = []
    with pytest.raises(CheckpointError, match=fragment):
        _short_fit(path, callbacks=[lambda info: steps.append(info.step)])
    assert steps == []
    if kind == "a device node":
        assert stat.S_ISCHR(os.stat(path).st_mode)  # never replaced


def test_read_only_checkpoint_folder_fails_before_step_1(tmp_path):
    """A read-only folder (ro tmpfs, which binds root too) fails before step 1."""
    with _tmpfs(tmp_path / "ro", "1m", read_only=True) as folder:
        steps = []
        with pytest.raises(CheckpointError, match=r"cannot create files.*Read-only"):
            _short_fit(folder / "run.pt", callbacks=[lambda info: steps.append(info.step)])
        assert steps == []


def test_disk_full_during_a_later_save_keeps_the_result(tmp_path):
    """The disk fills up after the first checkpoint: fit warns, trains on and returns."""
    with _tmpfs(tmp_path / "small", "256k") as folder:
        path = folder / "run.pt"

        def fill_disk(info):
            if info.step == 5:  # after the checkpoint of step 4
                with contextlib.suppress(OSError), open(folder / "filler", "wb") as filler:
                    while True:
                        filler.write(b"\0" * 65536)
                        filler.flush()

        with pytest.warns(RuntimeWarning, match=r"could not write the checkpoint of step 8"):
            result = _short_fit(path, callbacks=[fill_disk], checkpoint_every=4)
        assert result.stop_reason == "completed" and result.num_steps == 10
        assert "FAILED at steps [8, 10]" in result.message and "holds step 4" in result.message
        assert load_checkpoint(path)["step"] == 4  # the good one is intact and verifies
        assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_orphan_temp_files_are_removed_on_resume(tmp_path):
    """Temporaries of this checkpoint are deleted when fit starts; others are kept."""
    path = tmp_path / "run.pt"
    _short_fit(path)
    orphans = [tmp_path / f".run.pt.{tag}.tmp" for tag in ("a1b2c3", "zz9")]
    for orphan in orphans:
        orphan.write_bytes(b"\0" * 1000)
    other = tmp_path / ".other.pt.x.tmp"
    other.write_bytes(b"keep")
    _short_fit(path, resume=True)
    assert not any(o.exists() for o in orphans)
    assert other.exists()  # only this checkpoint's temporaries


_KILL_DURING_SAVE = """
import os, signal, sys, torch, pyro
import pyro_vi_ext.training.checkpoint as checkpoint_io
from pyro_vi_ext.training import fit
from tests.training._problems import regression_data, regression_guide, regression_model
real_save = torch.save
def save_then_die(obj, f, *args, **kwargs):
    if isinstance(obj, dict) and obj.get("step") == 6:
        f.write(b"partial")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)  # killed in the middle of writing
    return real_save(obj, f, *args, **kwargs)
checkpoint_io.torch.save = save_then_die
x, y, _, _ = regression_data(n=40)
fit(regression_model, regression_guide, (x, y), pyro.infer.Trace_ELBO(),
    pyro.optim.Adam({"lr": 0.05}), num_steps=10, batch_size=8, checkpoint=sys.argv[1],
    checkpoint_every=3, progress=False)
"""


@pytest.mark.slow
def test_sigkill_during_a_write_leaves_an_orphan_that_resume_removes(tmp_path):
    """SIGKILL mid-write: the old file survives, the orphan goes on resume."""
    path = tmp_path / "run.pt"
    proc = subprocess.run([sys.executable, "-c", _KILL_DURING_SAVE, str(path)], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL
    orphans = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(orphans) == 1 and load_checkpoint(path)["step"] == 3
    result = _short_fit(path, resume=True, checkpoint_every=3)
    assert result.num_steps == 10 and not orphans[0].exists()


# ------------------------------------------------------------------------------ 5. NaN stop
@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_nan_stop_keeps_a_verified_checkpoint_to_resume_from(tmp_path):
    """After a NaN stop the kept checkpoint verifies and resumes."""
    x, y, _, _ = regression_data(n=40)
    state = {"done": 0}

    def poisoned(x, y=None, *, idx=None, n_data=None):
        regression_model(x, y, idx=idx, n_data=n_data)
        if state["done"] == 6:
            with pyro.validation_enabled(False):
                pyro.factor("poison", torch.tensor(float("nan")))

    def count(info):
        state["done"] = info.step

    path = tmp_path / "run.pt"
    pyro.clear_param_store()
    with pytest.warns(RuntimeWarning, match="non-finite loss .*at step 7"):
        result = fit(poisoned, regression_guide, (x, y), Trace_ELBO(),
                     pyro.optim.Adam({"lr": 0.05}), num_steps=10, batch_size=8,
                     checkpoint=path, checkpoint_every=5, callbacks=[count])  # fmt: skip
    assert result.stop_reason == "non_finite" and "step 5) is kept" in result.message
    assert load_checkpoint(path)["step"] == 5  # hash verified
    state["done"] = -1
    resumed = _short_fit(path, resume=True, callbacks=[count])
    assert resumed.num_steps == 10


# ------------------------------------------------------------------------------ callback keys
def test_callback_state_follows_its_key_not_its_position(run, tmp_path):
    """A callback inserted before the stopper does not take its state."""
    path = tmp_path / "c.pt"
    stopper = EarlyStopping("eval_loss", patience=100)
    run(callbacks=[_interrupt_at(12), stopper], checkpoint=path)
    best = stopper.best
    fresh = EarlyStopping("eval_loss", patience=100)

    class Extra(EarlyStopping):  # another stateful callback, now placed first
        pass

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(callbacks=[Extra("eval_loss", patience=100), fresh], checkpoint=path, resume=True)
    assert any("no state for callbacks ['" in str(w.message) for w in caught)
    assert fresh.best <= best and fresh.best_step >= 10  # its own state came back


# ------------------------------------------------------------------------------ 6. DDP stall
_DDP_STALL_WORKER = Path(__file__).with_name("_ddp_stall_worker.py")


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["SIGSTOP", "SIGKILL"])
def test_a_stalled_or_dead_worker_ends_every_rank(tmp_path, fault):
    """torchrun, 2 gloo processes: rank 1 stops (or dies) at step 6; timeout 4 s."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(_DDP_STALL_WORKER), str(tmp_path), fault]  # fmt: skip
    started = time.monotonic()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            code = proc.wait(timeout=150)
        finally:
            if proc.poll() is None:
                proc.kill()
        log.seek(0)
        output = log.read()
    elapsed = time.monotonic() - started
    assert code != 0, output[-3000:]
    assert elapsed < 120, output[-3000:]
    if fault == "SIGSTOP":
        assert "distributed_timeout=4 s" in output, output[-3000:]
        assert (tmp_path / "rank0-message.txt").exists()
        message = (tmp_path / "rank0-message.txt").read_text()
        assert "after step" in message and "step 4) is kept" in message
        waited = float((tmp_path / "rank0-waited.txt").read_text())
        assert 4.0 <= waited < 15.0  # the configured 4 s, not gloo's default 30 minutes
    assert load_checkpoint(tmp_path / "run.pt")["step"] == 4


def test_save_never_replaces_a_device_node(tmp_path):
    """Even called directly, save_checkpoint refuses to rename over a device node."""
    from pyro_vi_ext.training.checkpoint import CheckpointWriteError, save_checkpoint

    device = tmp_path / "node"
    os.mknod(device, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    with pytest.raises(CheckpointWriteError, match="not a regular file"):
        save_checkpoint(device, {"step": 1, "params": {"a": torch.ones(2)}})
    assert stat.S_ISCHR(os.stat(device).st_mode)


def test_an_elbo_class_instead_of_an_instance_is_named():
    """Passing Trace_ELBO (the class) says to write Trace_ELBO()."""
    x, y, _, _ = regression_data(n=20)
    with pytest.raises(TypeError, match=r"got the class Trace_ELBO: write Trace_ELBO\(\)"):
        fit(regression_model, regression_guide, (x, y), Trace_ELBO, pyro.optim.Adam({"lr": 0.1}),
            num_steps=1)  # fmt: skip
