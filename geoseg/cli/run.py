"""``geoseg run``: run a pipeline file once over its scenes."""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path
from typing import Any

import click

from geoseg.io.remote import redact, redact_text
from geoseg.pipeline.config import load_pipeline
from geoseg.pipeline.planning import PlannedScene
from geoseg.pipeline.planning import dry_run as plan_pipeline
from geoseg.pipeline.runner import RunSummary, SceneResult, run_pipeline

log = logging.getLogger("geoseg.cli")


class BatchProgress:
    """Bars for the batch and each scene on a terminal; plain log lines elsewhere."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.lock = threading.Lock()
        self.total = 0
        self.to_run = 0
        self.finished = 0
        self.started = 0
        self.index: dict[str, int] = {}  # each scene's place in the order scenes started
        self.batch: Any = None
        self.bars: dict[str, Any] = {}
        self.quarters: dict[str, int] = {}

    def batch_started(self, planned: list[PlannedScene]) -> None:
        self.total = len(planned)
        self.to_run = sum(p.action == "run" for p in planned)
        if self.tty:
            from tqdm import tqdm

            self.batch = tqdm(total=self.total, desc="scenes", unit="scene", position=0)

    def scene_started(self, scene: PlannedScene) -> None:
        with self.lock:
            self.started += 1
            self.index[scene.stem] = self.started
        if not self.tty:
            log.info(
                "[%d/%d] %s: processing (%s)", self.started, self.to_run, scene.stem, scene.reason
            )

    def scene_chunks(self, scene: PlannedScene, done: int, total: int) -> None:
        with self.lock:
            if self.tty:
                from tqdm import tqdm

                bar = self.bars.get(scene.stem)
                if bar is None:
                    bar = tqdm(
                        total=total,
                        desc=scene.stem,
                        unit="chunk",
                        leave=False,
                        position=1 + len(self.bars),
                    )
                    self.bars[scene.stem] = bar
                bar.update(done - bar.n)
                return
            quarter = 4 * done // max(total, 1)
            if quarter != self.quarters.get(scene.stem):
                self.quarters[scene.stem] = quarter
                log.info("%s: %d/%d chunks", scene.stem, done, total)

    def scene_finished(self, result: SceneResult) -> None:
        with self.lock:
            self.finished += 1
            bar = self.bars.pop(result.stem, None)
            if bar is not None:
                bar.close()
            if self.batch is not None:
                self.batch.update(1)
            elif result.status != "skipped":
                log.info(
                    "[%d/%d] %s: %s in %.1f s",
                    self.index.get(result.stem, self.finished),
                    self.to_run,
                    result.stem,
                    result.status,
                    result.seconds,
                )

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        if self.batch is not None:
            self.batch.close()


def print_summary(summary: RunSummary) -> None:
    """The end-of-run summary: counts, then every failure with its reason."""
    counts = ", ".join(
        f"{summary.count(s)} {s}"
        for s in ("done", "skipped", "failed", "interrupted")
        if summary.count(s) or s != "interrupted"
    )
    click.echo(
        f"run {summary.run_id} of {summary.pipeline}: {len(summary.results)} scene(s): "
        f"{counts} ({summary.seconds:.1f} s)"
    )
    if summary.out_dir is not None:
        click.echo(f"outputs: {redact(str(summary.out_dir))}/<scene>/")
    amortized = summary.amortized()
    if amortized is not None:
        first, each = amortized
        click.echo(
            f"first scene done after {first:.1f} s (start-up included), then {each:.1f} s per scene"
        )
    if summary.report is not None:
        click.echo(f"report: {redact(summary.report)}")
    changes = summary.change_counts()
    if changes is not None:
        click.echo("building changes: " + ", ".join(f"{v} {k}" for k, v in changes.items()))
    for r in summary.results:
        if r.status in ("failed", "interrupted"):
            click.echo(f"  {r.status.upper()} {redact(str(r.path))}: {redact_text(r.error or '')}")


@click.command()
@click.argument("pipeline", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Redo every scene, even those already done.")
@click.option("--dry-run", is_flag=True, help="List what would run and why; change nothing.")
@click.option(
    "--scheduler",
    default=None,
    metavar="ADDRESS",
    help="Dask scheduler address; overrides the pipeline's compute section.",
)
@click.option(
    "--ledger",
    "ledger_path",
    default=None,
    type=click.Path(path_type=Path),
    help="Run ledger file (default: the pipeline's, else $GEOSEG_HOME/ledger.sqlite).",
)
def run(
    pipeline: Path, force: bool, dry_run: bool, scheduler: str | None, ledger_path: Path | None
) -> None:
    """Run PIPELINE.yml over its scenes: skip those done, isolate failures, record a ledger.

    Exit code 0 when every scene is done or skipped, 1 when a scene failed, 2 for a problem of
    the whole run (invalid pipeline file, missing model, no scenes, already running).
    """
    config = load_pipeline(pipeline)
    if dry_run:
        planned = plan_pipeline(config, force=force, ledger_path=ledger_path)
        for p in planned:
            click.echo(f"{p.action:<4}  {redact(str(p.path))}  ({p.reason})")
        n = sum(p.action == "run" for p in planned)
        click.echo(f"{config.name}: {n} of {len(planned)} scene(s) would run")
        return
    progress = BatchProgress()
    try:  # SIGTERM arrives as KeyboardInterrupt too (see geoseg.cli.main)
        summary = run_pipeline(
            config, force=force, scheduler=scheduler, ledger_path=ledger_path, progress=progress
        )
    except KeyboardInterrupt:
        progress.close()
        click.echo(
            f"{config.name}: interrupted; run it again to finish the remaining scenes", err=True
        )
        sys.exit(130)
    progress.close()
    print_summary(summary)
    if not summary.ok:
        sys.exit(1)
