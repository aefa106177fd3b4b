"""Road centerlines: skeletonize chunks with a halo, then trace one graph over all of them.

Each chunk is skeletonized over its core plus ``halo`` pixels of context and keeps only the
skeleton pixels of its core, with the distance to the nearest background pixel. The sparse
skeleton pixels of all chunks form one graph (mixed 4/8-adjacency, so staircases are not
junctions), so lines run through seams without breaks. Junction clusters and endpoints are
the nodes; every chain of pixels between two nodes becomes one LineString.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import shapely
from rasterio.windows import Window

from geoseg.vectorize.features import FeatureBatch, stable_ids

if TYPE_CHECKING:
    import networkx as nx

# scipy.sparse, scipy.spatial, scikit-image and networkx are imported where they are used:
# they take most of a second to import, and polygon-only runs never need them.
from geoseg.vectorize.geometry import Frames
from geoseg.vectorize.source import Prediction, read_class, with_context

__all__ = [
    "CenterlineJob",
    "SkeletonPixels",
    "build_centerlines",
    "skeleton_chunk",
    "trace_edges",
]


@dataclass(frozen=True)
class CenterlineJob:
    """What every centerline task of one layer shares (picklable); lengths in metres."""

    pred: Prediction
    frames: Frames
    cls: str
    layer: str
    threshold: float
    spur_m: float
    simplify_m: float
    halo: int
    #: join dangling ends to a road ahead within this distance; 0 = off (see _bridge_gaps)
    bridge_m: float = 0.0


@dataclass
class SkeletonPixels:
    """Skeleton pixels (global row, col) with road width (metres) and confidence (0–255)."""

    rows: np.ndarray
    cols: np.ndarray
    width_m: np.ndarray
    conf: np.ndarray | None

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def concat(cls, parts: list[SkeletonPixels]) -> SkeletonPixels:
        parts = [p for p in parts if len(p)] or [_empty_pixels()]
        confs = [p.conf for p in parts]
        conf: np.ndarray | None = None
        if all(c is not None for c in confs):
            conf = np.concatenate([c for c in confs if c is not None])
        return cls(
            np.concatenate([p.rows for p in parts]),
            np.concatenate([p.cols for p in parts]),
            np.concatenate([p.width_m for p in parts]),
            conf,
        )


def _empty_pixels() -> SkeletonPixels:
    e = np.empty(0, np.int64)
    return SkeletonPixels(e, e, np.empty(0, np.float32), np.empty(0, np.uint8))


def _edge_background(fg: np.ndarray) -> np.ndarray:
    """Background pixels with a foreground 4-neighbour: enough to find the nearest background."""
    nb = np.zeros_like(fg)
    nb[1:] |= fg[:-1]
    nb[:-1] |= fg[1:]
    nb[:, 1:] |= fg[:, :-1]
    nb[:, :-1] |= fg[:, 1:]
    return nb & ~fg


def skeleton_chunk(job: CenterlineJob, core: Window) -> SkeletonPixels:
    """Skeleton pixels of one chunk core, computed with ``halo`` pixels of context."""
    from scipy.spatial import cKDTree
    from skimage.morphology import skeletonize

    h = job.halo
    cw = read_class(job.pred, job.cls, with_context(core, h), job.threshold)
    if not cw.fg.any():
        return _empty_pixels()
    sk = skeletonize(cw.fg)
    ch, cwid = int(core.height), int(core.width)
    rr, cc = np.nonzero(sk[h : h + ch, h : h + cwid])
    if len(rr) == 0:
        return _empty_pixels()
    rr, cc = rr + h, cc + h
    py, px = job.frames.pixel_m
    bg = np.argwhere(_edge_background(cw.fg))
    if len(bg):
        tree = cKDTree(bg * np.array([py, px]))
        dist, _ = tree.query(np.column_stack((rr * py, cc * px)))
    else:
        dist = np.full(len(rr), np.nan)
    width = (2.0 * dist - 0.5 * (px + py)).astype(np.float32)
    conf = cw.conf[rr, cc] if cw.conf is not None else None
    return SkeletonPixels(
        (rr - h + int(core.row_off)).astype(np.int64),
        (cc - h + int(core.col_off)).astype(np.int64),
        width,
        conf,
    )


@dataclass
class Edge:
    """A chain of skeleton pixels between two nodes (pixel indices in order)."""

    start: int
    end: int
    pixels: np.ndarray


def _neighbours(
    key: np.ndarray, rows: np.ndarray, cols: np.ndarray, width: int, dr: int, dc: int
) -> tuple[np.ndarray, np.ndarray]:
    nk = key + dr * width + dc
    pos = np.minimum(np.searchsorted(key, nk), len(key) - 1)
    ok = (cols + dc >= 0) & (cols + dc < width) & (key[pos] == nk)
    return ok, pos


def _adjacency(rows: np.ndarray, cols: np.ndarray, width: int) -> np.ndarray:
    """Undirected pixel pairs under mixed adjacency (diagonals only where no 4-path exists)."""
    key = rows * width + cols
    n = len(key)
    idx = np.arange(n)
    east, pe = _neighbours(key, rows, cols, width, 0, 1)
    south, ps = _neighbours(key, rows, cols, width, 1, 0)
    west, _ = _neighbours(key, rows, cols, width, 0, -1)
    se, pse = _neighbours(key, rows, cols, width, 1, 1)
    sw, psw = _neighbours(key, rows, cols, width, 1, -1)
    # A diagonal pair's shared 4-neighbours: (r, c+1) and (r+1, c) for SE; (r, c-1), (r+1, c) SW.
    below_east = np.zeros(n, bool)
    below_west = np.zeros(n, bool)
    below_east[se] = west[pse[se]]  # (r+1, c+1) has a west neighbour (r+1, c)
    below_west[sw] = east[psw[sw]]  # (r+1, c-1) has an east neighbour (r+1, c)
    se &= ~east & ~below_east
    sw &= ~west & ~below_west
    pairs = [
        np.column_stack((idx[m], p[m])) for m, p in ((east, pe), (south, ps), (se, pse), (sw, psw))
    ]
    return np.concatenate(pairs)


def _components(n: int, pairs: np.ndarray) -> np.ndarray:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    g = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(g, directed=False)[1]  # type: ignore[no-any-return]


def trace_edges(
    rows: np.ndarray, cols: np.ndarray, width: int
) -> tuple[list[Edge], np.ndarray, int]:
    """Graph of skeleton pixels (sorted by row, col): edges, node coordinates (col, row) and
    the number of junction nodes (ids below it are junctions, the others endpoints).

    Nodes are junction clusters (pixels with 3+ neighbours, grouped when adjacent, placed at
    their mean) and endpoints; a closed loop without junctions is one edge from a node to itself.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import dijkstra

    n = len(rows)
    if n == 0:
        return [], np.empty((0, 2)), 0
    pairs = _adjacency(rows, cols, width)
    deg = np.bincount(pairs.ravel(), minlength=n)
    junction = deg >= 3
    jj = junction[pairs[:, 0]] & junction[pairs[:, 1]]
    pp = ~junction[pairs[:, 0]] & ~junction[pairs[:, 1]]
    pj = ~jj & ~pp
    # Junction clusters → node ids 0..k-1.
    jcomp = _components(n, pairs[jj])
    jpix = np.flatnonzero(junction)
    uniq, node_of = np.unique(jcomp[jpix], return_inverse=True)
    cluster = np.full(n, -1, np.int64)
    cluster[jpix] = node_of
    k = len(uniq)
    xy = np.column_stack((cols + 0.5, rows + 0.5))
    node_xy = [np.zeros((k, 2))]
    if k:
        sums = np.zeros((k, 2))
        np.add.at(sums, node_of, xy[jpix])
        node_xy[0] = sums / np.bincount(node_of, minlength=k)[:, None]
    # Which junction clusters each path pixel touches.
    attach: dict[int, list[int]] = {}
    for a, b in pairs[pj].tolist():
        p, j = (a, b) if not junction[a] else (b, a)
        attach.setdefault(p, []).append(int(cluster[j]))
    # Path components, ordered from one end.
    path_pairs = pairs[pp]
    pdeg = np.bincount(path_pairs.ravel(), minlength=n)
    on_path = ~junction & (deg > 0)
    comp = _components(n, path_pairs)
    members = np.flatnonzero(on_path)
    order_m = members[np.argsort(comp[members], kind="stable")]
    groups: list[np.ndarray] = []
    if len(order_m):
        cstarts = np.flatnonzero(np.r_[True, np.diff(comp[order_m]) != 0])
        groups = np.split(order_m, cstarts[1:])
    starts, cycles = [], []
    for grp in groups:
        ends = grp[pdeg[grp] <= 1]
        if len(ends):
            starts.append(int(ends.min()))
        else:
            cycles.append(int(grp.min()))
    # Cut each loop at its first pixel so it can be ordered like a path.
    cut = np.zeros(len(path_pairs), bool)
    for s in cycles:
        hit = np.flatnonzero((path_pairs[:, 0] == s) | (path_pairs[:, 1] == s))
        cut[hit[0]] = True
    g = coo_matrix(
        (np.ones(int((~cut).sum())), (path_pairs[~cut, 0], path_pairs[~cut, 1])), shape=(n, n)
    )
    roots = np.array(starts + cycles, dtype=np.int64)
    if len(roots):
        dist = dijkstra(g.tocsr(), directed=False, indices=roots, unweighted=True, min_only=True)
    else:
        dist = np.zeros(n)
    edges: list[Edge] = []
    extra_nodes: list[np.ndarray] = []
    next_node = k
    cycle_set = set(cycles)
    for grp in groups:
        seq = grp[np.argsort(dist[grp], kind="stable")]
        first, last = int(seq[0]), int(seq[-1])
        if first in cycle_set:
            edges.append(Edge(next_node, next_node, np.r_[seq, first]))
            extra_nodes.append(xy[first])
            next_node += 1
            continue
        ja = list(attach.get(first, []))
        jb = ja if first == last else list(attach.get(last, []))
        if first == last and len(ja) == 2:
            a, b = ja[0], ja[1]
        else:
            a = ja[0] if ja else -1
            b = (jb[-1] if first == last else jb[0]) if jb else -1
            if first == last and len(ja) == 1:
                b = -1
        if a < 0:
            a = next_node
            extra_nodes.append(xy[first])
            next_node += 1
        if b < 0:
            b = next_node
            extra_nodes.append(xy[last])
            next_node += 1
        edges.append(Edge(a, b, seq))
    coords = np.concatenate([node_xy[0], np.array(extra_nodes).reshape(-1, 2)])
    return edges, coords, k


def _edge_coords(e: Edge, node_xy: np.ndarray, xy: np.ndarray, k: int) -> np.ndarray:
    """Pixel-space coordinates of an edge, ending on junction nodes' centres."""
    pts = [xy[e.pixels]]
    if e.start < k:
        pts.insert(0, node_xy[e.start][None])
    if e.end < k:
        pts.append(node_xy[e.end][None])
    return np.concatenate(pts)


def _length_m(coords: np.ndarray, pixel_m: tuple[float, float]) -> float:
    d = np.diff(coords, axis=0) * np.array([pixel_m[0], pixel_m[1]])
    return float(np.hypot(d[:, 0], d[:, 1]).sum())


def build_centerlines(job: CenterlineJob, pix: SkeletonPixels) -> FeatureBatch:
    """Trace, prune spurs shorter than ``spur_m``, bridge gaps up to ``bridge_m``, join through
    2-way nodes, simplify."""
    import networkx as nx

    if len(pix) == 0:
        return FeatureBatch.empty()
    width = job.pred.width
    order = np.argsort(pix.rows * width + pix.cols, kind="stable")
    rows, cols = pix.rows[order], pix.cols[order]
    wid = pix.width_m[order]
    conf = pix.conf[order] if pix.conf is not None else None
    edges, node_xy, k = trace_edges(rows, cols, width)
    xy = np.column_stack((cols + 0.5, rows + 0.5))
    graph = nx.MultiGraph()
    for i, e in enumerate(edges):
        c = _edge_coords(e, node_xy, xy, k)
        graph.add_edge(
            e.start,
            e.end,
            key=i,
            coords=c,
            pixels=e.pixels,
            start=e.start,
            length=_length_m(c, job.frames.pixel_m),
        )
    _prune_spurs(graph, job.spur_m)
    _bridge_gaps(graph, job.bridge_m, job.frames.pixel_m)
    _join_through(graph)
    return _finish(job, graph, rows, cols, wid, conf, width)


def _prune_spurs(graph: nx.MultiGraph, spur_m: float) -> None:
    """Remove dangling edges shorter than ``spur_m``, shortest first, keeping junction roads."""
    if spur_m <= 0:
        return
    for _ in range(3):
        cand = [
            (d["length"], u, v, key)
            for u, v, key, d in graph.edges(keys=True, data=True)
            if u != v and d["length"] < spur_m and min(graph.degree(u), graph.degree(v)) == 1
        ]
        if not cand:
            return
        for _length, u, v, key in sorted(cand, key=lambda t: t[0]):
            du, dv = graph.degree(u), graph.degree(v)
            if min(du, dv) != 1 or (max(du, dv) == 2):
                continue
            graph.remove_edge(u, v, key)
        graph.remove_nodes_from([n for n in list(graph.nodes) if graph.degree(n) == 0])
        _join_through(graph)


#: A dangling end's direction is taken over this much of its own line (metres) ...
BRIDGE_AIM_M = 6.0
#: ... and a gap is bridged only to a road ahead of it, within this angle of that direction.
BRIDGE_MAX_ANGLE_DEG = 35.0


def _end_aims(
    graph: nx.MultiGraph, scale: np.ndarray
) -> dict[int, tuple[np.ndarray, np.ndarray, tuple[int, int, int], np.ndarray]]:
    """Each dangling end (a node of degree 1): its position and unit direction outward
    (metres), its edge (u, v, key), and its last skeleton pixel (as an index array)."""
    aims = {}
    for n in sorted(graph.nodes):
        if graph.degree(n) != 1:
            continue
        ((_, other, key, d),) = graph.edges(n, keys=True, data=True)
        coords, pixels = _oriented(d, other)  # other → n
        if not len(pixels):
            continue
        c = coords * scale
        back = np.cumsum(np.hypot(*np.diff(c[::-1], axis=0).T))
        i = min(int(np.searchsorted(back, BRIDGE_AIM_M)), len(c) - 2) if len(c) > 1 else -1
        if i < 0:
            continue
        v = c[-1] - c[::-1][i + 1]
        norm = float(np.hypot(*v))
        if norm > 0:
            aims[n] = (c[-1], v / norm, (n, other, key), pixels[-1:])
    return aims


def _bridge_gaps(graph: nx.MultiGraph, bridge_m: float, pixel_m: tuple[float, float]) -> None:
    """Join each dangling end to the nearest road ahead of it within ``bridge_m``: a straight
    segment to the nearest point of another edge (that edge split there, or its end node when
    the point is one) that lies within :data:`BRIDGE_MAX_ANGLE_DEG` of the end's direction;
    an end bridged to another end counts as bridged for both. Shortest gaps first; each end
    bridges once (it may still be the target of another end's bridge). A road lost under a
    tree or a shadow is one line again, and a side street that stops short of the road it
    meets joins it."""
    if bridge_m <= 0:
        return
    scale = np.array(pixel_m, dtype=np.float64)
    aims = _end_aims(graph, scale)
    if not aims:
        return
    edges = [(u, v, k) for u, v, k in graph.edges(keys=True)]
    lines = [shapely.LineString(graph.edges[e]["coords"] * scale) for e in edges]
    tree = shapely.STRtree(lines)
    cos_max = np.cos(np.radians(BRIDGE_MAX_ANGLE_DEG))
    found = []
    for n, (p, aim, own, _) in aims.items():
        point = shapely.Point(p)
        for i in tree.query(point, predicate="dwithin", distance=bridge_m).tolist():
            if {edges[i][0], edges[i][1]} == {own[0], own[1]} and edges[i][2] == own[2]:
                continue
            t = float(lines[i].project(point))
            q = np.array(lines[i].interpolate(t).coords[0])
            gap = q - p
            dist = float(np.hypot(*gap))
            if 0 < dist <= bridge_m and float(gap @ aim) >= cos_max * dist:
                found.append((dist, n, i, t))
    done: set[int] = set()
    split: set[int] = set()
    next_node = max(graph.nodes) + 1
    next_key = max(k for _, _, k in edges) + 1
    for dist, n, i, t in sorted(found, key=lambda f: (f[0], f[1], f[2])):
        if n in done or i in split:
            continue
        u, v, key = edges[i]
        target = _split_at(graph, (u, v, key), t, scale, next_node, next_key)
        if target is None:
            continue
        if target == next_node:
            split.add(i)
            next_node += 1
            next_key += 1
        if target == n or graph.has_edge(n, target):
            continue
        a = aims[n][0] / scale
        b = _node_xy(graph, target)
        graph.add_edge(  # with the end's last pixel, for a width should it stay a line
            n,
            target,
            key=next_key,
            coords=np.array([a, b]),
            pixels=aims[n][3],
            start=n,
            length=dist,
            bridge=True,
        )
        next_key += 1
        done.update((n, target))


def _node_xy(graph: nx.MultiGraph, node: int) -> np.ndarray:
    """A node's pixel-space position: where its edges' coordinates meet it."""
    _, other, d = next(iter(graph.edges(node, data=True)))
    return np.asarray(_oriented(d, other)[0][-1] if other != node else d["coords"][0])


def _split_at(
    graph: nx.MultiGraph,
    edge: tuple[int, int, int],
    t_m: float,
    scale: np.ndarray,
    new_node: int,
    new_key: int,
) -> int | None:
    """The node at ``t_m`` metres along ``edge`` (from its ``start``): one of its end nodes
    within a metre of it, else ``new_node``, inserted at the edge's nearest vertex by splitting
    it in two (``new_key`` the second part's key); None when the edge has too few skeleton
    pixels to give each part one."""
    u, v, key = edge
    d = graph.edges[edge]
    first = d["start"]
    last = v if first == u else u
    coords, pixels = d["coords"], d["pixels"]
    along = np.r_[0.0, np.cumsum(np.hypot(*(np.diff(coords, axis=0) * scale).T))]
    if t_m <= 1.0:
        return int(first)
    if t_m >= along[-1] - 1.0:
        return int(last)
    if len(pixels) < 2 or len(coords) < 3:
        return None
    c = int(np.clip(np.argmin(np.abs(along - t_m)), 1, len(coords) - 2))
    j = int(np.clip(c, 1, len(pixels) - 1))
    graph.remove_edge(u, v, key)
    graph.add_edge(
        first,
        new_node,
        key=key,
        coords=coords[: c + 1],
        pixels=pixels[:j],
        start=first,
        length=float(along[c]),
    )
    graph.add_edge(
        new_node,
        last,
        key=new_key,
        coords=coords[c:],
        pixels=pixels[j:],
        start=new_node,
        length=float(along[-1] - along[c]),
    )
    return new_node


def _oriented(d: dict[str, Any], frm: int) -> tuple[np.ndarray, np.ndarray]:
    if d["start"] == frm:
        return d["coords"], d["pixels"]
    return d["coords"][::-1], d["pixels"][::-1]


def _join_through(graph: nx.MultiGraph) -> None:
    """Merge the two edges at every node of degree 2 into one edge."""
    for node in list(graph.nodes):
        if node not in graph or graph.degree(node) != 2:
            continue
        inc = list(graph.edges(node, keys=True, data=True))
        if len(inc) != 2 or any(u == v for u, v, _, _ in inc):
            continue
        (_, a, ka, da), (_, b, kb, db) = inc
        ca, pa = _oriented(da, a)  # a → node
        cb, pb = _oriented(db, node)  # node → b
        coords = np.concatenate([ca, cb[1:]])
        pixels = np.concatenate([pa, pb])
        graph.remove_edge(node, a, ka)
        graph.remove_edge(node, b, kb)
        graph.remove_node(node)
        key = min(ka, kb)
        graph.add_edge(
            a, b, key=key, coords=coords, pixels=pixels, start=a, length=da["length"] + db["length"]
        )


def _finish(
    job: CenterlineJob,
    graph: nx.MultiGraph,
    rows: np.ndarray,
    cols: np.ndarray,
    wid: np.ndarray,
    conf: np.ndarray | None,
    width: int,
) -> FeatureBatch:
    data = [d for _, _, d in graph.edges(data=True) if len(d["coords"]) >= 2]
    if not data:
        return FeatureBatch.empty()
    lines = np.array([shapely.LineString(d["coords"]) for d in data], dtype=object)
    lines = job.frames.pixels_to_work(lines)
    if job.simplify_m > 0:
        lines = shapely.simplify(lines, job.simplify_m, preserve_topology=True)
    key = np.array(
        [
            min(zip(rows[d["pixels"]].tolist(), cols[d["pixels"]].tolist(), strict=True))
            for d in data
        ],
        dtype=np.int64,
    ).reshape(-1, 2)
    # a bridge left a line of its own (both its ends junctions) shares its pixel with the
    # line it leaves: its id comes from a key no pixel has
    bridges = np.array([bool(d.get("bridge")) for d in data])
    key[bridges, 0] = -1 - key[bridges, 0]
    n = len(lines)
    with np.errstate(invalid="ignore"):
        width_m = np.array(
            [np.nanmean(wid[d["pixels"]]) if len(d["pixels"]) else np.nan for d in data]
        )
    if conf is not None:
        cmean = np.array([conf[d["pixels"]].mean() / 255.0 for d in data])
    else:
        cmean = np.full(n, np.nan)
    columns = {
        "id": stable_ids(job.pred.scene, job.layer, key),
        "class": np.full(n, job.cls, dtype=object),
        "length_m": shapely.length(lines),
        "width_m": width_m,
        "confidence_mean": cmean,
        "scene": np.full(n, job.pred.scene, dtype=object),
        "model": np.full(n, job.pred.model, dtype=object),
    }
    return FeatureBatch(lines, key, columns).sorted()
