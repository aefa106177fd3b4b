"""``geoseg train``: train a U-Net bundle from scenes and labels described in a YAML config."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import click

from geoseg.cli.options import Progress

log = logging.getLogger("geoseg.cli")


def _fmt(value: float) -> str:
    return "  -  " if math.isnan(value) else f"{value:.3f}"


@click.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Override optim.epochs.")
@click.option("--device", default=None, help="Override optim.device (auto, cpu, cuda, cuda:N).")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="Override optim.threads (torch CPU threads).",
)
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16"]),
    default=None,
    help="Override optim.precision (auto: bf16 autocast where the device has native bf16).",
)
@click.option(
    "--out",
    "out",
    type=click.Path(path_type=Path),
    default=None,
    help="Override the output bundle directory.",
)
@click.option(
    "--restart",
    is_flag=True,
    help="Ignore and replace an existing checkpoint instead of resuming from it.",
)
def train(
    config: Path,
    epochs: int | None,
    device: str | None,
    threads: int | None,
    precision: str | None,
    out: Path | None,
    restart: bool,
) -> None:
    """Train a model from CONFIG (YAML); keeps the best epoch as a bundle, resumes if stopped.

    SIGTERM or Ctrl-C finishes the batch in progress, saves a checkpoint and exits 130; the
    same command resumes.
    """
    from geoseg.train.config import load_config, parse_config
    from geoseg.train.loop import EpochReport, TrainingStopped
    from geoseg.train.loop import train as run

    cfg = load_config(config)
    optim: dict[str, Any] = {}
    if epochs is not None:
        optim["epochs"] = epochs
    if device is not None:
        optim["device"] = device
    if threads is not None:
        optim["threads"] = threads
    if precision is not None:
        optim["precision"] = precision
    if optim or out is not None:
        raw = cfg.model_dump(mode="json", by_alias=True)
        raw["optim"].update(optim)
        if out is not None:
            raw["out"] = str(out)
            raw["checkpoint"] = raw["checkpoint"] if cfg.checkpoint else None
        cfg = parse_config(raw, str(config))

    bars: dict[int, Progress] = {}

    def progress(epoch: int, done: int, total: int) -> None:
        bar = bars.get(epoch)
        if bar is None:
            for old in bars.values():
                old.close()
            bar = bars[epoch] = Progress(
                f"epoch {epoch + 1}/{cfg.optim.epochs}", log.info, unit="batch"
            )
        bar(done, total)

    def on_epoch(r: EpochReport) -> None:
        if r.epoch in bars:
            bars[r.epoch].close()
        ious = " ".join(f"{k}={_fmt(v)}" for k, v in r.val_iou.items())
        click.echo(
            f"epoch {r.epoch + 1:>3}/{r.epochs}  loss {r.train_loss:.4f}  "
            f"val loss {r.val_loss:.4f}  IoU {ious}  score {r.score:.3f}"
            f"{'  *best' if r.best else ''}  ({r.chips_per_s:.2f} chips/s)"
        )
        if len(r.val_iou_by_scene) > 1:
            for scene, values in r.val_iou_by_scene.items():
                shown = " ".join(f"{k}={_fmt(v)}" for k, v in values.items() if k != "background")
                log.info("  %s: IoU %s", scene, shown)

    try:
        result = run(cfg, restart=restart, progress=progress, on_epoch=on_epoch)
    except TrainingStopped as exc:
        for bar in bars.values():
            bar.close()
        log.warning("%s", exc)
        raise SystemExit(exc.exit_code) from None
    click.echo(
        f"best epoch {result.best_epoch + 1} (mean foreground IoU {result.best_score:.3f}); "
        f"{result.train_chips} train chips per epoch / {result.val_chips} val chips; "
        f"wrote {result.bundle.path} ({result.bundle.ident})"
    )
    avg = result.averaged
    if avg is not None:
        ious = " ".join(f"{k}={_fmt(v)}" for k, v in avg.val_iou.items())
        click.echo(
            f"mean of epochs {avg.first}-{avg.last}: IoU {ious}  score {avg.score:.3f} "
            f"({'above' if avg.score > result.best_score else 'not above'} the best epoch's); "
            f"wrote {avg.bundle.path} ({avg.bundle.ident})"
        )
        for scene, values in avg.val_iou_by_scene.items():
            shown = " ".join(f"{k}={_fmt(v)}" for k, v in values.items() if k != "background")
            log.info("  %s: IoU %s", scene, shown)
