"""Options shared by several subcommands."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

#: ``-o/--out DIR``, shared by every command that writes outputs.
out_dir_option = click.option(
    "-o",
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Output directory.",
)


#: ``--resample/--no-resample``, for the commands that run a model on scenes.
resample_option = click.option(
    "--resample/--no-resample",
    default=True,
    show_default=True,
    help="Read each chunk at the model's ground sample distance when the scene's differs from "
    "it by more than 5 % on an axis, and bring the probabilities back onto the scene's grid.",
)


#: ``--tta``, for the commands that run a model on scenes (modes:
#: :data:`geoseg.models.backends.TTA`, not imported here: the CLI starts without torch).
tta_option = click.option(
    "--tta",
    type=click.Choice(["none", "flips", "d4"]),
    default="none",
    show_default=True,
    help="Test-time augmentation: average each chunk's class probabilities over its flips "
    "(flips: 4 forward passes) or its flips and quarter turns (d4: 8 passes). Costs that many "
    "times the model's time; tiles stay seamless.",
)


def _input_filter(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from geoseg.errors import ConfigError
    from geoseg.models.input_filter import parse_input_filter

    try:
        return parse_input_filter(value)
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from exc


#: ``--input-filter``, for the commands that run a model on scenes.
input_filter_option = click.option(
    "--input-filter",
    default="model",
    show_default=True,
    metavar="model|off|METRES",
    callback=_input_filter,
    help="The blur in front of the network. model: the model's own (input_low_pass_m in "
    "model.json; the demo model's is 0.6 m); off: the imagery as it is (sharp imagery like the "
    "town a model learned can score better); METRES: blur every input to that effective "
    "ground resolution (coarser than the model's; the halo grows to its reach).",
)


#: ``--backend``, for the commands that run a model on scenes (values:
#: :data:`geoseg.models.backends.BACKENDS`, not imported here: the CLI starts without torch).
backend_option = click.option(
    "--backend",
    type=click.Choice(["auto", "torch", "openvino"]),
    default="auto",
    show_default=True,
    help="Inference backend. auto: OpenVINO on a CPU when it is installed "
    "(pip install 'geoseg[openvino]'; 2-3x faster there), else torch (always on a GPU). The "
    "network is converted once per machine and cached in $GEOSEG_CACHE or ~/.cache/geoseg.",
)


def compute_options(f: F) -> F:
    """Chunk, halo, batch, device, precision, threads, workers and scheduler options."""
    opts = [
        click.option(
            "--chunk",
            type=click.IntRange(min=32),
            default=None,
            help="Chunk core size in model pixels (default: the model's recommendation).",
        ),
        click.option(
            "--halo",
            type=click.IntRange(min=0),
            default=None,
            help="Halo around each chunk in model pixels (default: the model's).",
        ),
        click.option(
            "--batch-size",
            type=click.IntRange(min=1),
            default=1,
            show_default=True,
            help="Chunks per forward pass.",
        ),
        click.option(
            "--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."
        ),
        click.option(
            "--precision",
            type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
            default="auto",
            show_default=True,
            help="auto picks bf16/fp16 autocast where the device runs it fast.",
        ),
        click.option(
            "--threads",
            type=click.IntRange(min=1),
            default=None,
            help="Torch threads per worker (default on CPU: cores / workers).",
        ),
        click.option(
            "--workers",
            type=click.IntRange(min=1),
            default=None,
            help="Local worker threads running chunks (default: 1 on a CPU, half the cores on "
            "CUDA; 2 on a CPU is faster and takes more memory).",
        ),
        click.option(
            "--scheduler",
            default=None,
            metavar="ADDRESS",
            help="Dask scheduler address (tcp://host:8786); default: local.",
        ),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def plural(noun: str) -> str:
    """English plural of a unit name: chunk → chunks, batch → batches."""
    return noun + ("es" if noun.endswith(("s", "sh", "ch", "x", "z")) else "s")


class Progress:
    """A tqdm bar on a terminal; a log line per quarter elsewhere."""

    def __init__(self, desc: str, log: Callable[[str], None], unit: str = "chunk") -> None:
        self.desc = desc
        self.log = log
        self.unit = unit
        self.bar: Any = None
        self.last_quarter = -1

    def __call__(self, done: int, total: int) -> None:
        if sys.stderr.isatty():
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=self.desc, unit=self.unit, leave=False)
            self.bar.update(done - self.bar.n)
            return
        quarter = 4 * done // max(total, 1)
        if quarter != self.last_quarter:
            self.last_quarter = quarter
            self.log(f"{self.desc}: {done}/{total} {plural(self.unit)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
