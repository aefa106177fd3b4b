"""Temporary files after kills: SIGTERM cleans up like Ctrl-C, and the next command sweeps what
``kill -9`` left (by owner pid and age), without touching a live process's files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from geoseg.io.tempfiles import STALE_AFTER_S, host_tag, owner, stale, sweep, temporary_path
from tests.conftest import write_tif
from tests.pipeline_support import REPO, leftovers, read_pixels


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no process has this pid now (reuse within the test is unlikely)


def test_temporary_names_carry_their_owner(tmp_path: Path) -> None:
    p = temporary_path(tmp_path / "scene.probs.tif", ".tif")
    assert p.name.startswith(".scene.probs.tif.") and p.name.endswith(".partial.tif")
    assert owner(p) == (os.getpid(), host_tag())
    assert owner(tmp_path / ".x.tif.0123abcd.partial") is None  # older naming


def test_sweep_removes_only_what_dead_or_old_writers_left(tmp_path: Path) -> None:
    host = host_tag()
    other = "000000" if host != "000000" else "111111"
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        files = {
            "dead": tmp_path / f".a.tif.{dead}-{host}-aaaaaa.partial",
            "dead_part": tmp_path / f".a.scratch.tif.{dead}-{host}-bbbbbb.partial.b0.tif",
            "live": tmp_path / f".b.tif.{live.pid}-{host}-cccccc.partial",
            "mine": temporary_path(tmp_path / "c.tif"),
            "remote_new": tmp_path / f".d.tif.{dead}-{other}-dddddd.partial",
            "remote_old": tmp_path / f".e.tif.{dead}-{other}-eeeeee.partial",
            "legacy_new": tmp_path / ".f.tif.0123abcd.partial",
            "legacy_old": tmp_path / ".g.tif.4567abcd.partial",
            "final": tmp_path / "h.tif",
        }
        for p in files.values():
            p.write_bytes(b"x")
        old = time.time() - STALE_AFTER_S - 60
        for key in ("remote_old", "legacy_old"):
            os.utime(files[key], (old, old))
        removed = {p.name for p in sweep(tmp_path)}
        expect = {"dead", "dead_part", "remote_old", "legacy_old"}
        assert removed == {files[k].name for k in expect}
        for key, p in files.items():
            assert p.exists() == (key not in expect), key
        assert not stale(files["live"]) and not stale(files["mine"])
    finally:
        live.kill()
        live.wait()


@pytest.fixture
def big_scene(tmp_path: Path) -> Path:
    """A scene that takes the tiny model some seconds in 32 px chunks, so it can be killed."""
    rng = np.random.default_rng(0)
    data = rng.integers(0, 255, (3, 1024, 1024), dtype=np.uint8)
    return write_tif(tmp_path / "big.tif", data)


def _start_predict(scene: Path, model: Path, out: Path) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "geoseg", "predict", str(scene), "-m", str(model)]
    cmd += ["-o", str(out), "--device", "cpu", "--chunk", "32", "--workers", "1"]
    cmd += ["--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_scratch(proc: subprocess.Popen[str], out: Path) -> None:
    deadline = time.monotonic() + 120
    while not leftovers(out):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no temporary output appeared"
        time.sleep(0.05)
    time.sleep(0.5)  # some chunks written


def test_sigterm_removes_temporaries_and_kill9_leftovers_are_swept(
    tmp_path: Path, big_scene: Path, make_bundle: Any
) -> None:
    model = make_bundle(chunk=32, halo=16).path
    out = tmp_path / "o"

    proc = _start_predict(big_scene, model, out)
    _wait_for_scratch(proc, out)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "geoseg: interrupted"
    assert leftovers(out) == [] and not list(out.glob("*.tif"))

    proc = _start_predict(big_scene, model, out)
    _wait_for_scratch(proc, out)
    proc.kill()
    proc.communicate(timeout=60)
    left = leftovers(out)
    assert left and all(owner(p) == (proc.pid, host_tag()) for p in left)

    # the next command writing there, on another scene, sweeps them
    small = write_tif(tmp_path / "small.tif", np.zeros((3, 64, 64), dtype=np.uint8))
    proc = _start_predict(small, model, out)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert leftovers(out) == []
    assert read_pixels(out / "small.mask.tif").shape == (1, 64, 64)
