"""The same pipeline on a real ``dask.distributed`` cluster: identical outputs, retries, one
model load per worker."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import yaml

from geoseg.pipeline import PlannedScene, SceneResult, load_pipeline, run_pipeline
from tests.pipeline_support import make_model, make_scene, read_pixels, write_pipeline

if TYPE_CHECKING:
    from distributed import LocalCluster

distributed = pytest.importorskip("distributed")

SCENES = ("d0", "d1")


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        silence_logs=40,
    ) as c:
        yield c


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local, in-process run of two 192 px scenes (3 x 3 chunks each) with vectors."""
    root = tmp_path_factory.mktemp("dist")
    (root / "scenes").mkdir()
    for i, name in enumerate(SCENES):
        make_scene(root / "scenes" / f"{name}.tif", 150 + 300 * i, 100 + 250 * i, 192)
    make_model(root / "model")
    outputs = {"dir": "local", "vectors": True, "quicklook_px": 96}
    summary = run_pipeline(load_pipeline(write_pipeline(root / "local.yml", outputs=outputs)))
    assert summary.ok and summary.count("done") == 2
    return root


def _job(root: Path, name: str, address: str) -> Path:
    outputs = {"dir": name, "vectors": True, "quicklook_px": 96}
    compute = {"kind": "dask", "scheduler": address, "threads": 1, "scenes_in_flight": 2}
    return write_pipeline(
        root / f"{name}.yml",
        name=name,
        outputs=outputs,
        compute=compute,
        ledger=f"state-{name}/ledger.sqlite",
    )


def _assert_same_outputs(root: Path, other: str) -> None:
    for stem in SCENES:
        a, b = root / "local" / stem, root / other / stem
        for kind in ("probs", "mask"):
            pa, pb = read_pixels(a / f"{stem}.{kind}.tif"), read_pixels(b / f"{stem}.{kind}.tif")
            assert np.array_equal(pa, pb), f"{stem}.{kind} differs"
        names = sorted(p.name for p in a.iterdir())
        assert names == sorted(p.name for p in b.iterdir())
        for geojson in a.glob("*.geojson"):
            assert geojson.read_text() == (b / geojson.name).read_text()


def _model_loads() -> tuple[int, int]:
    """(pid, model loads) of the process this runs in; imported there, not captured here."""
    from geoseg.models import predictor

    return os.getpid(), sum(predictor.LOAD_COUNT.values())


def test_cluster_run_matches_local_run(cluster: LocalCluster, local_run: Path) -> None:
    job = _job(local_run, "cluster", cluster.scheduler_address)
    summary = run_pipeline(load_pipeline(job))
    assert summary.ok and summary.count("done") == 2
    _assert_same_outputs(local_run, "cluster")
    with distributed.Client(cluster) as client:
        loads = list(client.run(_model_loads).values())
    assert len(loads) == 2 and all(pid != os.getpid() for pid, _ in loads)
    assert all(n <= 1 for _, n in loads) and sum(n for _, n in loads) >= 1


class KillOneWorker:
    """A RunProgress that SIGKILLs one worker process as soon as the first chunk is back."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.killed: int | None = None
        self.chunk_reports = 0

    def batch_started(self, planned: list[PlannedScene]) -> None: ...

    def scene_started(self, scene: PlannedScene) -> None: ...

    def scene_chunks(self, scene: PlannedScene, done: int, total: int) -> None:
        self.chunk_reports += 1
        if self.killed is None and done < total:
            self.killed = self.pids[0]
            os.kill(self.killed, signal.SIGKILL)

    def scene_finished(self, result: SceneResult) -> None: ...


def test_worker_killed_mid_scene_is_retried(cluster: LocalCluster, local_run: Path) -> None:
    with distributed.Client(cluster) as client:
        pids = list(client.run(os.getpid).values())
    killer = KillOneWorker(pids)
    job = _job(local_run, "killed", cluster.scheduler_address)
    summary = run_pipeline(load_pipeline(job), progress=killer)
    assert killer.killed is not None
    assert summary.ok and summary.count("done") == 2, [r.error for r in summary.results]
    _assert_same_outputs(local_run, "killed")
    with distributed.Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        assert killer.killed not in client.run(os.getpid).values()


def _corrupt_middle_tile(path: Path) -> Path:
    """A scene whose middle tile no longer decodes (its first and last tiles still do)."""
    import rasterio

    plain = make_scene(path.with_name("plain.tif"), 300, 300, 192)
    with rasterio.open(plain) as src:
        profile, data = src.profile, src.read()
    with rasterio.open(path, "w", **{**profile, "compress": "deflate"}) as dst:
        dst.write(data)
    with rasterio.open(path) as src:
        offset = int(src.get_tag_item("BLOCK_OFFSET_1_1", "TIFF", bidx=1))
        size = int(src.get_tag_item("BLOCK_SIZE_1_1", "TIFF", bidx=1))
        assert src.profile.get("compress")  # a compressed tile, so garbage cannot decode
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff\x00" * (size // 2))
    return path


def test_corrupt_tile_read_on_a_worker_is_one_clean_error(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    """The error a worker process raises reaches the client as geoseg's own InputError with its
    message (not a bare Exception), in the CLI (one line, exit 2) and in a pipeline's record."""
    from click.testing import CliRunner

    from geoseg.cli import cli

    scene = _corrupt_middle_tile(tmp_path / "bad.tif")
    model = make_model(tmp_path / "model")
    args = ["predict", str(scene), "-m", str(model), "-o", str(tmp_path / "o"), "--device", "cpu"]
    res = CliRunner().invoke(cli, [*args, "--scheduler", cluster.scheduler_address])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    errors = [line for line in lines if str(scene) in line and "read failed" in line]
    assert errors and "Traceback" not in res.output

    (tmp_path / "scenes").mkdir()
    scene.rename(tmp_path / "scenes" / "bad.tif")
    job = _job(tmp_path, "broken", cluster.scheduler_address)
    summary = run_pipeline(load_pipeline(job))
    assert not summary.ok
    (result,) = summary.results
    assert result.status == "failed"
    # geoseg's own error (recorded as its message), not "Exception: InputError(...)"
    assert result.error is not None and result.error.startswith(str(tmp_path / "scenes"))
    assert "read failed" in result.error and "Exception" not in result.error


def _name_gdal_requests(agent: str | None) -> None:
    """Make this process's HTTP requests say ``agent`` (plus its pid); None: GDAL's own."""
    if agent is None:
        os.environ.pop("GDAL_HTTP_USERAGENT", None)
    else:
        os.environ["GDAL_HTTP_USERAGENT"] = f"{agent}-{os.getpid()}"


def test_workers_read_remote_scenes_themselves(
    cluster: LocalCluster, local_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scenes given by URL: each worker process reads its chunks with range requests (no
    shared file system for inputs), and the outputs are the local run's."""
    from tests.http_support import serve

    monkeypatch.setenv("GDAL_HTTP_USERAGENT", f"client-{os.getpid()}")
    with distributed.Client(cluster) as client:
        client.run(_name_gdal_requests, "worker")
        workers = {f"worker-{pid}" for pid in client.run(os.getpid).values()}
    try:
        with serve(local_run / "scenes") as server:
            _run_remote(cluster, local_run, server)
    finally:
        with distributed.Client(cluster) as client:
            client.run(_name_gdal_requests, None)
    # every worker process read chunks, and together they read every tile of both scenes; the
    # client opened the scenes (their headers) and drew the quicklooks
    by_agent = server.bytes_by_agent
    assert set(by_agent) == workers | {f"client-{os.getpid()}"}, by_agent
    scenes = sum((local_run / "scenes" / f"{name}.tif").stat().st_size for name in SCENES)
    assert all(by_agent[w] > 0 for w in workers), by_agent
    assert sum(by_agent[w] for w in workers) >= scenes, (by_agent, scenes)
    _assert_same_outputs(local_run, "remote")


def _run_remote(cluster: LocalCluster, local_run: Path, server: Any) -> None:
    """The two scenes of ``local_run``, served by ``server``, through a pipeline on ``cluster``."""
    urls = [f"{server.url}/{name}.tif" for name in SCENES]
    job = _job(local_run, "remote", cluster.scheduler_address)
    doc = yaml.safe_load(job.read_text())
    doc["inputs"] = {"paths": urls}
    job.write_text(yaml.safe_dump(doc))
    summary = run_pipeline(load_pipeline(job))
    assert summary.ok and summary.count("done") == 2, summary.results
    assert [str(r.path) for r in summary.results] == urls
