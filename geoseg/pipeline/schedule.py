"""``geoseg schedule``: trigger pipelines on their cron schedules, each in its own process.

The clock and the way a run is started are injected, so the logic is tested without
sleeping. A pipeline never overlaps itself: a trigger that fires while its previous run is
still going is skipped, or (with ``catch_up``) queued once. Triggers missed while the
scheduler was down are found from the run ledger and caught up once or skipped.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol
from zoneinfo import ZoneInfo

from croniter import CroniterBadDateError, croniter

from geoseg.errors import ConfigError
from geoseg.pipeline.config import PipelineConfig

__all__ = [
    "Clock",
    "RunHandle",
    "Scheduler",
    "SubprocessLauncher",
    "SystemClock",
    "Trigger",
]

log = logging.getLogger(__name__)

#: A trigger handled within this many seconds of its time counts as on time (not missed).
ON_TIME_S = 60.0
#: Longest single wait between checks, seconds; bounds the effect of clock jumps.
MAX_WAIT_S = 60.0


class Clock(Protocol):
    """Where the scheduler gets the time from, and how it waits."""

    def now(self) -> datetime:
        """The current time, timezone-aware."""
        ...

    def wait(self, seconds: float, stop: threading.Event) -> None:
        """Return after ``seconds`` or as soon as ``stop`` is set."""
        ...


class SystemClock:
    """The real clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def wait(self, seconds: float, stop: threading.Event) -> None:
        stop.wait(max(0.0, seconds))


class RunHandle(Protocol):
    """A started pipeline run."""

    def poll(self) -> int | None:
        """Exit code once finished, else None."""
        ...

    def terminate(self) -> None:
        """Ask the run to stop (it records itself as interrupted)."""
        ...

    def wait(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` seconds; exit code or None if still running."""
        ...

    def kill(self) -> None: ...


Launcher = Callable[[PipelineConfig], RunHandle]


class _Process:
    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.pid = proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def terminate(self) -> None:
        self.proc.terminate()

    def kill(self) -> None:
        self.proc.kill()

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None


@dataclass(frozen=True)
class SubprocessLauncher:
    """Starts ``geoseg run PIPELINE.yml`` as a child process (isolated memory and crashes)."""

    extra_args: tuple[str, ...] = ()

    def __call__(self, config: PipelineConfig) -> RunHandle:
        cmd = [
            sys.executable,
            "-m",
            "geoseg",
            "run",
            str(Path(config.source).resolve()),
            *self.extra_args,
        ]
        return _Process(subprocess.Popen(cmd, env=os.environ.copy()))


@dataclass(frozen=True)
class Trigger:
    """What the scheduler did at a cron time: started, queued or skipped, and why."""

    pipeline: str
    due: datetime
    action: str
    detail: str


@dataclass
class _Entry:
    config: PipelineConfig
    tz: ZoneInfo
    next_due: datetime
    handle: RunHandle | None = None
    queued: bool = False
    history: list[Trigger] = field(default_factory=list)


class Scheduler:
    """Triggers each pipeline with a ``schedule`` section; call :meth:`run` or :meth:`tick`."""

    def __init__(
        self,
        configs: Sequence[PipelineConfig],
        *,
        clock: Clock | None = None,
        launch: Launcher | None = None,
        last_started: Callable[[str], float | None] | None = None,
    ) -> None:
        self.clock = clock or SystemClock()
        self.launch = launch or SubprocessLauncher()
        scheduled = [c for c in configs if c.schedule is not None]
        if not scheduled:
            raise ConfigError("none of the pipeline files has a schedule section")
        now = self.clock.now()
        self.entries: list[_Entry] = []
        #: pipelines left out, with why (a cron expression that never fires)
        self.skipped: dict[str, str] = {}
        for c in scheduled:
            assert c.schedule is not None
            tz = ZoneInfo(c.schedule.timezone)
            last = last_started(c.name) if last_started else None
            start = datetime.fromtimestamp(last, UTC) if last is not None else now
            try:
                first, upcoming = self._next(c, tz, start), self._next(c, tz, now)
            except CroniterBadDateError:
                why = f"{c.source}: schedule.cron '{c.schedule.cron}' never fires (no such date)"
                self.skipped[c.name] = why
                log.warning("%s; pipeline %s is not scheduled", why, c.name)
                continue
            self.entries.append(_Entry(c, tz, first))
            log.info(
                "%s: scheduled '%s' (%s); next run %s",
                c.name,
                c.schedule.cron,
                c.schedule.timezone,
                upcoming.isoformat(),
            )
        if not self.entries:
            raise ConfigError("no pipeline can be scheduled: " + "; ".join(self.skipped.values()))

    @staticmethod
    def _next(config: PipelineConfig, tz: ZoneInfo, after: datetime) -> datetime:
        assert config.schedule is not None
        it = croniter(config.schedule.cron, after.astimezone(tz))
        nxt: datetime = it.get_next(datetime)
        return nxt

    @property
    def running(self) -> list[str]:
        """Names of pipelines with a run in progress."""
        return [e.config.name for e in self.entries if e.handle is not None]

    def next_wakeup(self) -> datetime:
        """The earliest time something is due."""
        return min(e.next_due for e in self.entries)

    def tick(self) -> list[Trigger]:
        """Reap finished runs and handle every trigger due by now; returns what was done."""
        now = self.clock.now()
        done: list[Trigger] = []
        for e in self.entries:
            self._reap(e)
            due = self._due(e, now)
            if due:
                done += self._fire(e, due, now)
            elif e.queued and e.handle is None:
                e.queued = False
                done.append(self._start(e, now, "catching up a trigger queued while running"))
        return done

    def _reap(self, e: _Entry) -> None:
        if e.handle is None:
            return
        code = e.handle.poll()
        if code is not None:
            level = logging.INFO if code == 0 else logging.WARNING
            log.log(level, "%s: run finished with exit code %d", e.config.name, code)
            e.handle = None

    def _due(self, e: _Entry, now: datetime) -> list[datetime]:
        """Every cron time from ``next_due`` up to ``now``; advances ``next_due`` past now."""
        due: list[datetime] = []
        t = e.next_due
        while t <= now:
            due.append(t)
            if len(due) > 10_000:  # a minutely cron down for a week; enough to count
                break
            t = self._next(e.config, e.tz, t)
        e.next_due = self._next(e.config, e.tz, now) if due else e.next_due
        return due

    def _fire(self, e: _Entry, due: list[datetime], now: datetime) -> list[Trigger]:
        assert e.config.schedule is not None
        sched = e.config.schedule
        latest = due[-1]
        late_s = (now - latest).total_seconds()
        missed = len(due) - (1 if late_s <= ON_TIME_S else 0)
        fresh = [t for t in due if (now - t).total_seconds() <= sched.max_late_s]
        if e.handle is not None:
            if sched.catch_up and fresh:
                e.queued = True
                return [
                    self._note(
                        e,
                        latest,
                        "queued",
                        "previous run still going; it runs once more when that one finishes",
                    )
                ]
            return [self._note(e, latest, "skipped", "previous run still going (no overlap)")]
        if late_s <= ON_TIME_S:
            detail = "on time" + (f"; {missed} earlier missed trigger(s) skipped" if missed else "")
            return [self._start(e, latest, detail)]
        if sched.catch_up and fresh:
            return [
                self._start(
                    e, latest, f"catching up {missed} missed trigger(s), latest {late_s:.0f} s ago"
                )
            ]
        why = "catch_up is off" if sched.catch_up is False else f"older than {sched.max_late_s} s"
        return [self._note(e, latest, "skipped", f"{missed} missed trigger(s) skipped ({why})")]

    def _start(self, e: _Entry, due: datetime, detail: str) -> Trigger:
        try:
            e.handle = self.launch(e.config)
        except OSError as exc:
            return self._note(e, due, "failed", f"could not start the run: {exc}")
        pid = getattr(e.handle, "pid", None)
        return self._note(e, due, "started", detail + (f" (pid {pid})" if pid else ""))

    def _note(self, e: _Entry, due: datetime, action: str, detail: str) -> Trigger:
        trig = Trigger(e.config.name, due, action, detail)
        e.history.append(trig)
        level = logging.WARNING if action == "failed" else logging.INFO
        log.log(
            level,
            "%s: trigger %s: %s: %s",
            e.config.name,
            due.astimezone(e.tz).isoformat(),
            action,
            detail,
        )
        return trig

    def run(self, stop: threading.Event, grace_s: float = 60.0) -> None:
        """Tick until ``stop`` is set, then stop running pipelines (SIGTERM, then SIGKILL)."""
        log.info("scheduler started with %d pipeline(s)", len(self.entries))
        while not stop.is_set():
            self.tick()
            if stop.is_set():
                break
            wait = (self.next_wakeup() - self.clock.now()).total_seconds()
            if any(e.handle is not None for e in self.entries):
                wait = min(wait, 5.0)  # notice finished runs (and queued catch-ups) soon
            self.clock.wait(min(max(wait, 0.0), MAX_WAIT_S), stop)
        self.shutdown(grace_s)

    def shutdown(self, grace_s: float) -> None:
        """Ask every running pipeline to stop and wait up to ``grace_s`` seconds for it."""
        for e in self.entries:
            if e.handle is not None and e.handle.poll() is None:
                log.info("%s: stopping the running pipeline", e.config.name)
                e.handle.terminate()
        deadline = self.clock.now() + timedelta(seconds=grace_s)
        for e in self.entries:
            if e.handle is None:
                continue
            left = max(0.0, (deadline - self.clock.now()).total_seconds())
            if e.handle.wait(left) is None:
                log.warning("%s: did not stop within %.0f s; killing it", e.config.name, grace_s)
                e.handle.kill()
                e.handle.wait(10.0)
            e.handle = None
        log.info("scheduler stopped")
