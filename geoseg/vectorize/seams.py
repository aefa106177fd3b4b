"""Join polygon pieces across chunk seams: exact, because pieces are unions of pixels.

Two pieces in neighbouring chunks belong to one component when a pixel of each faces the other
across the seam (4-connectivity). The pairs found along every seam are grouped with
connected components, and each group's pixel polygons are unioned.
"""

from __future__ import annotations

import numpy as np
import shapely
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from geoseg.vectorize.polygons import ChunkPolygons, Pieces

__all__ = ["merge_seams"]


def _pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    both = (a > 0) & (b > 0)
    if not both.any():
        return np.empty((0, 2), dtype=np.int64)
    return np.unique(np.column_stack((a[both], b[both])).astype(np.int64), axis=0)


def merge_seams(chunks: dict[tuple[int, int], ChunkPolygons]) -> Pieces:
    """Union the seam pieces of all ``chunks`` into whole components with pooled statistics."""
    offsets: dict[tuple[int, int], int] = {}
    total = 0
    for idx in sorted(chunks):
        offsets[idx] = total
        total += len(chunks[idx].seam)
    if total == 0:
        return Pieces(
            np.empty(0, dtype=object),
            np.empty((0, 2), np.int64),
            np.empty(0, np.int64),
            np.empty(0),
            np.empty(0, np.int32),
        )

    def node(idx: tuple[int, int], labels: np.ndarray) -> np.ndarray:
        seam_labels = chunks[idx].seam_labels
        return offsets[idx] + np.searchsorted(seam_labels, labels)

    src: list[np.ndarray] = []
    dst: list[np.ndarray] = []
    for (r, c), ch in chunks.items():
        for other, mine, theirs in (((r, c + 1), "right", "left"), ((r + 1, c), "bottom", "top")):
            nb = chunks.get(other)
            if nb is None or mine not in ch.edges or theirs not in nb.edges:
                continue
            p = _pairs(ch.edges[mine], nb.edges[theirs])
            if len(p):
                src.append(node((r, c), p[:, 0]))
                dst.append(node(other, p[:, 1]))
    geoms = np.concatenate([chunks[i].seam.geoms for i in sorted(chunks)])
    key = np.concatenate([chunks[i].seam.key for i in sorted(chunks)])
    count = np.concatenate([chunks[i].seam.count for i in sorted(chunks)])
    csum = np.concatenate([chunks[i].seam.csum for i in sorted(chunks)])
    cmax = np.concatenate([chunks[i].seam.cmax for i in sorted(chunks)])
    if src:
        s, d = np.concatenate(src), np.concatenate(dst)
        graph = coo_matrix((np.ones(len(s), np.int8), (s, d)), shape=(total, total))
        n, comp = connected_components(graph, directed=False)
    else:
        n, comp = total, np.arange(total)
    order = np.argsort(comp, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(comp[order]) != 0])
    out_geoms = np.empty(n, dtype=object)
    out_key = np.empty((n, 2), dtype=np.int64)
    for g, (a, b) in enumerate(zip(starts, np.r_[starts[1:], total], strict=True)):
        members = order[a:b]
        out_geoms[g] = geoms[members[0]] if len(members) == 1 else shapely.union_all(geoms[members])
        k = key[members]
        out_key[g] = k[np.lexsort((k[:, 1], k[:, 0]))[0]]
    return Pieces(
        out_geoms,
        out_key,
        np.add.reduceat(count[order], starts),
        np.add.reduceat(csum[order], starts),
        np.maximum.reduceat(cmax[order], starts),
    )
