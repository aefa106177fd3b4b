"""The living building layer: one GeoPackage that every run updates, each building once.

Each building carries ``first_seen`` and ``last_seen`` (UTC, ISO 8601: the start of the runs
that first and last saw it) and the scene that last saw it. A scene's new buildings are
matched one to one against the living buildings within its valid-data footprint: a match
updates ``last_seen`` and the outline, a building without a match is added. Rerunning a
scene therefore matches every building it adds the first time: none is counted twice.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from geoseg.errors import InputError, OutputError

if TYPE_CHECKING:
    import geopandas as gpd

__all__ = ["LAYER", "update_living"]

#: The layer name inside the GeoPackage.
LAYER = "buildings"
COLUMNS = ["building_id", "first_seen", "last_seen", "scene"]

_LOCK = threading.Lock()  # scenes in flight update the same file one after the other


def _read(path: Path) -> gpd.GeoDataFrame:
    import geopandas as gpd
    import pyogrio

    if not path.exists():
        return gpd.GeoDataFrame({c: [] for c in COLUMNS}, geometry=[], crs="EPSG:4326")
    try:
        gdf = pyogrio.read_dataframe(path, layer=LAYER)
    except (pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError, OSError) as exc:
        raise InputError(f"{path}: cannot read the living building layer ({exc})") from exc
    missing = set(COLUMNS) - set(gdf.columns)
    if missing:
        raise InputError(f"{path}: not a living building layer (no {', '.join(sorted(missing))})")
    return gdf.to_crs("EPSG:4326")


def _write(gdf: gpd.GeoDataFrame, path: Path) -> None:
    import pyogrio

    from geoseg.io.tempfiles import temporary_path

    tmp = temporary_path(path, ".gpkg")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        pyogrio.write_dataframe(gdf, tmp, driver="GPKG", layer=LAYER)
        os.replace(tmp, path)
    except (OSError, pyogrio.errors.DataSourceError) as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write the living building layer ({exc})") from exc


def update_living(
    path: str | os.PathLike[str],
    buildings: gpd.GeoDataFrame,
    area: gpd.GeoSeries,
    seen: str,
    scene: str,
    match_iou: float = 0.3,
) -> dict[str, int]:
    """Merge a scene's ``buildings`` (polygons with a CRS) into the living layer at ``path``
    within ``area`` (the scene's footprint, with its CRS); ``seen`` is the run's time (ISO
    8601). Returns ``{"new": n, "seen_again": m, "total": t}``."""
    import geopandas as gpd
    import pandas as pd
    import shapely

    from geoseg.evaluate import match_polygons, metric_pair

    p = Path(path)
    with _LOCK:
        living = _read(p)
        footprint = shapely.union_all(np.asarray(area.to_crs("EPSG:4326").values))
        inside = np.flatnonzero(np.asarray(living.geometry.intersects(footprint), dtype=bool))
        new, old = metric_pair(buildings, living.iloc[inside])
        matches = match_polygons(list(new.geometry), list(old.geometry), match_iou)
        new_4326 = buildings.to_crs("EPSG:4326").geometry.to_numpy()
        for i, j, _ in matches:
            row = living.index[inside[j]]
            living.loc[row, ["last_seen", "scene"]] = [seen, scene]
            living.loc[row, "geometry"] = new_4326[i]
        matched = {i for i, _, _ in matches}
        fresh = [i for i in range(len(buildings)) if i not in matched]
        start = int(living["building_id"].max()) + 1 if len(living) else 1
        added = gpd.GeoDataFrame(
            {
                "building_id": np.arange(start, start + len(fresh), dtype=np.int64),
                "first_seen": [seen] * len(fresh),
                "last_seen": [seen] * len(fresh),
                "scene": [scene] * len(fresh),
            },
            geometry=list(new_4326[fresh]) if fresh else [],
            crs="EPSG:4326",
        )
        merged = pd.concat([living, added], ignore_index=True) if len(living) else added
        merged = gpd.GeoDataFrame(merged, geometry="geometry", crs="EPSG:4326")
        merged["building_id"] = merged["building_id"].astype(np.int64)
        _write(merged, p)
    return {"new": len(fresh), "seen_again": len(matches), "total": len(merged)}
