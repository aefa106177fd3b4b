"""Touching buildings: a model's building_contact pixels split them, or are merged on request."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyogrio
import rasterio
from click.testing import CliRunner

from geoseg.cli import cli
from geoseg.vectorize import VectorizeOptions, vectorize_prediction
from tests.conftest import write_tif
from tests.vectorize_helpers import TILED, UTM, UTM_TRANSFORM

CLASSES = ["background", "building", "road", "building_contact"]


def _row_of_houses(tmp: Path, chunked: bool = False) -> Path:
    """Three 20 px deep buildings in a row sharing walls (2 px of contact), one detached.
    With 64 px chunks, seams at y = 64 cut the row, x = 64 runs inside a wall, x = 128 cuts the
    detached building."""
    ids = np.zeros((128, 160), np.uint8)
    ids[50:70, 30:98] = 1
    ids[50:70, 46:48] = 3
    ids[50:70, 63:65] = 3
    ids[90:106, 120:140] = 1
    probs = np.zeros((4, *ids.shape), np.uint8)
    for k in range(4):
        probs[k][ids == k] = 230
    tags = {
        "GEOSEG_CLASSES": json.dumps(CLASSES),
        "GEOSEG_MODEL": "m@0123456789ab",
        "GEOSEG_SCENE": "houses.tif",
    }
    mask = tmp / "houses.mask.tif"
    write_tif(mask, ids[None], crs=UTM, transform=UTM_TRANSFORM, nodata=255, tags=tags, **TILED)
    return write_tif(
        tmp / "houses.probs.tif", probs, crs=UTM, transform=UTM_TRANSFORM, tags=tags, **TILED
    )


def _count(tmp: Path, **opts: object) -> int:
    outs = vectorize_prediction(
        _row_of_houses(tmp), tmp / "out", VectorizeOptions(layers={"building": "polygons"}, **opts)
    )
    path = outs.layers["buildings"].paths["geojson"]
    return len(pyogrio.read_dataframe(path))


def test_contact_pixels_split_touching_buildings(tmp_path: Path) -> None:
    assert _count(tmp_path, min_area_m2=0) == 4
    assert _count(tmp_path, min_area_m2=0, split_touching=False) == 2


def test_split_is_the_same_across_chunk_seams(tmp_path: Path) -> None:
    """64 px chunks: every building crosses a seam, and one seam runs inside a shared wall."""
    with rasterio.open(_row_of_houses(tmp_path).with_name("houses.mask.tif")) as src:
        ids = src.read(1)
    building, wall = ids == 1, ids == 3
    assert (building[63] & building[64]).any() and (building[:, 127] & building[:, 128]).any()
    assert (wall[:, 63] & wall[:, 64]).any()
    assert _count(tmp_path, min_area_m2=0, chunk=64) == 4
    assert _count(tmp_path, min_area_m2=0, chunk=64, split_touching=False) == 2


def test_cli_merge_touching(tmp_path: Path) -> None:
    probs = _row_of_houses(tmp_path)
    args = ["vectorize", str(probs), "--out", str(tmp_path / "o"), "--min-area", "0"]
    res = CliRunner().invoke(cli, [*args, "--merge-touching"])
    assert res.exit_code == 0, res.output
    assert "buildings: 2 features" in res.output
    res = CliRunner().invoke(cli, args)
    assert "buildings: 4 features" in res.output


def test_contact_threshold_cuts_walls_where_building_still_wins(tmp_path: Path) -> None:
    """Walls where building is likeliest (0.55) but contact is likely (0.35) split only when the
    threshold is at most 0.35 (the default, 0.4, leaves them)."""
    ids = np.zeros((40, 60), np.uint8)
    ids[10:30, 10:50] = 1
    probs = np.zeros((4, *ids.shape), np.uint8)
    probs[0][ids == 0] = 230
    probs[1][ids == 1] = 230
    probs[1, 10:30, 29:31] = 140
    probs[3, 10:30, 29:31] = 89
    tags = {
        "GEOSEG_CLASSES": json.dumps(CLASSES),
        "GEOSEG_MODEL": "m@0123456789ab",
        "GEOSEG_SCENE": "w.tif",
    }
    mask = tmp_path / "w.mask.tif"
    write_tif(mask, ids[None], crs=UTM, transform=UTM_TRANSFORM, nodata=255, tags=tags, **TILED)
    path = write_tif(
        tmp_path / "w.probs.tif", probs, crs=UTM, transform=UTM_TRANSFORM, tags=tags, **TILED
    )

    def count(**opts: object) -> int:
        o = VectorizeOptions(layers={"building": "polygons"}, min_area_m2=0, **opts)
        outs = vectorize_prediction(path, tmp_path / "o", o)
        return len(pyogrio.read_dataframe(outs.layers["buildings"].paths["geojson"]))

    assert count() == 1
    assert count(contact_threshold=0.3) == 2
    assert count(contact_threshold=0.3, split_touching=False) == 1
