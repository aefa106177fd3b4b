"""``geoseg run``: idempotence, changes, failure isolation, ledger, lock, atomic outputs, resume."""

from __future__ import annotations

import errno
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner
from PIL import Image

from geoseg.cli import cli
from geoseg.pipeline import Ledger, PipelineLock, PipelineLocked, load_pipeline, run_pipeline
from geoseg.pipeline.planning import PlannedScene, dry_run
from geoseg.pipeline.runner import SceneResult, lock_path
from tests.pipeline_support import (
    REPO,
    leftovers,
    make_model,
    make_scene,
    read_pixels,
    write_pipeline,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "model")


@pytest.fixture
def job(tmp_path: Path, model_dir: Path) -> Path:
    """A pipeline over three 96 px scenes, with the shared tiny model linked beside it."""
    (tmp_path / "scenes").mkdir()
    for i, (c, r) in enumerate([(0, 0), (300, 200), (600, 500)]):
        make_scene(tmp_path / "scenes" / f"s{i}.tif", c, r, 96)
    (tmp_path / "model").symlink_to(model_dir)
    return write_pipeline(tmp_path / "p.yml")


def _ledger(job: Path) -> Ledger:
    return Ledger(job.parent / "state" / "ledger.sqlite")


class Recorder:
    """A RunProgress that remembers events and the most scenes seen in progress at once."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.active = 0
        self.most_active = 0

    def batch_started(self, planned: list[PlannedScene]) -> None:
        self.events.append(("batch", str(len(planned))))

    def scene_started(self, scene: PlannedScene) -> None:
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        self.events.append(("start", scene.stem))

    def scene_chunks(self, scene: PlannedScene, done: int, total: int) -> None:
        self.events.append(("chunks", f"{scene.stem}:{done}/{total}"))

    def scene_finished(self, result: SceneResult) -> None:
        if result.status != "skipped":
            self.active -= 1
        self.events.append(("end", f"{result.stem}:{result.status}"))


def test_run_then_rerun_skips(job: Path) -> None:
    outputs = {"dir": "out", "vectors": True, "formats": ["geojson", "gpkg"], "quicklook_px": 64}
    config = load_pipeline(write_pipeline(job, outputs=outputs))
    rec = Recorder()
    first = run_pipeline(config, progress=rec)
    assert [r.status for r in first.results] == ["done"] * 3 and first.ok
    assert rec.most_active <= 2  # compute.scenes_in_flight
    assert ("chunks", "s0:4/4") in rec.events  # 96 px in 64 px chunks: 2 x 2
    out = job.parent / "out"
    for i in range(3):
        d = out / f"s{i}"
        assert read_pixels(d / f"s{i}.mask.tif").shape == (1, 96, 96)
        assert read_pixels(d / f"s{i}.probs.tif").shape == (3, 96, 96)
        assert (d / f"s{i}.buildings.geojson").exists() and (d / f"s{i}.roads.gpkg").exists()
        with Image.open(d / f"s{i}.quicklook.png") as im:
            assert im.size == (64, 64) and im.mode == "RGB"
    assert leftovers(job.parent) == []
    stamp = (out / "s0" / "s0.mask.tif").stat().st_mtime_ns

    second = run_pipeline(config)
    assert [r.status for r in second.results] == ["skipped"] * 3
    assert all("up to date" in r.reason for r in second.results)
    assert (out / "s0" / "s0.mask.tif").stat().st_mtime_ns == stamp
    with _ledger(job) as ledger:
        runs = ledger.runs("tiny")
        assert [(r.status, r.n_done, r.n_skipped) for r in runs] == [("done", 0, 3), ("done", 3, 0)]
        rows = ledger.scenes(first.run_id)
        assert rows[0].size == (job.parent / "scenes" / "s0.tif").stat().st_size
        assert rows[0].outputs["files"]["mask"].endswith("s0.mask.tif")
        assert rows[0].outputs["files"]["buildings.gpkg"].endswith("s0.buildings.gpkg")
        assert set(rows[0].outputs["counts"]) == {"buildings", "roads"}
        assert rows[0].model_hash == runs[0].model_hash and rows[0].seconds is not None


def test_cli_output_counts_scenes_once_on_one_clock_in_plain_lines(job: Path) -> None:
    res = CliRunner().invoke(cli, ["run", str(job)])
    assert res.exit_code == 0, res.output
    lines = res.stderr.splitlines()
    started = sorted(line.split(" ")[0] for line in lines if "processing" in line)
    assert started == ["[1/3]", "[2/3]", "[3/3]"], lines
    assert all(not line[:1].isdigit() for line in lines), lines  # no timestamps by default
    with _ledger(job) as ledger:
        run = ledger.runs("tiny")[0]
    assert run.finished is not None
    summary = res.stdout.splitlines()[0]
    assert summary.endswith(f"({run.finished - run.started:.1f} s)"), (summary, run)
    assert res.stdout.splitlines()[1] == f"outputs: {job.parent / 'out'}/<scene>/"
    assert res.stdout.splitlines()[2].startswith("first scene done after ")

    res = CliRunner().invoke(cli, ["-v", "run", str(job), "--force"])
    assert res.exit_code == 0 and "INFO geoseg.pipeline.runner:" in res.stderr, res.stderr


def test_batch_reports_its_marginal_cost_per_scene() -> None:
    from geoseg.pipeline.runner import RunSummary

    def done(ended: float | None, status: str = "done") -> SceneResult:
        return SceneResult(Path("x"), "x", status, "new", ended=ended)

    results = [done(112.0), done(104.0), done(None, "failed"), done(108.0), done(116.0)]
    summary = RunSummary(1, "p", results, 20.0, None, started=100.0)
    assert summary.amortized() == (4.0, 4.0)  # first after 4 s, then 12 s for 3 more
    assert RunSummary(1, "p", results[:1], 20.0, None, started=100.0).amortized() is None


def test_changes_force_and_dry_run(job: Path) -> None:
    config = load_pipeline(job)
    run_pipeline(config)
    scene = job.parent / "scenes" / "s1.tif"
    os.utime(scene, ns=(time.time_ns(), scene.stat().st_mtime_ns + 5_000_000_000))
    (job.parent / "out" / "s2" / "s2.quicklook.png").unlink()
    planned = {p.stem: p for p in dry_run(config)}
    assert planned["s0"].action == "skip"
    assert planned["s1"].action == "run" and "input changed" in planned["s1"].reason
    assert planned["s2"].action == "run" and "outputs missing: quicklook" in planned["s2"].reason
    res = CliRunner().invoke(cli, ["run", str(job), "--dry-run"])
    assert res.exit_code == 0 and "2 of 3 scene(s) would run" in res.output
    with _ledger(job) as ledger:
        assert len(ledger.runs("tiny")) == 1  # the dry run recorded nothing

    rerun = run_pipeline(config)
    assert [r.status for r in rerun.results] == ["skipped", "done", "done"]
    forced = run_pipeline(config, force=True)
    assert [r.status for r in forced.results] == ["done"] * 3
    assert all(r.reason == "--force" for r in forced.results)
    changed = load_pipeline(write_pipeline(job, predict={"device": "cpu", "halo": 0}))
    assert {p.reason.split(" (")[0] for p in dry_run(changed)} == {"pipeline settings changed"}


def _output_bytes(out: Path) -> dict[str, bytes]:
    """Every scene output under ``out``: its bytes, or for a GeoPackage (whose metadata holds
    the time it was written) its features as GeoJSON; the run report aside (it shows times)."""
    import pyogrio

    files = [f for f in sorted(out.rglob("*")) if f.is_file() and f.name != "report.html"]
    return {
        str(f.relative_to(out)): (
            pyogrio.read_dataframe(f).to_json().encode() if f.suffix == ".gpkg" else f.read_bytes()
        )
        for f in files
    }


def test_force_rewrites_the_same_bytes(job: Path) -> None:
    outputs = {"dir": "out", "vectors": True, "formats": ["geojson", "gpkg"], "quicklook_px": 64}
    config = load_pipeline(write_pipeline(job, outputs=outputs))
    assert run_pipeline(config).ok
    first = _output_bytes(job.parent / "out")
    assert len(first) >= 3 * 5  # probs, mask, buildings, roads and a quicklook per scene
    forced = run_pipeline(config, force=True)
    assert [r.status for r in forced.results] == ["done"] * 3
    assert _output_bytes(job.parent / "out") == first


def test_a_changed_model_reruns_every_scene(job: Path) -> None:
    config = load_pipeline(job)
    assert run_pipeline(config).ok
    mask = job.parent / "out" / "s0" / "s0.mask.tif"
    with rasterio.open(mask) as src:
        old_model = src.tags()["GEOSEG_MODEL"]
    (job.parent / "model").unlink()  # the shared model: replaced by other weights, same path
    make_model(job.parent / "model", seed=1)
    config = load_pipeline(job)
    planned = dry_run(config)
    assert [p.action for p in planned] == ["run"] * 3
    assert all(p.reason.startswith("model changed (was ") for p in planned), planned
    rerun = run_pipeline(config)
    assert [r.status for r in rerun.results] == ["done"] * 3
    with rasterio.open(mask) as src:
        new_model = src.tags()["GEOSEG_MODEL"]
    assert new_model != old_model and new_model.startswith("tiny@")
    assert [r.status for r in run_pipeline(config).results] == ["skipped"] * 3


def test_corrupt_scene_is_isolated(job: Path) -> None:
    (job.parent / "scenes" / "bad.tif").write_bytes(b"II*\x00 not really a tiff")
    res = CliRunner().invoke(cli, ["run", str(job)])
    assert res.exit_code == 1, res.output
    assert "3 done, 0 skipped, 1 failed" in res.output
    assert f"outputs: {job.parent / 'out'}/<scene>/" in res.output
    assert "FAILED" in res.output and "bad.tif" in res.output
    assert "not a readable raster" in res.output
    with _ledger(job) as ledger:
        run = ledger.runs("tiny")[0]
        assert (run.status, run.n_done, run.n_failed) == ("failed", 3, 1)
        bad = [s for s in ledger.scenes(run.id) if s.status == "failed"]
        assert len(bad) == 1 and "not a readable raster" in (bad[0].error or "")
    listing = CliRunner().invoke(cli, ["runs", "--ledger", str(job.parent / "state/ledger.sqlite")])
    assert listing.exit_code == 0 and "tiny" in listing.output and "failed" in listing.output
    shown = CliRunner().invoke(
        cli, ["runs", "--ledger", str(job.parent / "state/ledger.sqlite"), "show", str(run.id)]
    )
    assert shown.exit_code == 0 and "error: " in shown.output and "s0.quicklook.png" in shown.output
    missing = CliRunner().invoke(
        cli, ["runs", "--ledger", str(job.parent / "state/ledger.sqlite"), "show", "999"]
    )
    assert missing.exit_code == 2 and "no run with id 999" in missing.output
    # a failed scene is retried by the next run, the others are skipped
    (job.parent / "scenes" / "bad.tif").unlink()
    make_scene(job.parent / "scenes" / "bad.tif", 100, 100, 96)
    again = run_pipeline(load_pipeline(job))
    assert [r.status for r in again.results] == ["done", "skipped", "skipped", "skipped"]


def test_lock_prevents_concurrent_runs(job: Path) -> None:
    config = load_pipeline(job)
    with PipelineLock(lock_path(job.parent / "state" / "ledger.sqlite", "tiny"), "tiny"):
        with pytest.raises(PipelineLocked, match="'tiny' is already running .pid"):
            run_pipeline(config)
        res = CliRunner().invoke(cli, ["run", str(job)])
        assert res.exit_code == 2 and "already running" in res.output
    assert run_pipeline(config).ok  # released


def test_unwritable_output_fails_that_scene(job: Path) -> None:
    out = job.parent / "out"
    out.mkdir()
    (out / "s1").write_text("a file where the scene's folder should be")
    summary = run_pipeline(load_pipeline(job))
    assert [r.status for r in summary.results] == ["done", "failed", "done"]
    assert "not writable" in (summary.results[1].error or "")
    with _ledger(job) as ledger:
        assert ledger.integrity_ok()
        assert [s.status for s in ledger.scenes(summary.run_id)].count("failed") == 1


def test_full_disk_leaves_no_partial_outputs(job: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import geoseg.io.cog

    real_write = geoseg.io.cog.write_cog

    def write_cog(path: Path, *args: object, **kw: object) -> None:
        if "s2" in str(path):
            Path(path).write_bytes(b"half a file")  # what a full disk leaves behind
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(geoseg.io.cog, "write_cog", write_cog)
    summary = run_pipeline(load_pipeline(job))
    assert [r.status for r in summary.results] == ["done", "done", "failed"]
    assert "No space left" in (summary.results[2].error or "")
    assert leftovers(job.parent) == []
    assert not (job.parent / "out" / "s2" / "s2.probs.tif").exists()
    with _ledger(job) as ledger:
        assert ledger.integrity_ok()
        assert ledger.runs("tiny")[0].status == "failed"


def test_unopenable_ledger_is_a_clear_error(job: Path) -> None:
    (job.parent / "state").mkdir()
    (job.parent / "state" / "ledger.sqlite").write_text("this is not a database" * 100)
    res = CliRunner().invoke(cli, ["run", str(job)])
    assert res.exit_code == 2 and "run ledger" in res.output


def test_empty_ledger_file_is_refused_not_treated_as_new(job: Path) -> None:
    """A zero-byte ledger (truncated history) must not silently start over."""
    (job.parent / "state").mkdir()
    (job.parent / "state" / "ledger.sqlite").write_bytes(b"")
    res = CliRunner().invoke(cli, ["run", str(job)])
    assert res.exit_code == 2, res.output
    assert "empty file (0 bytes)" in res.output and "ledger.sqlite" in res.output
    assert (job.parent / "state" / "ledger.sqlite").stat().st_size == 0


def _count_done(db: Path) -> int:
    con = sqlite3.connect(db)
    try:
        return int(con.execute("SELECT COUNT(*) FROM scenes WHERE status='done'").fetchone()[0])
    except sqlite3.OperationalError:  # tables not created yet
        return 0
    finally:
        con.close()


def test_sigkill_mid_batch_then_resume(tmp_path: Path, model_dir: Path) -> None:
    (tmp_path / "scenes").mkdir()
    for i in range(5):
        make_scene(tmp_path / "scenes" / f"k{i}.tif", 100 * i, 90 * i, 128)
    (tmp_path / "model").symlink_to(model_dir)
    job = write_pipeline(
        tmp_path / "p.yml",
        compute={"kind": "local", "workers": 1, "threads": 1, "scenes_in_flight": 1},
    )
    db = tmp_path / "state" / "ledger.sqlite"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "geoseg", "run", str(job)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        done = 0
        deadline = time.monotonic() + 120
        while done < 1 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            if db.exists():
                done = _count_done(db)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    finished = _count_done(db)
    assert 1 <= finished < 5
    # every file under a final name is complete
    for mask in (tmp_path / "out").rglob("*.mask.tif"):
        assert read_pixels(mask).shape == (1, 128, 128)

    summary = run_pipeline(load_pipeline(job))
    statuses = [r.status for r in summary.results]
    assert statuses.count("skipped") == finished and statuses.count("done") == 5 - finished
    assert leftovers(tmp_path) == []
    with _ledger(job) as ledger:
        first = ledger.run(summary.run_id - 1)
        assert first is not None and first.status == "interrupted"
        assert first.n_done == finished  # the killed run's finished scenes are counted
        last_event = max(s.finished or s.started for s in ledger.scenes(first.id))
        assert first.finished == last_event  # it ended at its last record, not at the resume
        assert ledger.integrity_ok()
    for i in range(5):
        assert np.isin(read_pixels(tmp_path / "out" / f"k{i}" / f"k{i}.mask.tif"), [0, 1, 2]).all()


def test_refused_real_scenes_fail_with_reasons(job: Path) -> None:
    data = REPO.parent.parent / "shared" / "data" / "robustness"
    if not data.is_dir():
        data = REPO.parent / "shared" / "data" / "robustness"
    if not (data / "rotated.tif").exists():
        pytest.skip("shared robustness data not present")
    paths = [str(data / "rotated.tif"), str(data / "sar_hh.tif"), "scenes/s0.tif"]
    summary = run_pipeline(load_pipeline(write_pipeline(job, inputs={"paths": paths})))
    by_stem = {r.stem: r for r in summary.results}
    assert by_stem["s0"].status == "done"
    assert by_stem["rotated"].status == "failed" and "rotated" in (by_stem["rotated"].error or "")
    assert by_stem["sar_hh"].status == "failed" and "complex" in (by_stem["sar_hh"].error or "")


def test_a_skip_checks_that_the_outputs_on_disk_are_this_pipelines(job: Path) -> None:
    """Pipelines A and C, with different models, share outputs.dir: after A, C, A the files
    hold A's model again, not C's under A's "up to date"."""
    import rasterio

    make_model(job.parent / "model_c", seed=1)
    a = load_pipeline(job)
    c = load_pipeline(write_pipeline(job.parent / "c.yml", name="c", model="model_c"))
    mask = job.parent / "out" / "s0" / "s0.mask.tif"

    def model_tag() -> str:
        with rasterio.open(mask) as src:
            return str(src.tags()["GEOSEG_MODEL"])

    assert run_pipeline(a).ok
    tag_a = model_tag()
    assert run_pipeline(c).ok and model_tag() != tag_a
    again = run_pipeline(a)
    assert [r.status for r in again.results] == ["done"] * 3
    assert "outputs replaced since run" in again.results[0].reason
    assert model_tag() == tag_a
    assert [r.status for r in run_pipeline(a).results] == ["skipped"] * 3
