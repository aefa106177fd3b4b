"""How fast geoseg answers when it has nothing heavy to do.

Runs the demo pipeline once (into a temporary directory, with its own ledger), then times the
commands a user runs most often, each ``--repeat`` times (median wall time, highest peak RSS):

- ``geoseg --help``;
- ``geoseg runs`` (the ledger's history);
- ``geoseg run --dry-run`` (what would run, and why);
- ``geoseg run`` with every scene up to date (skips only).

Each should take under 1.5 s and 200 MiB: none of them imports torch, smp, Dask or rasterio.
The first run, which loads the model and starts a cluster, is printed for comparison.

    python benchmarks/bench_startup.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import yaml
from _common import ROOT, machine, run_measured

BUDGET_S, BUDGET_MIB = 1.5, 200.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    geoseg = [sys.executable, "-m", "geoseg"]
    with tempfile.TemporaryDirectory() as tmp:
        job = yaml.safe_load((ROOT / "pipelines" / "demo.yml").read_text())
        job["inputs"]["paths"] = [str(ROOT / "data_samples" / "banepa_rgb.tif")]
        job["model"] = str(ROOT / "data_samples" / "model")
        job["outputs"]["dir"] = str(Path(tmp) / "out")
        job["ledger"] = str(Path(tmp) / "ledger.sqlite")
        pipeline = Path(tmp) / "demo.yml"
        pipeline.write_text(yaml.safe_dump(job))
        first = run_measured([*geoseg, "run", str(pipeline)])
        commands = {
            "geoseg --help": [*geoseg, "--help"],
            "geoseg runs": [*geoseg, "runs", "--ledger", job["ledger"]],
            "geoseg run --dry-run": [*geoseg, "run", str(pipeline), "--dry-run"],
            "geoseg run (all skipped)": [*geoseg, "run", str(pipeline)],
        }
        print(f"machine: {machine()}; python {platform.python_version()}")
        print(
            f"{'command':<28} {'wall s':>7} {'peak MiB':>9}  within {BUDGET_S} s, {BUDGET_MIB} MiB"
        )
        print(f"{'geoseg run (first: 1 scene)':<28} {first[0]:>7.2f} {first[1]:>9.0f}")
        for name, cmd in commands.items():
            runs = [run_measured(cmd) for _ in range(args.repeat)]
            wall = statistics.median(w for w, _ in runs)
            peak = max(m for _, m in runs)
            ok = "yes" if wall < BUDGET_S and peak < BUDGET_MIB else "NO"
            print(f"{name:<28} {wall:>7.2f} {peak:>9.0f}  {ok}")


if __name__ == "__main__":
    main()
