"""Bounded memory: the mechanisms that bound it (tasks in flight, the writer's partial tiles and
its queue) and the peak RSS of ``geoseg predict``-like runs at two scene sizes. No timings."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rasterio.windows import Window

from geoseg.io.raster import open_scene
from geoseg.io.tiles import BLOCK
from geoseg.io.writer import JOBS_PER_THREAD, RasterWriter
from tests.conftest import write_tif

REPO = Path(__file__).resolve().parents[1]


def _echo(i: int) -> int:
    return i


def test_stream_tasks_keeps_at_most_max_in_flight_chunks_alive() -> None:
    """The chunk descriptions are drawn lazily: at any time at most ``max_in_flight`` have been
    submitted and not yet consumed, however many chunks the scene has."""
    from distributed import Client

    from geoseg.engine.cluster import stream_tasks

    drawn = 0

    def chunks(n: int) -> Iterator[tuple[int]]:
        nonlocal drawn
        for i in range(n):
            drawn += 1
            yield (i,)

    with Client(processes=False, n_workers=1, threads_per_worker=4, dashboard_address=":0") as c:
        for limit in (1, 3):
            drawn, consumed, most = 0, 0, 0
            for result in stream_tasks(c, _echo, chunks(40), limit, "t"):
                most = max(most, drawn - consumed)
                consumed += 1
                assert 0 <= result < 40
            assert consumed == 40 and most == limit, (limit, most)


def _row_major_chunks(width: int, height: int, chunk: int) -> Iterator[Window]:
    for r in range(0, height, chunk):
        for c in range(0, width, chunk):
            yield Window(c, r, min(chunk, width - c), min(chunk, height - r))


def _most_partial_tiles(path: Path, background: bool) -> tuple[int, int, int, int]:
    """Write a scene chunk by chunk (384 px chunks: they cut the 512 px tiles) through a
    :class:`RasterWriter`; the most full-resolution tiles held incomplete at once, the most of
    every level, the number of levels and the longest queue."""
    scene = open_scene(path)
    most_full = most_pending = most_queued = 0
    writer = RasterWriter(scene, background=background, threads=2)
    writer.add("probs", path.with_name(path.stem + ".out.tif"), 2, resampling="average")
    with writer:
        for win in _row_major_chunks(scene.width, scene.height, 384):
            data = np.full((2, int(win.height), int(win.width)), 7, np.uint8)
            writer.write("probs", win, data)
            out = writer._outputs["probs"]
            most_full = max(most_full, sum(k == 0 for k, _, _ in out.pending))
            most_pending = max(most_pending, len(out.pending))
            most_queued = max(most_queued, len(writer._queued))
    return most_full, most_pending, len(out.sizes), most_queued


@pytest.mark.parametrize("background", [False, True])
def test_the_writer_holds_a_row_of_tiles_whatever_the_scene_height(
    tmp_path: Path, background: bool
) -> None:
    """Incomplete tiles (at every overview level) are bounded by the scene's width, not its
    height; in the background, queued tile jobs by the threads."""
    most = {}
    for height in (1536, 4608):
        path = write_tif(
            tmp_path / f"s{height}.tif",
            np.zeros((1, height, 1536), np.uint8),
            tiled=True,
            compress="deflate",
        )
        most[height] = _most_partial_tiles(path, background)
    (full, _, _, _), (full_tall, pending, levels, _) = most.values()
    assert full == full_tall <= 2 * (1536 // BLOCK), most  # two rows of tiles at most
    assert pending <= levels * 2 * (1536 // BLOCK), most  # and so at each overview level
    if background:
        assert all(m[3] <= JOBS_PER_THREAD * 2 for m in most.values()), most


#: Runs in a subprocess: predicts a scene with the identity model, prints the peak RSS. The peak
#: is the process's own high-water mark (VmHWM), not ``ru_maxrss``: a process that subprocess
#: starts with vfork begins its ``ru_maxrss`` at its parent's peak, the test runner's, which is
#: over 2 GiB once other tests have loaded real models.
PEAK_RSS = """
import json, sys
from tests.test_predict import IdentityFactory
from geoseg.models.bundle import load_bundle
from geoseg.predict import PredictOptions, open_client, predict_scene
from geoseg.io.raster import open_scene

scene, bundle, out = sys.argv[1:4]
options = PredictOptions(device="cpu", precision="fp32", chunk=512, halo=32, workers=1)
with open_client(options) as client:
    predict_scene(open_scene(scene), load_bundle(bundle), out, options, client,
                  factory=IdentityFactory("rss"))
with open("/proc/self/status") as f:
    hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
print(json.dumps(hwm // 1024))
"""

#: Runs a command from a small process and prints the kernel's high-water mark of its resident
#: set (``ru_maxrss`` from ``wait4``): the command's own peak or its children's, whichever is
#: larger. Measured from here rather than from the test runner, whose own peak a child started
#: with vfork would inherit.
MEASURE = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(proc.pid, 0)
print("measured:", os.waitstatus_to_exitcode(status), usage.ru_maxrss, flush=True)
"""


def _peak_rss_mib(scene: Path, bundle: Path, out: Path) -> int:
    res = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, str(scene), str(bundle), str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return int(json.loads(res.stdout.strip().splitlines()[-1]))


@pytest.mark.slow  # about a minute: 67 Mpx through the identity model
def test_peak_rss_does_not_grow_with_the_scene(tmp_path: Path, make_bundle: Any) -> None:
    """A 1024² and an 8192² px scene (64x the pixels; a full-scene float32 array of its
    3 classes would be 768 MiB) peak within a generous 400 MiB of each other (GDAL's cache and
    the block cache, 64 MiB each, fill only on the larger one), under 1.5 GiB."""
    from geoseg.synthetic import write_scene

    bundle = make_bundle().path
    peaks = {}
    for size in (1024, 8192):
        scene = tmp_path / f"scene{size}.tif"
        write_scene(scene, size, seed=3)
        peaks[size] = _peak_rss_mib(scene, bundle, tmp_path / f"out{size}")
    assert peaks[8192] < peaks[1024] + 400, peaks
    assert peaks[8192] < 1536, peaks


def _vm_hwm_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _banepa_mirrored(path: Path, size: int) -> Path:
    """Banepa's sample (real roofs and roads) mirror-tiled to ``size``² px at 0.30 m."""
    import rasterio
    from rasterio.transform import from_origin

    with rasterio.open(REPO / "data_samples" / "banepa_rgb.tif") as src:
        img = src.read((1, 2, 3))
    img = np.concatenate([img, img[:, ::-1]], axis=1)
    img = np.concatenate([img, img[:, :, ::-1]], axis=2)
    reps = (1, -(-size // img.shape[1]), -(-size // img.shape[2]))
    big = np.ascontiguousarray(np.tile(img, reps)[:, :size, :size])
    transform = from_origin(340000.0, 3060000.0, 0.3, 0.3)
    return write_tif(path, big, crs="EPSG:32645", transform=transform)


class _Sized:
    width = height = 3072


@pytest.mark.slow  # about a minute: the shipped model on a 3072² scene, vectors included
def test_the_shipped_model_stays_within_the_budget_in_every_process(tmp_path: Path) -> None:
    """`geoseg predict --vectorize` with the shipped model and the default backend (OpenVINO
    where installed): the main process (model, probabilities, mask, writer) and each worker
    process (vectors) peak under 1.5 GiB; the chunk is the one the budget allows."""
    import os
    import threading

    import psutil

    pytest.importorskip("openvino")
    env = {**os.environ, "GEOSEG_CACHE": str(tmp_path / "cache")}
    model = str(REPO / "data_samples" / "model")
    small = _banepa_mirrored(tmp_path / "small.tif", 512)
    warm = [sys.executable, "-m", "geoseg", "predict", str(small), "-m", model]
    subprocess.run([*warm, "-o", str(tmp_path / "w")], env=env, check=True, timeout=600)
    scene = _banepa_mirrored(tmp_path / "scene.tif", 3072)
    cmd = [sys.executable, "-m", "geoseg", "-v", "predict", str(scene), "-m", model]
    cmd += ["-o", str(tmp_path / "o"), "--vectorize"]
    proc = subprocess.Popen(
        [sys.executable, "-c", MEASURE, *cmd],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    peaks: dict[int, int] = {}
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            try:
                children = [
                    c
                    for main in psutil.Process(proc.pid).children()
                    for c in main.children(recursive=True)
                ]
            except psutil.Error:
                children = []
            for c in children:
                peaks[c.pid] = max(peaks.get(c.pid, 0), _vm_hwm_kib(c.pid))
            done.wait(0.2)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    proc.wait()
    done.set()
    thread.join()
    status, maxrss_kib = map(int, out.strip().splitlines()[-1].split()[1:])
    assert status == 0, out[-3000:]
    from geoseg.engine.options import PredictOptions
    from geoseg.engine.plan import chunk_for
    from geoseg.models.bundle import load_bundle

    spec = load_bundle(model).spec  # 1536 px in bf16 (native bf16 CPUs), 1024 px in fp32
    options = PredictOptions(device="cpu", backend="openvino")
    chunk = chunk_for(spec, spec.halo, options, _Sized())  # type: ignore[arg-type]
    assert f"{chunk} px chunks for the {spec.halo} px halo" in out, out[-3000:]
    workers = [kib / 1024 for kib in peaks.values() if kib]
    assert workers, out[-3000:]  # the vectors ran in worker processes
    # wait4's figure is the largest of the process and its children: the main process's own
    # unless a worker's was larger, and each worker's is checked as well
    assert maxrss_kib / 1024 < 1536, (maxrss_kib / 1024, workers)
    assert max(workers) < 1536, workers
