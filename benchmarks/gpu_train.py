#!/usr/bin/env python3
"""Train a config (by default ``data_samples/train_cities_lite2.yml``, the demo model's first
stage) on a remote GPU machine in one run, ship the bundle.

The GPU machine ("device") is reached by a runner that sends it a copy of the working tree
plus at most 8 ignored paths ("carry"), 64 MiB in all per command ("call"), and returns the
files the command writes under ``$OUT``. It gets nothing beside the repository (no
../shared/data), no internet, and its python3 (3.12, torch with CUDA) lacks rasterio,
pyproj, pydantic, segmentation-models-pytorch and the Lite ImageNet weights. So the work is
split in two:

``pack`` (here, with the project's venv, ../shared/data and PyPI at hand) writes ``.gpu_pack/``
(git-ignored): numbered parts ``part1`` .. ``partN``, each small enough to travel in one call
beside the working tree. The parts hold

- the wheels (cp312, manylinux) of what training imports and the device lacks, at this venv's
  versions (see ``WHEELS``, and ``wheels_for`` for the package of the config's offline
  ``encoder_weights``; they were checked to import under Python 3.12 here), plus a
  stub for ``imagecodecs`` (26 MB of wheel; ``geoseg.io.tiles`` imports it at module level but
  only COG writing calls it, which training never does: the stub raises on any use);
- the data. Scenes given as one image file (Banepa, Atlanta, Las Vegas, Paris) are written on
  the grid training cuts chips from, with their labels burned on it as a uint8 raster (class
  ids); so Banepa travels at 0.30 m (5.5 MB instead of 35; Atlanta grows from 2.0 to 3.0 MB
  at 0.30 m instead of 0.5 m) and the vector labels need no geopandas, pyogrio and shapely
  there (33 MB of wheels). ``pack`` decodes each such scene both ways with geoseg's own
  chip cache and refuses unless pixels, validity and labels are equal, element for element,
  on the same grid; the derived config declares each scene's labelled classes explicitly, so
  the partial-label loss sees the same sets. Scenes given as globs of chips (Rio, Dubai) are
  copied file for file;
- for a config that starts from a bundle (``init``, e.g. ``train_cities_lite2_finetune.yml``),
  that bundle's model.json and weights (10.6 MB for the demo model), checked to hash as the
  original after the copy;
- in the part of the last call (the lightest), ``run/train_gpu.yml``: the config with
  the paths above, device cuda and the GPU budget (see ``GPU_BUDGET``); model, classes,
  label choices, hold-outs, weights, seed, augmentation and schedule are unchanged.

``pack`` prints what each call carries, with the working tree, and refuses when one call would
exceed the limit (it keeps MARGIN free for the tree to grow: run it right before the calls).
On 2026-12-07, with a 20.2 MiB working tree: 3 calls of 61.0, 61.0 and 59.2 MiB for
train_cities_lite2.yml, and 4 for train_cities_lite2_finetune.yml (its init bundle, 10.1 MiB,
takes a call's room).

``run`` (there, plain python3, standard library only at import) stages every part it finds
under ``.gpu_pack`` into /tmp (wheels installed with pip into /tmp/site, data
copied to /tmp/geoseg-gpu), and once all parts are staged, trains: ``python3 -m geoseg train``
with a hard deadline (SIGTERM: the trainer finishes its batch, saves and exits 130; the best
epoch's bundle is already written), then copies the bundle (model.json, fp16
weights.safetensors; with ``optim.average_from_epoch`` also the averaged bundle), the log and
the history (the checkpoint's state.json) to ``$OUT`` and runs ``python3 -m geoseg model info``
on it.

Protocol when a GPU machine is at hand (files under /tmp survive only between calls made
back to back while the machine is held: about 30 s; make the calls one after the other)::

    .venv/bin/python benchmarks/gpu_train.py pack     # here: prints the calls to make
    # then, for K = 1 .. N, one call each on the GPU machine (an H100), straight after the
    # previous one returns; with N = 3, as on 2026-12-06:
    {"command": "python3 benchmarks/gpu_train.py run",
     "carry": [".gpu_pack/part1"], "timeout_s": 120}
    {"command": "python3 benchmarks/gpu_train.py run",
     "carry": [".gpu_pack/part2"], "timeout_s": 120}
    {"command": "python3 benchmarks/gpu_train.py run",
     "carry": [".gpu_pack/part3"], "timeout_s": 570}
    # the last call trains; $OUT/ comes back with model/ (model.json, weights.safetensors),
    # model-averaged/ for a config that averages epochs, train.log, history.json,
    # model_info.txt and run.json. Copy model/ to its place here: for the demo model's first
    # stage ../out/model-cities-lite2, the init of its second stage, which is packed and run
    # the same way (pack --config data_samples/train_cities_lite2_finetune.yml).
    # Then release the machine. GPU time: its start (1-2 min), the staging calls (under a
    # minute each, mostly pip) and the training call (at most 9 min): 12-13 minutes.

If a call finds an earlier part missing (the machine went cold between calls), ``run`` says
so and exits 3 without training: start again from part 1. A training call that is repeated on
the same warm machine resumes from its checkpoint.

Test here with a tiny budget (1 epoch of 16 chips on the CPU; what tests/test_gpu_train.py
does, marked slow)::

    .venv/bin/python benchmarks/gpu_train.py pack --tiny --no-wheels --pack /tmp/p
    OUT=/tmp/o .venv/bin/python benchmarks/gpu_train.py run --pack /tmp/p \\
        --stage /tmp/s --site /tmp/site-test
"""

from __future__ import annotations

import argparse
import copy
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "data_samples" / "train_cities_lite2.yml"
PACK = REPO / ".gpu_pack"
STAGE = Path("/tmp/geoseg-gpu")
SITE = Path("/tmp/site")
DERIVED = "train_gpu.yml"
PART_FILE = "part.json"
#: Where a fine-tuning config's starting bundle (``init``) travels, beside ``data``.
INIT = "init"

#: What one call may carry, the working tree included (the runner's limit).
LIMIT = 64 * 2**20
#: Room left in every call for the working tree to grow between ``pack`` and the calls.
MARGIN = 3 * 2**20
#: More calls than this cannot be made back to back reliably: refuse instead.
MAX_PARTS = 4

#: Distributions training imports that the device's python3 lacks (its documented
#: package list), carried as wheels at this venv's versions. rasterio's
#: own needs affine, cligj and click-plugins (attrs, certifi, click, pyparsing are there);
#: pyproj gives ground resolutions (without it geoseg silently takes CRS units as metres);
#: croniter is imported by the CLI; segmentation-models-pytorch needs huggingface-hub, which
#: is there. OVERRIDES are there too, but carried at this venv's version for the reason given.
WHEELS = (
    "rasterio",
    "affine",
    "cligj",
    "click-plugins",
    "pyproj",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "segmentation-models-pytorch",
    "croniter",
    "timm",
    "typing-extensions",
)
OVERRIDES = {
    "timm": "it defines the encoder's modules, so the bundle's tensors match this venv's timm",
    "typing-extensions": "pydantic 2.14 needs >= 4.16; the device's version is not known",
}
#: Modules imported but never called in training: a stub that fails loudly on use.
STUBS = {"imagecodecs": "COG tile codecs (geoseg.io.tiles); training writes no COG"}
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)

#: The GPU budget. train_cities.yml (Lite0; train_cities_lite2.yml the same with Lite2) runs
#: 60 epochs of 480 random chips (256 px, batch 8):
#: 3,600 optimizer steps, about 8 h on the 2-core CPU. On an H100 a step of this small U-Net
#: (about 36 GFLOP forward and backward at batch 8) is bound by kernel launches and Python,
#: some 15-50 ms; the chips are cut and augmented by one CPU thread meanwhile (measured here,
#: one thread on a loaded 2-core Xeon: 1.3 s per epoch of 480 chips), and each epoch ends with
#: a validation pass over 242 chips (2.3 s of CPU work here besides the forward pass) and a
#: checkpoint. Estimate: 3-5 s per epoch, 3-5 min for 60, plus about a minute before the first
#: (imports, label checks, decoding the scenes into the chip cache: 40 s here, one thread).
#: So the whole schedule is kept (epochs, chips per epoch, batch 8, learning rate, warm-up):
#: its results compare with the CPU run's in benchmarks/RESULTS.md, where a larger batch would
#: change the optimisation. What changes: device cuda, no compact snapshot (it is for
#: committing a resumable CPU run), checkpoints at epoch ends only. If the estimate is wrong,
#: the deadline below stops the run (saved, resumable by the same call on the warm machine)
#: and the best epoch's bundle so far is shipped.
GPU_BUDGET: dict[str, Any] = {"epochs": 60, "chips_per_epoch": 480, "batch_size": 8}
#: The tiny budget of the CPU test of the whole path.
TINY_BUDGET: dict[str, Any] = {"epochs": 1, "chips_per_epoch": 16, "batch_size": 2}
#: Seconds from the start of ``run`` after which training is stopped (SIGTERM), so that the
#: call, with staging before and copying after, ends inside 9 minutes.
DEADLINE_S = 470
#: geoseg.train.labels.IGNORE (not labelled, or invalid), checked against it by ``pack``.
IGNORE = 255
#: Seconds the trainer gets after SIGTERM to finish its batch and save, before SIGKILL.
GRACE_S = 45


class PackError(RuntimeError):
    """What the pack cannot do (too large, unequal chips); the message says why."""


# ---------------------------------------------------------------------------------- sizes


@dataclass
class Item:
    """One file of the pack: where it comes from, where it goes in a part, its size."""

    source: Path
    dest: str
    size: int


@dataclass
class Part:
    number: int
    items: list[Item] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(i.size for i in self.items)


def tree_size(repo: Path = REPO) -> int:
    """Bytes of what travels in every call: tracked and untracked-not-ignored files."""
    out = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True,
        capture_output=True,
    ).stdout
    total = 0
    for name in {n for n in out.decode().split("\0") if n}:
        p = repo / name
        if p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total


def plan_parts(items: Sequence[Item], budget: int, max_parts: int = MAX_PARTS) -> list[Part]:
    """Items into parts of at most ``budget`` bytes each (first fit, largest first).
    PackError when an item alone exceeds the budget or more than ``max_parts`` are needed."""
    if budget <= 0:
        raise PackError(f"no room at all: the working tree alone fills a call ({budget} B left)")
    parts: list[Part] = []
    for item in sorted(items, key=lambda i: -i.size):
        if item.size > budget:
            raise PackError(
                f"{item.dest}: {mib(item.size)} alone exceeds what one call can carry beside "
                f"the working tree ({mib(budget)})"
            )
        for part in parts:
            if part.size + item.size <= budget:
                part.items.append(item)
                break
        else:
            parts.append(Part(len(parts) + 1, [item]))
    if len(parts) > max_parts:
        raise PackError(
            f"the pack needs {len(parts)} calls of at most {mib(budget)}; more than "
            f"{max_parts} cannot be made back to back reliably"
        )
    return parts


def order_parts(parts: Sequence[Part], last: Item) -> list[Part]:
    """``parts`` renumbered with the lightest last, where ``last`` (the config: the call that
    carries it trains) is moved: the training call then carries, installs and copies least."""
    out = sorted(parts, key=lambda p: -p.size)
    for p in out:
        if last in p.items:
            p.items.remove(last)
    out[-1].items.append(last)
    for n, p in enumerate(out, 1):
        p.number = n
    return out


def check_calls(tree: int, parts: Sequence[Part], limit: int = LIMIT) -> list[str]:
    """One line per call (what it carries and its total); PackError if one exceeds ``limit``."""
    lines = []
    for p in parts:
        total = tree + p.size
        lines.append(
            f"call {p.number}: carry .gpu_pack/part{p.number} {mib(p.size)} + working tree "
            f"{mib(tree)} = {mib(total)} of {mib(limit)}"
        )
        if total > limit:
            raise PackError(lines[-1] + ": over the limit")
    return lines


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


# ------------------------------------------------------------------------------ the config


def derive_config(
    raw: dict[str, Any],
    scenes: Sequence[dict[str, Any]],
    budget: dict[str, Any],
    device: str,
    init: str | None = None,
) -> dict[str, Any]:
    """The config the device trains: ``raw`` (the config as read) with its scenes
    replaced by ``scenes`` (paths inside the pack), its starting bundle by ``init`` (the
    packed copy, for a config with ``init``), outputs inside the stage, ``device`` and
    ``budget`` (epochs, chips_per_epoch, batch_size); everything else as it is."""
    if len(scenes) != len(raw["scenes"]):
        raise PackError(f"{len(scenes)} derived scenes for {len(raw['scenes'])} configured")
    if bool(raw.get("init")) != (init is not None):
        raise PackError(
            f"the config's init ({raw.get('init')}) and the packed bundle ({init}) disagree: "
            "pack the bundle a config starts from (pack_init), and only then"
        )
    out = copy.deepcopy(raw)
    if init is not None:
        out["init"] = init
    out["scenes"] = [dict(s) for s in scenes]
    out["chips"] = {**out.get("chips", {}), "chips_per_epoch": budget["chips_per_epoch"]}
    out["optim"] = {
        **out.get("optim", {}),
        "epochs": budget["epochs"],
        "batch_size": budget["batch_size"],
        "device": device,
    }
    out["out"] = "model"
    out["checkpoint"] = "checkpoint"
    out.pop("snapshot", None)
    out["checkpoint_minutes"] = 0
    return out


def gridded_scene(
    scene: dict[str, Any], image: str, labels: str, classes: Sequence[str], ids: Iterable[int]
) -> dict[str, Any]:
    """A single-image scene entry rewritten for its pre-gridded image and burned labels:
    ``ids`` are the class ids found in the label raster (255: not labelled), ``classes`` the
    model's, and the scene's labelled classes are declared as the original ones (its
    ``classes``, or those its label sources burn)."""
    from geoseg.train.config import SceneConfig

    ids = set(ids)
    values = {i: classes[i] for i in sorted(ids) if 0 < i < len(classes)}
    label: dict[str, Any] = {"kind": "raster", "path": labels, "values": values}
    if IGNORE in ids:
        label["unlabelled"] = [IGNORE]
    unknown = ids - set(range(len(classes))) - {IGNORE}
    if unknown:
        raise PackError(f"{image}: burned label values {sorted(unknown)} are no class ids")
    out = {k: v for k, v in scene.items() if k not in ("image", "labels", "gsd_m", "fill")}
    out["image"] = image
    out["labels"] = [label]
    out["classes"] = SceneConfig.model_validate(scene).labelled()
    return out


# ------------------------------------------------------------------------------------ pack


def pack(args: argparse.Namespace) -> int:
    from geoseg.train.labels import IGNORE as GEOSEG_IGNORE

    if GEOSEG_IGNORE != IGNORE:
        raise PackError(f"geoseg's IGNORE is {GEOSEG_IGNORE}, this script assumes {IGNORE}")
    from geoseg.train.config import read_config_mapping

    t0 = time.perf_counter()
    config = Path(args.config).resolve()
    raw = read_config_mapping(config)  # with what it extends; paths made absolute
    root = Path(args.pack).resolve()
    build = root / "build"
    shutil.rmtree(build, ignore_errors=True)
    (build / "data").mkdir(parents=True)
    scenes, items, originals = pack_data(config, raw, build)
    init = None
    if raw.get("init"):
        init_items = pack_init(config.parent / raw["init"], build)
        items += init_items
        init = f"../{INIT}"
    budget = TINY_BUDGET if args.tiny else GPU_BUDGET
    device = args.device or ("cpu" if args.tiny else "cuda")
    derived = derive_config(raw, scenes, budget, device, init)
    (build / "run").mkdir()
    check_derived(derived, build / "run", originals)
    print(f"{len(originals)} re-gridded scene(s) decode to the original's chips exactly")
    import yaml

    text = (
        f"# Derived from {config.relative_to(REPO) if config.is_relative_to(REPO) else config}"
        f" by benchmarks/gpu_train.py pack{' --tiny' if args.tiny else ''}: paths inside the "
        "pack,\n# device and budget changed; see that script.\n"
    )
    cfg_path = build / "run" / DERIVED
    cfg_path.write_text(text + yaml.safe_dump(derived, sort_keys=False))
    cfg_item = Item(cfg_path, f"run/{DERIVED}", cfg_path.stat().st_size)
    if not args.no_wheels:
        items += pack_wheels(root / "wheels-cache", wheels_for(raw))
    items += pack_stubs(build)
    tree = tree_size()
    parts = order_parts(plan_parts([cfg_item, *items], LIMIT - tree - MARGIN), cfg_item)
    lines = check_calls(tree, parts)
    write_parts(root, parts, derived)
    for line in lines:
        print(line)
    for p in parts:
        kinds: dict[str, int] = {}
        for i in p.items:
            top = i.dest.split("/")[0]
            kinds[top] = kinds.get(top, 0) + i.size
        print(f"  part{p.number}: " + ", ".join(f"{k} {mib(v)}" for k, v in sorted(kinds.items())))
    print(f"packed {root} in {time.perf_counter() - t0:.0f} s; device calls, one straight after")
    print("the other (files in /tmp survive only while the machine stays warm, about 30 s):")
    for p in parts:
        last = p.number == len(parts)
        call = {
            "command": "python3 benchmarks/gpu_train.py run",
            "carry": [f".gpu_pack/part{p.number}"],
            "timeout_s": 570 if last else 120,
        }
        print(f"  {json.dumps(call)}{'   # trains' if last else ''}")
    return 0


def pack_data(
    config: Path, raw: dict[str, Any], build: Path
) -> tuple[list[dict[str, Any]], list[Item], dict[int, Any]]:
    """Write the data of every scene under ``build/data``: (derived scene entries, items,
    scene index → (SceneLabels, CachedScene) of the original of each re-gridded scene)."""
    from geoseg.train.config import load_config
    from geoseg.train.scenes import has_magic

    cfg = load_config(config)
    scenes: list[dict[str, Any]] = []
    items: list[Item] = []
    names: set[str] = set()
    originals: dict[int, Any] = {}
    for i, (rs, sc) in enumerate(zip(raw["scenes"], cfg.scenes, strict=True)):
        name = safe_name(sc.display_name(), names)
        if has_magic(sc.image):
            entry, new = copy_glob_scene(rs, sc, build, name)
        else:
            entry, new, originals[i] = grid_scene(cfg, rs, sc, build, name)
        scenes.append(entry)
        items += new
    return scenes, items, originals


def pack_init(bundle: Path, build: Path) -> list[Item]:
    """The bundle a fine-tuning config starts from (``init``), copied to ``build/init``
    (model.json and weights.safetensors; training reads nothing else of it) and loaded back:
    the copy's weights must hash as the original's."""
    from geoseg.errors import GeosegError
    from geoseg.models.bundle import SPEC_FILE, WEIGHTS_FILE, load_bundle

    try:
        original = load_bundle(bundle)
    except GeosegError as exc:
        raise PackError(f"init: {exc}") from exc
    dest = build / INIT
    dest.mkdir(parents=True, exist_ok=True)
    items = []
    for name in (SPEC_FILE, WEIGHTS_FILE):
        shutil.copyfile(original.path / name, dest / name)
        items.append(Item(dest / name, f"{INIT}/{name}", (dest / name).stat().st_size))
    if load_bundle(dest).sha256 != original.sha256:
        raise PackError(f"init: the copy of {bundle} does not hash as the original")
    return items


def safe_name(name: str, taken: set[str]) -> str:
    base = "".join(c if c.isalnum() or c in "._-" else "_" for c in name) or "scene"
    out, n = base, 1
    while out in taken:
        n += 1
        out = f"{base}_{n}"
    taken.add(out)
    return out


def _fixed_dir(pattern: str) -> str:
    """The folder above a glob's first wildcard."""
    parts = Path(pattern).parts
    fixed = []
    for p in parts:
        if glob.has_magic(p):
            break
        fixed.append(p)
    return str(Path(*fixed)) if len(fixed) < len(parts) else str(Path(pattern).parent)


def copy_glob_scene(
    rs: dict[str, Any], sc: Any, build: Path, name: str
) -> tuple[dict[str, Any], list[Item]]:
    """A scene of chip folders, copied file for file under data/<name>/."""
    from geoseg.train.scenes import expand_scene

    patterns = [sc.image] + [str(src.path) for src in sc.labels]
    base = os.path.commonpath([_fixed_dir(p) for p in patterns])
    files = {img.image for img in expand_scene(sc)} | {
        str(src.path) for img in expand_scene(sc) for src in img.labels
    }
    items = []
    for f in sorted(files):
        rel = Path("data", name, os.path.relpath(f, base))
        dest = build / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dest)
        items.append(Item(dest, rel.as_posix(), dest.stat().st_size))
    entry = dict(rs)
    entry["image"] = Path("..", "data", name, os.path.relpath(sc.image, base)).as_posix()
    entry["labels"] = [
        {**rl, "path": Path("..", "data", name, os.path.relpath(str(src.path), base)).as_posix()}
        for rl, src in zip(rs["labels"], sc.labels, strict=True)
    ]
    return entry, items


def _scene_grid(cfg: Any, sc: Any, cache_root: Path) -> tuple[Any, Any]:
    """(SceneLabels, CachedScene) of a single-image scene: its chip grid, decoded by geoseg's
    chip cache exactly as training decodes it."""
    from geoseg.train.cache import cache_key, cache_scene
    from geoseg.train.chips import virtual_grid
    from geoseg.train.dataset import _fill
    from geoseg.train.labels import load_scene_labels
    from geoseg.train.scenes import expand_scene, open_image

    spec = cfg.model
    (item,) = expand_scene(sc)
    image = open_image(item.image, sc.gsd_m)
    grid = virtual_grid(image, spec.gsd_m) if (cfg.resample and spec.gsd_m) else None
    fill = _fill(sc.fill, len(spec.bands), sc.image)
    labels = load_scene_labels(sc, image, spec.classes, grid, sources=item.labels, fill=fill)
    key = cache_key(labels, spec.bands)
    if key is None:
        raise PackError(f"{sc.image}: its labels cannot be cached, so not gridded either")
    return labels, cache_scene(labels, spec.bands, cache_root, key)


def grid_scene(
    cfg: Any, rs: dict[str, Any], sc: Any, build: Path, name: str
) -> tuple[dict[str, Any], list[Item], tuple[Any, Any]]:
    """A single-image scene written on its chip grid: image.tif (the model's bands, the
    validity as an internal mask where not all valid) and labels.tif (class ids)."""
    import numpy as np
    import rasterio

    if list(cfg.model.bands) != list(range(1, len(cfg.model.bands) + 1)):
        raise PackError(f"model bands {cfg.model.bands} are not 1..n: cannot re-grid scenes")
    folder = build / "data" / name
    folder.mkdir(parents=True, exist_ok=True)
    labels, cached = _scene_grid(cfg, sc, build / "cache")
    grid = labels.scene
    pixels = np.asarray(cached.pixels)
    valid = np.asarray(cached.valid)
    burned = np.asarray(cached.labels)
    common = {
        "driver": "GTiff",
        "width": grid.width,
        "height": grid.height,
        "crs": grid.crs,
        "transform": grid.transform,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
        "predictor": 2,
        "zlevel": 9,
    }
    image = folder / "image.tif"
    with (
        rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True),
        rasterio.open(image, "w", count=pixels.shape[0], dtype=pixels.dtype, **common) as dst,
    ):
        dst.write(pixels)
        if not valid.all():
            dst.write_mask(np.where(valid, 255, 0).astype(np.uint8))
    label_path = folder / "labels.tif"
    with rasterio.open(label_path, "w", count=1, dtype="uint8", **common) as dst:
        dst.write(burned[None])
    ids = np.unique(burned).tolist()
    entry = gridded_scene(
        rs,
        f"../data/{name}/image.tif",
        f"../data/{name}/labels.tif",
        cfg.model.classes,
        ids,
    )
    items = [Item(p, f"data/{name}/{p.name}", p.stat().st_size) for p in (image, label_path)]
    return entry, items, (labels, cached)


def check_derived(derived: dict[str, Any], base: Path, originals: dict[int, Any]) -> None:
    """Decode every re-gridded scene of the derived config (paths relative to ``base``) with
    geoseg's chip cache and compare it with the original's (``originals``: scene index →
    (SceneLabels, CachedScene)): the grid, the labelled classes, pixels, validity and labels
    must be equal. PackError otherwise."""
    import numpy as np

    from geoseg.train.config import parse_config

    cfg = parse_config(copy.deepcopy(derived), DERIVED, base)  # it resolves paths in place
    for i, (ref_labels, ref) in originals.items():
        sc = cfg.scenes[i]
        labels, got = _scene_grid(cfg, sc, base.parent / "check-cache")
        a, b = ref_labels.scene, labels.scene
        problems = []
        if labels.image is not None:
            problems.append("it would be resampled again")
        if (a.width, a.height, a.crs) != (b.width, b.height, b.crs) or not (
            a.transform.almost_equals(b.transform)
        ):
            problems.append(
                f"grid {b.width}x{b.height} {b.transform} != {a.width}x{a.height} {a.transform}"
            )
        if ref_labels.labelled != labels.labelled:
            problems.append(
                f"labelled classes {set(labels.labelled)} != {set(ref_labels.labelled)}"
            )
        for part in ("pixels", "valid", "labels"):
            x, y = getattr(ref, part), getattr(got, part)
            if x.shape != y.shape or x.dtype != y.dtype or not np.array_equal(x, y):
                problems.append(f"{part} differ")
        if problems:
            raise PackError(f"scene {i + 1} ({sc.image}) re-gridded: " + "; ".join(problems))
    shutil.rmtree(base.parent / "check-cache", ignore_errors=True)


def wheels_for(raw: dict[str, Any]) -> tuple[str, ...]:
    """WHEELS, and the PyPI package of the config's offline ImageNet start
    (``model.encoder_weights``, one of geoseg's ``LITE_VARIANTS``) where it names one."""
    from geoseg.models.encoders import LITE_VARIANTS

    variant = LITE_VARIANTS.get(str((raw.get("model") or {}).get("encoder_weights") or ""))
    return WHEELS + ((variant.package,) if variant else ())


def pack_wheels(cache: Path, dists: Sequence[str] = WHEELS) -> list[Item]:
    """The wheels of ``dists`` at this venv's versions for the device's Python 3.12 (pip
    download; reused from ``cache``)."""
    from importlib.metadata import version

    cache.mkdir(parents=True, exist_ok=True)
    items = []
    for dist in dists:
        ver = version(dist)
        stem = dist.replace("-", "_").lower()
        found = [p for p in cache.glob("*.whl") if p.name.lower().startswith(f"{stem}-{ver}-")]
        if not found:
            cmd = [
                sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                *(a for p in PLATFORMS for a in ("--platform", p)),
                "-d", str(cache), f"{dist}=={ver}",
            ]  # fmt: skip
            subprocess.run(cmd, check=True)
            found = [p for p in cache.glob("*.whl") if p.name.lower().startswith(f"{stem}-{ver}-")]
        if len(found) != 1:
            raise PackError(f"{dist} {ver}: expected one wheel in {cache}, found {found}")
        items.append(Item(found[0], f"wheels/{found[0].name}", found[0].stat().st_size))
    return items


def pack_stubs(build: Path) -> list[Item]:
    items = []
    for module, why in STUBS.items():
        path = build / "site" / module / "__init__.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            f'"""Stub of {module} for a GPU training run (benchmarks/gpu_train.py): {why}."""\n\n\n'
            "def __getattr__(name):\n"
            "    if name.startswith('__'):\n"
            "        raise AttributeError(name)\n"
            f"    raise ImportError(f'{module}.{{name}}: {module} is a stub here ({why})')\n"
        )
        items.append(Item(path, f"site/{module}/__init__.py", path.stat().st_size))
    return items


def write_parts(root: Path, parts: Sequence[Part], derived: dict[str, Any]) -> None:
    """Write part1 .. partN under ``root`` (replacing earlier ones), each with part.json."""
    pack_id = hashlib.sha256(
        json.dumps([[i.dest, i.size] for p in parts for i in p.items] + [derived]).encode()
    ).hexdigest()[:12]
    for old in root.glob("part*"):
        shutil.rmtree(old)
    for p in parts:
        tmp = root / f".part{p.number}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        for item in p.items:
            dest = tmp / item.dest
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(item.source, dest)
        meta = {"pack": pack_id, "part": p.number, "of": len(parts), "bytes": p.size}
        (tmp / PART_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        tmp.rename(root / f"part{p.number}")
    shutil.rmtree(root / "build", ignore_errors=True)


# ------------------------------------------------------------------------------------- run


def stage_part(part: Path, stage: Path, site: Path, force_wheels: bool = False) -> dict[str, Any]:
    """Install a part's wheels into ``site`` (those not importable at their version already,
    unless ``force_wheels``), copy its site/ files there and its data and config to
    ``stage``; mark it staged. Returns its part.json."""
    meta = json.loads((part / PART_FILE).read_text())
    marker = stage / ".parts" / f"{meta['pack']}-{meta['part']}"
    if marker.exists():
        return meta
    t0 = time.perf_counter()
    wheels = sorted((part / "wheels").glob("*.whl"))
    todo = [w for w in wheels if force_wheels or not wheel_present(w, site)]
    if todo:
        site.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
            "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site),
            *map(str, todo),
        ]  # fmt: skip
        subprocess.run(cmd, check=True)
    for top in ("site", "data", INIT):
        src = part / top
        if src.is_dir():
            shutil.copytree(src, site if top == "site" else stage / top, dirs_exist_ok=True)
    if (part / "run" / DERIVED).exists():
        (stage / f"run-{meta['pack']}").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(part / "run" / DERIVED, stage / f"run-{meta['pack']}" / DERIVED)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(meta) + "\n")
    print(
        f"staged part {meta['part']} of {meta['of']} ({mib(meta['bytes'])}; "
        f"{len(todo)} of {len(wheels)} wheels installed) in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    return meta


def wheel_present(wheel: Path, site: Path | None = None) -> bool:
    """True when the wheel's distribution is importable at the wheel's version already, from
    ``sys.path`` or from ``site`` (which the trainer gets first on its path)."""
    from importlib.metadata import distributions

    name, ver = wheel.name.split("-")[:2]
    path = ([str(site)] if site is not None else []) + sys.path
    found = next(iter(distributions(name=name, path=path)), None)
    return found is not None and found.version == ver


def run(args: argparse.Namespace) -> int:
    start = time.monotonic()
    out_env = args.out or os.environ.get("OUT")
    if not out_env:
        print("run: no output folder: set OUT or pass --out", file=sys.stderr)
        return 2
    out = Path(out_env)
    pack_dir, stage, site = Path(args.pack), Path(args.stage), Path(args.site)
    found = sorted(pack_dir.glob(f"part*/{PART_FILE}"))
    if not found:
        print(f"run: no part under {pack_dir} (carry .gpu_pack/partK)", file=sys.stderr)
        return 2
    metas = [stage_part(p.parent, stage, site, args.force_wheels) for p in found]
    last = [m for m in metas if m["part"] == m["of"]]
    if not last:
        nxt = max(m["part"] for m in metas) + 1
        print(f"staged; now call again at once with carry .gpu_pack/part{nxt}")
        return 0
    meta = last[0]
    missing = [
        k
        for k in range(1, meta["of"] + 1)
        if not (stage / ".parts" / f"{meta['pack']}-{k}").exists()
    ]
    if missing:
        print(
            f"run: part(s) {missing} of this pack are not staged in {stage}: the machine went "
            "cold (or was fresh) between calls; start again from part 1",
            file=sys.stderr,
        )
        return 3
    deadline = start + args.deadline
    return train(stage / f"run-{meta['pack']}", site, out, deadline, args.audit_imports)


def train(folder: Path, site: Path, out: Path, deadline: float, audit: bool = False) -> int:
    """Run the trainer on ``folder``'s config with ``deadline`` (monotonic), then put the
    bundle and logs in ``out``. The trainer writes model/ and checkpoint/ beside its config."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    paths = [str(site), str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    # geoseg trains with deterministic algorithms (warn_only); cuBLAS needs this for that
    env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if audit:
        env["PYTHONPROFILEIMPORTTIME"] = "1"
    info = device_info()
    print(info, flush=True)
    cmd = [sys.executable, "-m", "geoseg", "train", str(folder / DERIVED)]
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(folder)
    )
    log_path, imports = out / "train.log", out / "imports.txt"
    pump = threading.Thread(target=_pump, args=(proc, log_path, imports if audit else None))
    pump.start()
    stopped = False
    while proc.poll() is None:
        if not stopped and time.monotonic() >= deadline:
            print(f"deadline: stopping training (SIGTERM) after {time.monotonic() - t0:.0f} s")
            proc.send_signal(signal.SIGTERM)
            stopped = True
            try:
                proc.wait(GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
        time.sleep(0.5)
    pump.join()
    seconds = time.monotonic() - t0
    code = proc.returncode
    return finish(folder, out, env, code, stopped, seconds, info)


def _pump(proc: subprocess.Popen[bytes], log_path: Path, imports: Path | None) -> None:
    assert proc.stdout is not None
    with open(log_path, "w") as log, open(imports or os.devnull, "w") as imp:
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            if line.startswith("import time:") and imports is not None:
                imp.write(line)
                continue
            log.write(line)
            log.flush()
            sys.stdout.write(line)
            sys.stdout.flush()


def device_info() -> str:
    code = (
        "import torch; c = torch.cuda.is_available(); print('torch', torch.__version__, "
        "'cuda:', torch.cuda.get_device_name() if c else 'none')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return (r.stdout or r.stderr).strip()


def _copy_bundle(src: Path, dst: Path) -> bool:
    """Copy bundle ``src`` (model.json, weights.safetensors) into ``dst``; False, copying
    nothing, when either file is missing."""
    names = ("model.json", "weights.safetensors")
    if not all((src / name).exists() for name in names):
        return False
    dst.mkdir(exist_ok=True)
    for name in names:
        shutil.copyfile(src / name, dst / name)
    return True


def finish(
    folder: Path,
    out: Path,
    env: dict[str, str],
    code: int,
    stopped: bool,
    seconds: float,
    info: str,
) -> int:
    """Copy the bundle (and the averaged one, when the config averages epochs), history and a
    summary to ``out``; run ``geoseg model info``."""
    bundle = folder / "model"
    history: list[dict[str, Any]] = []
    state = folder / "checkpoint" / "state" / "state.json"
    if state.exists():
        shutil.copyfile(state, out / "history.json")
        history = json.loads(state.read_text()).get("history", [])
    shipped = _copy_bundle(bundle, out / "model")
    text = ""
    if shipped:
        env = {k: v for k, v in env.items() if k != "PYTHONPROFILEIMPORTTIME"}
        r = subprocess.run(
            [sys.executable, "-m", "geoseg", "model", "info", str(out / "model")],
            env=env,
            capture_output=True,
            text=True,
        )
        text = r.stdout + r.stderr
        (out / "model_info.txt").write_text(text)
        print(text, end="")
        shipped = r.returncode == 0
    if shipped:  # a config with optim.average_from_epoch wrote the averaged bundle too
        _copy_bundle(folder / "model-averaged", out / "model-averaged")
    best = max(history, key=lambda h: h.get("score") or -1.0, default=None)
    summary = {
        "exit_code": code,  # 0: all epochs and the halo measurement done; 130: stopped, saved
        "stopped_at_deadline": stopped,
        "train_seconds": round(seconds, 1),
        "epochs_done": len(history),
        "best_epoch": best["epoch"] + 1 if best else None,
        "best_score": best.get("score") if best else None,
        "bundle": shipped,
        "device": info,
    }
    (out / "run.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))
    if not shipped:
        print("run: no valid bundle was written", file=sys.stderr)
        return 1
    return 0 if code in (0, 130) or stopped else code


# ------------------------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("pack", help="write .gpu_pack/partK (here)")
    p.add_argument("--config", default=str(CONFIG))
    p.add_argument("--pack", default=str(PACK), help="pack folder (default .gpu_pack)")
    p.add_argument("--tiny", action="store_true", help="1 epoch of 16 chips, CPU: the test")
    p.add_argument("--device", default=None, help="default cuda (cpu with --tiny)")
    p.add_argument("--no-wheels", action="store_true", help="carry no wheels (CPU test)")
    r = sub.add_parser("run", help="stage the parts found, train once all are (there)")
    r.add_argument("--pack", default=str(PACK))
    r.add_argument("--stage", default=str(STAGE))
    r.add_argument("--site", default=str(SITE))
    r.add_argument("--out", default=None, help="default $OUT")
    r.add_argument("--deadline", type=float, default=DEADLINE_S, help="seconds from start")
    r.add_argument("--force-wheels", action="store_true", help="install even if importable")
    r.add_argument(
        "--audit-imports", action="store_true", help="write the trainer's imports to imports.txt"
    )
    args = parser.parse_args(argv)
    try:
        return pack(args) if args.step == "pack" else run(args)
    except PackError as exc:
        print(f"{args.step}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
