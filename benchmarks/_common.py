"""Helpers shared by the benchmark scripts: peak RSS of a child process tree, timing."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run ``cmd``; return (wall seconds, peak RSS of the process tree in MiB), polled at 20 Hz."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak = 0.0
    done = threading.Event()

    def poll() -> None:
        nonlocal peak
        p = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [p, *p.children(recursive=True)]
                rss = sum(q.memory_info().rss for q in procs if q.is_running())
                peak = max(peak, rss / 2**20)
            except psutil.Error:
                pass
            time.sleep(0.05)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    out, _ = proc.communicate()
    done.set()
    t.join()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(out.decode(errors="replace"))
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    return wall, peak
