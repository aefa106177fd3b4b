"""Process settings the command line applies: glibc keeps big freed blocks for reuse."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = r"""
import resource, sys
from geoseg.runtime import tune_allocator
applied = tune_allocator()
import numpy as np
np.ones(64 << 20, np.uint8)  # the first big block faults its pages in once
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    a = np.ones(64 << 20, np.uint8); del a          # freed and allocated again
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def probe(**env: str) -> tuple[bool, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**clean, "NUMPY_MADVISE_HUGEPAGE": "0", **env},  # count 4 KiB pages
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_tuned_allocator_reuses_big_blocks() -> None:
    applied, faults = probe()
    assert applied
    # 5 x 64 MiB touched again: without reuse that is ~80,000 page faults (4 KiB pages)
    assert faults < 2_000, faults
    _, default_faults = probe(GEOSEG_TUNE_MALLOC="0")
    assert default_faults > 10 * max(faults, 100)


def test_user_malloc_settings_win() -> None:
    assert probe(MALLOC_ARENA_MAX="2")[0] is False
    assert probe(GEOSEG_TUNE_MALLOC="0")[0] is False


def minor_faults_of_reuse() -> int:
    """Page faults of allocating a 64 MiB block five more times after the first (in a task)."""
    import resource

    import numpy as np

    np.ones(64 << 20, np.uint8)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        a = np.ones(64 << 20, np.uint8)
        del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_spawned_vectorize_workers_get_the_allocator_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Workers spawned by geoseg's local cluster (this process runs other threads) reuse
    freed big blocks like the command line's own process."""
    import threading

    from geoseg.vectorize.run import local_client

    for k in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("NUMPY_MADVISE_HUGEPAGE", "0")
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)  # so local_client spawns instead of forking
    other.start()
    try:
        with local_client(1) as client:
            faults = client.submit(minor_faults_of_reuse, pure=False).result()
    finally:
        stop.set()
        other.join()
    assert faults < 2_000, faults


EXIT_PROBE = r"""
import atexit, sys, threading, time
from pathlib import Path
from geoseg.cli import _exit
out = Path(sys.argv[1])
atexit.register(lambda: (out / "atexit").write_text("ran"))
print("buffered output", end="")             # still in the buffer: must be flushed
if sys.argv[2] == "thread":                   # a worker that is not a daemon must finish
    def late() -> None:
        time.sleep(0.5)
        (out / "thread").write_text("done")
    threading.Thread(target=late).start()
code = sys.argv[3]
_exit(None if code == "none" else int(code) if code.isdigit() else code)
"""


@pytest.mark.parametrize(("code", "status"), [("none", 0), ("0", 0), ("3", 3), ("bad input", 1)])
@pytest.mark.parametrize("thread", ["nothread", "thread"])
def test_cli_exit_keeps_exit_handlers_output_and_status(
    tmp_path: os.PathLike[str], code: str, status: int, thread: str
) -> None:
    from pathlib import Path

    out = Path(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", EXIT_PROBE, str(out), thread, code],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == status, proc.stderr
    assert proc.stdout == "buffered output"
    assert (out / "atexit").read_text() == "ran"
    if thread == "thread":
        assert (out / "thread").read_text() == "done"
    if code == "bad input":
        assert proc.stderr.strip() == "bad input"
