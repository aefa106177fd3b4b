"""Corrupt GeoTIFFs against ``geoseg predict``: seeded variants of valid tiled and striped files.

Each variant is one of: a truncation at a random offset; random bytes over a random tile or
strip's data; random bytes over the first IFD's entries; random bytes over the 8-byte header.
Every variant goes through the real command line (``geoseg predict``, in this process, on one
shared Dask scheduler so that 200 of them take seconds, not minutes). What each must give:

- exit 0, with outputs whose georeferencing is the source's; or
- exit 2 and exactly one line, ``geoseg: error: …`` naming the file;

and nothing left in its output directory but complete outputs. Run by ``tests/test_fuzz.py``
in a subprocess with a time limit (a hang or a crash of GDAL fails it); by hand:

    python -m tests.fuzz_geotiff WORKDIR [--variants 240] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

KINDS = ("truncate", "data", "ifd", "header")


@dataclass(frozen=True)
class Layout:
    """Where a TIFF's parts are: its first IFD's entries and its tiles' or strips' data."""

    ifd_start: int
    ifd_end: int
    blocks: list[tuple[int, int]]  # (offset, length)


def layout(data: bytes) -> Layout:
    """Parse a classic (not Big) TIFF's first IFD for its block offsets and byte counts."""
    order = {b"II": "<", b"MM": ">"}[data[:2]]
    (magic,) = struct.unpack(order + "H", data[2:4])
    assert magic == 42, "classic TIFF only"
    (ifd,) = struct.unpack(order + "I", data[4:8])
    (n,) = struct.unpack(order + "H", data[ifd : ifd + 2])
    sizes = {3: 2, 4: 4, 16: 8}
    tags: dict[int, list[int]] = {}
    for i in range(n):
        entry = data[ifd + 2 + 12 * i : ifd + 14 + 12 * i]
        tag, typ, count = struct.unpack(order + "HHI", entry[:8])
        if tag not in (273, 279, 324, 325) or typ not in (3, 4):
            continue
        size = sizes[typ]
        fmt = order + ("H" if typ == 3 else "I") * count
        if size * count <= 4:
            raw = entry[8 : 8 + size * count]
        else:
            (where,) = struct.unpack(order + "I", entry[8:12])
            raw = data[where : where + size * count]
        tags[tag] = list(struct.unpack(fmt, raw))
    offsets = tags.get(324) or tags[273]
    counts = tags.get(325) or tags[279]
    return Layout(ifd + 2, ifd + 2 + 12 * n, list(zip(offsets, counts, strict=True)))


def make_sources(folder: Path) -> list[Path]:
    """Valid 3-band uint8 GeoTIFFs: tiled and striped, compressed and not."""
    import rasterio
    from affine import Affine

    rng = np.random.default_rng(1234)
    base = rng.integers(0, 255, (3, 26, 21)).astype(np.float32)
    img = np.kron(base, np.ones((8, 8), np.float32))[:, :200, :160]  # blocky: compressible
    img = (img + rng.normal(0, 3, img.shape)).clip(0, 255).astype(np.uint8)
    variants: dict[str, dict[str, Any]] = {
        "tiled_deflate": {"tiled": True, "blockxsize": 64, "blockysize": 64, "compress": "deflate"},
        "tiled_raw": {"tiled": True, "blockxsize": 64, "blockysize": 64},
        "striped_lzw": {"blockysize": 16, "compress": "lzw"},
        "striped_raw": {"blockysize": 16},
    }
    paths = []
    for name, options in variants.items():
        path = folder / f"{name}.tif"
        profile = {
            "driver": "GTiff",
            "width": 160,
            "height": 200,
            "count": 3,
            "dtype": "uint8",
            "crs": "EPSG:32633",
            "transform": Affine(0.5, 0, 500_000, 0, -0.5, 4_100_000),
            **options,
        }
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(img)
        paths.append(path)
    return paths


def corrupt(data: bytes, kind: str, rng: np.random.Generator) -> bytes:
    buf = bytearray(data)
    lay = layout(data)
    if kind == "truncate":
        return bytes(buf[: int(rng.integers(0, len(buf)))])
    if kind == "header":
        start, end = 0, 8
    elif kind == "ifd":
        start, end = lay.ifd_start, lay.ifd_end
    else:
        offset, length = lay.blocks[int(rng.integers(len(lay.blocks)))]
        start, end = offset, offset + length
    n = int(rng.integers(1, min(16, end - start) + 1))
    at = int(rng.integers(start, end - n + 1))
    buf[at : at + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    return bytes(buf)


def georef(path: Path) -> tuple[Any, ...]:
    import rasterio

    with rasterio.open(path) as src:
        return (src.crs.to_string() if src.crs else None, tuple(src.transform), src.shape)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--variants", type=int, default=240)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")

    import torch
    from click.testing import CliRunner
    from distributed import Client, LocalCluster

    from geoseg.cli import cli
    from geoseg.models.bundle import ModelSpec, build_module, save_bundle

    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    spec = ModelSpec(encoder="mobilenet_v2", encoder_depth=3, decoder_channels=[8, 8, 8], chunk=64)
    spec = spec.model_copy(update={"halo": 16})
    torch.manual_seed(0)
    model = save_bundle(spec, build_module(spec).state_dict(), work / "model").path
    sources = make_sources(work)
    truth = {p.name: georef(p) for p in sources}
    rng = np.random.default_rng(args.seed)
    results: list[dict[str, Any]] = []
    runner = CliRunner()
    cluster = LocalCluster(
        processes=False,
        n_workers=1,
        threads_per_worker=1,
        dashboard_address=None,
        silence_logs=logging.CRITICAL,  # failed chunk tasks are the point here
    )
    with cluster, Client(cluster) as client:
        address = client.scheduler.address
        for i in range(args.variants):
            source = sources[i % len(sources)]
            kind = KINDS[(i // len(sources)) % len(KINDS)]
            variant = work / f"v{i:03d}_{kind}_{source.name}"
            variant.write_bytes(corrupt(source.read_bytes(), kind, rng))
            out = work / f"out{i:03d}"
            res = runner.invoke(
                cli,
                ["-q", "predict", str(variant), "-m", str(model), "-o", str(out)]
                + ["--device", "cpu", "--scheduler", address],
            )
            left = sorted(p.name for p in out.iterdir()) if out.exists() else []
            row: dict[str, Any] = {
                "variant": variant.name,
                "kind": kind,
                "code": res.exit_code,
                "output": res.output,
                "left": left,
            }
            if res.exception is not None and not isinstance(res.exception, SystemExit):
                row["exception"] = repr(res.exception)
            if res.exit_code == 0:
                stem = variant.stem
                row["georef_ok"] = all(
                    georef(out / f"{stem}.{o}.tif") == truth[source.name] for o in ("probs", "mask")
                )
            results.append(row)
            variant.unlink()
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
