"""The run report: self-contained HTML that loads in headless Chromium without console errors;
quicklooks that draw changes."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from geoseg.cli import cli
from geoseg.pipeline import load_pipeline, run_pipeline
from geoseg.pipeline.quicklook import CHANGE_RGB
from geoseg.pipeline.runner import RunSummary
from tests.pipeline_support import make_model, make_scene, write_pipeline

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (apt-get install chromium); .ci/run installs it",
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunSummary, RunSummary]:
    """Two runs of a pipeline over two scenes and one broken file; between them one scene's
    left half is new imagery, so its buildings changed."""
    from rasterio import open as ropen
    from rasterio.windows import Window

    tmp = tmp_path_factory.mktemp("report")
    (tmp / "scenes").mkdir()
    make_scene(tmp / "scenes" / "s0.tif", 0, 0, 96)
    make_scene(tmp / "scenes" / "s1.tif", 300, 200, 96)
    (tmp / "scenes" / "broken.tif").write_bytes(b"not a GeoTIFF")
    make_model(tmp / "model")
    job = write_pipeline(
        tmp / "p.yml",
        outputs={"dir": "out", "vectors": True, "quicklook_px": 96},
        vectorize={"threshold": 0.34, "min_area_m2": 0.5, "simplify_m": 0.0},
        changes={"reference": "previous"},
    )
    config = load_pipeline(job)
    first = run_pipeline(config)
    with ropen(tmp / "scenes" / "s0.tif", "r+") as ds:
        w = Window(0, 0, 48, 96)
        ds.write(ds.read(window=w)[:, :, ::-1].copy(), window=w)
    second = run_pipeline(config)
    return tmp, first, second


def test_report_is_written_after_each_run_and_self_contained(
    runs: tuple[Path, RunSummary, RunSummary],
) -> None:
    tmp, first, second = runs
    report = tmp / "out" / "report.html"
    assert first.report == second.report == str(report)
    text = report.read_text()
    assert f"run {second.run_id}" in text  # rewritten by the second run
    # nothing from elsewhere: no script, no stylesheet link, no remote source
    assert "<script" not in text and "<link" not in text
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)
    assert "@import" not in text and "url(" not in text
    assert len(text) < 400_000  # small: simplified map, thumbnails, links to the layers
    # a row per scene: quicklooks embedded, the failure's reason, the changes, links
    assert text.count("data:image/png;base64,") == 2
    row = second.results[[r.stem for r in second.results].index("s0")]
    assert row.changes is not None
    assert f"{row.changes['added']} added" in text
    assert 'href="s0/s0.changes.geojson"' in text
    assert 'href="s0/s0.buildings.geojson"' in text
    # the map: scene footprints, buildings and changes coloured by class
    svg = text[text.index("<svg") : text.index("</svg>")]
    assert svg.count('class="fp"') == 2
    assert 'class="bldg"' in svg and 'class="chg"' in svg


def test_report_names_the_failed_scene_and_its_reason(
    runs: tuple[Path, RunSummary, RunSummary],
) -> None:
    tmp, _, second = runs
    text = (tmp / "out" / "report.html").read_text()
    failed = [r for r in second.results if r.status == "failed"]
    assert [r.stem for r in failed] == ["broken"]
    row = text[text.index('id="scene-broken"') :]
    row = row[: row.index("</tr>")]
    assert "failed" in row and (failed[0].error or "")[:30].replace("'", "&#x27;") in row


def test_runs_report_writes_any_recorded_run(runs: tuple[Path, RunSummary, RunSummary]) -> None:
    tmp, first, _ = runs
    out = tmp / "elsewhere" / "first.html"
    ledger = str(tmp / "state" / "ledger.sqlite")
    r = CliRunner().invoke(
        cli, ["runs", "--ledger", ledger, "report", str(first.run_id), "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    text = out.read_text()
    assert f"run {first.run_id}" in text
    assert 'href="../out/s0/s0.buildings.geojson"' in text  # relative to the report
    latest = tmp / "latest.html"
    r = CliRunner().invoke(cli, ["runs", "--ledger", ledger, "report", "--out", str(latest)])
    assert r.exit_code == 0, r.output
    assert "run 2" in latest.read_text()
    r = CliRunner().invoke(cli, ["runs", "--ledger", ledger, "report", "99", "--out", str(out)])
    assert r.exit_code == 2 and "no run with id 99" in r.output


def test_quicklook_draws_changes_in_their_colours(
    runs: tuple[Path, RunSummary, RunSummary],
) -> None:
    tmp, _, second = runs
    s0 = next(r for r in second.results if r.stem == "s0")
    assert s0.changes is not None and s0.changes["added"] + s0.changes["removed"] > 0
    rgb = np.asarray(Image.open(tmp / "out" / "s0" / "s0.quicklook.png").convert("RGB"))
    seen = {
        kind: bool((rgb == np.array(colour, np.uint8)).all(axis=-1).any())
        for kind, colour in CHANGE_RGB.items()
    }
    assert seen["added"] == (s0.changes["added"] > 0)
    assert seen["removed"] == (s0.changes["removed"] > 0)
    # the unchanged scene's quicklook has no change colours
    s1 = np.asarray(Image.open(tmp / "out" / "s1" / "s1.quicklook.png").convert("RGB"))
    for colour in CHANGE_RGB.values():
        assert not (s1 == np.array(colour, np.uint8)).all(axis=-1).any()


def _chromium(page: Path, shot: Path, tmp: Path) -> str:
    """Load ``page`` in headless Chromium, screenshot it to ``shot``; returns its log."""
    assert CHROMIUM is not None
    proc = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",  # CI runs as root
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={tmp / 'profile'}",
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1200,1800",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.stdout + proc.stderr


def _console_errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if "Uncaught" in line or "ERROR:CONSOLE" in line]


@needs_chromium
def test_report_loads_in_headless_chromium(
    runs: tuple[Path, RunSummary, RunSummary], tmp_path: Path
) -> None:
    tmp, _, _ = runs
    # the check itself: a page with a script error is caught
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><script>notDefined()</script></body></html>")
    assert _console_errors(_chromium(bad, tmp_path / "bad.png", tmp_path))
    shot = tmp / "report.png"
    log = _chromium(tmp / "out" / "report.html", shot, tmp_path)
    assert not _console_errors(log), log
    with Image.open(shot) as im:
        assert im.size == (1200, 1800)
        colours = np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)
    assert len(colours) > 50  # the page was drawn: text, thumbnails, map
