"""``geoseg runs``: the history of pipeline runs from the run ledger."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from geoseg.errors import ConfigError
from geoseg.pipeline.ledger import Ledger, RunRow, default_ledger_path

_LEDGER = click.option(
    "--ledger",
    "ledger_path",
    default=None,
    type=click.Path(path_type=Path),
    help="Run ledger file (default: $GEOSEG_HOME/ledger.sqlite).",
)


def _open(ledger_path: Path | None) -> Ledger:
    path = ledger_path or default_ledger_path()
    if not path.exists():
        raise ConfigError(f"{path}: no run ledger yet (nothing has run); use --ledger to pick one")
    return Ledger(path)


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _duration(r: RunRow) -> str:
    return f"{r.finished - r.started:.1f} s" if r.finished else "-"


@click.group(invoke_without_command=True)
@_LEDGER
@click.option("-p", "--pipeline", default=None, help="Only runs of this pipeline.")
@click.option("-n", "--limit", type=click.IntRange(min=1), default=20, show_default=True)
@click.pass_context
def runs(ctx: click.Context, ledger_path: Path | None, pipeline: str | None, limit: int) -> None:
    """List recent pipeline runs, newest first (``geoseg runs show RUN_ID`` for one)."""
    ctx.obj = ledger_path
    if ctx.invoked_subcommand is not None:
        return
    with _open(ledger_path) as ledger:
        rows = ledger.runs(pipeline, limit)
    click.echo(
        f"{'id':>5}  {'pipeline':<20} {'status':<12} {'started':<19}  {'time':>9}  "
        f"{'done':>5} {'skip':>5} {'fail':>5}  model"
    )
    for r in rows:
        click.echo(
            f"{r.id:>5}  {r.pipeline:<20} {r.status:<12} {_when(r.started):<19}  "
            f"{_duration(r):>9}  {r.n_done:>5} {r.n_skipped:>5} {r.n_failed:>5}  {r.model}"
        )


@runs.command("show")
@click.argument("run_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print the run and its scenes as JSON.")
@click.pass_obj
def show(ledger_path: Path | None, run_id: int, as_json: bool) -> None:
    """Show one run: its settings, and every scene with status, timing, outputs and error."""
    with _open(ledger_path) as ledger:
        run = ledger.run(run_id)
        if run is None:
            raise ConfigError(f"{ledger.path}: no run with id {run_id}")
        scenes = ledger.scenes(run_id)
    if as_json:
        click.echo(
            json.dumps(
                {"run": run.__dict__, "scenes": [s.__dict__ for s in scenes]}, indent=2, default=str
            )
        )
        return
    for k, v in (
        ("run", run.id),
        ("pipeline", f"{run.pipeline} ({run.source})"),
        ("status", run.status),
        ("started", _when(run.started)),
        ("finished", _when(run.finished)),
        ("duration", _duration(run)),
        ("host / pid", f"{run.host} / {run.pid}"),
        ("compute", run.compute),
        ("model", f"{run.model} (sha256 {run.model_hash})"),
        ("config hash", run.config_hash),
        ("forced", run.forced),
        (
            "scenes",
            f"{run.n_done} done, {run.n_skipped} skipped, {run.n_failed} failed or interrupted",
        ),
        ("message", run.message or "-"),
    ):
        click.echo(f"{k:>12}: {v}")
    for s in scenes:
        secs = f"{s.seconds:.1f} s" if s.seconds is not None else "-"
        size = f"{s.size} bytes" if s.size is not None else "size unknown"
        click.echo(f"\n  {s.status:<11} {s.path}  ({secs}, {size})")
        click.echo(f"    why: {s.reason}")
        for name, path in s.outputs.get("files", {}).items():
            click.echo(f"    {name}: {path}")
        counts = s.outputs.get("counts")
        if counts:
            click.echo("    features: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        changes = s.outputs.get("changes")
        if changes:
            click.echo("    changes: " + ", ".join(f"{v} {k}" for k, v in changes.items()))
        if s.outputs.get("change_reference"):
            click.echo(f"    compared with: {s.outputs['change_reference']}")
        if s.error:
            click.echo(f"    error: {s.error}")


@runs.command("report")
@click.argument("run_id", type=int, required=False)
@click.option("-p", "--pipeline", default=None, help="Without RUN_ID: the latest run of this.")
@click.option(
    "--out",
    "-o",
    "out",
    type=click.Path(path_type=Path),
    required=True,
    help="The HTML file to write (self-contained; links to the outputs are relative to it).",
)
@click.pass_obj
def report(ledger_path: Path | None, run_id: int | None, pipeline: str | None, out: Path) -> None:
    """Write the report of run RUN_ID (default: the latest run) as one HTML page."""
    from geoseg.pipeline.report import write_report

    with _open(ledger_path) as ledger:
        if run_id is None:
            latest = ledger.runs(pipeline, 1)
            if not latest:
                raise ConfigError(f"{ledger.path}: no run recorded yet")
            run_id = latest[0].id
        elif ledger.run(run_id) is None:
            raise ConfigError(f"{ledger.path}: no run with id {run_id}")
        write_report(ledger, run_id, out)
    click.echo(f"run {run_id}: report written to {out}")
