"""200 seeded corruptions of valid tiled and striped GeoTIFFs through ``geoseg predict``
(``tests/fuzz_geotiff.py``): each exits 0 with the source's georeferencing, or exits 2 with one
line; never a traceback, a hang or a crash, and nothing half-written is left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from tests.pipeline_support import REPO

VARIANTS = 200


def test_corrupt_geotiffs_exit_0_or_2_with_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fuzz_geotiff", str(tmp_path), "--variants", str(VARIANTS)],
        capture_output=True,
        text=True,
        timeout=300,  # a hang fails here; a crash of GDAL ends the process with a signal
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout)
    assert len(results) == VARIANTS
    problems = []
    for r in results:
        lines = r["output"].strip().splitlines()
        if r["code"] == 0:
            ok = r["georef_ok"] and sorted(r["left"]) == sorted(
                f"{Path(r['variant']).stem}.{o}.tif" for o in ("mask", "probs")
            )
        elif r["code"] == 2:
            ok = (
                len(lines) == 1
                and lines[0].startswith("geoseg: error: ")
                and r["variant"] in lines[0]
                and r["left"] == []
            )
        else:
            ok = False
        if not ok:
            problems.append(r)
    assert not problems, json.dumps(problems[:5], indent=1)
    # the corruptions reached both outcomes in every kind that can have both
    outcomes = Counter((r["kind"], r["code"]) for r in results)
    assert all(outcomes[(kind, 2)] > 0 for kind in ("truncate", "data", "ifd", "header"))
    assert outcomes[("data", 0)] > 0  # random bytes in raw pixel data are just other pixels
