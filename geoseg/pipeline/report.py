"""A run's report: one self-contained HTML page a person opens in any browser, offline.

It shows the run (status, times, model), a row per scene (quicklook, building count, road
length, changes, time, and why a scene failed) and a map: an inline SVG of the scenes'
footprints with their buildings and changes, coloured by class. Nothing is loaded from
elsewhere: no script at all, styles inline, quicklooks as small PNG data URIs, and the map
draws simplified geometries. The full layers are linked, not embedded.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geoseg.errors import OutputError
from geoseg.io.remote import is_remote, redact
from geoseg.pipeline.ledger import Ledger, RunRow, SceneRow

if TYPE_CHECKING:
    from shapely.geometry.base import BaseGeometry

__all__ = ["render_report", "scene_facts", "write_report"]

#: The map's width, CSS pixels; its height follows the footprints' shape.
MAP_PX = 760
#: Thumbnails' longer side, pixels.
THUMB_PX = 160
#: At most this many buildings are drawn per scene (the map stays small); changes always are.
MAP_BUILDINGS = 4000
CHANGE_COLOURS = {"added": "#00c85a", "removed": "#2878ff", "changed": "#ff8c00"}


# --- what the runner records per scene ---------------------------------------------------------


def scene_facts(scene_path: str, line_layers: dict[str, str]) -> dict[str, Any]:
    """What the report needs beyond the ledger's files and counts: the scene's valid-data
    footprint (GeoJSON geometry, EPSG:4326, simplified to about 1/200 of its size) and the
    length of each line layer, metres."""
    import shapely

    from geoseg.changes import valid_outline

    outline = valid_outline(scene_path, longest=512).to_crs("EPSG:4326")
    geom = outline.iloc[0]
    x0, y0, x1, y1 = geom.bounds
    simple = geom.simplify(max(x1 - x0, y1 - y0) / 200)
    facts: dict[str, Any] = {"footprint": shapely.geometry.mapping(simple)}
    lengths = {}
    for name, path in line_layers.items():
        lengths[name] = round(_length_m(path), 1)
    if lengths:
        facts["lengths_m"] = lengths
    return facts


def _length_m(path: str) -> float:
    """Total length of a line layer (GeoJSON, EPSG:4326), ground metres (local UTM)."""
    import pyogrio

    gdf = pyogrio.read_dataframe(path, columns=[])
    if not len(gdf):
        return 0.0
    return float(gdf.to_crs(gdf.estimate_utm_crs()).length.sum())


# --- gathering -------------------------------------------------------------------------------


@dataclass
class _Scene:
    """One row of the report: the run's row, and the row whose outputs are shown (the same,
    or for a skipped scene the run that made its outputs)."""

    row: SceneRow
    shown: SceneRow | None
    stem: str = ""
    files: dict[str, str] = field(default_factory=dict)

    @property
    def info(self) -> dict[str, Any]:
        return self.shown.outputs if self.shown is not None else {}


def _scenes(ledger: Ledger, run: RunRow) -> list[_Scene]:
    out = []
    for row in ledger.scenes(run.id):
        shown = row if row.status == "done" else None
        if row.status == "skipped":
            shown = ledger.last_done(run.pipeline, row.path)
        s = _Scene(row, shown)
        s.files = dict(s.info.get("files", {}))
        name = row.path.rstrip("/").rsplit("/", 1)[-1]
        s.stem = name.rsplit(".", 1)[0] if "." in name else name
        out.append(s)
    return out


# --- pieces of the page ----------------------------------------------------------------------


def _thumbnail(path: str | None) -> str:
    """An <img> with the quicklook shrunk to a small PNG data URI, or '' without one."""
    if path is None or is_remote(path) or not Path(path).is_file():
        return ""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.thumbnail((THUMB_PX, THUMB_PX))
            buf = io.BytesIO()
            im.convert("RGB").save(buf, format="PNG", optimize=True)
    except OSError:
        return ""
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img class="thumb" alt="quicklook" src="data:image/png;base64,{data}">'


def _href(path: str, base: Path | None, link_base: str | None) -> str:
    """A link to an output: relative to the report's folder where both are local files."""
    if is_remote(path):
        return redact(path)
    if link_base is not None:
        return link_base.rstrip("/") + "/" + Path(path).parent.name + "/" + Path(path).name
    if base is not None:
        return Path(os.path.relpath(path, base)).as_posix()
    return Path(path).as_uri()


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t)) if t else "-"


def _secs(s: float | None) -> str:
    return f"{s:.1f} s" if s is not None else "-"


def _length(m: float | None) -> str:
    if m is None:
        return "-"
    return f"{m / 1000:.2f} km" if m >= 1000 else f"{m:.0f} m"


def _changes_cell(info: dict[str, Any]) -> str:
    counts = info.get("changes")
    if not counts:
        note = info.get("change_reference")
        return f'<span class="muted">{html.escape(note)}</span>' if note else "-"
    parts = [
        f'<span class="chip" style="background:{CHANGE_COLOURS[k]}">{counts.get(k, 0)} {k}</span>'
        for k in ("added", "removed", "changed")
    ]
    return (
        " ".join(parts) + f'<br><span class="muted">{counts.get("unchanged", 0)} unchanged</span>'
    )


def _scene_row(s: _Scene, base: Path | None, link_base: str | None) -> str:
    info, row = s.info, s.row
    counts = info.get("counts", {})
    buildings = next((v for k, v in counts.items() if "building" in k.lower()), None)
    lengths = info.get("lengths_m", {})
    road = next((v for k, v in lengths.items() if "road" in k.lower()), None)
    links = " ".join(
        f'<a href="{html.escape(_href(p, base, link_base))}">{html.escape(name)}</a>'
        for name, p in sorted(s.files.items())
        if name != "quicklook"
    )
    status = html.escape(row.status)
    why = html.escape(row.error or row.reason or "")
    return (
        f'<tr id="scene-{html.escape(s.stem)}" class="{status}">'
        f"<td>{_thumbnail(s.files.get('quicklook'))}</td>"
        f'<td><b>{html.escape(s.stem)}</b><br><span class="muted">{html.escape(row.path)}</span>'
        f"<br>{links}</td>"
        f'<td><span class="status {status}">{status}</span><br>'
        f'<span class="{"error" if row.error else "muted"}">{why}</span></td>'
        f'<td class="num">{buildings if buildings is not None else "-"}</td>'
        f'<td class="num">{_length(road)}</td>'
        f"<td>{_changes_cell(info)}</td>"
        f'<td class="num">{_secs(row.seconds if row.status != "skipped" else None)}</td>'
        "</tr>"
    )


# --- the map -----------------------------------------------------------------------------------


class _Projection:
    """Longitude/latitude to SVG pixels: equirectangular, scaled by the cosine of the middle
    latitude so that shapes keep their proportions."""

    def __init__(self, bounds: tuple[float, float, float, float], width: int) -> None:
        x0, y0, x1, y1 = bounds
        self.k = math.cos(math.radians((y0 + y1) / 2))
        span = max((x1 - x0) * self.k, y1 - y0, 1e-9)
        self.scale = (width - 20) / span
        self.x0, self.y1 = x0, y1
        self.width = width
        self.height = int((y1 - y0) * self.scale) + 20

    def path(self, geom: BaseGeometry) -> str:
        """An SVG path of a (multi)polygon's rings, coordinates to 0.1 px."""
        import shapely

        out = []
        for poly in shapely.get_parts(geom):
            if poly.geom_type != "Polygon":
                continue
            for ring in (poly.exterior, *poly.interiors):
                pts = " ".join(
                    f"{10 + (x - self.x0) * self.k * self.scale:.1f},"
                    f"{10 + (self.y1 - y) * self.scale:.1f}"
                    for x, y in ring.coords[:-1]
                )
                if pts:
                    out.append(f"M{pts}Z")
        return "".join(out)


def _layer(path: str | None, limit: int | None) -> Any:
    """A local GeoJSON layer in EPSG:4326, or None when missing or larger than ``limit``."""
    if path is None or is_remote(path) or not Path(path).is_file():
        return None
    import pyogrio

    try:
        info = pyogrio.read_info(path)
        if limit is not None and info["features"] > limit:
            return None
        gdf = pyogrio.read_dataframe(path)
    except (pyogrio.errors.DataSourceError, OSError):
        return None
    return gdf.to_crs("EPSG:4326") if gdf.crs is not None else None


_MAP_OPEN, _MAP_CLOSE = "<!-- geoseg-map {} -->", "<!-- /geoseg-map -->"


def _map_key(scenes: list[_Scene]) -> str:
    """What the map is drawn from: each scene's footprint and the size and modification time
    of its building and change layers (a stat, no geometry read)."""
    import hashlib
    import json

    parts = []
    for s in scenes:
        stamps = {}
        for name, path in sorted(s.files.items()):
            if (name.startswith("building") and name.endswith(".geojson")) or name == "changes":
                try:
                    st = os.stat(path) if not is_remote(path) else None
                except OSError:
                    st = None
                stamps[name] = [path, st.st_size, st.st_mtime_ns] if st else [path]
        parts.append([s.stem, s.info.get("footprint"), stamps])
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _cached_map(scenes: list[_Scene], previous: str | None) -> str:
    """The map between markers that carry its key: taken from the ``previous`` page when its
    key is the same (a run that only skipped redraws nothing, and reads no geometry), else
    drawn anew."""
    key = _map_key(scenes)
    start = _MAP_OPEN.format(key)
    if previous and start in previous:
        body = previous.split(start, 1)[1]
        if _MAP_CLOSE in body:
            return start + body.split(_MAP_CLOSE, 1)[0] + _MAP_CLOSE
    return start + _map(scenes) + _MAP_CLOSE


def _map(scenes: list[_Scene]) -> str:
    """The inline SVG map, or a line saying there is nothing to draw."""
    from shapely.geometry import shape

    footprints = [(s, shape(s.info["footprint"])) for s in scenes if s.info.get("footprint")]
    if not footprints:
        return '<p class="muted">No scene footprint to draw.</p>'
    x0 = min(g.bounds[0] for _, g in footprints)
    y0 = min(g.bounds[1] for _, g in footprints)
    x1 = max(g.bounds[2] for _, g in footprints)
    y1 = max(g.bounds[3] for _, g in footprints)
    proj = _Projection((x0, y0, x1, y1), MAP_PX)
    tol = 1.0 / proj.scale  # one pixel, degrees
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{proj.width}" height="{proj.height}" '
        f'viewBox="0 0 {proj.width} {proj.height}" role="img" aria-label="map of the scenes">'
    ]
    for s, fp in footprints:
        parts.append(
            f'<a href="#scene-{html.escape(s.stem)}"><path class="fp" d="{proj.path(fp)}">'
            f"<title>{html.escape(s.stem)}</title></path></a>"
        )
    for s, _ in footprints:
        building = next(
            (p for n, p in s.files.items() if n.startswith("building") and n.endswith(".geojson")),
            None,
        )
        gdf = _layer(building, MAP_BUILDINGS)
        if gdf is not None and len(gdf):
            d = "".join(proj.path(g.simplify(tol)) for g in gdf.geometry if g is not None)
            parts.append(f'<path class="bldg" d="{d}"/>')
        changes = _layer(s.files.get("changes"), None)
        if changes is not None and len(changes) and "change" in changes.columns:
            for kind, colour in CHANGE_COLOURS.items():
                sel = changes.geometry[changes["change"] == kind]
                d = "".join(proj.path(g.simplify(tol)) for g in sel if g is not None)
                if d:
                    parts.append(
                        f'<path class="chg" fill="{colour}" stroke="{colour}" d="{d}">'
                        f"<title>{kind}</title></path>"
                    )
    parts.append("</svg>")
    return "".join(parts)


# --- the page ----------------------------------------------------------------------------------

_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:24px 0 8px}
.muted{color:#777;font-size:12px} .error{color:#b00020;font-size:12px}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 16px;margin:8px 0}
dt{color:#555} dd{margin:0}
table{border-collapse:collapse;width:100%} th,td{padding:6px 8px;border-bottom:1px solid #ddd;
vertical-align:top;text-align:left} th{background:#f4f4f4;font-weight:600}
td.num{text-align:right;white-space:nowrap} .thumb{display:block;max-width:160px}
.status{font-weight:600} .status.done{color:#1b7f3b}
.status.failed,.status.interrupted{color:#b00020} .status.skipped{color:#777}
tr.failed{background:#fff4f4}
.chip{display:inline-block;color:#fff;border-radius:3px;padding:0 5px;margin:1px 0;font-size:12px}
svg{border:1px solid #ccc;background:#fafafa;max-width:100%;height:auto}
.fp{fill:#e8eef6;stroke:#4a5a70;stroke-width:1} .bldg{fill:#ff2828;fill-opacity:.35;stroke:#c00;
stroke-width:.4} .chg{fill-opacity:.55;stroke-width:1.2}
.legend span{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px;vertical-align:-1px}
a{color:#0b57d0}
"""


def _run_part(run: RunRow) -> str:
    dur = f"{run.finished - run.started:.1f} s" if run.finished else "-"
    items = [
        (
            "status",
            f'<span class="status {html.escape(run.status)}">{html.escape(run.status)}</span>',
        ),
        ("started", _when(run.started)),
        ("finished", _when(run.finished)),
        ("duration", dur),
        ("scenes", f"{run.n_done} done, {run.n_skipped} skipped, {run.n_failed} failed"),
        (
            "model",
            f"{html.escape(run.model)} <span class='muted'>sha256 {run.model_hash[:12]}</span>",
        ),
        ("compute", html.escape(run.compute)),
        ("pipeline file", html.escape(run.source)),
    ]
    if run.message:
        items.append(("message", html.escape(run.message)))
    return "<dl>" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"


def _totals(scenes: list[_Scene]) -> str:
    compared = [
        s.info["changes"] for s in scenes if s.row.status == "done" and s.info.get("changes")
    ]
    if not compared:
        return ""
    total = {k: sum(c.get(k, 0) for c in compared) for k in ("added", "removed", "changed")}
    text = ", ".join(f"{v} {k}" for k, v in total.items())
    return f"<p>Building changes in the scenes done in this run: <b>{text}</b>.</p>"


def render_report(
    ledger: Ledger,
    run_id: int,
    base: Path | None = None,
    link_base: str | None = None,
    previous: str | None = None,
) -> str:
    """The HTML of run ``run_id``'s report. Links to outputs are relative to the folder
    ``base`` (where the page will live), or under the prefix ``link_base`` (a bucket); the map
    of a ``previous`` page is reused when it was drawn from the same footprints and layers."""
    run = ledger.run(run_id)
    if run is None:
        raise OutputError(f"{ledger.path}: no run with id {run_id}")
    scenes = _scenes(ledger, run)
    rows = "".join(_scene_row(s, base, link_base) for s in scenes)
    legend = (
        '<p class="legend muted">'
        '<span style="background:#e8eef6;border:1px solid #4a5a70"></span>scene footprint'
        '<span style="background:#ff2828;opacity:.5"></span>buildings'
        + "".join(f'<span style="background:{c}"></span>{k}' for k, c in CHANGE_COLOURS.items())
        + "</p>"
    )
    title = f"{html.escape(run.pipeline)}: run {run.id}"
    return "\n".join(
        _lines(
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width,initial-scale=1">',
            f"<title>{title}</title><style>{_STYLE}</style></head><body>",
            f"<h1>{title}</h1>",
            _run_part(run),
            _totals(scenes),
            "<h2>Map</h2>",
            _cached_map(scenes, previous),
            legend,
            "<h2>Scenes</h2>",
            "<table><thead><tr><th>quicklook</th><th>scene and outputs</th><th>status</th>"
            "<th>buildings</th><th>roads</th><th>changes</th><th>time</th></tr></thead>",
            f"<tbody>{rows}</tbody></table>",
            f'<p class="muted">Written {_when(time.time())} by geoseg.</p>',
            "</body></html>",
        )
    )


def _lines(*parts: str) -> Iterator[str]:
    return (p for p in parts if p)


def write_report(
    ledger: Ledger, run_id: int, out: str | os.PathLike[str], link_base: str | None = None
) -> Path:
    """Write run ``run_id``'s report to ``out``, atomically; links are relative to its folder
    (or under ``link_base``)."""
    from geoseg.io.tempfiles import temporary_path

    out = Path(out)
    try:
        previous: str | None = out.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        previous = None
    text = render_report(ledger, run_id, out.resolve().parent, link_base, previous)
    tmp = temporary_path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{out}: cannot write the report ({exc.strerror or exc})") from exc
    return out
