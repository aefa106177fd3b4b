"""Commands with nothing heavy to do import nothing heavy: ``geoseg --help``, ``geoseg runs``,
``geoseg run --dry-run`` and a ``geoseg run`` that only skips answer without torch, smp, Dask
or rasterio (``benchmarks/bench_startup.py`` prints their times and memory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from geoseg.pipeline import load_pipeline, run_pipeline
from tests.pipeline_support import REPO, make_model, make_scene, write_pipeline

HEAVY: tuple[str, ...] = (
    "torch",
    "segmentation_models_pytorch",
    "timm",
    "distributed",
    "dask",
    "rasterio",
)
HEAVY += ("geopandas", "shapely", "pyproj")

PROBE = """
import json, sys
from geoseg.cli import cli
try:
    cli.main(sys.argv[1:], prog_name="geoseg")
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "heavy": [m for m in HEAVY if m in sys.modules]}))
"""


def _probe(*args: str) -> tuple[int, list[str], str]:
    code = f"HEAVY = {HEAVY!r}\n{PROBE}"
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["code"] or 0, result["heavy"], proc.stdout + proc.stderr


def test_listing_planning_and_skipping_import_no_engine(tmp_path: Path) -> None:
    (tmp_path / "scenes").mkdir()
    make_scene(tmp_path / "scenes" / "s0.tif", 0, 0, 64)
    make_model(tmp_path / "model")
    job = write_pipeline(tmp_path / "p.yml")
    first = run_pipeline(load_pipeline(job))
    assert [r.status for r in first.results] == ["done"]

    ledger = str(tmp_path / "state" / "ledger.sqlite")
    for args in (
        ["--help"],
        ["runs", "--ledger", ledger],
        ["run", str(job), "--dry-run"],
        ["run", str(job)],  # everything up to date: skips only
    ):
        code, heavy, output = _probe(*args)
        assert code == 0, output
        assert heavy == [], f"geoseg {' '.join(args)} imported {heavy}"
    assert "1 skipped" in output


def test_a_run_with_work_still_checks_the_model_first(tmp_path: Path) -> None:
    """Deferring the weights check to when a scene must run keeps it before any cluster."""
    (tmp_path / "scenes").mkdir()
    make_scene(tmp_path / "scenes" / "s0.tif", 0, 0, 64)
    model = make_model(tmp_path / "model")
    weights = model / "weights.safetensors"
    weights.write_bytes(b"not safetensors" + weights.read_bytes()[15:])
    spec = json.loads((model / "model.json").read_text())
    spec["weights_sha256"] = None
    (model / "model.json").write_text(json.dumps(spec))
    job = write_pipeline(tmp_path / "p.yml")
    code, _, output = _probe("run", str(job))
    assert code == 2 and "not a valid safetensors file" in output, output
    assert "Traceback" not in output and "distributed" not in output
