"""The training loop: chips → U-Net → Dice + cross-entropy, AdamW, best bundle, resumable state.

Randomness is drawn from generators seeded by (seed, epoch), and a checkpoint (at the end of
every epoch, every ``checkpoint_minutes`` inside one, and on SIGTERM/SIGINT) holds the
generator's state after the last batch, so a run stopped and resumed any number of times
gives the same weights as an uninterrupted one on the same device. Chips come from scenes
decoded once (:mod:`geoseg.train.cache`), batches are prepared by a background thread while
the model trains, and the forward pass runs in bf16 autocast where the device has native bf16.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from rasterio.windows import Window

from geoseg.engine.plan import check_compatible
from geoseg.engine.resample import check_ratio
from geoseg.errors import ConfigError, InputError, ModelError
from geoseg.io.raster import Scene
from geoseg.io.reader import read_padded
from geoseg.models.bundle import (
    Bundle,
    ModelSpec,
    build_module,
    load_bundle,
    save_bundle,
)
from geoseg.models.encoders import init_encoder
from geoseg.models.predictor import resolve_device
from geoseg.train.cache import ChipCache
from geoseg.train.checkpoint import Checkpoint, Snapshot, position
from geoseg.train.chips import (
    Chip,
    ChipSet,
    band_statistics,
    holdout_window,
    load_chip,
    mean_gsd,
    plan_chips,
    random_windows,
    virtual_grid,
)
from geoseg.train.config import LabelSource, TrainConfig
from geoseg.train.control import (
    StopRequest,
    TrainingStopped,
    autocast_dtype,
    decode_generator,
    encode_generator,
)
from geoseg.train.feed import Prefetch
from geoseg.train.labels import (
    IGNORE,
    SceneLabels,
    classes_present,
    load_scene_labels,
)
from geoseg.train.scenes import SceneItem, expand_scene, no_georef_warning, open_image

if TYPE_CHECKING:
    import torch

__all__ = [
    "EpochReport",
    "Speedups",
    "TrainResult",
    "TrainingStopped",
    "augment",
    "known_classes",
    "prepare",
    "train",
]

log = logging.getLogger(__name__)

#: progress(epoch, batches done, batches total), called after each training batch.
ProgressFn = Callable[[int, int, int], None]


@dataclass
class EpochReport:
    """Metrics of one epoch; IoU per class on the validation chips (valid pixels only).

    ``val_iou`` of a class is the mean of its IoU over the configured scenes that label it
    (``val_iou_by_scene``), so that a scene with many validation chips does not outweigh the
    others; ``score``, the mean over foreground classes, picks the best epoch.
    """

    epoch: int
    epochs: int
    train_loss: float
    val_loss: float
    val_iou: dict[str, float]
    score: float
    best: bool
    lr: float
    chips_per_s: float
    seconds: float
    val_iou_by_scene: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class TrainResult:
    """What a run produced: the best bundle and the history of every epoch so far."""

    bundle: Bundle
    best_epoch: int
    best_score: float
    history: list[EpochReport] = field(default_factory=list)
    train_chips: int = 0
    val_chips: int = 0
    resumed_from: int | None = None


@dataclass(frozen=True)
class Prepared:
    """Chips and the spec with statistics filled in, ready to train on.

    ``chips.labels``, ``holdouts`` and ``weights`` have one entry per image: a configured scene
    that is a glob of images gives one each. ``weights`` are the shares of random training
    chips (0 for an image that is wholly validation).
    """

    spec: ModelSpec
    chips: ChipSet
    holdouts: tuple[Window | None, ...] = ()
    weights: tuple[float, ...] = ()
    #: per image, the index of its configured scene; and the scenes' names
    groups: tuple[int, ...] = ()
    group_names: tuple[str, ...] = ()


def prepare(cfg: TrainConfig) -> Prepared:
    """Open scenes, check labels, compute band statistics and plan the chips.

    With ``model.gsd_m`` set and ``resample`` on, scenes at another ground resolution are cut
    into chips on a virtual grid at the model's GSD (resampled reads, no copy of the scene);
    a scene more than ``max_resample_ratio`` times finer or coarser than it is refused.
    Every label file is checked (sizes, colours) before any chip is read.
    """
    spec = cfg.model
    expanded = [expand_scene(s) for s in cfg.scenes]
    items = [item for group in expanded for item in group]
    groups = tuple(g for g, group in enumerate(expanded) for _ in group)
    scenes = [open_image(item.image, item.config.gsd_m) for item in items]
    for scene in scenes:
        check_compatible(scene, spec)
    gsd = spec.gsd_m if spec.gsd_m else round(mean_gsd(scenes), 4)
    if cfg.resample and spec.gsd_m:
        for item, scene in zip(items, scenes, strict=True):
            check_ratio(
                item.image,
                scene.ground_res,
                gsd,
                cfg.max_resample_ratio,
                f"warp the scene near {gsd:.3g} m first (gdalwarp -tr), train on it as it is "
                "(resample: false), or raise the limit (max_resample_ratio)",
            )
    grids = [
        virtual_grid(scene, gsd) if (cfg.resample and spec.gsd_m) else None for scene in scenes
    ]
    labels = [
        load_scene_labels(
            item.config,
            scene,
            spec.classes,
            grid,
            sources=item.labels,
            fill=_fill(item.config.fill, len(spec.bands), item.image),
        )
        for item, scene, grid in zip(items, scenes, grids, strict=True)
    ]
    _check_classes_present(labels, spec.classes, [item.labels for item in items])
    if spec.normalization.mean:
        norm = spec.normalization
    else:
        norm = band_statistics(
            scenes, spec.bands, spec.normalization.scale, fills=[lab.fill for lab in labels]
        )
    spec = spec.model_copy(update={"normalization": norm, "gsd_m": gsd})
    spec = ModelSpec.model_validate(spec.model_dump())
    c = cfg.chips
    holdouts = [_holdout(item, lab.scene) for item, lab in zip(items, labels, strict=True)]
    chips = plan_chips(
        labels,
        spec.bands,
        size=c.size,
        stride=c.stride,
        block=c.block,
        val_fraction=c.val_fraction,
        seed=cfg.optim.seed,
        holdouts=holdouts,
        train_chips=c.sampling == "grid",
    )
    n_train, n_val = len(chips.split("train")), len(chips.split("val"))
    if c.sampling == "random":
        n_train = c.chips_per_epoch
    if n_train == 0:
        raise InputError("no training chips: every chip is nodata or in a validation region")
    if n_val == 0:
        hint = (
            "the hold-outs hold no chip with valid pixels: make them larger than chips.size "
            f"({c.size} px on the model's grid)"
            if any(s.holdout for s in cfg.scenes)
            else "make chips.block smaller than the scenes so that each scene has several "
            "regions, or set chips.val_fraction above 0"
        )
        raise ConfigError(f"no validation chips: {hint}")
    weights = _weights(items, labels, groups)
    log.info(
        "%d image(s) in %d scene(s): %d training and %d validation chips (%d all-nodata "
        "skipped); normalization %s",
        len(items),
        len(cfg.scenes),
        n_train,
        n_val,
        chips.skipped,
        norm.model_dump(),
    )
    return Prepared(spec, chips, tuple(holdouts), weights, groups, _names(cfg))


def _names(cfg: TrainConfig) -> tuple[str, ...]:
    """The configured scenes' display names, made unique with a suffix where they repeat."""
    names = [s.display_name() for s in cfg.scenes]
    return tuple(n if names.count(n) == 1 else f"{n}#{i + 1}" for i, n in enumerate(names))


def _check_classes_present(
    labels: Sequence[SceneLabels],
    classes: Sequence[str],
    sources: Sequence[Sequence[LabelSource]],
) -> None:
    """Refuse a class that scenes claim to label but no label file holds a pixel of: it would
    be taught as background everywhere (an empty label file, a wrong value or colour).
    ``sources`` are each image's label sources, for the message."""
    present: set[int] = set()
    for lab in labels:
        for layer in lab.layers:
            present |= classes_present(layer)
    claimed = {c for lab in labels for c in lab.labelled} - {0}
    for c in sorted(claimed - present):
        files = sorted(
            {
                str(src.path)
                for lab, srcs in zip(labels, sources, strict=True)
                if c in lab.labelled
                for src in srcs
                if classes[c] in src.classes()
            }
        )
        shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        raise InputError(
            f"class {classes[c]!r}: no label source ({shown or 'none'}) holds a single feature "
            "or pixel of it, so training would teach it as background everywhere; check the "
            "label files and their values or colours, or leave the class out of the scenes' "
            "classes"
        )


def _fill(fill: list[float] | None, n_bands: int, image: str) -> tuple[float, ...] | None:
    """The scene's fill values, one per model band."""
    if fill is None:
        return None
    if len(fill) == 1:
        return tuple(fill) * n_bands
    if len(fill) != n_bands:
        raise ConfigError(
            f"{image}: fill has {len(fill)} values; give one for all bands or one per model "
            f"band ({n_bands})"
        )
    return tuple(fill)


def _holdout(item: SceneItem, grid: Scene) -> Window | None:
    """The hold-out window of one image on its chip grid: a rectangle, the whole image
    ("all"), an empty window (no hold-out: all training) or None (seeded regions)."""
    if item.holdout is None:
        return None
    if item.holdout == "all":
        return Window(0, 0, grid.width, grid.height)
    if isinstance(item.holdout, str):  # "none"
        return Window(0, 0, 0, 0)
    x, y = item.holdout
    return holdout_window(grid, x, y)


def _weights(
    items: Sequence[SceneItem], labels: Sequence[SceneLabels], groups: Sequence[int]
) -> tuple[float, ...]:
    """Each image's share of random training chips: its scene's weight split among the
    scene's training images (``groups``: each image's configured scene) by area (pixels of
    the chip grid); an image held out whole gets none."""
    area = [
        0.0 if item.holdout == "all" else float(lab.scene.width * lab.scene.height)
        for item, lab in zip(items, labels, strict=True)
    ]
    totals = [0.0] * (max(groups, default=0) + 1)
    for g, a in zip(groups, area, strict=True):
        totals[g] += a
    return tuple(
        item.config.weight * a / totals[g] if a else 0.0
        for item, a, g in zip(items, area, groups, strict=True)
    )


def augment(
    x: torch.Tensor,
    y: torch.Tensor,
    gen: torch.Generator,
    color: float = 0.0,
    std: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flips and 90° rotations, the same for each image (N, C, H, W) and label (N, H, W);
    with ``color`` > 0 also a random brightness gain and per-band gain and offset of up to that
    fraction (in scaled pixel units, ``std`` (C,) the normalization's std)."""
    import torch

    xs, ys = [], []
    for xi, yi in zip(x, y, strict=True):
        k, flip = (int(v) for v in torch.randint(0, 4, (2,), generator=gen))
        xi, yi = torch.rot90(xi, k, (1, 2)), torch.rot90(yi, k, (0, 1))
        if flip & 1:
            xi, yi = torch.flip(xi, (2,)), torch.flip(yi, (1,))
        if color > 0:
            c = xi.shape[0]
            u = torch.rand((2 * c + 1,), generator=gen) * 2 - 1
            gain = (1 + color * u[0]) * (1 + 0.5 * color * u[1 : c + 1])
            offset = 0.5 * color * u[c + 1 :]
            scale = std if std is not None else torch.ones(c)
            # x = (v - mean) / std; v' = v * gain + offset  →  x' = x * gain + (mean (gain - 1)
            # + offset) / std; the mean term is folded in as gain applied around the mean
            xi = xi * gain[:, None, None] + (offset / scale)[:, None, None]
        xs.append(xi)
        ys.append(yi)
    return torch.stack(xs), torch.stack(ys)


def known_classes(unknown: torch.Tensor) -> torch.Tensor:
    """(N, K) bool: the classes each chip's scene labels completely, from ``unknown``;
    background is known only on chips whose scene labels every class."""
    known = ~unknown
    known[:, 0] = ~unknown.any(dim=1)
    return known


class _Loss:
    """Cross-entropy + Dice for partial labels.

    ``unknown`` (N, K) marks, per chip, the classes its scene does not label. An unburned pixel
    (class 0) of such a chip is "background or one of those": its cross-entropy is
    -log of the summed probability of that set, so no unlabelled class is ever taught as
    background. Dice of class k is computed over the chips whose scene labels k.
    """

    def __init__(self, dice_weight: float) -> None:
        self.dice_weight = dice_weight

    def __call__(
        self, logits: torch.Tensor, y: torch.Tensor, unknown: torch.Tensor | None = None
    ) -> torch.Tensor:
        import torch

        n, k = logits.shape[:2]
        if unknown is None:
            unknown = torch.zeros((n, k), dtype=torch.bool, device=logits.device)
        keep = y != IGNORE
        logp = torch.log_softmax(logits, dim=1)
        target = torch.where(keep, y, 0)
        picked = logp.gather(1, target[:, None])[:, 0]
        group = unknown.clone()
        group[:, 0] = True
        neg_inf = torch.tensor(float("-inf"), device=logits.device)
        bg = torch.logsumexp(torch.where(group[:, :, None, None], logp, neg_inf), dim=1)
        nll = -torch.where(target == 0, bg, picked)
        loss = nll[keep].mean() if keep.any() else logits.sum() * 0.0
        if self.dice_weight:
            loss = loss + self.dice_weight * self._dice(logp.exp(), target, keep, unknown)
        return loss

    @staticmethod
    def _dice(
        probs: torch.Tensor, target: torch.Tensor, keep: torch.Tensor, unknown: torch.Tensor
    ) -> torch.Tensor:
        import torch

        k = probs.shape[1]
        onehot = torch.nn.functional.one_hot(target, k).permute(0, 3, 1, 2).to(probs.dtype)
        labelled = known_classes(unknown)
        m = keep[:, None].to(probs.dtype) * labelled[:, :, None, None].to(probs.dtype)
        inter = (probs * onehot * m).sum(dim=(0, 2, 3))
        card = ((probs + onehot) * m).sum(dim=(0, 2, 3))
        present = (onehot * m).sum(dim=(0, 2, 3)) > 0
        if not present.any():
            return probs.sum() * 0.0
        dice = 1.0 - (2.0 * inter + 1e-6) / (card + 1e-6)
        return dice[present].mean()


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 1% at ``total`` steps."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))


def _batches(chips: Sequence[Chip], size: int, order: Sequence[int]) -> Iterator[list[Chip]]:
    for i in range(0, len(order), size):
        yield [chips[j] for j in order[i : i + size]]


def _tensors(
    prep: Prepared,
    batch: Sequence[Chip],
    device: torch.device,
    size: int | None = None,
    cache: ChipCache | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, labels, unknown (N, K) classes per chip), from ``cache`` when given; chips of
    another side than ``size`` (scale jitter) are resized to it, images bilinearly and labels
    by nearest neighbour."""
    import torch

    k = len(prep.spec.classes)
    xs, ys = [], []
    for c in batch:
        if cache is not None:
            x, y = cache.load(c.scene, c.window)
        else:
            x, y = load_chip(prep.chips.labels[c.scene], c.window, prep.spec)
        tx, ty = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
        if size is not None and x.shape[-1] != size:
            tx = torch.nn.functional.interpolate(
                tx[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )[0]
            ty = torch.nn.functional.interpolate(
                ty[None, None].float(), size=(size, size), mode="nearest"
            )[0, 0].long()
        xs.append(tx)
        ys.append(ty)
    unknown = torch.tensor(
        [[i not in prep.chips.labels[c.scene].labelled for i in range(k)] for c in batch],
        dtype=torch.bool,
    )
    unknown[:, 0] = False
    return torch.stack(xs).to(device), torch.stack(ys).to(device), unknown.to(device)


def _random_chips(cfg: TrainConfig, prep: Prepared, epoch: int) -> list[Chip]:
    """This epoch's random training chips; sides vary with the scale jitter (seeded by epoch)."""
    import random

    rng = random.Random(cfg.optim.seed * 1_000_003 + epoch)
    c = cfg.chips
    scenes = [
        (lab.scene, held, w)
        for lab, held, w in zip(prep.chips.labels, prep.holdouts, prep.weights, strict=True)
    ]
    j = c.scale_jitter
    biggest = round(c.size * (1 + j))
    picks = random_windows(scenes, biggest, c.chips_per_epoch, rng)
    chips = []
    for i, win in picks:
        side = round(c.size * math.exp(rng.uniform(-math.log1p(j), math.log1p(j)))) if j else c.size
        side = min(side, biggest)
        dc = rng.randint(0, biggest - side)
        dr = rng.randint(0, biggest - side)
        chips.append(Chip(i, Window(win.col_off + dc, win.row_off + dr, side, side), "train"))
    return chips


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    import torch

    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@dataclass(frozen=True)
class Speedups:
    """How chips reach the model. The defaults are the fast path; all off is the older path
    (every chip read from its file, nothing prepared ahead, contiguous tensors), which the
    benchmarks compare against."""

    cache: bool = True  # scenes decoded once into <checkpoint>/cache (see geoseg.train.cache)
    prefetch: int = 2  # batches prepared ahead by a background thread (0: none)
    channels_last: bool = True  # NHWC module and batches


#: (batch index, images, labels, unknown classes, generator state after augmenting it)
_Batch = tuple[int, "torch.Tensor", "torch.Tensor", "torch.Tensor", "torch.Tensor"]


class _Trainer:
    """One run's model, optimizer and saved state; runs epochs, saves and resumes them."""

    def __init__(
        self,
        cfg: TrainConfig,
        prep: Prepared,
        module: torch.nn.Module,
        device: torch.device,
        speed: Speedups,
    ) -> None:
        import torch

        o = cfg.optim
        self.cfg, self.prep, self.module, self.device, self.speed = cfg, prep, module, device, speed
        self.optimizer = torch.optim.AdamW(
            module.parameters(), lr=o.lr, weight_decay=o.weight_decay
        )
        self.loss_fn = _Loss(o.dice_weight)
        self.train_chips = prep.chips.split("train")
        self.val_chips = prep.chips.split("val")
        self.random_sampling = cfg.chips.sampling == "random"
        self.n_train = cfg.chips.chips_per_epoch if self.random_sampling else len(self.train_chips)
        self.steps = math.ceil(self.n_train / o.batch_size)
        self.total_steps = self.steps * o.epochs
        self.warmup = round(o.warmup_epochs * self.steps)
        self.autocast = autocast_dtype(o.precision, device)
        self.memory_format = torch.channels_last if speed.channels_last else torch.contiguous_format
        norm = prep.spec.normalization.arrays(len(prep.spec.bands))
        self.std = torch.tensor(norm[1][:, 0, 0])
        fingerprint = cfg.fingerprint()
        self.ckpt = Checkpoint(cfg.checkpoint_dir, fingerprint)
        self.snapshot = Snapshot(cfg.snapshot, fingerprint) if cfg.snapshot else None
        self.cache: ChipCache | None = None
        self.history: list[EpochReport] = []
        self.best_score, self.best_epoch, self.done_epoch = -1.0, -1, -1
        self.last_save = time.monotonic()
        self.resumed_at: int | None = None  # the epoch a resumed run went on with

    def resume(self, restart: bool) -> dict[str, Any]:
        """Load the furthest saved state: the checkpoint, or the snapshot when the checkpoint
        is missing or behind it; return its ``partial`` epoch (or {})."""
        if restart:
            self.ckpt.clear()
        full = self.ckpt.peek()
        snap = self.snapshot.peek() if self.snapshot and not restart else None
        if snap is not None and full is not None and snap["fingerprint"] != self.ckpt.fingerprint:
            snap = None  # an older config's snapshot; the next save replaces it
        args = (self.module, self.optimizer, self.device)
        if full is not None and (snap is None or position(full) >= position(snap)):
            state = self.ckpt.load(*args)
            how = f"checkpoint {self.ckpt.path}"
        elif snap is not None and self.snapshot is not None:
            state = self.snapshot.load(*args)
            how = f"compact snapshot {self.snapshot.path} (float16 weights: not bit-identical)"
        else:
            return {}
        self.history = [EpochReport(**h) for h in state.get("history", [])]
        self.best_score = float(state.get("best_score", -1.0))
        self.best_epoch = int(state.get("best_epoch", -1))
        self.done_epoch = int(state.get("epoch", -1))
        epoch, batch = position(state)
        self.resumed_at = epoch
        log.info("resuming from the %s at epoch %d, batch %d", how, epoch + 1, batch)
        if self.best_epoch >= 0 and not (self.cfg.out / "model.json").exists():
            log.warning(
                "%s: the best bundle so far (epoch %d, score %.3f) is missing; the next "
                "validated epoch writes one",
                self.cfg.out,
                self.best_epoch + 1,
                self.best_score,
            )
            self.best_score, self.best_epoch = -1.0, -1
        partial = state.get("partial") or {}
        return dict(partial) if partial.get("epoch") == self.done_epoch + 1 else {}

    def save(self, partial: dict[str, Any] | None) -> None:
        """Write the checkpoint (and the snapshot, when configured)."""
        state = {
            "epoch": self.done_epoch,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "history": [asdict(h) for h in self.history],
            "partial": partial,
        }
        self.ckpt.save(self.module, self.optimizer, state)
        if self.snapshot is not None:
            self.snapshot.save(self.module, self.optimizer, state)
        self.last_save = time.monotonic()

    def _feed(
        self, chips: Sequence[Chip], order: Sequence[int], first: int, gen: torch.Generator
    ) -> Iterator[_Batch]:
        """Augmented batches from batch ``first`` on, each with ``gen``'s state after it."""
        import torch

        c = self.cfg.chips
        cpu = torch.device("cpu")
        for b, batch in enumerate(_batches(chips, self.cfg.optim.batch_size, order)):
            if b < first:
                continue
            x, y, unknown = _tensors(self.prep, batch, cpu, c.size, self.cache)
            x, y = augment(x, y, gen, c.color_jitter, self.std)
            yield b, x.contiguous(memory_format=self.memory_format), y, unknown, gen.get_state()

    def _step(self, x: torch.Tensor, y: torch.Tensor, unknown: torch.Tensor, lr: float) -> float:
        import torch

        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y, unknown = x.to(self.device), y.to(self.device), unknown.to(self.device)
        dtype = self.autocast or torch.float32
        with torch.autocast(self.device.type, dtype=dtype, enabled=self.autocast is not None):
            logits = self.module(x)
        loss = self.loss_fn(logits.float(), y, unknown)  # the loss in fp32
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def epoch(
        self,
        epoch: int,
        resume: dict[str, Any],
        stop: StopRequest,
        progress: ProgressFn | None,
    ) -> EpochReport:
        """Train one epoch (from where ``resume`` left it), validate, save; return its report."""
        import torch

        o = self.cfg.optim
        gen = torch.Generator().manual_seed(o.seed * 100_003 + epoch)
        chips = self.train_chips
        if self.random_sampling:
            chips = _random_chips(self.cfg, self.prep, epoch)
        order = torch.randperm(len(chips), generator=gen).tolist()
        losses: list[float] = list(resume.get("losses", []))
        first, seconds = int(resume.get("batch", 0)), float(resume.get("seconds", 0.0))
        lr = float(resume.get("lr", o.lr))
        if resume:
            gen.set_state(decode_generator(resume["generator"]))
        self.module.train()
        t0 = time.perf_counter()
        with Prefetch(self._feed(chips, order, first, gen), self.speed.prefetch) as feed:
            for b, x, y, unknown, gen_state in feed:
                lr = o.lr * _lr_factor(epoch * self.steps + b, self.total_steps, self.warmup)
                losses.append(self._step(x, y, unknown, lr))
                if progress is not None:
                    progress(epoch, b + 1, self.steps)
                partial = {
                    "epoch": epoch,
                    "batch": b + 1,
                    "generator": encode_generator(gen_state),
                    "losses": losses,
                    "seconds": seconds + time.perf_counter() - t0,
                    "lr": lr,
                }
                if stop(epoch, b + 1):
                    self._stop(partial, stop)
                minutes = self.cfg.checkpoint_minutes
                if minutes and time.monotonic() - self.last_save >= 60 * minutes:
                    log.info("checkpoint at epoch %d, batch %d/%d", epoch + 1, b + 1, self.steps)
                    self.save(partial)
        seconds += time.perf_counter() - t0
        return self._finish(epoch, losses, lr, len(chips), seconds)

    def _stop(self, partial: dict[str, Any], stop: StopRequest) -> None:
        self.save(partial)
        epoch, batch = partial["epoch"], partial["batch"]
        raise TrainingStopped(
            f"training stopped ({stop.reason()}) at epoch {epoch + 1}, batch {batch}/{self.steps}; "
            f"state saved in {self.ckpt.path}; run the same command to resume",
            epoch,
            batch,
            stop.signum,
        )

    def _finish(
        self, epoch: int, losses: list[float], lr: float, n_chips: int, seconds: float
    ) -> EpochReport:
        """Validate, keep the best bundle, save the state; the epoch's report."""
        o = self.cfg.optim
        val_loss, iou, per_scene = evaluate_chips(
            self.module,
            self.prep,
            self.val_chips,
            o.batch_size,
            self.device,
            self.loss_fn,
            cache=self.cache,
            autocast=self.autocast,
        )
        named = {c: float(v) for c, v in zip(self.prep.spec.classes, iou, strict=True)}
        fg = [v for v in iou[1:] if not np.isnan(v)]
        score = float(np.mean(fg)) if fg else 0.0
        is_best = score > self.best_score
        if is_best:
            self.best_score, self.best_epoch = score, epoch
            dtype = _torch_dtype(self.cfg.weights_dtype)
            save_bundle(self.prep.spec, self.module.state_dict(), self.cfg.out, dtype=dtype)
        report = EpochReport(
            epoch=epoch,
            epochs=o.epochs,
            train_loss=float(np.mean(losses)) if losses else math.nan,
            val_loss=val_loss,
            val_iou=named,
            val_iou_by_scene={
                scene: {
                    c: float(v)
                    for c, v in zip(self.prep.spec.classes, values, strict=True)
                    if not np.isnan(v)
                }
                for scene, values in per_scene.items()
            },
            score=score,
            best=is_best,
            lr=lr,
            chips_per_s=n_chips / seconds if seconds > 0 else math.nan,
            seconds=seconds,
        )
        self.history.append(report)
        self.done_epoch = epoch
        self.save(None)
        return report


def _torch_dtype(name: str) -> torch.dtype | None:
    import torch

    return torch.float16 if name == "float16" else None


def train(
    cfg: TrainConfig,
    *,
    restart: bool = False,
    progress: ProgressFn | None = None,
    on_epoch: Callable[[EpochReport], None] | None = None,
    stop: Callable[[int, int], bool] | None = None,
    speed: Speedups = Speedups(),  # noqa: B008 (frozen)
) -> TrainResult:
    """Train per ``cfg``; resume from ``cfg.checkpoint_dir`` (or ``cfg.snapshot``) unless
    ``restart``; return the best.

    ``stop(epoch, batches done)`` is polled after every batch, and SIGTERM/SIGINT are caught
    while the epochs run: either way the batch in progress finishes, the state is saved and
    :class:`TrainingStopped` is raised; the same call later resumes bit for bit.
    """
    import torch

    device = torch.device(resolve_device(cfg.optim.device))
    if cfg.optim.threads:
        torch.set_num_threads(cfg.optim.threads)
    prep = prepare(cfg)
    o = cfg.optim

    torch.manual_seed(o.seed)
    module = build_module(prep.spec)
    source = init_encoder(
        module, prep.spec.encoder, prep.spec.encoder_depth, cfg.model.encoder_weights
    )
    prep = replace(prep, spec=prep.spec.model_copy(update={"encoder_weights": source}))
    module = module.to(device)
    if speed.channels_last:
        module = module.to(memory_format=torch.channels_last)
    run = _Trainer(cfg, prep, module, device, speed)
    resume = run.resume(restart)
    resumed_from = run.resumed_at
    if speed.cache:
        run.cache = ChipCache(prep.chips.labels, prep.spec, run.ckpt.cache_dir)
    log.info("training on %s, forward pass in %s", device, run.autocast or "fp32")
    request = StopRequest(stop)
    with _deterministic(), request.on_signals():
        for epoch in range(run.done_epoch + 1, o.epochs):
            report = run.epoch(epoch, resume, request, progress)
            resume = {}
            if on_epoch is not None:
                on_epoch(report)
            if request.signum is not None and epoch + 1 < o.epochs:  # during validation
                raise TrainingStopped(
                    f"training stopped ({request.reason()}) after epoch {epoch + 1}; state "
                    f"saved in {run.ckpt.path}; run the same command to resume",
                    epoch + 1,
                    0,
                    request.signum,
                )
    if run.best_epoch < 0 or not (cfg.out / "model.json").exists():
        raise ModelError(f"{cfg.out}: training finished without writing a bundle")
    return TrainResult(
        _store_seamless_halo(load_bundle(cfg.out), cfg),
        run.best_epoch,
        run.best_score,
        run.history,
        run.n_train,
        len(run.val_chips),
        resumed_from,
    )


def _store_seamless_halo(bundle: Bundle, cfg: TrainConfig) -> Bundle:
    """Measure the trained model's seamless halo on its training scenes; record it."""
    from rasterio.windows import Window

    from geoseg.models.bundle import load_module, write_spec
    from geoseg.models.halo import bundle_halo

    size = 128 + 2 * 512  # the measurement's core plus twice its largest halo, px
    samples = []
    for s in cfg.scenes:  # the first image of each scene (of a glob: the largest)
        images = expand_scene(s)
        scenes = [open_image(i.image, s.gsd_m) for i in images[:16]]
        scene = max(scenes, key=lambda sc: sc.width * sc.height)
        win = Window(scene.width // 2 - size // 2, scene.height // 2 - size // 2, size, size)
        with no_georef_warning():
            data, valid = read_padded(scene, win, bundle.spec.bands)
        samples.append(bundle.spec.normalization.apply(data, valid))
    halo = bundle_halo(load_module(bundle), bundle.spec, samples=samples)
    if halo == bundle.spec.halo:
        return bundle
    spec = bundle.spec.model_copy(update={"halo": halo})
    write_spec(bundle.path, spec)
    return Bundle(bundle.path, spec, bundle.sha256)


def evaluate_chips(
    module: torch.nn.Module,
    prep: Prepared,
    chips: Sequence[Chip],
    batch_size: int,
    device: torch.device,
    loss_fn: _Loss,
    *,
    cache: ChipCache | None = None,
    autocast: torch.dtype | None = None,
) -> tuple[float, np.ndarray, dict[str, np.ndarray]]:
    """(mean loss, per-class IoU, per-class IoU of each configured scene) of ``module`` on
    ``chips``, without augmentation; the forward pass in ``autocast`` precision (None: fp32),
    the module's memory format.

    The IoU of a class in a scene counts only chips whose scene labels it (valid pixels only),
    NaN where no chip of that scene labels or shows it; the per-class IoU is the mean over the
    scenes where it is defined, so every scene weighs the same whatever its chip count.
    """
    import torch

    k = len(prep.spec.classes)
    n_groups = max(prep.groups, default=0) + 1 if prep.groups else 1
    tp, fp, fn = (np.zeros((n_groups, k)) for _ in range(3))
    losses = []
    module.eval()
    dtype = autocast or torch.float32
    weight = next(module.parameters())
    channels_last = weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with torch.no_grad():
        for batch in _batches(chips, batch_size, range(len(chips))):
            x, y, unknown = _tensors(prep, batch, device, cache=cache)
            x = x.contiguous(memory_format=fmt)
            with torch.autocast(device.type, dtype=dtype, enabled=autocast is not None):
                logits = module(x).float()
            losses.append(float(loss_fn(logits, y, unknown)) * len(batch))
            pred = logits.argmax(1).cpu().numpy()
            truth = y.cpu().numpy()
            known = known_classes(unknown).cpu().numpy()
            for i, chip in enumerate(batch):
                g = prep.groups[chip.scene] if prep.groups else 0
                keep = truth[i] != IGNORE
                for cls in np.flatnonzero(known[i]):
                    p, t = pred[i][keep] == cls, truth[i][keep] == cls
                    tp[g, cls] += np.count_nonzero(p & t)
                    fp[g, cls] += np.count_nonzero(p & ~t)
                    fn[g, cls] += np.count_nonzero(~p & t)
    denom = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        by_group = np.where(denom > 0, tp / denom, np.nan)
    defined = ~np.isnan(by_group)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(
            defined.any(axis=0),
            np.nansum(by_group, axis=0) / defined.sum(axis=0),
            np.nan,
        )
    names = prep.group_names or tuple(f"scene {g + 1}" for g in range(n_groups))
    per_scene = {names[g]: by_group[g] for g in range(n_groups) if defined[g].any()}
    return float(np.sum(losses) / max(1, len(chips))), iou, per_scene
