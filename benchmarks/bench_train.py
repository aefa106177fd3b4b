"""Training throughput: chips per second of `geoseg train` (read, normalize, augment, step).

Runs the given training config for a few epochs into a scratch directory and prints the
per-epoch rate that the training loop measures (validation excluded), for each thread count.

    python benchmarks/bench_train.py data_samples/train.yml --epochs 2 --threads 1 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from geoseg.train.config import load_config, parse_config
from geoseg.train.loop import EpochReport, train


def run(config: Path, epochs: int, threads: int, device: str) -> list[EpochReport]:
    """Train ``epochs`` epochs of ``config`` in a scratch directory; return the epoch reports."""
    cfg = load_config(config)
    with tempfile.TemporaryDirectory(prefix="geoseg-bench-train-") as tmp:
        raw = cfg.model_dump(mode="json", by_alias=True)
        raw["optim"].update(epochs=epochs, threads=threads, device=device)
        raw["out"] = str(Path(tmp) / "model")
        raw["checkpoint"] = str(Path(tmp) / "ckpt")
        reports: list[EpochReport] = []
        train(parse_config(raw, str(config)), on_epoch=reports.append)
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    cfg = load_config(args.config)
    size = cfg.chips.size
    print(
        f"config {args.config}: {cfg.model.arch}/{cfg.model.encoder}, chips {size}² px, "
        f"batch {cfg.optim.batch_size}, device {args.device}"
    )
    for threads in args.threads:
        t0 = time.perf_counter()
        reports = run(args.config, args.epochs, threads, args.device)
        wall = time.perf_counter() - t0
        rates = [r.chips_per_s for r in reports]
        mp = statistics.median(rates) * size * size / 1e6
        print(
            f"threads {threads}: chips/s per epoch {', '.join(f'{r:.2f}' for r in rates)} "
            f"(median {statistics.median(rates):.2f} chips/s = {mp:.2f} MP/s); "
            f"total wall {wall:.0f} s incl. setup and validation"
        )


if __name__ == "__main__":
    main()
