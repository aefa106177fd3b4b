"""The run ledger: an embedded SQLite database of every pipeline run and every scene in it.

Every change is one short transaction, so a crash, SIGKILL or full disk leaves the database
as it was before that change, never half-updated. Rows of runs that died without closing
are marked ``interrupted`` by the next run of the same pipeline.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geoseg.errors import OutputError

__all__ = ["Ledger", "RunRow", "SceneRow", "default_home", "default_ledger_path"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    pipeline TEXT NOT NULL,
    source TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    model_hash TEXT NOT NULL,
    model TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    compute TEXT NOT NULL,
    forced INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL,
    started REAL NOT NULL,
    finished REAL,
    n_done INTEGER NOT NULL DEFAULT 0,
    n_skipped INTEGER NOT NULL DEFAULT 0,
    n_failed INTEGER NOT NULL DEFAULT 0,
    message TEXT
);
CREATE TABLE IF NOT EXISTS scenes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    pipeline TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER,
    mtime_ns INTEGER,
    config_hash TEXT NOT NULL,
    model_hash TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    started REAL NOT NULL,
    finished REAL,
    seconds REAL,
    outputs TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS scenes_lookup ON scenes(pipeline, path, status);
CREATE INDEX IF NOT EXISTS scenes_run ON scenes(run_id);
"""


def default_home() -> Path:
    """geoseg's state folder: $GEOSEG_HOME, else $XDG_STATE_HOME/geoseg, else ~/.local/state."""
    if os.environ.get("GEOSEG_HOME"):
        return Path(os.environ["GEOSEG_HOME"])
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "geoseg"


def default_ledger_path() -> Path:
    """Where the ledger lives unless a pipeline or ``--ledger`` names another file."""
    return default_home() / "ledger.sqlite"


@dataclass(frozen=True)
class RunRow:
    """One run of a pipeline; times are Unix seconds."""

    id: int
    pipeline: str
    source: str
    config_hash: str
    model_hash: str
    model: str
    host: str
    pid: int
    compute: str
    forced: bool
    status: str
    started: float
    finished: float | None
    n_done: int
    n_skipped: int
    n_failed: int
    message: str | None


@dataclass(frozen=True)
class SceneRow:
    """One scene within a run: its identity (size in bytes, mtime in ns), result and timing."""

    id: int
    run_id: int
    pipeline: str
    path: str
    size: int | None
    mtime_ns: int | None
    config_hash: str
    model_hash: str
    status: str
    reason: str | None
    started: float
    finished: float | None
    seconds: float | None
    outputs: dict[str, Any]
    error: str | None


class Ledger:
    """The SQLite run ledger at ``path``; every method is one transaction."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        if self.path.is_file() and self.path.stat().st_size == 0:
            raise OutputError(
                f"{self.path}: the run ledger is an empty file (0 bytes): its history is gone, "
                "and using it as new would hide that; move it away to start a new ledger"
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                self.path, timeout=30.0, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise OutputError(f"{self.path}: cannot open the run ledger ({exc})") from exc

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        try:
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise OutputError(f"{self.path}: run ledger update failed ({exc})") from exc

    # runs --------------------------------------------------------------------------------
    def start_run(
        self,
        pipeline: str,
        source: str,
        config_hash: str,
        model_hash: str,
        model: str,
        compute: str,
        forced: bool,
        started: float | None = None,
    ) -> int:
        """Record a new run as ``running``; returns its id. ``started``: when the command began
        (``time.time()``; default now), so that the recorded duration is the one users wait."""
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO runs (pipeline, source, config_hash, model_hash, model, host, pid,"
                " compute, forced, status, started) VALUES (?,?,?,?,?,?,?,?,?,'running',?)",
                (
                    pipeline,
                    source,
                    config_hash,
                    model_hash,
                    model,
                    socket.gethostname(),
                    os.getpid(),
                    compute,
                    int(forced),
                    time.time() if started is None else started,
                ),
            )
            assert cur.lastrowid is not None
            return int(cur.lastrowid)

    def finish_run(self, run_id: int, status: str, message: str | None = None) -> None:
        """Close a run with its final status and the counts of its scene rows."""
        with self._tx() as db:
            _close_run(db, run_id, status, message, time.time())

    def mark_interrupted(self, pipeline: str) -> int:
        """Close the rows of earlier runs of ``pipeline`` that died while running; returns how many.

        Only call this while holding the pipeline's lock: then no such run can be alive.
        """
        with self._tx() as db:
            ids = [
                r[0]
                for r in db.execute(
                    "SELECT id FROM runs WHERE pipeline=? AND status='running'", (pipeline,)
                )
            ]
            for rid in ids:
                # When it died is unknown: its last recorded event stands for the end.
                (last,) = db.execute(
                    "SELECT MAX(COALESCE(s.finished, s.started, r.started)) FROM runs r"
                    " LEFT JOIN scenes s ON s.run_id = r.id WHERE r.id=?",
                    (rid,),
                ).fetchone()
                db.execute(
                    "UPDATE scenes SET status='interrupted', error='the run was killed',"
                    " finished=? WHERE run_id=? AND status='running'",
                    (last, rid),
                )
                _close_run(
                    db, rid, "interrupted", "the process ended without closing the run", last
                )
            return len(ids)

    def interrupt_run(self, run_id: int, message: str) -> None:
        """Close run ``run_id`` and its unfinished scenes as ``interrupted``."""
        with self._tx() as db:
            db.execute(
                "UPDATE scenes SET status='interrupted', error=?, finished=? WHERE run_id=?"
                " AND status='running'",
                (message, time.time(), run_id),
            )
        self.finish_run(run_id, "interrupted", message)

    def runs(self, pipeline: str | None = None, limit: int = 20) -> list[RunRow]:
        """The latest runs, newest first."""
        sql = "SELECT * FROM runs"
        args: tuple[Any, ...] = ()
        if pipeline:
            sql += " WHERE pipeline=?"
            args = (pipeline,)
        sql += " ORDER BY id DESC LIMIT ?"
        return [self._run(r) for r in self._query(sql, (*args, limit))]

    def run(self, run_id: int) -> RunRow | None:
        rows = self._query("SELECT * FROM runs WHERE id=?", (run_id,))
        return self._run(rows[0]) if rows else None

    def last_started(self, pipeline: str) -> float | None:
        """Start time (Unix s) of the newest run of ``pipeline``, if any."""
        rows = self._query("SELECT MAX(started) FROM runs WHERE pipeline=?", (pipeline,))
        return rows[0][0] if rows and rows[0][0] is not None else None

    # scenes ------------------------------------------------------------------------------
    def start_scene(
        self,
        run_id: int,
        pipeline: str,
        path: str,
        size: int | None,
        mtime_ns: int | None,
        config_hash: str,
        model_hash: str,
        reason: str,
    ) -> int:
        """Record that a scene is being processed; returns the row id."""
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO scenes (run_id, pipeline, path, size, mtime_ns, config_hash,"
                " model_hash, status, reason, started) VALUES (?,?,?,?,?,?,?,'running',?,?)",
                (
                    run_id,
                    pipeline,
                    path,
                    size,
                    mtime_ns,
                    config_hash,
                    model_hash,
                    reason,
                    time.time(),
                ),
            )
            assert cur.lastrowid is not None
            return int(cur.lastrowid)

    def finish_scene(
        self,
        row_id: int,
        status: str,
        outputs: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> None:
        """Close a scene row as ``done``, ``failed`` or ``interrupted``."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "UPDATE scenes SET status=?, finished=?, seconds=? - started, outputs=?, error=?"
                " WHERE id=? AND status='running'",
                (status, now, now, json.dumps(outputs or {}, default=str), error, row_id),
            )

    def record_skip(
        self,
        run_id: int,
        pipeline: str,
        path: str,
        size: int | None,
        mtime_ns: int | None,
        config_hash: str,
        model_hash: str,
        reason: str,
    ) -> None:
        """Record a scene this run skipped, and why."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO scenes (run_id, pipeline, path, size, mtime_ns, config_hash,"
                " model_hash, status, reason, started, finished, seconds)"
                " VALUES (?,?,?,?,?,?,?,'skipped',?,?,?,0)",
                (run_id, pipeline, path, size, mtime_ns, config_hash, model_hash, reason, now, now),
            )

    def last_done(self, pipeline: str, path: str) -> SceneRow | None:
        """The newest successful row for ``path`` in ``pipeline``."""
        rows = self._query(
            "SELECT * FROM scenes WHERE pipeline=? AND path=? AND status='done'"
            " ORDER BY id DESC LIMIT 1",
            (pipeline, path),
        )
        return self._scene(rows[0]) if rows else None

    def scenes(self, run_id: int) -> list[SceneRow]:
        return [
            self._scene(r)
            for r in self._query("SELECT * FROM scenes WHERE run_id=? ORDER BY id", (run_id,))
        ]

    def integrity_ok(self) -> bool:
        """True when SQLite's own integrity check passes."""
        return self._query("PRAGMA integrity_check", ())[0][0] == "ok"

    # helpers -----------------------------------------------------------------------------
    def _query(self, sql: str, args: tuple[Any, ...]) -> list[sqlite3.Row]:
        try:
            with self._lock:
                cur = self._db.execute(sql, args)
                cur.row_factory = sqlite3.Row
                return list(cur.fetchall())
        except sqlite3.Error as exc:
            raise OutputError(f"{self.path}: cannot read the run ledger ({exc})") from exc

    @staticmethod
    def _run(r: sqlite3.Row) -> RunRow:
        d = dict(r)
        d["forced"] = bool(d["forced"])
        return RunRow(**d)

    @staticmethod
    def _scene(r: sqlite3.Row) -> SceneRow:
        d = dict(r)
        d["outputs"] = json.loads(d["outputs"]) if d["outputs"] else {}
        return SceneRow(**d)


def _close_run(
    db: sqlite3.Connection, run_id: int, status: str, message: str | None, finished: float
) -> None:
    """Set a run's status, end time and the counts of its scene rows (inside a transaction)."""
    counts = dict(
        db.execute(
            "SELECT status, COUNT(*) FROM scenes WHERE run_id=? GROUP BY status", (run_id,)
        ).fetchall()
    )
    db.execute(
        "UPDATE runs SET status=?, finished=?, n_done=?, n_skipped=?, n_failed=?,"
        " message=? WHERE id=?",
        (
            status,
            finished,
            counts.get("done", 0),
            counts.get("skipped", 0),
            counts.get("failed", 0) + counts.get("interrupted", 0),
            message,
            run_id,
        ),
    )
