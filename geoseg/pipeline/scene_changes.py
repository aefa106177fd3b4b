"""Changes of a pipeline's scenes: each scene's new buildings against the pipeline's reference.

The reference is a building layer (read once per run) or ``previous``: the building layer
that this pipeline's last successful run of the same scene wrote. That file is replaced by
the new run, so it is read before the scene is predicted, and only when it is still the
file the ledger recorded (its size and modification time).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geoseg.pipeline.config import PipelineConfig
from geoseg.pipeline.ledger import Ledger

if TYPE_CHECKING:
    import geopandas as gpd

__all__ = ["Reference", "SceneChanges"]


@dataclass
class Reference:
    """A scene's reference buildings (None: nothing to compare with) and where they came
    from, or why there are none."""

    buildings: gpd.GeoDataFrame | None
    note: str


class SceneChanges:
    """Reads references, compares scenes and keeps the living layer, for one run."""

    def __init__(self, config: PipelineConfig, ledger: Ledger, seen: str) -> None:
        assert config.changes is not None
        self.config = config
        self.settings = config.changes
        self.ledger = ledger
        self.seen = seen  # the run's time, UTC ISO 8601
        self._lock = threading.Lock()
        self._shared: Reference | None = None

    @property
    def layer_file(self) -> str:
        """The name of the compared layer among a scene's output files (the vectorizer names
        a class's polygon layer after the class, in the plural)."""
        return f"{self.settings.layer}s.geojson"

    def reference(self, ledger_key: str) -> Reference:
        """The reference buildings of the scene the ledger names ``ledger_key``."""
        ref = self.config.change_reference
        if ref == "previous":
            return self._previous(ledger_key)
        assert ref is not None
        with self._lock:
            if self._shared is None:
                from geoseg.changes import read_buildings

                self._shared = Reference(read_buildings(ref), ref)
            return self._shared

    def _previous(self, ledger_key: str) -> Reference:
        from geoseg.changes import read_buildings
        from geoseg.pipeline.identity import output_identity

        prev = self.ledger.last_done(self.config.name, ledger_key)
        if prev is None:
            return Reference(None, "no previous run of this scene")
        path = prev.outputs.get("files", {}).get(self.layer_file)
        if path is None:
            return Reference(None, f"run {prev.run_id} wrote no {self.layer_file}")
        recorded = prev.outputs.get("identity", {}).get(self.layer_file)
        now = output_identity(path)
        if now is None:
            return Reference(None, f"the {self.layer_file} of run {prev.run_id} is gone")
        if recorded is not None and list(now) != list(recorded):
            return Reference(None, f"the {self.layer_file} of run {prev.run_id} was replaced since")
        return Reference(read_buildings(path), f"run {prev.run_id}")

    def compare(
        self,
        reference: Reference,
        scene_path: str,
        stem: str,
        layer_path: str | Path,
        out: Path,
    ) -> tuple[dict[str, str], dict[str, Any], gpd.GeoDataFrame | None]:
        """Compare the scene's new layer with ``reference`` within the scene's valid-data
        footprint; write ``<out>/<stem>.changes.geojson`` and update the living layer.

        Returns (files written, ledger information, the change features or None)."""
        from geoseg.changes import (
            ChangeOptions,
            NoOverlapError,
            compare_buildings,
            read_buildings,
            valid_outline,
            write_changes,
        )

        s = self.settings
        after = read_buildings(layer_path)
        area = valid_outline(scene_path)
        info: dict[str, Any] = {"change_reference": reference.note}
        files: dict[str, str] = {}
        features = None
        if reference.buildings is not None:
            options = ChangeOptions(s.match_iou, s.unchanged_iou, s.min_area_m2)
            try:
                result = compare_buildings(
                    reference.buildings, after, area, options, (reference.note, str(layer_path))
                )
            except NoOverlapError as exc:
                info["change_reference"] = f"{reference.note}: not compared ({exc})"
            else:
                path = write_changes(result, out / f"{stem}.changes.geojson")
                files["changes"] = str(path)
                info["changes"] = result.counts
                features = result.selected()
        if "changes" not in files:  # none this time: a layer of an earlier run must not linger
            (out / f"{stem}.changes.geojson").unlink(missing_ok=True)
        if s.living is not None:
            from geoseg.pipeline.living import update_living

            info["living"] = update_living(
                self.config.resolve(s.living), after, area, self.seen, stem, s.match_iou
            )
        return files, info, features
