"""Pipeline files (``pipelines/*.yml``): a validated :class:`PipelineConfig` per file.

Validation is strict (``extra='forbid'``), so a typo fails with the field's name and its line
in the YAML file. Relative paths are taken relative to the directory of the YAML file, so a
pipeline runs the same from cron, a systemd timer or a shell in any directory.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from geoseg.errors import ConfigError, GeosegError
from geoseg.io.remote import is_remote, list_matching, redact, remote_key, remote_name
from geoseg.vectorize.options import Format, LayerKind, VectorizeOptions
from geoseg.yamlio import node_at, safe_load_unique

if TYPE_CHECKING:
    from geoseg.models.bundle import ModelSpec

__all__ = [
    "SCHEMA_VERSION",
    "ChangeSettings",
    "DaskCompute",
    "Inputs",
    "LocalCompute",
    "Outputs",
    "PipelineConfig",
    "PredictSettings",
    "ScheduleSettings",
    "load_pipeline",
    "load_pipelines",
]

SCHEMA_VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StacSearch(_Strict):
    """A STAC API search (pystac-client's ``search`` arguments)."""

    collections: list[str] | None = Field(None, description="Collection ids.")
    bbox: list[float] | None = Field(
        None, min_length=4, max_length=4, description="west, south, east, north (EPSG:4326)."
    )
    datetime: str | None = Field(None, description="A date, or an interval 'start/end'.")
    query: dict[str, Any] | None = Field(None, description="Property filters (STAC query).")
    ids: list[str] | None = Field(None, description="Item ids.")
    max_items: int = Field(1000, ge=1, description="At most this many items.")


class StacInput(_Strict):
    """Scenes from STAC: the asset ``asset`` of each item of ``source``."""

    source: str = Field(
        description="A STAC Item, ItemCollection or Catalog (file, relative to the YAML file, "
        "or URL), or with ``search`` the root URL of a STAC API."
    )
    asset: str = Field(description="The key of the asset to read, e.g. 'visual' or 'image'.")
    search: StacSearch | None = Field(None, description="Search the STAC API at ``source``.")


class Inputs(_Strict):
    """Which scenes to process: paths and globs, a text file listing paths, STAC items."""

    paths: list[str] = Field(
        default_factory=list,
        description="Scene files or glob patterns (``**`` recurses); relative to the YAML file.",
    )
    list_file: str | None = Field(
        None, description="A text file with one scene path per line ('#' starts a comment)."
    )
    exclude: list[str] = Field(
        default_factory=list, description="Glob patterns of file names or paths to leave out."
    )
    stac: StacInput | None = Field(None, description="Scenes from STAC items or a STAC search.")
    allow_empty: bool = Field(
        False,
        description="Succeed with nothing to do when no scene matches (for example a nightly "
        "drop folder that may be empty); by default an empty match is an error.",
    )


class PredictSettings(_Strict):
    """Prediction settings; sizes in model pixels, ``null`` takes the model's recommendation."""

    chunk: int | None = Field(None, ge=32, description="Chunk core size, model pixels.")
    halo: int | None = Field(None, ge=0, description="Halo on each side of a chunk, model pixels.")
    batch_size: int = Field(1, ge=1, description="Chunks per forward pass.")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto picks bf16/fp16 autocast where the device runs it fast."
    )
    resample: bool = Field(
        True,
        description="Read each chunk at the model's ground sample distance when the scene's "
        "differs from it by more than 5 % on an axis (false: read scenes as they are).",
    )
    max_resample_ratio: float = Field(
        8.0,
        ge=1.0,
        allow_inf_nan=False,
        description="Refuse scenes whose ground resolution is more than this many times finer "
        "or coarser than the model's GSD (with resample): their time and memory grow with it.",
    )
    tta: Literal["none", "flips", "d4"] = Field(
        "none",
        description="Test-time augmentation: average each chunk's class probabilities over its "
        "flips (flips: 4 forward passes) or its flips and quarter turns (d4: 8 passes).",
    )
    input_filter: str = Field(
        "model",
        description="The blur in front of the network. model: the model's own "
        "(input_low_pass_m in model.json); off: the imagery as it is; a number: blur every "
        "input to that effective ground resolution in metres (coarser than the model's).",
    )
    backend: Literal["auto", "torch", "openvino"] = Field(
        "auto",
        description="Inference backend. auto: OpenVINO on a CPU when it is installed, else "
        "torch (always on a GPU); openvino needs the geoseg[openvino] extra.",
    )

    @field_validator("input_filter", mode="before")
    @classmethod
    def _input_filter(cls, v: str | float) -> str:
        from geoseg.models.input_filter import parse_input_filter

        if v is False:  # YAML reads a bare `off` (or `no`) as false
            return "off"
        return parse_input_filter(v)  # anything else (a list, true) is no resolution either

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", v):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {v!r}")
        return v


RasterName = Literal["probs", "mask"]
Compression = Literal["deflate", "zstd", "lzw"]


def _both_rasters() -> list[RasterName]:
    return ["probs", "mask"]


class Outputs(_Strict):
    """Where and what to write; each scene gets its own folder ``<dir>/<scene stem>/``."""

    dir: str = Field(description="Output directory; every worker must be able to open it.")
    rasters: list[RasterName] = Field(
        default_factory=_both_rasters,
        description="Rasters to keep; the class mask is always written (the quicklook uses it).",
    )
    vectors: bool = Field(True, description="Vectorize the prediction into vector layers.")
    layers: dict[str, LayerKind] | None = Field(
        None,
        description="Class name → layer type (polygons or centerlines), e.g. {building: "
        "polygons, road: centerlines}; sets vectorize.layers.",
    )
    formats: list[Format] | None = Field(
        None,
        description="Vector formats among geojson, gpkg, fgb, parquet (GeoJSON is always "
        "written); sets vectorize.formats.",
    )
    compress: Compression = Field(
        "deflate",
        description="The rasters' COG codec: deflate (the default; every TIFF reader decodes "
        "it), zstd (smaller and faster; GDAL >= 2.3, QGIS, rasterio) or lzw.",
    )
    quicklook: bool = Field(True, description="Write <stem>.quicklook.png per scene.")
    quicklook_px: int = Field(1024, ge=64, le=8192, description="Quicklook's longer side, px.")
    report: bool = Field(
        True,
        description="Write report.html in the output folder after each run (a page a "
        "person opens: scenes, quicklooks, counts, changes and a map).",
    )


class LocalCompute(_Strict):
    """Run on this machine: an in-process Dask cluster of worker threads."""

    kind: Literal["local"] = "local"
    workers: int | None = Field(
        None,
        ge=1,
        description="Worker threads running chunks (default: 1 on a CPU, half the cores on CUDA).",
    )
    threads: int | None = Field(None, ge=1, description="Torch threads per worker.")
    scenes_in_flight: int = Field(2, ge=1, description="Scenes processed at the same time.")


class DaskCompute(_Strict):
    """Run on a ``dask.distributed`` cluster given by its scheduler address."""

    kind: Literal["dask"] = "dask"
    scheduler: str = Field(description="Scheduler address, e.g. tcp://10.0.0.5:8786.")
    threads: int | None = Field(None, ge=1, description="Torch threads per worker.")
    scenes_in_flight: int = Field(4, ge=1, description="Scenes in flight on the cluster.")


Compute = Annotated[LocalCompute | DaskCompute, Field(discriminator="kind")]


class ChangeSettings(_Strict):
    """Building changes per scene against a reference layer (``<stem>.changes.geojson``)."""

    reference: str = Field(
        description="'previous': each scene's buildings from this pipeline's last run of it; "
        "else a building layer (file relative to the YAML file, or URL) in any format and CRS."
    )
    layer: str = Field("building", description="The polygon layer compared (a class name).")
    match_iou: float = Field(
        0.3,
        gt=0,
        le=1,
        description="A reference and a new building with at least this IoU "
        "can be the same building (matched one to one, best first).",
    )
    unchanged_iou: float = Field(
        0.8,
        gt=0,
        le=1,
        description="A matched pair with at least this IoU is unchanged; below it, changed.",
    )
    min_area_m2: float = Field(
        0.0, ge=0, description="Leave out buildings smaller than this, ground square metres."
    )
    living: str | None = Field(
        None,
        description="A GeoPackage (relative to the YAML file) kept up to date by every run: "
        "each building once, with first_seen and last_seen (UTC, ISO 8601).",
    )

    @model_validator(mode="after")
    def _ious(self) -> ChangeSettings:
        if self.unchanged_iou < self.match_iou:
            raise ValueError(
                f"unchanged_iou ({self.unchanged_iou}) must be at least match_iou "
                f"({self.match_iou})"
            )
        return self


class ScheduleSettings(_Strict):
    """When ``geoseg schedule`` triggers this pipeline."""

    cron: str = Field(description="Five-field cron expression, e.g. '0 2 * * *' (02:00 daily).")
    timezone: str = Field("UTC", description="IANA time zone of the cron expression.")
    catch_up: bool = Field(
        False,
        description="After downtime or an overrun, run once for the missed triggers (true) "
        "or skip them and wait for the next one (false).",
    )
    max_late_s: int = Field(
        24 * 3600, ge=0, description="Missed triggers older than this many seconds are skipped."
    )

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        from croniter import croniter

        if len(v.split()) != 5 or not croniter.is_valid(v):
            raise ValueError(f"not a valid five-field cron expression: {v!r}")
        return v

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(
                f"unknown time zone {v!r} (use an IANA name like Europe/Paris)"
            ) from exc
        return v


class PipelineConfig(_Strict):
    """One pipeline file: what to process, with which model and settings, where, and when."""

    _stac: dict[str, str] | None = PrivateAttr(None)
    _stac_errors: dict[str, str] = PrivateAttr(default_factory=dict)

    schema_version: Literal[1] = Field(description="Pipeline file format version; must be 1.")
    name: str = Field(description="Pipeline name: letters, digits, '.', '_' and '-'.")
    description: str = ""
    inputs: Inputs
    model: str = Field(description="Model bundle directory (model.json + weights.safetensors).")
    predict: PredictSettings = Field(default_factory=lambda: PredictSettings.model_validate({}))
    vectorize: VectorizeOptions = Field(
        default_factory=VectorizeOptions,
        description="Vectorizer settings (threshold, building_threshold, min_area_m2, regularize, "
        "simplify_m, spur_m, bridge_m, valley_m, valley_depth, road_polygons, precision, chunk, "
        "halo); see geoseg.vectorize.VectorizeOptions.",
    )
    outputs: Outputs
    compute: Compute = Field(default_factory=lambda: LocalCompute.model_validate({}))
    schedule: ScheduleSettings | None = None
    changes: ChangeSettings | None = Field(
        None, description="Building changes per scene against a reference layer."
    )
    ledger: str | None = Field(
        None, description="SQLite run ledger (default: $GEOSEG_HOME/ledger.sqlite)."
    )
    source: str = Field("", exclude=True, description="The YAML file this came from.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"name may hold letters, digits, '.', '_' and '-' only, got {v!r}")
        return v

    @property
    def base_dir(self) -> Path:
        """Directory that relative paths in the file are resolved against."""
        return Path(self.source).resolve().parent if self.source else Path.cwd()

    def resolve(self, path: str) -> Path:
        """``path`` with ``~`` and environment variables expanded, relative to the file."""
        p = Path(os.path.expandvars(os.path.expanduser(path)))
        return Path(os.path.normpath(p if p.is_absolute() else self.base_dir / p))

    @property
    def model_path(self) -> Path:
        return self.resolve(self.model)

    @property
    def out_dir(self) -> Path:
        """The local output directory (for a remote ``outputs.dir``, see :attr:`remote_out`)."""
        return self.resolve(self.outputs.dir)

    @property
    def remote_out(self) -> str | None:
        """``outputs.dir`` when it is an object-store prefix (s3://, gs://, az://), else None."""
        return self.outputs.dir if is_remote(self.outputs.dir) else None

    def config_hash(self, model: ModelSpec | None = None) -> str:
        """SHA-256 of every setting that changes the outputs (not inputs, compute or schedule);
        with ``model``, the vectorizer settings chosen for it count where they apply, and its
        input filter (``input_low_pass_m``) when it has one."""
        vectorize = self.vectorize_options(model)
        relevant = {
            "schema_version": self.schema_version,
            # tta, input_filter, backend and max_resample_ratio only when set: pipelines hashed
            # before they existed keep their hash
            "predict": self.predict.model_dump(
                mode="json",
                exclude=({"tta"} if self.predict.tta == "none" else set())
                | ({"input_filter"} if self.predict.input_filter == "model" else set())
                | ({"backend"} if self.predict.backend == "auto" else set())
                | ({"max_resample_ratio"} if self.predict.max_resample_ratio == 8.0 else set()),
            ),
            # bridge_m, the valley cut and building_threshold only when set: pipelines hashed
            # before they existed keep their hash
            "vectorize": vectorize.model_dump(
                mode="json",
                exclude=({"bridge_m"} if not vectorize.bridge_m else set())
                | ({"valley_m", "valley_depth"} if not vectorize.valley_m else set())
                | ({"building_threshold"} if vectorize.building_threshold is None else set()),
            ),
            # compress only when set: pipelines hashed before it existed keep their hash
            "outputs": self.outputs.model_dump(
                mode="json",
                exclude={"dir", "report"}  # the report is the run's, not a scene's output
                | ({"compress"} if self.outputs.compress == "deflate" else set()),
            ),
        }
        if self.changes is not None:  # only when set: pipelines without it keep their hash
            relevant["changes"] = self.changes.model_dump(mode="json", exclude={"living"})
        if model is not None and model.input_low_pass_m is not None:
            # the model's input filter changes its outputs on the same weights (the ledger's
            # model hash); only when set: pipelines whose model has none keep their hash
            relevant["input_low_pass_m"] = model.input_low_pass_m
        blob = json.dumps(relevant, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def vectorize_options(self, model: ModelSpec | None = None) -> VectorizeOptions:
        """The vectorizer's options, with ``outputs.layers`` and ``outputs.formats`` applied,
        and the settings chosen for ``model`` (``model.json``'s ``vectorize``) in place of
        those this file does not set."""
        update: dict[str, Any] = {}
        if self.outputs.layers is not None:
            update["layers"] = dict(self.outputs.layers)
        if self.outputs.formats is not None:
            update["formats"] = list(self.outputs.formats)
        options = self.vectorize
        if update:
            given = self.vectorize.model_dump(exclude_unset=True)  # defaults stay defaults
            options = VectorizeOptions.model_validate({**given, **update})
        if model is not None and model.vectorize is not None:
            options = options.under(model.vectorize.settings())
        return options

    @model_validator(mode="after")
    def _one_place_for_layers(self) -> PipelineConfig:
        for name in ("layers", "formats"):
            if getattr(self.outputs, name) is not None and name in self.vectorize.model_fields_set:
                raise ValueError(f"set {name} in outputs or in vectorize, not in both")
        if self.changes is not None and not self.outputs.vectors:
            raise ValueError("changes need building layers: set outputs.vectors to true")
        return self

    @property
    def change_reference(self) -> str | None:
        """``changes.reference`` as a path or URL to read ('previous' as it is); None: off."""
        if self.changes is None:
            return None
        ref = self.changes.reference
        return ref if ref == "previous" or is_remote(ref) else str(self.resolve(ref))

    def scene_paths(self) -> list[Path | str]:
        """Every scene the inputs match, sorted, without duplicates; raise if none match.

        Local scenes are absolute paths; remote ones (URLs, ``/vsi`` paths; see
        :mod:`geoseg.io.remote`) stay strings, and a URL with glob characters in its key is
        matched against a listing of the store."""
        found: dict[str, Path | str] = {}
        for href in self.stac_items():
            scene: Path | str = href if is_remote(href) else Path(href)
            if not self._excluded(scene):
                found.setdefault(href, scene)
        entries = [(p, "inputs.paths") for p in self.inputs.paths]
        if self.inputs.list_file:
            entries += [(p, f"inputs.list_file ({self.inputs.list_file})") for p in self._listed()]
        for entry, origin in entries:
            if is_remote(entry):
                urls = [entry]
                if globlib.has_magic(remote_key(entry)):  # not a URL's query string
                    try:
                        urls = list_matching(entry)
                    except GeosegError as exc:
                        raise ConfigError(f"{self.source}: {origin}: {exc}") from exc
                    if not urls and not self.inputs.allow_empty:
                        raise ConfigError(
                            f"{self.source}: {origin}: {redact(entry)!r} matches no object"
                        )
                for url in urls:
                    if not self._excluded(url):
                        found.setdefault(url, url)
                continue
            pattern = str(self.resolve(entry))
            if globlib.has_magic(pattern):
                matches = [Path(m) for m in globlib.glob(pattern, recursive=True)]
                matches = [m for m in matches if m.is_file()]
                if not matches and not self.inputs.allow_empty:
                    raise ConfigError(f"{self.source}: {origin}: {entry!r} matches no file")
            else:
                matches = [Path(pattern)]
            for m in matches:
                if not self._excluded(m):
                    found.setdefault(str(m.resolve()), m.resolve())
        if not found and not self.inputs.allow_empty:
            raise ConfigError(f"{self.source}: inputs match no scene")
        return [found[k] for k in sorted(found)]

    def stac_items(self) -> dict[str, str]:
        """Asset href → STAC item id of the scenes ``inputs.stac`` names (read once)."""
        if self.inputs.stac is None:
            return {}
        if self._stac is None:
            from geoseg.io.stac import stac_scenes

            st = self.inputs.stac
            source = st.source if is_remote(st.source) else str(self.resolve(st.source))
            search = None
            max_items = 1000
            if st.search is not None:
                search = st.search.model_dump(exclude_none=True)
                max_items = search.pop("max_items")
            try:
                found = stac_scenes(source, st.asset, search, max_items)
            except GeosegError as exc:
                raise ConfigError(f"{self.source}: inputs.stac: {exc}") from exc
            self._stac = {s.href: s.item_id for s in found}
            self._stac_errors = {s.href: s.error for s in found if s.error}
        return self._stac

    def stac_errors(self) -> dict[str, str]:
        """Href → why that STAC item cannot be read, for the item links of ``inputs.stac``
        that are broken: each is a scene that fails alone."""
        self.stac_items()
        return self._stac_errors

    def _listed(self) -> list[str]:
        assert self.inputs.list_file is not None
        p = self.resolve(self.inputs.list_file)
        try:
            lines = p.read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"{self.source}: inputs.list_file: cannot read {p} ({exc})") from exc
        base = p.parent
        out = []
        for line in lines:
            text = line.split("#", 1)[0].strip()
            if text and is_remote(text):
                out.append(text)
            elif text:
                q = Path(os.path.expanduser(text))
                out.append(str(q if q.is_absolute() else base / q))
        return out

    def _excluded(self, path: Path | str) -> bool:
        from fnmatch import fnmatch

        name = remote_name(path) if isinstance(path, str) else path.name
        pats = self.inputs.exclude
        return any(fnmatch(name, pat) or fnmatch(str(path), pat) for pat in pats)


def _clean_loc(loc: Sequence[int | str]) -> list[int | str]:
    """A pydantic error location without the union tags it inserts (``compute.local.x``)."""
    out: list[int | str] = []
    for i, x in enumerate(loc):
        if i == 1 and loc[0] == "compute" and x in ("local", "dask"):
            continue
        out.append(x)
    return out


def _where(root: yaml.Node | None, loc: Sequence[int | str]) -> str:
    node = node_at(root, _clean_loc(loc))
    return f"line {node.start_mark.line + 1}" if node is not None else "top level"


def _describe_error(err: Any) -> str:
    field = ".".join(str(x) for x in _clean_loc(err["loc"])) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{field}: unknown field"
    if err["type"] == "missing":
        return f"{field}: required field is missing"
    return f"{field}: {err['msg']}"


def parse_pipeline(text: str, source: str) -> PipelineConfig:
    """Parse and validate the YAML ``text`` of a pipeline file named ``source``."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = safe_load_unique(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{source}: invalid YAML: {where}{problem}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a pipeline file must be a YAML mapping of fields")
    version = data.get("schema_version")
    if version is not None and version != SCHEMA_VERSION:
        raise ConfigError(
            f"{source}: {_where(root, ['schema_version'])}: schema_version {version!r} is not "
            f"supported; this geoseg reads version {SCHEMA_VERSION}"
        )
    try:
        config = PipelineConfig.model_validate({**data, "source": source})
    except ValidationError as exc:
        problems = [
            f"{_where(root, e['loc'])}: {_describe_error(e)}"
            for e in exc.errors()
            if e["loc"][:1] != ("source",)
        ]
        raise ConfigError(f"{source}: invalid pipeline: " + "; ".join(problems)) from exc
    return config


def load_pipeline(path: str | os.PathLike[str]) -> PipelineConfig:
    """Read and validate one pipeline file; raise :class:`ConfigError` naming field and line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such pipeline file")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read pipeline file ({exc})") from exc
    return parse_pipeline(text, str(p))


def load_pipelines(path: str | os.PathLike[str]) -> list[PipelineConfig]:
    """A pipeline file, or every ``*.yml``/``*.yaml`` file in a directory, sorted by name."""
    p = Path(path)
    if p.is_dir():
        files = sorted([*p.glob("*.yml"), *p.glob("*.yaml")])
        if not files:
            raise ConfigError(f"{p}: holds no pipeline files (*.yml)")
    else:
        files = [p]
    configs = [load_pipeline(f) for f in files]
    names: dict[str, str] = {}
    for c in configs:
        if c.name in names:
            raise ConfigError(
                f"{c.source}: pipeline name {c.name!r} is also used by {names[c.name]}"
            )
        names[c.name] = c.source
    return configs
