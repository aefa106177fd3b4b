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
