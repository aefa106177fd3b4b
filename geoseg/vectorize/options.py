"""Options and results of vectorizing one prediction raster."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: The class a model learns between touching buildings (see ``contact_class`` in training).
CONTACT_CLASS = "building_contact"

__all__ = ["CONTACT_CLASS", "FORMATS", "LayerOutput", "VectorizeOptions", "VectorizeOutputs"]

Format = Literal["geojson", "gpkg", "fgb", "parquet"]
LayerKind = Literal["polygons", "centerlines"]

#: File extension of each output format.
FORMATS: dict[str, str] = {
    "geojson": "geojson",
    "gpkg": "gpkg",
    "fgb": "fgb",
    "parquet": "parquet",
}


def _default_layers() -> dict[str, LayerKind]:
    return {"building": "polygons", "road": "centerlines"}


class VectorizeOptions(BaseModel):
    """How to turn class probabilities or class ids into vector layers; lengths in metres."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    threshold: float = Field(
        default=0.5,
        gt=0.0,
        le=1.0,
        description="A pixel is in a class when its probability >= this.",
    )
    building_threshold: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="The threshold of the building class's polygons (building and, merged, "
        "contact probability), in place of threshold: a higher one narrows buildings to their "
        "surest pixels, which parts neighbours that a yard or an alley barely separates; None "
        "= threshold. Needs the probabilities (a class mask is the likeliest class already).",
    )
    min_area_m2: float = Field(
        default=2.0, ge=0.0, description="Drop polygons smaller than this (square metres)."
    )
    simplify_m: float = Field(
        default=0.5,
        ge=0.0,
        description="Topology-preserving simplification (metres); 0 = off.",
    )
    regularize: bool = Field(
        default=False, description="Straighten building outlines to their dominant orientation."
    )
    layers: dict[str, LayerKind] = Field(
        default_factory=_default_layers,
        description="Class name → layer type; classes not listed are not vectorized.",
    )
    spur_m: float = Field(
        default=10.0,
        ge=0.0,
        description="Prune dangling centerline edges shorter than this (m).",
    )
    bridge_m: float = Field(
        default=0.0,
        ge=0.0,
        description="Join each dangling centerline end to the nearest road ahead of it (within "
        "35° of its direction) when one lies within this distance (m): a road broken under a "
        "tree or a shadow becomes one line, a side street that stops short meets its road; "
        "0 = off.",
    )
    split_touching: bool = Field(
        default=True,
        description=f"Pixels of class {CONTACT_CLASS!r} (shared walls and narrow gaps, from a "
        "model trained with a contact class) separate touching buildings; False counts them "
        "as building.",
    )
    contact_threshold: float = Field(
        default=0.4,
        gt=0.0,
        le=1.0,
        description=f"When splitting, pixels whose {CONTACT_CLASS!r} probability is at least this "
        "are cut out of buildings (besides those where it is the likeliest class). 0.4 was "
        "best for the earlier demo model on a training part of Banepa (F1 0.502, against 0.486 "
        "at 0.5); for the six-city model the held-out data gave no better value.",
    )
    valley_m: float = Field(
        default=0.0,
        ge=0.0,
        description="Also cut out of buildings the pixels where the building probability lies "
        "at least valley_depth below its closing (grey-level) over a square this wide (m): the "
        "thin dips along shared walls and narrow gaps that the contact class misses, so that "
        "touching buildings become separate polygons; 0 = off. Needs the probabilities; off "
        "when split_touching is false.",
    )
    valley_depth: float = Field(
        default=0.1,
        gt=0.0,
        le=1.0,
        description="How far (in probability) below its surroundings a pixel must lie to be cut "
        "with valley_m.",
    )
    road_polygons: bool = Field(
        default=False,
        description="Also write polygons of centerline classes (<class>_areas).",
    )
    formats: tuple[Format, ...] = Field(
        default=("geojson",), description="Output formats; GeoJSON (EPSG:4326) is always written."
    )
    precision: int = Field(
        default=7, ge=0, le=15, description="Decimals of GeoJSON coordinates (7 ≈ 1 cm)."
    )
    chunk: int = Field(default=2048, ge=64, description="Chunk core size (pixels).")
    halo: int = Field(
        default=64, ge=0, description="Context around each chunk for skeletonizing roads (pixels)."
    )
    workers: int = Field(
        default=2,
        ge=1,
        description="Local worker processes when no client is given. Beside a prediction, "
        "unless set: half the cores when that is more (the rest feed the model).",
    )

    def under(self, defaults: Mapping[str, Any]) -> VectorizeOptions:
        """These options with ``defaults`` (a model's chosen settings, see
        :class:`geoseg.models.bundle.VectorizeDefaults`) in place of the settings not given
        explicitly; the settings given keep their values."""
        unset = {k: v for k, v in defaults.items() if k not in self.model_fields_set}
        if all(getattr(self, k) == v for k, v in unset.items()):
            return self
        return type(self).model_validate({**self.model_dump(exclude_unset=True), **unset})

    @field_validator("formats", mode="before")
    @classmethod
    def _always_geojson(cls, v: object) -> object:
        if isinstance(v, str):
            v = (v,)
        if isinstance(v, list | tuple):
            names = [str(x).lower().lstrip(".") for x in v]
            names = ["parquet" if n == "geoparquet" else n for n in names]
            return tuple(dict.fromkeys(["geojson", *names]))
        return v

    @field_validator("layers")
    @classmethod
    def _some_layer(cls, v: dict[str, LayerKind]) -> dict[str, LayerKind]:
        if not v:
            raise ValueError("at least one class must be mapped to a layer type")
        return v


@dataclass
class LayerOutput:
    """One written layer: its type, feature count and one path per format."""

    name: str
    kind: LayerKind
    count: int
    paths: dict[str, Path] = field(default_factory=dict)


@dataclass
class VectorizeOutputs:
    """What vectorizing one prediction produced, layer by layer."""

    source: Path | str
    layers: dict[str, LayerOutput] = field(default_factory=dict)

    @property
    def paths(self) -> dict[str, dict[str, Path]]:
        """Layer name → format → path."""
        return {name: dict(layer.paths) for name, layer in self.layers.items()}

    @property
    def counts(self) -> dict[str, int]:
        """Layer name → number of features."""
        return {name: layer.count for name, layer in self.layers.items()}
