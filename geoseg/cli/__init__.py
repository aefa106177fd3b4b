"""The ``geoseg`` command line: a click group with one module per subcommand."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
import threading
import warnings
from types import FrameType
from typing import Any

import click

from geoseg import __version__
from geoseg.errors import GeosegError
from geoseg.io.remote import redact_text
from geoseg.runtime import tune_allocator

__all__ = ["cli", "main"]

# Dask reads this when distributed is first imported; its INFO chatter is not for users.
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
# Before numpy, torch or any thread starts: glibc fixes its arena limit at the first new arena.
tune_allocator()


class UserFacingError(click.ClickException):
    """A :class:`GeosegError` shown as one line on stderr, with exit code 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"geoseg: error: {redact_text(self.format_message())}", err=True)


class GeosegGroup(click.Group):
    """Turns library errors into clean messages instead of tracebacks."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except GeosegError as exc:
            raise UserFacingError(str(exc)) from exc
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (see main): outputs in progress removed
            click.echo("geoseg: interrupted", err=True)
            ctx.exit(130)


_INTERRUPTED = threading.Event()


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    """The first Ctrl-C or SIGTERM stops the command cleanly (temporary outputs removed, the
    cluster closed); a second one while that clean-up runs ends the process at once, quietly:
    what a killed run leaves is swept by the next run into the same folder."""
    if _INTERRUPTED.is_set():
        os.write(2, b"geoseg: interrupted again: stopped at once\n")
        os._exit(130)
    _INTERRUPTED.set()
    raise KeyboardInterrupt(f"signal {signum}")


class PlainFormatter(logging.Formatter):
    """Log lines as a user reads them: the message alone, with ``geoseg: warning:`` or
    ``geoseg: error:`` in front of problems. ``-v`` shows times, levels and modules instead."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= logging.ERROR:
            return f"geoseg: error: {message}"
        if record.levelno >= logging.WARNING:
            return f"geoseg: warning: {message}"
        return message


#: GDAL's warnings on each failed or retried HTTP request: debug detail (a request that
#: still fails after its retries is an error of the command, shown in one line).
HTTP_NOISE = ("Retrying again in", "HTTP response code on", "HTTP error code")


class RedactFilter(logging.Filter):
    """Every log line with the URLs in it redacted (:func:`geoseg.io.remote.redact_text`): a
    pre-signed URL or an API token in a scene's name, or in a library's message about a
    request (urllib3's retries), never reaches the terminal or a log file."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        shown = redact_text(message)
        if shown != message:
            record.msg, record.args = shown, None
        return True


def _drop_http_retries(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return record.levelno < logging.WARNING or not any(n in message for n in HTTP_NOISE)


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    click.echo(f"geoseg: warning: {redact_text(str(message))}", err=True)


@click.group(cls=GeosegGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="geoseg")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors.")
def cli(verbose: int, quiet: bool) -> None:
    """Find roads and buildings in GeoTIFF scenes of any size."""
    level = (
        logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    )
    if not quiet and verbose == 0:
        level = logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactFilter())
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        if verbose
        else PlainFormatter()
    )
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for noisy in ("distributed", "rasterio", "fiona", "pyogrio", "timm", "tornado", "botocore"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    for name in ("rasterio", "rasterio._env", "rasterio._err"):
        logging.getLogger(name).addFilter(_drop_http_retries)
    # A failed chunk task is raised again, as one line, by the command that waits for it;
    # the worker's own "Compute Failed" report of it (a dozen lines) is debug detail.
    logging.getLogger("distributed.worker").setLevel(
        logging.DEBUG if verbose >= 2 else logging.CRITICAL
    )
    warnings.showwarning = _show_warning


def _register() -> None:
    from geoseg.cli import changes as changes_cli
    from geoseg.cli import evaluate as evaluate_cli
    from geoseg.cli import model, predict
    from geoseg.cli import train as train_cli

    cli.add_command(predict.predict)
    cli.add_command(model.model)
    from geoseg.cli import vectorize

    cli.add_command(vectorize.vectorize)
    from geoseg.cli import run, runs, schedule

    cli.add_command(run.run)
    cli.add_command(runs.runs)
    cli.add_command(schedule.schedule)
    cli.add_command(train_cli.train)
    cli.add_command(evaluate_cli.evaluate)
    cli.add_command(changes_cli.changes)


_register()


def main() -> None:
    """Console-script entry point. SIGTERM (``kill``, a batch system's time limit) stops a
    command as Ctrl-C does, so every temporary output is removed on the way out; a second
    signal during that stops the process at once."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)
    try:
        cli.main(prog_name="geoseg")
    except SystemExit as exc:
        _exit(exc.code)


def _exit(code: str | int | None) -> None:
    """End the process once the command is done, without the interpreter's teardown.

    After ``import torch`` the teardown (freeing every module, then the C++ static destructors
    of torch's libraries, which page their code back in) takes about 2 s and raises peak RSS by
    about 125 MiB, at a moment when all the work is written and committed. The exit handlers
    registered with :mod:`atexit` (multiprocessing's, distributed's) and logging's flush still
    run. If a thread that is not a daemon is still alive, the interpreter's normal exit waits
    for it instead.
    """
    if any(t is not threading.main_thread() and not t.daemon for t in threading.enumerate()):
        sys.exit(code)
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"): Python prints it and exits with 1
        print(code, file=sys.stderr)
        status = 1
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed, or a broken pipe
            stream.flush()
    os._exit(status)
