"""``geoseg schedule``: cron with time zones, no overlap, catch-up or skip, clean shutdown.

The scheduler runs on a controllable clock and a fake launcher, so nothing sleeps.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from geoseg.errors import ConfigError
from geoseg.pipeline.config import PipelineConfig, parse_pipeline
from geoseg.pipeline.schedule import Scheduler

UTC = UTC
REPO = Path(__file__).resolve().parents[1]


def pipeline(
    name: str = "nightly",
    cron: str = "0 2 * * *",
    tz: str = "Europe/Paris",
    catch_up: bool = False,
    max_late_s: int = 86400,
) -> PipelineConfig:
    text = f"""\
schema_version: 1
name: {name}
inputs: {{paths: [scenes/*.tif]}}
model: model
outputs: {{dir: out}}
schedule: {{cron: "{cron}", timezone: {tz}, catch_up: {str(catch_up).lower()},
            max_late_s: {max_late_s}}}
"""
    return parse_pipeline(text, f"/pipes/{name}.yml")


class FakeClock:
    """A clock that only moves when told to; ``wait`` jumps ahead instead of sleeping."""

    def __init__(self, start: datetime) -> None:
        self.t = start
        self.waits: list[float] = []

    def now(self) -> datetime:
        return self.t

    def wait(self, seconds: float, stop: threading.Event) -> None:
        self.waits.append(seconds)
        self.t += timedelta(seconds=seconds)

    def set(self, t: datetime) -> None:
        self.t = t


class FakeRun:
    def __init__(self) -> None:
        self.code: int | None = None
        self.terminated = False
        self.killed = False

    def poll(self) -> int | None:
        return self.code

    def terminate(self) -> None:
        self.terminated = True
        self.code = 130

    def kill(self) -> None:
        self.killed = True
        self.code = -9

    def wait(self, timeout: float) -> int | None:
        return self.code


class FakeLauncher:
    def __init__(self) -> None:
        self.runs: list[tuple[str, FakeRun]] = []

    def __call__(self, config: PipelineConfig) -> FakeRun:
        run = FakeRun()
        self.runs.append((config.name, run))
        return run


def make(
    configs: list[PipelineConfig], start: datetime, last: dict[str, float] | None = None
) -> tuple[Scheduler, FakeClock, FakeLauncher]:
    clock, launcher = FakeClock(start), FakeLauncher()
    last = last or {}
    sched = Scheduler(configs, clock=clock, launch=launcher, last_started=last.get)
    return sched, clock, launcher


def test_fires_at_local_time_of_its_timezone() -> None:
    # 02:00 in Paris is 01:00 UTC in winter and 00:00 UTC in summer
    sched, clock, launcher = make([pipeline()], datetime(2026, 1, 10, 0, 30, tzinfo=UTC))
    assert sched.next_wakeup() == datetime(2026, 1, 10, 1, 0, tzinfo=UTC)
    assert sched.tick() == []
    clock.set(datetime(2026, 1, 10, 0, 59, 59, tzinfo=UTC))
    assert sched.tick() == [] and launcher.runs == []
    clock.set(datetime(2026, 1, 10, 1, 0, 1, tzinfo=UTC))
    [trig] = sched.tick()
    assert trig.action == "started" and trig.detail.startswith("on time")
    assert len(launcher.runs) == 1
    assert sched.tick() == []  # the same trigger fires once
    launcher.runs[0][1].code = 0
    summer, clock2, _ = make([pipeline()], datetime(2026, 7, 10, 0, 30, tzinfo=UTC))
    assert summer.next_wakeup() == datetime(2026, 7, 11, 0, 0, tzinfo=UTC)


def test_never_overlaps_itself_and_skips() -> None:
    sched, clock, launcher = make(
        [pipeline(cron="*/10 * * * *", tz="UTC")], datetime(2026, 3, 1, 12, 0, 30, tzinfo=UTC)
    )
    clock.set(datetime(2026, 3, 1, 12, 10, 0, tzinfo=UTC))
    assert [t.action for t in sched.tick()] == ["started"]
    clock.set(datetime(2026, 3, 1, 12, 20, 0, tzinfo=UTC))
    [trig] = sched.tick()
    assert trig.action == "skipped" and "still going" in trig.detail
    assert len(launcher.runs) == 1 and sched.running == ["nightly"]
    launcher.runs[0][1].code = 0
    clock.set(datetime(2026, 3, 1, 12, 25, 0, tzinfo=UTC))
    assert sched.tick() == [] and sched.running == []  # skipped, not made up for
    clock.set(datetime(2026, 3, 1, 12, 30, 0, tzinfo=UTC))
    assert [t.action for t in sched.tick()] == ["started"]


def test_overrun_with_catch_up_runs_once_more_afterwards() -> None:
    sched, clock, launcher = make(
        [pipeline(cron="*/10 * * * *", tz="UTC", catch_up=True)],
        datetime(2026, 3, 1, 12, 0, 30, tzinfo=UTC),
    )
    clock.set(datetime(2026, 3, 1, 12, 10, 0, tzinfo=UTC))
    sched.tick()
    for minute in (20, 30):  # two triggers during the long run: queued once
        clock.set(datetime(2026, 3, 1, 12, minute, 0, tzinfo=UTC))
        assert [t.action for t in sched.tick()] == ["queued"]
    launcher.runs[0][1].code = 0
    clock.set(datetime(2026, 3, 1, 12, 31, 0, tzinfo=UTC))
    [trig] = sched.tick()
    assert trig.action == "started" and "queued" in trig.detail
    assert len(launcher.runs) == 2 and sched.tick() == []


def test_downtime_is_caught_up_once() -> None:
    last = {"nightly": datetime(2026, 5, 1, 0, 0, 5, tzinfo=UTC).timestamp()}
    start = datetime(2026, 5, 3, 9, 0, tzinfo=UTC)  # missed the nights of the 2nd and 3rd
    sched, clock, launcher = make([pipeline(catch_up=True, max_late_s=3 * 86400)], start, last)
    [trig] = sched.tick()
    assert trig.action == "started" and "catching up 2 missed trigger(s)" in trig.detail
    assert len(launcher.runs) == 1
    assert sched.next_wakeup() == datetime(2026, 5, 4, 0, 0, tzinfo=UTC)


def test_downtime_is_skipped_without_catch_up_or_when_too_old() -> None:
    last = {"nightly": datetime(2026, 5, 1, 0, 0, 5, tzinfo=UTC).timestamp()}
    start = datetime(2026, 5, 3, 9, 0, tzinfo=UTC)
    for cfg in (pipeline(catch_up=False), pipeline(catch_up=True, max_late_s=3600)):
        sched, _, launcher = make([cfg], start, last)
        [trig] = sched.tick()
        assert trig.action == "skipped" and "2 missed trigger(s) skipped" in trig.detail
        assert launcher.runs == []


def test_run_loop_waits_on_the_clock_and_shuts_down_running_pipelines() -> None:
    configs = [
        pipeline("a", cron="0 * * * *", tz="UTC"),
        pipeline("b", cron="30 * * * *", tz="UTC"),
    ]
    sched, clock, launcher = make(configs, datetime(2026, 2, 1, 8, 50, tzinfo=UTC))
    done = threading.Event()
    real_wait = clock.wait

    def wait(seconds: float, stop: threading.Event) -> None:
        real_wait(seconds, stop)
        if clock.now() >= datetime(2026, 2, 1, 10, 0, tzinfo=UTC):
            done.set()

    clock.wait = wait  # type: ignore[method-assign]  # a test double's method, replaced
    sched.run(done, grace_s=5)
    # a started at 09:00 and b at 09:30; neither finished, so both are stopped on shutdown
    assert [name for name, _ in launcher.runs] == ["a", "b"]
    assert all(run.terminated and not run.killed for _, run in launcher.runs)
    assert sched.running == []
    assert max(clock.waits) <= 60 and min(clock.waits) >= 0
    assert clock.waits[-1] <= 5  # while a run is going, finished runs are noticed within 5 s


def test_no_scheduled_pipeline_is_an_error() -> None:
    plain = parse_pipeline(
        "schema_version: 1\nname: x\ninputs: {paths: [a]}\nmodel: m\noutputs: {dir: o}\n", "x.yml"
    )
    with pytest.raises(ConfigError, match="none of the pipeline files has a schedule"):
        Scheduler([plain], clock=FakeClock(datetime(2026, 1, 1, tzinfo=UTC)))


def test_cli_schedule_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    (tmp_path / "far.yml").write_text(
        "schema_version: 1\nname: far\ninputs: {paths: [a.tif]}\nmodel: m\n"
        "outputs: {dir: o}\nschedule: {cron: '0 0 1 1 *', timezone: UTC}\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "GEOSEG_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "geoseg", "schedule", str(tmp_path)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "scheduler started" in line:
                break
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(lines) + rest
    assert proc.returncode == 0, text
    assert "far: scheduled '0 0 1 1 *' (UTC)" in text
    assert "shutting down" in text and "scheduler stopped" in text


def test_a_cron_that_never_fires_is_reported_and_the_others_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    never = pipeline("feb30", cron="0 0 30 2 *", tz="UTC")  # valid cron, no such date
    hourly = pipeline("hourly", cron="0 * * * *", tz="UTC")
    with caplog.at_level("WARNING", logger="geoseg.pipeline.schedule"):
        sched, clock, launcher = make([never, hourly], datetime(2026, 2, 1, 8, 50, tzinfo=UTC))
    assert "feb30" in sched.skipped and "never fires" in caplog.text
    assert "/pipes/feb30.yml" in caplog.text
    clock.set(datetime(2026, 2, 1, 9, 0, 1, tzinfo=UTC))
    assert [(t.pipeline, t.action) for t in sched.tick()] == [("hourly", "started")]
    with pytest.raises(ConfigError, match="never fires"):
        make([never], datetime(2026, 2, 1, tzinfo=UTC))


#: ``geoseg schedule`` as its command line runs it, on a clock shifted so that the next minute
#: begins 3 s after start: a minutely cron then fires a real run within seconds. Only
#: ``SystemClock.now`` is shifted; the scheduler, its launcher and ``geoseg run`` are the real ones.
SHIFTED_SCHEDULE = """
import sys
from datetime import timedelta
from geoseg.pipeline import schedule

real = schedule.SystemClock.now
start = real(schedule.SystemClock())
into_minute = timedelta(seconds=start.second, microseconds=start.microsecond)
shift = timedelta(minutes=1) - into_minute - timedelta(seconds=3)
if shift < timedelta(0):
    shift += timedelta(minutes=1)
schedule.SystemClock.now = lambda self: real(self) + shift  # type: ignore[method-assign]
from geoseg.cli import main

sys.argv = ["geoseg", "schedule", sys.argv[1]]
main()
"""


def test_cli_schedule_fires_a_real_run_then_stops_cleanly(tmp_path: Path) -> None:
    from geoseg.pipeline import Ledger
    from tests.pipeline_support import make_model, make_scene, write_pipeline

    (tmp_path / "scenes").mkdir()
    make_scene(tmp_path / "scenes" / "m0.tif", 0, 0, 96)
    make_model(tmp_path / "model")
    write_pipeline(tmp_path / "minutely.yml", schedule={"cron": "* * * * *", "timezone": "UTC"})
    env = {**os.environ, "PYTHONPATH": str(REPO), "GEOSEG_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen(
        [sys.executable, "-c", SHIFTED_SCHEDULE, str(tmp_path / "minutely.yml")],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(240, proc.kill)  # a hung scheduler fails the test, never hangs it
    watchdog.start()
    try:
        assert proc.stderr is not None
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "run finished with exit code" in line:
                break
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=60)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
    text = "".join(lines) + rest
    assert proc.returncode == 0, text
    assert "tiny: run finished with exit code 0" in text, text
    assert "scheduler stopped" in text
    assert (tmp_path / "out" / "m0" / "m0.mask.tif").is_file()
    with Ledger(tmp_path / "state" / "ledger.sqlite") as ledger:
        runs = ledger.runs("tiny")
    assert [(r.status, r.n_done) for r in runs] == [("done", 1)]
