"""Training throughput: chips per second of `geoseg train`, the older path and the new one.

"before" reads every chip from its file (resampled read, label burn), makes each batch in line
with the training step, and runs the model in fp32 with contiguous tensors; "after" is the
default: scenes decoded once into the chip cache, batches prepared by a background thread,
channels_last, and bf16 autocast on CPUs with native bf16 (fp32 elsewhere). Each runs the
given config for a few epochs in its own scratch directory; the rate is the one the training
loop measures per epoch (validation excluded), the wall time includes set-up (the cache is
built there) and validation.

    python benchmarks/bench_train.py data_samples/train.yml --epochs 2 --chips 64
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from geoseg.train.config import load_config, parse_config
from geoseg.train.loop import EpochReport, Speedups, train

PATHS = {
    "before": (Speedups(cache=False, prefetch=0, channels_last=False), "fp32"),
    "after": (Speedups(), "auto"),
}


def run(
    config: Path, name: str, epochs: int, chips: int | None, threads: int | None, device: str
) -> tuple[list[EpochReport], float]:
    """Train ``epochs`` epochs of ``config`` the ``name`` way in a scratch directory; return
    the epoch reports and the wall time (s)."""
    speed, precision = PATHS[name]
    cfg = load_config(config)
    with tempfile.TemporaryDirectory(prefix="geoseg-bench-train-") as tmp:
        raw = cfg.model_dump(mode="json", by_alias=True)
        raw["optim"].update(epochs=epochs, threads=threads, device=device, precision=precision)
        if chips:
            raw["chips"]["chips_per_epoch"] = chips
        raw["out"] = str(Path(tmp) / "model")
        raw["checkpoint"] = str(Path(tmp) / "ckpt")
        raw["snapshot"] = None
        reports: list[EpochReport] = []
        t0 = time.perf_counter()
        train(parse_config(raw, str(config)), on_epoch=reports.append, speed=speed)
        return reports, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--chips", type=int, default=64, help="chips.chips_per_epoch override")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default all)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    cfg = load_config(args.config)
    size = cfg.chips.size
    print(
        f"config {args.config}: {cfg.model.arch}/{cfg.model.encoder}, chips {size}² px, "
        f"batch {cfg.optim.batch_size}, {args.chips} chips per epoch, {args.epochs} epochs, "
        f"device {args.device}"
    )
    medians = {}
    for name in PATHS:
        reports, wall = run(args.config, name, args.epochs, args.chips, args.threads, args.device)
        rates = [r.chips_per_s for r in reports]
        medians[name] = statistics.median(rates)
        mp = medians[name] * size * size / 1e6
        print(
            f"{name:>6}: chips/s per epoch {', '.join(f'{r:.2f}' for r in rates)} "
            f"(median {medians[name]:.2f} chips/s = {mp:.3f} MP/s); "
            f"wall {wall:.0f} s incl. set-up and validation"
        )
    print(f"after / before: {medians['after'] / medians['before']:.2f}x chips/s")


if __name__ == "__main__":
    main()
