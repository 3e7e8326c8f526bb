"""Regression suite for the main job (``python -m models``) under bad options and Ctrl-C.

Each bad option must end the job before any training with one line on stderr and exit code 2;
a Ctrl-C (a real SIGINT sent to the process) must exit with code 130.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run_main(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "models", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def _assert_one_line(proc: subprocess.CompletedProcess, fragment: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert "dSprites" not in proc.stdout  # nothing started


@contextlib.contextmanager
def _read_only_folder(path: Path):
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)],
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here ({proc.stderr.strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_unwritable_out_fails_before_training(tmp_path):
    """A read-only --out (tmpfs mounted ro) ends the job before training."""
    with _read_only_folder(tmp_path / "ro") as folder:
        proc = _run_main("--steps", "2", "--out", str(folder / "report"))
    _assert_one_line(proc, "cannot be written (Read-only file system)")


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--out", "/proc/self/report"], "lies under /proc"),
        (["--batch-size", "20000"], "larger than the small grid's 11,520 images"),
        (["--loss", "iwae", "--num-particles", "100000000"], "lower --num-particles"),
    ],
    ids=["out-under-proc", "batch-larger-than-data", "huge-num-particles"],
)
def test_bad_options_end_with_one_line(argv, fragment):
    """Out under /proc, a batch larger than the data, a huge K: one line, exit 2."""
    _assert_one_line(_run_main(*argv), fragment)


def test_ctrl_c_exits_130(tmp_path):
    """A real SIGINT during training exits with code 130 and writes no report."""
    out = tmp_path / "report"
    # the full grid renders images on demand, so training starts without rendering them all
    cmd = [sys.executable, "-m", "models", "--steps", "100000", "--batch-size", "16",
           "--grid", "full", "--out", str(out), "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))  # fmt: skip
    try:
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        assert "training" in lines[1], "".join(lines) + proc.stderr.read()
        time.sleep(2.0)  # inside fit's loop, which turns the SIGINT into a stop after a step
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 130, proc.stderr.read()
    assert "interrupted" in proc.stderr.read()
    assert not (out / "summary.json").exists()
