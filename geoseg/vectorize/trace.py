"""Pixel-edge polygons of labelled components, traced with array operations.

The boundary of every 4-connected component (with its holes) is the set of unit pixel edges
between it and anything else. Each edge is taken as a directed edge with the component on its
left; at every vertex the next edge follows from the pixels ahead of it (components are
4-connected, as with ``rasterio.features.shapes(connectivity=4)``; where a component touches
itself only at a corner, the regions on either side stay separate rings). The edges then form
disjoint cycles: one exterior ring per component and one ring per hole. Cycles are found by
pointer jumping, and only the vertices where the direction changes are kept.

This gives the same polygons as GDAL's polygonizer (equal as point sets, with the same rings)
without building a Python object per vertex, which is where most of ``shapes``' time goes.
"""

from __future__ import annotations

import numpy as np
import shapely

__all__ = ["join_pixel_polygons", "trace_polygons"]

# Directions in (row, col) pixel-vertex space: east, south, west, north (y grows downwards).
_DR = np.array([0, 1, 0, -1], dtype=np.int64)
_DC = np.array([1, 0, -1, 0], dtype=np.int64)


# Pixels ahead of an edge that ends at vertex (r, c), heading east, south, west, north, as
# offsets of pixel (r + dr, c + dc): vertex (r, c) is the top-left corner of pixel (r, c).
_AL_DR = np.array([-1, 0, 0, -1], dtype=np.int64)  # ahead-left: ne, se, sw, nw
_AL_DC = np.array([0, 0, -1, -1], dtype=np.int64)
_AR_DR = np.array([0, 0, -1, -1], dtype=np.int64)  # ahead-right: se, sw, nw, ne
_AR_DC = np.array([0, -1, -1, 0], dtype=np.int64)


def _pixel(labels: np.ndarray, rr: np.ndarray, cc: np.ndarray) -> np.ndarray:
    """Labels of pixels (rr, cc); 0 outside the raster."""
    h, w = labels.shape
    inside = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
    return np.where(inside, labels[rr.clip(0, h - 1), cc.clip(0, w - 1)], 0)


def trace_polygons(labels: np.ndarray, n: int, origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """One polygon (with holes) per label 1..n of ``labels``, indexed by label - 1.

    ``labels`` must hold 4-connected components (as ``scipy.ndimage.label`` gives with its
    default structure), 0 for background. Coordinates are (x = column, y = row) pixel corners
    plus ``origin`` (row, col). Labels without pixels get ``None``.
    """
    geoms = np.empty(n, dtype=object)
    if n == 0:
        return geoms
    h, w = labels.shape
    fg = np.zeros((h + 2, w + 2), dtype=bool)  # foreground, with a background border
    np.greater(labels, 0, out=fg[1:-1, 1:-1])
    # Directed boundary edges: start vertex (sr, sc), direction d, label on the left. Two
    # different components are never 4-adjacent, so an edge is on a boundary exactly where
    # one of its two pixels is foreground, and it belongs to that pixel's component.
    # Vertex (r, c) is the top-left corner of pixel (r, c), which is fg[r + 1, c + 1].
    # Horizontal edges, on vertex row r between vertex columns c and c + 1:
    idx = np.flatnonzero(fg[:-1] != fg[1:])
    r, c = np.divmod(idx, w + 2)
    c -= 1
    above = fg.ravel()[idx]  # the pixel above is ours: going east (left = above), else west
    sr_h, sc_h, d_h = r, np.where(above, c, c + 1), np.where(above, 0, 2)
    lab_h = labels[np.where(above, r - 1, r), c]
    # Vertical edges, on vertex column c between vertex rows r and r + 1:
    idx = np.flatnonzero(fg[:, :-1] != fg[:, 1:])
    r, c = np.divmod(idx, w + 1)
    r -= 1
    east = fg[r + 1, c + 1]  # the pixel to the east is ours: going south (left = east)
    sr_v, sc_v, d_v = np.where(east, r, r + 1), c, np.where(east, 1, 3)
    lab_v = labels[r, np.where(east, c, c - 1)]
    sr = np.concatenate((sr_h, sr_v)).astype(np.int64)
    sc = np.concatenate((sc_h, sc_v)).astype(np.int64)
    d = np.concatenate((d_h, d_v)).astype(np.int64)
    lab = np.concatenate((lab_h, lab_v)).astype(np.int64)
    # Next edge: from the end vertex, turn right if the pixel ahead-right is ours (also where
    # ours touch only diagonally: then the two regions of other pixels there stay apart, so a
    # hole touching the outside at a corner is its own ring, as GDAL makes it), else go
    # straight if the pixel ahead-left is ours, else turn left.
    er, ec = sr + _DR[d], sc + _DC[d]
    ahead_right = _pixel(labels, er + _AR_DR[d], ec + _AR_DC[d]) == lab
    ahead_left = _pixel(labels, er + _AL_DR[d], ec + _AL_DC[d]) == lab
    nd = np.where(ahead_right, (d + 1) % 4, np.where(ahead_left, d, (d + 3) % 4))
    # Index of the edge leaving vertex (er, ec) in direction nd: sort edges by (vertex, dir).
    width = w + 1
    key = (sr * width + sc) * 4 + d
    order = np.argsort(key, kind="stable")
    want = (er * width + ec) * 4 + nd
    nxt = order[np.searchsorted(key[order], want)]
    return _polygons(sr, sc, d, lab, nxt, n, origin)


def _polygons(
    sr: np.ndarray,
    sc: np.ndarray,
    d: np.ndarray,
    lab: np.ndarray,
    nxt: np.ndarray,
    n: int,
    origin: tuple[int, int],
) -> np.ndarray:
    """Polygons (index label - 1) from directed unit edges: start vertex (sr, sc), direction
    d, label on the left, and the index of the next edge of each edge's cycle."""
    geoms = np.empty(n, dtype=object)
    m = sr.size
    # Cycles: the smallest edge index of each cycle, by pointer jumping. After k rounds each
    # edge holds the minimum over its next 2**k edges; a round that changes nothing means
    # every edge holds its cycle's minimum.
    rep = np.arange(m)
    jump = nxt.copy()
    while True:
        new = np.minimum(rep, rep[jump])
        if np.array_equal(new, rep):
            break
        rep = new
        jump = jump[jump]
    # Position of each edge within its cycle, counted from the representative: list ranking
    # on the cycles cut just before their representative.
    is_rep = rep == np.arange(m)
    nxt_cut = np.where(is_rep[nxt], -1, nxt)
    dist = np.where(nxt_cut < 0, 0, 1)
    ptr = nxt_cut.copy()
    while (ptr >= 0).any():
        alive = ptr >= 0
        safe = np.where(alive, ptr, 0)
        dist = np.where(alive, dist + dist[safe], dist)
        ptr = np.where(alive, ptr[safe], -1)
    # dist counts edges to the cycle's end; order edges by cycle (by representative), then in
    # walking order: each edge's place follows from its cycle's offset and its distance
    length = np.bincount(rep, minlength=m)
    offset = np.cumsum(length) - length
    seq = np.empty(m, dtype=np.int64)
    seq[offset[rep] + length[rep] - 1 - dist] = np.arange(m)
    # keep only corners: edges whose direction differs from the previous edge's in the cycle
    prev_dir = np.empty(m, dtype=np.int64)
    prev_dir[nxt] = d
    corner = prev_dir != d
    seq = seq[corner[seq]]
    cyc = rep[seq]
    xs = sc[seq].astype(np.float64) + origin[1]
    ys = sr[seq].astype(np.float64) + origin[0]
    # ring boundaries in seq
    brk = np.flatnonzero(np.r_[True, cyc[1:] != cyc[:-1]])
    ring_len = np.diff(np.r_[brk, seq.size])
    ring_lab = lab[seq[brk]]
    # signed area (shoelace, y down): exterior rings of the left-hand traversal are negative
    xn = np.roll(xs, -1)
    yn = np.roll(ys, -1)
    last = brk + ring_len - 1
    xn[last], yn[last] = xs[brk], ys[brk]
    area2 = np.add.reduceat(xs * yn - xn * ys, brk)
    hole = area2 > 0
    # polygons: per label its exterior ring, then its holes; rings closed
    ring_order = np.lexsort((hole, ring_lab))
    closed_len = ring_len + 1
    starts = np.r_[0, np.cumsum(ring_len)][:-1]
    k = ring_len[ring_order]
    first = np.repeat(starts[ring_order], k + 1)
    step = np.arange(int((k + 1).sum())) - np.repeat(np.r_[0, np.cumsum(k + 1)][:-1], k + 1)
    idx = first + np.where(step == np.repeat(k, k + 1), 0, step)  # each ring closed
    xy = np.column_stack((xs[idx], ys[idx]))
    ring_off = np.r_[0, np.cumsum(closed_len[ring_order])]
    lab_sorted = ring_lab[ring_order]
    poly_start = np.flatnonzero(np.r_[True, lab_sorted[1:] != lab_sorted[:-1]])
    poly_off = np.r_[poly_start, lab_sorted.size]
    polys = shapely.from_ragged_array(shapely.GeometryType.POLYGON, xy, (ring_off, poly_off))
    geoms[lab_sorted[poly_start] - 1] = polys
    return geoms


def join_pixel_polygons(polys: np.ndarray) -> shapely.Polygon:
    """The union of pixel polygons that make one 4-connected component (pieces of it cut by
    chunk seams, each as :func:`trace_polygons` gives it), traced again from their edges.

    Every ring is cut into unit pixel edges, oriented with the component on the left; an edge
    two pieces share appears in both, in opposite directions, and is dropped. The edges left
    are the component's boundary, linked into rings with :func:`trace_polygons`' rule (at a
    vertex where the component touches itself diagonally, turn right). Time and memory are
    linear in the pieces' perimeter (px), unlike a geometric union of ragged polygons with
    many holes. The result equals ``trace_polygons`` of the whole component, ring for ring.
    """
    rings = shapely.get_rings(polys)
    nrings = shapely.get_num_interior_rings(polys) + 1
    exterior = np.zeros(rings.size, dtype=bool)
    exterior[np.r_[0, np.cumsum(nrings)[:-1]]] = True
    xy, ring = shapely.get_coordinates(rings, return_index=True)
    # segments between consecutive coordinates of one ring (rings are closed)
    same = ring[1:] == ring[:-1]
    x0, y0 = xy[:-1][same].T
    x1, y1 = xy[1:][same].T
    seg_ring = ring[:-1][same]
    # the shoelace sign of each ring (y down: negative when the component is on the left of
    # an exterior ring); rings the other way round are walked backwards
    area2 = np.bincount(seg_ring, weights=x0 * y1 - x1 * y0, minlength=rings.size)
    flip = np.where(exterior, area2 > 0, area2 < 0)[seg_ring]
    x0, x1 = np.where(flip, x1, x0), np.where(flip, x0, x1)
    y0, y1 = np.where(flip, y1, y0), np.where(flip, y0, y1)
    dx, dy = (x1 - x0).astype(np.int64), (y1 - y0).astype(np.int64)
    length = np.abs(dx) + np.abs(dy)
    keep = length > 0
    dx, dy, length = dx[keep], dy[keep], length[keep]
    x0, y0 = x0[keep].astype(np.int64), y0[keep].astype(np.int64)
    seg_d = np.where(dx > 0, 0, np.where(dy > 0, 1, np.where(dx < 0, 2, 3)))
    # unit edges: the k-th step of each segment
    k = np.arange(int(length.sum())) - np.repeat(np.cumsum(length) - length, length)
    d = np.repeat(seg_d, length)
    sr = np.repeat(y0, length) + k * _DR[d]
    sc = np.repeat(x0, length) + k * _DC[d]
    r0, c0 = int(sr.min()) - 1, int(sc.min()) - 1
    sr, sc = sr - r0, sc - c0
    width = int(sc.max()) + 2
    key = (sr * width + sc) * 4 + d
    er, ec = sr + _DR[d], sc + _DC[d]
    shared = np.isin(key, (er * width + ec) * 4 + (d + 2) % 4)
    sr, sc, d, key = sr[~shared], sc[~shared], d[~shared], key[~shared]
    er, ec = er[~shared], ec[~shared]
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    nxt = np.full(key.size, -1, dtype=np.int64)
    for nd in ((d + 3) % 4, d, (d + 1) % 4):  # left, straight, right: the last found wins
        want = (er * width + ec) * 4 + nd
        pos = np.searchsorted(sorted_key, want).clip(0, key.size - 1)
        found = sorted_key[pos] == want
        nxt = np.where(found, order[pos], nxt)
    lab = np.ones(key.size, dtype=np.int64)
    return _polygons(sr, sc, d, lab, nxt, 1, (r0, c0))[0]
