"""Join polygon pieces across chunk seams: exact, because pieces are unions of pixels.

Two pieces in neighbouring chunks belong to one component when a pixel of each faces the other
across the seam (4-connectivity). Chunks are added one at a time; a component is complete, and
its pieces are unioned and handed back, as soon as every seam its pieces touch has its chunks
on both sides in. Only the pieces of incomplete components are held, so memory follows the
front of finished chunks, not the size of the raster.
"""

from __future__ import annotations

import numpy as np
import shapely

from geoseg.vectorize.polygons import ChunkPolygons, Pieces
from geoseg.vectorize.trace import join_pixel_polygons

__all__ = ["SeamMerger"]

#: Side → (row step, column step) to the neighbour across it, and the neighbour's side.
_ACROSS = {
    "top": ((-1, 0), "bottom"),
    "bottom": ((1, 0), "top"),
    "left": ((0, -1), "right"),
    "right": ((0, 1), "left"),
}


#: A chunk side waiting for its neighbour: seam labels, edge labels (None: no pieces), first node.
_Side = tuple[np.ndarray, np.ndarray | None, int]
_NO_SIDE: _Side = (np.empty(0, np.int64), None, 0)


def _pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    both = (a > 0) & (b > 0)
    if not both.any():
        return np.empty((0, 2), dtype=np.int64)
    return np.unique(np.column_stack((a[both], b[both])).astype(np.int64), axis=0)


def _no_pieces() -> Pieces:
    e = np.empty(0, dtype=np.int64)
    return Pieces(np.empty(0, dtype=object), np.empty((0, 2), np.int64), e, e.astype(float), e)


class SeamMerger:
    """Incremental union of seam pieces over a grid of ``rows`` x ``cols`` chunks."""

    def __init__(self, rows: int, cols: int) -> None:
        self.rows, self.cols = rows, cols
        self._arrived: set[tuple[int, int]] = set()
        # Seam labels and edges of arrived chunks, per side still facing a missing neighbour.
        self._waiting: dict[tuple[tuple[int, int], str], _Side] = {}
        self._parent: dict[int, int] = {}
        self._members: dict[int, list[int]] = {}
        self._open: dict[int, int] = {}  # root → sides its pieces touch that are not joined yet
        self._piece: dict[int, tuple[shapely.Geometry, tuple[int, int], int, float, int]] = {}
        self._next = 0

    @property
    def pending(self) -> int:
        """Pieces held for components that are not complete yet."""
        return len(self._piece)

    def _find(self, a: int) -> int:
        while self._parent[a] != a:
            self._parent[a] = self._parent[self._parent[a]]
            a = self._parent[a]
        return a

    def _union(self, a: int, b: int) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra == rb:
            return
        if len(self._members[ra]) < len(self._members[rb]):
            ra, rb = rb, ra
        self._parent[rb] = ra
        self._members[ra].extend(self._members.pop(rb))
        self._open[ra] += self._open.pop(rb)

    def add(self, ch: ChunkPolygons) -> Pieces:
        """Add one chunk's seam pieces; return the components completed by it, each one
        polygon with only its corners as vertices (see :func:`join_pixel_polygons`)."""
        r, c = ch.index
        self._arrived.add(ch.index)
        seam = ch.seam
        base = self._next
        self._next += len(seam)
        nodes = list(range(base, base + len(seam)))
        for i, node in enumerate(nodes):
            self._parent[node] = node
            self._members[node] = [node]
            self._open[node] = 0
            key = (int(seam.key[i, 0]), int(seam.key[i, 1]))
            self._piece[node] = (
                seam.geoms[i],
                key,
                int(seam.count[i]),
                float(seam.csum[i]),
                int(seam.cmax[i]),
            )
        touched: set[int] = set()
        for side, ((dr, dc), theirs) in _ACROSS.items():
            other = (r + dr, c + dc)
            if not (0 <= other[0] < self.rows and 0 <= other[1] < self.cols):
                continue
            mine = ch.edges.get(side)
            on_side = self._touching(ch.seam_labels, mine, base)
            if other not in self._arrived:
                self._waiting[(ch.index, side)] = (ch.seam_labels, mine, base)
                for node in on_side:
                    self._open[self._find(node)] += 1
                continue
            nb_labels, nb_edge, nb_base = self._waiting.pop((other, theirs), _NO_SIDE)
            for node in self._touching(nb_labels, nb_edge, nb_base):
                root = self._find(node)
                self._open[root] -= 1
                touched.add(root)
            if mine is not None and nb_edge is not None:
                p = _pairs(mine, nb_edge)
                a = base + np.searchsorted(ch.seam_labels, p[:, 0])
                b = nb_base + np.searchsorted(nb_labels, p[:, 1])
                for x, y in zip(a.tolist(), b.tolist(), strict=True):
                    self._union(x, y)
        touched.update(self._find(n) for n in nodes)
        done = sorted({self._find(t) for t in touched if t in self._parent})
        return self._emit([root for root in done if self._open.get(root) == 0])

    def finish(self) -> Pieces:
        """Every component still held (none once every chunk of the grid was added)."""
        roots = sorted({self._find(n) for n in self._piece})
        return self._emit(roots)

    @staticmethod
    def _touching(labels: np.ndarray | None, edge: np.ndarray | None, base: int) -> list[int]:
        """Nodes of the pieces whose pixels lie on ``edge``."""
        if labels is None or edge is None or len(labels) == 0:
            return []
        on = np.unique(edge[edge > 0])
        on = on[np.isin(on, labels)]
        return (base + np.searchsorted(labels, on)).tolist()  # type: ignore[no-any-return]

    def _emit(self, roots: list[int]) -> Pieces:
        if not roots:
            return _no_pieces()
        n = len(roots)
        geoms = np.empty(n, dtype=object)
        key = np.empty((n, 2), dtype=np.int64)
        count = np.empty(n, dtype=np.int64)
        csum = np.empty(n)
        cmax = np.empty(n, dtype=np.int32)
        for g, root in enumerate(roots):
            members = self._members.pop(root)
            self._open.pop(root)
            parts = [self._piece.pop(m) for m in members]
            for m in members:
                del self._parent[m]
            shapes_ = np.array([p[0] for p in parts], dtype=object)
            geoms[g] = shapes_[0] if len(parts) == 1 else join_pixel_polygons(shapes_)
            key[g] = min(p[1] for p in parts)
            count[g] = sum(p[2] for p in parts)
            csum[g] = sum(p[3] for p in parts)
            cmax[g] = max(p[4] for p in parts)
        return Pieces(geoms, key, count, csum, cmax)
