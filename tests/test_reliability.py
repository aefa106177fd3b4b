"""Regressions of the reliability review: what is printed (no secrets, no dead folders, no
"None"), what a run trusts on disk, and the smaller failure paths of the CLI."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from geoseg.cli import cli
from geoseg.pipeline import Ledger


def test_runs_show_of_a_scene_of_unknown_size_says_so(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as ledger:
        run = ledger.start_run("p", "p.yml", "c", "m", "model", "local", False)
        row = ledger.start_scene(
            run, "p", "/gone.tif", None, None, "c", "m", "input cannot be read"
        )
        ledger.finish_scene(row, "failed", {}, "/gone.tif: no such file")
        ledger.finish_run(run, "failed")
    res = CliRunner().invoke(cli, ["runs", "--ledger", str(path), "show", str(run)])
    assert res.exit_code == 0, res.output
    assert "None" not in res.output and "size unknown" in res.output
