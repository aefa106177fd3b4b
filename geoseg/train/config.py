"""The training configuration: a YAML file validated by pydantic (``extra='forbid'``).

Relative paths in the file are resolved against the file's own directory.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from geoseg.errors import ConfigError, describe_validation_error
from geoseg.io.remote import is_remote
from geoseg.models.bundle import WEIGHTS_FILE, ModelSpec, file_sha256

__all__ = [
    "ChipConfig",
    "HoldOut",
    "LabelSource",
    "OptimConfig",
    "RasterLabels",
    "SceneConfig",
    "TrainConfig",
    "VectorLabels",
    "load_config",
    "read_config_mapping",
]


_MAGIC = re.compile(r"[*?[]")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VectorLabels(_Strict):
    """A vector layer whose geometries are burned as one class (any CRS; reprojected)."""

    kind: Literal["vector"] = "vector"
    path: Path = Field(description="GeoJSON, GeoPackage, FlatGeobuf, Shapefile …")
    class_name: str = Field(alias="class", description="Class the geometries are burned as.")
    width_m: float | None = Field(
        None, gt=0, description="Full width of line and point features in metres (buffered)."
    )
    layer: str | None = Field(None, description="Layer name for multi-layer files.")
    contact_class: str | None = Field(
        None,
        description="Burn pixels within contact_width_m of two different features as this class "
        "(e.g. building_contact): shared walls and narrow gaps, so that touching buildings can "
        "be told apart.",
    )
    contact_width_m: float = Field(
        1.0, gt=0, description="Width of the contact zone between two features, metres."
    )

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def classes(self) -> list[str]:
        """Class names this source burns."""
        return [self.class_name] + ([self.contact_class] if self.contact_class else [])


class RasterLabels(_Strict):
    """A label raster or image: pixel values (``values``) or colours (``colors``) → classes.

    ``path`` may be a glob when the scene's ``image`` is one: each image is paired with the
    mask whose wildcard parts match its own (``tile_*/images/*.jpg`` with
    ``tile_*/masks/*.png``). A mask on the image's own pixel grid (same size) is read pixel for
    pixel, georeferenced or not; a georeferenced mask on another grid is warped onto the
    scene's.
    """

    kind: Literal["raster"] = "raster"
    path: Path = Field(description="Label raster or image (PNG, TIFF, ...), or a glob of them.")
    values: dict[int, str] | None = Field(
        None,
        description="Pixel value → class name, e.g. {255: road}; unlisted values are background.",
    )
    colors: dict[str, str] | None = Field(
        None,
        description="Colour '#RRGGBB' → class name (a 'background' class included) for "
        "colour-coded masks; every colour in a mask must be listed here or in unlabelled.",
    )
    unlabelled: list[str | int] = Field(
        default_factory=list,
        description="Colours ('#RRGGBB') or values that mean 'not labelled': ignored by the "
        "loss, never taught as background.",
    )

    @field_validator("colors")
    @classmethod
    def _hex_keys(cls, colors: dict[str, str] | None) -> dict[str, str] | None:
        if colors is not None:
            for key in colors:
                parse_color(key)
        return colors

    @model_validator(mode="after")
    def _one_table(self) -> RasterLabels:
        if (self.values is None) == (self.colors is None):
            raise ValueError(
                f"{self.path}: give either values (pixel value → class) or colors "
                "('#RRGGBB' → class), not both and not neither"
            )
        for item in self.unlabelled:
            if self.colors is not None and not isinstance(item, str):
                raise ValueError(f"{self.path}: unlabelled {item!r} must be a '#RRGGBB' colour")
            if self.values is not None and not isinstance(item, int):
                raise ValueError(f"{self.path}: unlabelled {item!r} must be a pixel value")
            if isinstance(item, str):
                parse_color(item)
        return self

    def classes(self) -> list[str]:
        """Class names this source burns."""
        table = self.values if self.values is not None else self.colors or {}
        return list(dict.fromkeys(table.values()))


def parse_color(text: str) -> int:
    """'#RRGGBB' → the colour packed as 0xRRGGBB; ValueError naming the text otherwise."""
    if not re.fullmatch(r"#[0-9A-Fa-f]{6}", text):
        raise ValueError(f"colour {text!r} is not of the form '#RRGGBB'")
    return int(text[1:], 16)


LabelSource = Annotated[VectorLabels | RasterLabels, Field(discriminator="kind")]


class HoldOut(_Strict):
    """What of a scene is kept for validation: a rectangle (fractions of its width and height)
    of every image, or, for a scene of many images, the whole images matching ``images``."""

    x: tuple[float, float] = Field((0.0, 1.0), description="Column range, fractions 0..1.")
    y: tuple[float, float] = Field((0.0, 1.0), description="Row range, fractions 0..1.")
    images: str | None = Field(
        None,
        description="Glob matched against the end of each image's path (e.g. 'tile_8/*/*' or "
        "'img6[0-4].tif'): matching images are validation as a whole, the others training.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> HoldOut:
        for name, (a, b) in (("x", self.x), ("y", self.y)):
            if not 0.0 <= a < b <= 1.0:
                raise ValueError(f"holdout.{name} must satisfy 0 <= start < end <= 1, got {a, b}")
        if self.images is not None and (self.x != (0.0, 1.0) or self.y != (0.0, 1.0)):
            raise ValueError("holdout: give images, or a rectangle (x, y), not both")
        return self


class SceneConfig(_Strict):
    """One training scene and the label sources burned onto it, later sources on top."""

    image: str = Field(
        description="The scene: a GeoTIFF path (relative to the config file), an http(s)://, "
        "s3://, gs:// or az:// URL (see geoseg.io.remote), or a glob of images (chip folders: "
        "PNG, JPEG, TIFF; each image is one scene with its own labels)."
    )
    name: str | None = Field(
        None,
        min_length=1,
        description="Short name in the per-scene validation figures (default: the image's "
        "file stem, or for a glob the folder above its first wildcard).",
    )
    gsd_m: float | None = Field(
        None,
        gt=0,
        description="Ground sample distance (metres) of images without a georeference, which "
        "are then read on a local metric grid; georeferenced images use their own.",
    )
    fill: list[float] | None = Field(
        None,
        min_length=1,
        description="Pixel values (one for every band, or one per model band) that mark pixels "
        "outside the image, such as black corners that no nodata value declares: ignored by "
        "the loss, like declared nodata.",
    )
    labels: list[LabelSource] = Field(min_length=1)
    classes: list[str] | None = Field(
        None,
        description="Classes this scene labels completely (default: those its label sources "
        "burn). A model class that is not listed is unknown here: never taught as background.",
    )
    holdout: HoldOut | None = Field(
        None,
        description="Validation rectangle of this scene; training chips never touch it "
        "(default: a seeded share of regions, see chips.block).",
    )
    weight: float = Field(
        1.0,
        gt=0,
        description="Relative share of random training chips drawn from this scene (a glob "
        "scene's share is split among its images by area).",
    )

    def display_name(self) -> str:
        """:attr:`name`, or the image's file stem, or a glob's folder above its first wildcard."""
        if self.name:
            return self.name
        parts = PurePosixPath(self.image.replace("\\", "/")).parts
        fixed = [p for p in itertools.takewhile(lambda p: not _MAGIC.search(p), parts)]
        if len(fixed) == len(parts):
            return PurePosixPath(self.image).stem
        return fixed[-1] if fixed else self.image

    def labelled(self) -> list[str]:
        """The class names this scene labels completely."""
        if self.classes is not None:
            return list(self.classes)
        out: list[str] = []
        for src in self.labels:
            out += [n for n in src.classes() if n not in out]
        return out


class ChipConfig(_Strict):
    """How chips are cut (pixels) and how the scene is split into train/validation regions."""

    size: int = Field(256, ge=32, description="Chip side, pixels (multiple of the model stride).")
    stride: int = Field(128, ge=8, description="Step between chips inside a region, pixels.")
    block: int = Field(
        512, ge=32, description="Split-region side, pixels; whole regions go to validation."
    )
    val_fraction: float = Field(0.25, ge=0, lt=1, description="Share of regions for validation.")
    sampling: Literal["grid", "random"] = Field(
        "grid",
        description="grid: every chip of the training regions each epoch; random: "
        "chips_per_epoch chips at random positions, scenes drawn by weight.",
    )
    chips_per_epoch: int = Field(512, ge=1, description="Training chips per epoch (random).")
    scale_jitter: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="Random zoom of training chips by up to this fraction (0.2: 0.8x-1.25x).",
    )
    color_jitter: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="Random per-band gain and offset of training chips (fraction of the range).",
    )
    blur_m: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Random sharpness: each training chip is blurred to an effective ground "
        "resolution drawn uniformly between model.gsd_m (as it is) and this, in metres (a "
        "Gaussian, as model.input_low_pass_m), so that sharpness does not tell the network "
        "which scene, or which kind of imagery, a chip came from. None: chips as they are.",
    )

    @model_validator(mode="after")
    def _block_holds_chip(self) -> ChipConfig:
        if self.block < self.size:
            raise ValueError(f"block ({self.block} px) must be >= chip size ({self.size} px)")
        return self


class OptimConfig(_Strict):
    """AdamW with linear warm-up then cosine decay, stepped per batch."""

    epochs: int = Field(20, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(1e-4, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    dice_weight: float = Field(1.0, ge=0, description="Loss = cross-entropy + this × Dice.")
    lovasz_weight: float = Field(
        0.0,
        ge=0,
        description="Adds this × the Lovász-softmax loss (a surrogate of each class's IoU, "
        "over the chips whose scene labels the class) to the loss; 0: none.",
    )
    average_from_epoch: int | None = Field(
        None,
        ge=1,
        description="Also average the weights at the end of this epoch (1-based) and every "
        "later one, measure the mean's BatchNorm statistics on training chips, validate it and "
        "write it as the bundle <out>-averaged beside the best epoch's; None: no averaging.",
    )
    seed: int = 0
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    threads: int | None = Field(None, ge=1, description="Torch CPU threads.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Forward pass precision: auto is bf16 autocast on CUDA devices and CPUs "
        "with native bf16 (AVX512-BF16, AMX), fp32 elsewhere; fp32 forces full precision. "
        "The loss is always computed in fp32.",
    )

    @model_validator(mode="after")
    def _average_within_run(self) -> OptimConfig:
        if self.average_from_epoch is not None and self.average_from_epoch > self.epochs:
            raise ValueError(
                f"average_from_epoch {self.average_from_epoch} is after the last epoch "
                f"({self.epochs})"
            )
        return self


class TrainConfig(_Strict):
    """Everything ``geoseg train`` needs; the model section is a bundle spec (see model.json)."""

    schema_version: Literal[1] = 1
    model: ModelSpec = Field(
        description="The bundle spec. model.encoder_weights picks the encoder's start: random, "
        "imagenet, lite0-imagenet, lite1-imagenet, lite2-imagenet or a weights file; "
        "model.normalization.mean/std, when given (e.g. ImageNet's for a pretrained encoder), "
        "are kept instead of computed."
    )
    init: Path | None = Field(
        None,
        description="A bundle whose weights start the run (fine-tuning, e.g. data_samples/model "
        "on your own scenes). Its arch, encoder, decoder, bands and classes must be model's; "
        "model.normalization is taken from it (a different one given is an error), and "
        "model.encoder_weights is not used. A run that resumes goes on from its checkpoint.",
    )
    scenes: list[SceneConfig] = Field(min_length=1)
    chips: ChipConfig = Field(default_factory=lambda: ChipConfig.model_validate({}))
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig.model_validate({}))
    out: Path = Field(description="Bundle directory written with the best weights.")
    checkpoint: Path | None = Field(
        None,
        description="Resumable state directory (default: <out>.checkpoint); also holds the "
        "chip cache (cache/).",
    )
    checkpoint_minutes: float = Field(
        10.0,
        ge=0,
        description="Minutes between checkpoints inside an epoch (0: at the end of each epoch "
        "only). SIGTERM and SIGINT also save one after the batch in progress.",
    )
    snapshot: Path | None = Field(
        None,
        description="Compact resumable state, one safetensors file small enough to commit "
        "(float16 weights, bfloat16 optimizer moments), rewritten at every checkpoint; training "
        "resumes from it when the checkpoint directory is missing (not bit for bit).",
    )
    resample: bool = Field(
        True,
        description="Read scenes whose ground resolution differs from model.gsd_m by more than "
        "5 % resampled to it (needs model.gsd_m).",
    )
    max_resample_ratio: float = Field(
        8.0,
        ge=1.0,
        allow_inf_nan=False,
        description="Refuse scenes whose ground resolution is more than this many times finer "
        "or coarser than model.gsd_m (with resample): their chips would be mostly made up.",
    )
    weights_dtype: Literal["float32", "float16"] = Field(
        "float32", description="Storage type of the bundle's weights (float16: half the size)."
    )

    @field_validator("model")
    @classmethod
    def _stats_pair(cls, spec: ModelSpec) -> ModelSpec:
        if bool(spec.normalization.mean) != bool(spec.normalization.std):
            raise ValueError(
                "give both model.normalization.mean and std (fixed statistics, e.g. ImageNet's "
                "for a pretrained encoder), or neither (computed from the training scenes)"
            )
        return spec

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        stride = self.model.stride
        if self.chips.size % stride:
            raise ValueError(
                f"chips.size {self.chips.size} px must be a multiple of the model stride {stride}"
            )
        known = set(self.model.classes)
        for scene in self.scenes:
            for src in scene.labels:
                for name in src.classes():
                    if name not in known:
                        raise ValueError(
                            f"{src.path}: class {name!r} is not one of the model classes "
                            f"{self.model.classes}"
                        )
            for name in scene.classes or []:
                if name not in known:
                    raise ValueError(
                        f"{scene.image}: classes lists {name!r}, not one of the model classes "
                        f"{self.model.classes}"
                    )
        blur = self.chips.blur_m
        if blur is not None and (self.model.gsd_m is None or blur <= self.model.gsd_m):
            raise ValueError(
                f"chips.blur_m ({blur} m) needs model.gsd_m set and finer than it "
                f"(model.gsd_m: {self.model.gsd_m})"
            )
        if self.chips.sampling == "random" and not any(s.holdout for s in self.scenes):
            raise ValueError("chips.sampling random needs a holdout rectangle in some scene")
        return self

    @property
    def checkpoint_dir(self) -> Path:
        return self.checkpoint or self.out.with_name(self.out.name + ".checkpoint")

    def fingerprint(self) -> str:
        """Hash of everything that shapes training except the epoch count and output paths."""
        data = self.model_dump(
            mode="json",
            # max_resample_ratio only refuses scenes: it never changes what is trained
            exclude={"out", "checkpoint", "checkpoint_minutes", "snapshot", "max_resample_ratio"},
        )
        data["optim"].pop("epochs")
        data["optim"].pop("device")
        data["optim"].pop("threads")
        data["optim"].pop("precision")
        data["optim"].pop("average_from_epoch")  # never changes what is trained
        if not data["optim"]["lovasz_weight"]:
            data["optim"].pop("lovasz_weight")  # runs from before it keep their fingerprint
        for scene in data["scenes"]:
            scene.pop("name")  # a label for reports only
        if self.init is not None:  # the starting weights, wherever the bundle lies
            try:
                data["init"] = file_sha256(self.init / WEIGHTS_FILE)
            except OSError:
                data["init"] = "missing"  # loading the bundle says why
        return hashlib.sha256(repr(sorted(_flatten(data))).encode()).hexdigest()


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(obj, dict):
        return [kv for k, v in obj.items() for kv in _flatten(v, f"{prefix}.{k}")]
    if isinstance(obj, list):
        return [kv for i, v in enumerate(obj) for kv in _flatten(v, f"{prefix}[{i}]")]
    return [(prefix, repr(obj))]


def _resolve(raw: Any, base: Path) -> Any:
    """Make the config's relative paths relative to ``base`` (the config file's directory)."""
    if not isinstance(raw, dict):
        return raw
    for key in ("out", "checkpoint", "snapshot", "init"):
        if isinstance(raw.get(key), str):
            raw[key] = os.path.normpath(base / raw[key])
    for scene in raw.get("scenes") or []:
        if isinstance(scene, dict):
            if isinstance(scene.get("image"), str) and not is_remote(scene["image"]):
                scene["image"] = os.path.normpath(base / scene["image"])
            for src in scene.get("labels") or []:
                if isinstance(src, dict) and isinstance(src.get("path"), str):
                    src["path"] = os.path.normpath(base / src["path"])
    return raw


def parse_config(raw: Any, source: str, base: Path | None = None) -> TrainConfig:
    """Validate a config mapping; relative paths are taken relative to ``base``."""
    if base is not None:
        raw = _resolve(raw, base)
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        problems = describe_validation_error(exc)
        raise ConfigError(f"{source}: invalid training config: {problems}") from exc


def load_config(path: str | os.PathLike[str]) -> TrainConfig:
    """Read and validate a YAML training config (with the configs it ``extends``)."""
    p = Path(path)
    return parse_config(read_config_mapping(p), str(p))


def read_config_mapping(path: Path) -> Any:
    """A training config file as one mapping, its relative paths made absolute: with
    ``extends: OTHER.yml`` (relative to the file), OTHER's mapping (itself read the same way)
    with this file's keys laid over it, mappings key by key, anything else (lists included)
    replaced; ``key: null`` clears a key that OTHER sets."""
    return _read_extended(Path(path), ())


def _read_yaml(p: Path) -> Any:
    import yaml

    from geoseg.yamlio import safe_load_unique

    try:
        return safe_load_unique(p.read_text())
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({exc})") from exc


def _read_extended(p: Path, chain: tuple[Path, ...]) -> Any:
    raw = _read_yaml(p)
    here = p.resolve()
    if not isinstance(raw, dict) or "extends" not in raw:
        return _resolve(raw, here.parent)
    parent = raw.pop("extends")
    if not isinstance(parent, str) or not parent.strip():
        raise ConfigError(
            f"{p}: extends must be the path of another training config, got {parent!r}"
        )
    other = here.parent / parent
    if other.resolve() in (*chain, here):
        loop = " -> ".join(str(c) for c in (*chain, here, other.resolve()))
        raise ConfigError(f"{p}: extends {parent}, which leads back to it ({loop})")
    try:
        base = _read_extended(other, (*chain, here))
    except ConfigError as exc:
        raise ConfigError(f"{p}: extends {parent}: {exc}") from exc
    if not isinstance(base, dict):
        raise ConfigError(f"{p}: extends {parent}, which is not a mapping of settings")
    return _overlay(base, _resolve(raw, here.parent))


def _overlay(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _overlay(out[key], value)
        elif value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out
