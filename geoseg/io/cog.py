"""Lay out a Cloud Optimized GeoTIFF from tiles that are already compressed.

Design: :class:`geoseg.io.writer.RasterWriter` compresses every 512 x 512 tile of every level
exactly once, in parallel, as the chunks arrive, and appends it to a scratch file. Once every
tile exists, :func:`write_cog` writes the file in the layout of GDAL's COG driver: the TIFF
header, GDAL's "ghost" structural metadata, every IFD (full resolution, its mask, the overviews
from largest to smallest, then their masks), and then the tile data from the smallest overview
to full resolution, row by row, each mask tile right after its image tile, each tile framed by
its size before it and its last 4 bytes after it (``BLOCK_LEADER`` and ``BLOCK_TRAILER``, which
let GDAL read a tile and its mask in one request without the tile index). Nothing is
recompressed: the tile bytes are copied in order. The georeferencing and metadata tags are not
encoded here: GDAL writes them into a sparse template (:func:`geotiff_tags`) and they are copied
byte for byte, so the CRS, the transform, the tags, the band names and nodata read back exactly
as GDAL wrote them.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: TIFF field types: size of one value in bytes.
_TYPE_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 16: 8}
SHORT, LONG, LONG8 = 3, 4, 16

#: Tags that GDAL writes for georeferencing and metadata, copied from its template: model pixel
#: scale, tie points, transformation, GeoKey directory, its double and ASCII parameters,
#: GDAL_METADATA (tags, band names) and GDAL_NODATA.
GEO_TAGS = (33550, 33922, 34264, 34735, 34736, 34737, 42112, 42113)

#: Of those, the ones that GDAL repeats in every overview IFD.
OVERVIEW_TAGS = (42113,)

#: Photometric interpretations and subfile types used here.
MINISBLACK, MASK = 1, 4
FULL, REDUCED, MASK_FULL, MASK_REDUCED = 0, 1, 4, 5

#: Largest file written as classic TIFF (32-bit offsets); larger ones are BigTIFF.
CLASSIC_MAX = 2**32 - 1


@dataclass(frozen=True)
class RawTag:
    """One TIFF tag with its value already encoded (little-endian)."""

    code: int
    type: int
    count: int
    value: bytes


@dataclass
class Image:
    """One IFD: an image or a mask at one level, and where its compressed tiles lie in the
    scratch file (``tiles``: (offset, size) each, row-major)."""

    width: int
    height: int
    samples: int
    bits: int
    subfile: int
    photometric: int
    compression: int
    predictor: int
    tile: int
    tiles: list[tuple[int, int]]
    extra: list[RawTag] = field(default_factory=list)

    def tags(self, offsets: Sequence[int], big: bool) -> list[RawTag]:
        def short_or_long(code: int, v: int) -> RawTag:
            if v < 2**16:
                return RawTag(code, SHORT, 1, struct.pack("<H", v))
            return RawTag(code, LONG, 1, struct.pack("<I", v))

        def shorts(values: Sequence[int]) -> bytes:
            return struct.pack(f"<{len(values)}H", *values)

        n = len(self.tiles)
        off_type, fmt = (LONG8, "Q") if big else (LONG, "I")
        tags = [
            short_or_long(256, self.width),
            short_or_long(257, self.height),
            RawTag(258, SHORT, self.samples, shorts([self.bits] * self.samples)),
            RawTag(259, SHORT, 1, shorts([self.compression])),
            RawTag(262, SHORT, 1, shorts([self.photometric])),
            RawTag(277, SHORT, 1, shorts([self.samples])),
            RawTag(284, SHORT, 1, shorts([1])),  # pixel interleaved
            RawTag(317, SHORT, 1, shorts([self.predictor])),
            RawTag(322, SHORT, 1, shorts([self.tile])),
            RawTag(323, SHORT, 1, shorts([self.tile])),
            RawTag(324, off_type, n, struct.pack(f"<{n}{fmt}", *offsets)),
            RawTag(325, off_type, n, struct.pack(f"<{n}{fmt}", *(s for _, s in self.tiles))),
            RawTag(339, SHORT, self.samples, shorts([1] * self.samples)),  # unsigned integers
        ]
        if self.subfile:
            tags.append(RawTag(254, LONG, 1, struct.pack("<I", self.subfile)))
        if self.samples > 1:  # the bands after the first are unspecified extra samples
            tags.append(RawTag(338, SHORT, self.samples - 1, shorts([0] * (self.samples - 1))))
        return sorted([*tags, *self.extra], key=lambda t: t.code)


def read_tags(data: bytes, codes: Iterable[int]) -> list[RawTag]:
    """The tags ``codes`` of the first IFD of a classic little-endian TIFF, values encoded."""
    if data[:4] != b"II*\x00":
        raise ValueError("not a classic little-endian TIFF")
    wanted = set(codes)
    (ifd,) = struct.unpack_from("<I", data, 4)
    (n,) = struct.unpack_from("<H", data, ifd)
    tags = []
    for i in range(n):
        code, typ, count, value = struct.unpack_from("<HHI4s", data, ifd + 2 + 12 * i)
        if code not in wanted:
            continue
        size = _TYPE_SIZE[typ] * count
        if size > 4:
            (at,) = struct.unpack("<I", value)
            value = data[at : at + size]
        tags.append(RawTag(code, typ, count, value[:size]))
    return tags


def geotiff_tags(
    profile: dict[str, Any], tags: dict[str, str], band_names: Sequence[str]
) -> list[RawTag]:
    """The georeferencing and metadata tags (:data:`GEO_TAGS`) that GDAL writes for a raster of
    ``profile`` (crs, transform, nodata) with dataset ``tags`` and ``band_names``, taken from a
    sparse template that GDAL writes in memory (no pixels)."""
    from rasterio.io import MemoryFile

    template = {
        **{k: profile[k] for k in ("width", "height", "count", "crs", "transform", "nodata")},
        "driver": "GTiff",
        "dtype": "uint8",
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "sparse_ok": True,
        "bigtiff": "no",
        "photometric": "minisblack",
        "interleave": "pixel" if profile["count"] > 1 else "band",
    }
    with MemoryFile() as mem:
        with mem.open(**template) as ds:
            if tags:
                ds.update_tags(**tags)
            for i, name in enumerate(band_names, start=1):
                ds.set_band_description(i, name)
        data = mem.read()
    return read_tags(data, GEO_TAGS)


def ghost_header(with_masks: bool) -> bytes:
    """GDAL's structural metadata for this layout, as its COG driver writes it (the space is
    room it keeps for turning NO into YES when a file is edited)."""
    body = (
        "LAYOUT=IFDS_BEFORE_DATA\n"
        "BLOCK_ORDER=ROW_MAJOR\n"
        "BLOCK_LEADER=SIZE_AS_UINT4\n"
        "BLOCK_TRAILER=LAST_4_BYTES_REPEATED\n"
        "KNOWN_INCOMPATIBLE_EDITION=NO\n"
        " "
    )
    if with_masks:
        body += "MASK_INTERLEAVED_WITH_IMAGERY=YES\n"
    return f"GDAL_STRUCTURAL_METADATA_SIZE={len(body):06d} bytes\n{body}".encode()


def _ifd_size(tags: Sequence[RawTag], big: bool) -> int:
    entry, head, tail, inline = (20, 8, 8, 8) if big else (12, 2, 4, 4)
    size = head + entry * len(tags) + tail
    for t in tags:
        if len(t.value) > inline:
            size += len(t.value) + len(t.value) % 2
    return size


def _encode_ifd(tags: Sequence[RawTag], at: int, next_ifd: int, big: bool) -> bytes:
    entry_fmt, inline = ("<HHQ8s", 8) if big else ("<HHI4s", 4)
    count = struct.pack("<Q" if big else "<H", len(tags))
    entry_size = 20 if big else 12
    values_at = at + len(count) + entry_size * len(tags) + (8 if big else 4)
    entries, values = [], []
    for t in tags:
        if len(t.value) <= inline:
            field_ = t.value.ljust(inline, b"\0")
        else:
            field_ = struct.pack("<Q" if big else "<I", values_at)
            padded = t.value + b"\0" * (len(t.value) % 2)
            values.append(padded)
            values_at += len(padded)
        entries.append(struct.pack(entry_fmt, t.code, t.type, t.count, field_))
    nxt = struct.pack("<Q" if big else "<I", next_ifd)
    return count + b"".join(entries) + nxt + b"".join(values)


def write_cog(path: Path, levels: Sequence[tuple[Image, Image | None]], source: int) -> None:
    """Write a COG at ``path`` from ``levels`` (full resolution first: its image and its mask,
    if any), whose tiles are read from the file descriptor ``source``."""
    images = [img for img, _ in levels]
    masks = [m for _, m in levels if m is not None]
    if masks and len(masks) != len(levels):
        raise ValueError("every level or none has a mask")
    order = [images[0], *masks[:1], *images[1:], *masks[1:]]  # GDAL's order of IFDs
    ghost = ghost_header(bool(masks))
    tile_bytes = sum(size + 8 for img in order for _, size in img.tiles)

    def layout(big: bool) -> tuple[int, list[int], int]:
        start = (16 if big else 8) + len(ghost)
        start += start % 2
        ifds, at = [], start
        for img in order:
            ifds.append(at)
            at += _ifd_size(img.tags([0] * len(img.tiles), big), big)
        return start, ifds, at

    _, _, data_at = layout(False)
    big = data_at + tile_bytes > CLASSIC_MAX
    start, ifd_at, data_at = layout(big)

    # where each tile goes: smallest level first, each mask tile after its image tile
    offsets: dict[int, list[int]] = {id(img): [0] * len(img.tiles) for img in order}
    plan: list[tuple[int, int, int]] = []  # (final offset of the data, source offset, size)
    at = data_at
    for img, mask in reversed(levels):
        for i in range(len(img.tiles)):
            for part in (img, mask):
                if part is None:
                    continue
                src, size = part.tiles[i]
                offsets[id(part)][i] = at + 4
                plan.append((at + 4, src, size))
                at += size + 8

    header = (
        b"II+\x00\x08\x00\x00\x00" + struct.pack("<Q", start)
        if big
        else b"II*\x00" + struct.pack("<I", start)
    )
    head = bytearray(header + ghost)
    head += b"\0" * (start - len(head))
    for i, img in enumerate(order):
        nxt = ifd_at[i + 1] if i + 1 < len(order) else 0
        head += _encode_ifd(img.tags(offsets[id(img)], big), ifd_at[i], nxt, big)
    if len(head) != data_at:
        raise AssertionError(f"COG layout: IFDs end at {len(head)}, data planned at {data_at}")
    with open(path, "wb", buffering=1 << 20) as f:
        f.write(head)
        for _, src, size in plan:
            blob = os.pread(source, size, src)
            if len(blob) != size:
                raise OSError(f"scratch tiles of {path} are truncated")
            f.write(struct.pack("<I", size))
            f.write(blob)
            f.write(blob[-4:].rjust(4, b"\0"))
