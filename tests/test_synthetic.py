"""The seeded synthetic scene generator that benchmarks and tests use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

from geoseg.synthetic import BUILDING, ROAD, main, write_scene


def test_scene_is_seeded_window_independent_and_labelled(tmp_path: Path) -> None:
    a = write_scene(tmp_path / "a.tif", (700, 333), seed=3, labels=tmp_path / "la.tif", block=256)
    write_scene(tmp_path / "b.tif", (700, 333), seed=3, block=100)
    write_scene(tmp_path / "c.tif", (700, 333), seed=4, block=256)
    with rasterio.open(tmp_path / "a.tif") as ra, rasterio.open(tmp_path / "b.tif") as rb:
        img = ra.read()
        assert img.shape == (3, 333, 700) and img.dtype == np.uint8
        np.testing.assert_array_equal(img, rb.read())  # no seams between written windows
        assert ra.crs.is_projected and ra.crs.to_epsg() // 100 in (326, 327)  # UTM
        assert ra.transform.a == 0.3 and ra.profile["tiled"]
    with rasterio.open(tmp_path / "c.tif") as rc:
        assert (rc.read() != img).mean() > 0.5  # another seed, another scene
    with rasterio.open(tmp_path / "la.tif") as rl:
        labels = rl.read(1)
    win = Window(123, 45, 300, 200)
    np.testing.assert_array_equal(a.labels(win), labels[45:245, 123:423])
    np.testing.assert_array_equal(a.image(win), img[:, 45:245, 123:423])
    assert (labels == BUILDING).mean() > 0.02 and (labels == ROAD).mean() > 0.01
    # roofs and asphalt differ from the ground: the labels are learnable from the image
    red = img[0].astype(float)
    assert red[labels == BUILDING].mean() > red[labels == 0].mean() + 40


def test_command_line_writes_the_scene(tmp_path: Path) -> None:
    main([str(tmp_path / "s.tif"), "--size", "96", "--seed", "1"])
    with rasterio.open(tmp_path / "s.tif") as src:
        assert (src.width, src.height, src.count) == (96, 96, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.tif"]  # no temporary files left
