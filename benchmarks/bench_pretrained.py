"""ImageNet start against random start: the same training config, the same epochs.

Runs ``geoseg train``'s loop on CONFIG for ``--epochs`` epochs once per encoder start (the
schedule stays the config's, so the first epochs are identical to those of a full run), and
prints the validation IoU per class after each epoch, side by side.

    python benchmarks/bench_pretrained.py data_samples/train.yml --epochs 4 \
        --starts lite0-imagenet random
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any


class _Stop(Exception):
    pass


def run(config: Path, start: str, epochs: int, work: Path) -> list[dict[str, Any]]:
    from geoseg.train.config import load_config, parse_config
    from geoseg.train.loop import EpochReport, train

    cfg = load_config(config)
    raw = cfg.model_dump(mode="json", by_alias=True)
    raw["model"]["encoder_weights"] = None if start == "random" else start
    raw["out"] = str(work / f"model-{start}")
    raw["checkpoint"] = str(work / f"ckpt-{start}")
    cfg = parse_config(raw, str(config))
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()

    def on_epoch(r: EpochReport) -> None:
        rows.append({"epoch": r.epoch + 1, "minutes": (time.perf_counter() - t0) / 60, **r.val_iou})
        print(json.dumps({"start": start, **rows[-1]}), flush=True)
        if len(rows) >= epochs:
            raise _Stop

    with contextlib.suppress(_Stop):
        train(cfg, restart=True, on_epoch=on_epoch)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("config", type=Path)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--starts", nargs="+", default=["lite0-imagenet", "random"])
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for start in args.starts:
            results[start] = run(args.config, start, args.epochs, Path(tmp))
    classes = [k for k in results[args.starts[0]][0] if k not in ("epoch", "minutes")]
    print("epoch  " + "  ".join(f"{s:>28}" for s in args.starts))
    for i in range(args.epochs):
        cells = []
        for s in args.starts:
            r = results[s][i]
            cells.append(" ".join(f"{c}={r[c]:.3f}" for c in classes if c != "background"))
        print(f"{i + 1:>5}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
