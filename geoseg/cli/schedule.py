"""``geoseg schedule``: a long-running scheduler for the pipelines in a folder."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType

import click

from geoseg.pipeline.config import load_pipelines
from geoseg.pipeline.ledger import Ledger, default_ledger_path
from geoseg.pipeline.planning import ledger_path_for
from geoseg.pipeline.schedule import Scheduler, SubprocessLauncher


@click.command()
@click.argument("pipelines", type=click.Path(path_type=Path))
@click.option(
    "--ledger",
    "ledger_path",
    default=None,
    type=click.Path(path_type=Path),
    help="Run ledger file (default: $GEOSEG_HOME/ledger.sqlite).",
)
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="Seconds running pipelines get to stop on shutdown before being killed.",
)
def schedule(pipelines: Path, ledger_path: Path | None, grace: float) -> None:
    """Run each pipeline in PIPELINES (a folder of *.yml, or one file) on its cron schedule.

    Stops cleanly on SIGTERM or Ctrl-C: no new runs start, running ones are asked to stop.
    """
    configs = load_pipelines(pipelines)
    ledgers = {c.name: ledger_path_for(c, ledger_path) for c in configs}

    def last_started(name: str) -> float | None:
        path = ledgers.get(name, default_ledger_path())
        if not path.exists():
            return None
        with Ledger(path) as ledger:
            return ledger.last_started(name)

    extra = ("--ledger", str(ledger_path)) if ledger_path else ()
    scheduler = Scheduler(configs, launch=SubprocessLauncher(extra), last_started=last_started)
    stop = threading.Event()

    def stop_now(signum: int) -> None:
        click.echo(f"geoseg schedule: received signal {signum}; shutting down", err=True)
        stop.set()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # The handler runs on the main thread between two bytecodes, possibly while that
        # thread holds the lock inside ``stop.wait`` or stderr's buffer lock: setting the event
        # or writing here could deadlock, so another thread does both.
        threading.Thread(target=stop_now, args=(signum,), daemon=True).start()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        scheduler.run(stop, grace_s=grace)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
