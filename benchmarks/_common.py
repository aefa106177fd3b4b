"""Helpers shared by the benchmark scripts: wall time and peak RSS of a child process, the
machine, and side-by-side timing of forward passes on a real chunk window."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run ``cmd``; return (wall seconds, peak RSS in MiB).

    The peak is the kernel's high-water mark of the child's resident set (``ru_maxrss`` from
    ``wait4``): exact, and free. (Polling ``/proc`` instead cost 3 ms of CPU per poll, 6 % of
    a core at 20 Hz, taken from the very run being timed, and missed short peaks.) Processes
    the child starts and waits for count with their own peak, not summed with the child's:
    every command measured here runs in one process.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    out = proc.stdout.read()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.stderr.write(out.decode(errors="replace"))
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    return wall, usage.ru_maxrss / 1024  # KiB on Linux


def machine() -> str:
    """The CPU model, its core count and whether it has native bf16 (figures depend on it)."""
    model, flags = "unknown CPU", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    bf16 = "native bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "no native bf16"
    simd = "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "no AVX2")
    return f"{model}, {os.cpu_count()} cores, {simd}, {bf16}"


def scene_args(doc: str, size: int = 8192) -> argparse.Namespace:
    """``--size`` (scene side, px), ``--repeat`` and ``--chunk``: the arguments of the
    benchmarks that run one synthetic scene with the null model."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=size)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=2048)
    return ap.parse_args()


def austin_window(spec: Any, shared: Path) -> tuple[Any, Any]:
    """(normalized batch of one, window): the first chunk window (chunk plus halo) of Inria
    Austin in ``../shared/data`` as ``geoseg predict`` cuts it for model ``spec`` on a CPU."""
    from geoseg.engine.options import PredictOptions
    from geoseg.engine.plan import scene_grid
    from geoseg.io.raster import open_scene
    from geoseg.io.reader import read_padded

    scene = open_scene(shared / "data" / "real" / "austin_buildings_rgb" / "aerial_sample.tif")
    window = scene_grid(scene, spec, PredictOptions(device="cpu")).at(0, 0).padded
    data, valid = read_padded(scene, window, tuple(spec.bands))
    return spec.normalization.apply(data, valid)[None], window


def interleaved_seconds(
    runs: Mapping[str, Callable[[Any], Any]], x: Any, passes: int
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(median, all) seconds of ``run(x)`` per run: one untimed pass each (allocation,
    compilation), then ``passes`` rounds, the order reversed every other round."""
    for run in runs.values():
        run(x)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(passes):
        for key in list(runs) if r % 2 == 0 else list(runs)[::-1]:
            t0 = time.perf_counter()
            runs[key](x)
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(t) for k, t in times.items()}, times
