"""The training loop: chips → U-Net → Dice + cross-entropy, AdamW, best bundle, resumable state.

Randomness is drawn from generators seeded by (seed, epoch), so an interrupted run resumed
from its checkpoint gives the same weights as an uninterrupted one on the same device.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rasterio.windows import Window

from geoseg.encoders import init_encoder
from geoseg.errors import ConfigError, InputError, ModelError
from geoseg.model import (
    Bundle,
    ModelSpec,
    build_module,
    follow_umask,
    load_bundle,
    save_bundle,
)
from geoseg.predict import check_compatible, resolve_device
from geoseg.raster import Scene
from geoseg.reader import read_padded
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
from geoseg.train.config import TrainConfig
from geoseg.train.labels import IGNORE, SceneLabels, load_scene_labels
from geoseg.train.scenes import SceneItem, expand_scene, no_georef_warning, open_image

if TYPE_CHECKING:
    import torch

__all__ = ["EpochReport", "TrainResult", "augment", "known_classes", "prepare", "train"]

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
WEIGHTS_FILE = "weights.safetensors"
OPTIMIZER_FILE = "optimizer.pt"

#: progress(epoch, batches done, batches total), called after each training batch.
ProgressFn = Callable[[int, int, int], None]


@dataclass
class EpochReport:
    """Metrics of one epoch; IoU per class on the validation chips (valid pixels only)."""

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


def prepare(cfg: TrainConfig) -> Prepared:
    """Open scenes, check labels, compute band statistics and plan the chips.

    With ``model.gsd_m`` set and ``resample`` on, scenes at another ground resolution are cut
    into chips on a virtual grid at the model's GSD (resampled reads, no copy of the scene).
    Every label file is checked (sizes, colours) before any chip is read.
    """
    spec = cfg.model
    items = [item for s in cfg.scenes for item in expand_scene(s)]
    scenes = [open_image(item.image, item.config.gsd_m) for item in items]
    for scene in scenes:
        check_compatible(scene, spec)
    gsd = spec.gsd_m if spec.gsd_m else round(mean_gsd(scenes), 4)
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
    weights = _weights(items, labels, holdouts)
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
    return Prepared(spec, chips, tuple(holdouts), weights)


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
    items: Sequence[SceneItem], labels: Sequence[SceneLabels], holdouts: Sequence[Window | None]
) -> tuple[float, ...]:
    """Each image's share of random training chips: its scene's weight split among the
    scene's training images by area (pixels of the chip grid)."""
    area = [
        0.0
        if held is not None and (held.width, held.height) == (lab.scene.width, lab.scene.height)
        else float(lab.scene.width * lab.scene.height)
        for lab, held in zip(labels, holdouts, strict=True)
    ]
    totals: dict[int, float] = {}
    for item, a in zip(items, area, strict=True):
        totals[id(item.config)] = totals.get(id(item.config), 0.0) + a
    return tuple(
        item.config.weight * a / totals[id(item.config)] if a else 0.0
        for item, a in zip(items, area, strict=True)
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, labels, unknown (N, K) classes per chip); chips of another side than ``size``
    (scale jitter) are resized to it, images bilinearly and labels by nearest neighbour."""
    import torch

    k = len(prep.spec.classes)
    xs, ys = [], []
    for c in batch:
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


def train(
    cfg: TrainConfig,
    *,
    restart: bool = False,
    progress: ProgressFn | None = None,
    on_epoch: Callable[[EpochReport], None] | None = None,
) -> TrainResult:
    """Train per ``cfg``; resume from ``cfg.checkpoint_dir`` unless ``restart``; return the best."""
    import torch

    device = torch.device(resolve_device(cfg.optim.device))
    if cfg.optim.threads:
        torch.set_num_threads(cfg.optim.threads)
    prep = prepare(cfg)
    train_chips, val_chips = prep.chips.split("train"), prep.chips.split("val")
    o = cfg.optim
    c = cfg.chips
    random_sampling = c.sampling == "random"
    n_train = c.chips_per_epoch if random_sampling else len(train_chips)
    steps_per_epoch = math.ceil(n_train / o.batch_size)
    total_steps = steps_per_epoch * o.epochs
    warmup = round(o.warmup_epochs * steps_per_epoch)

    torch.manual_seed(o.seed)
    module = build_module(prep.spec)
    source = init_encoder(
        module, prep.spec.encoder, prep.spec.encoder_depth, cfg.model.encoder_weights
    )
    spec = prep.spec.model_copy(update={"encoder_weights": source})
    prep = Prepared(spec, prep.chips, prep.holdouts, prep.weights)
    module = module.to(device)
    optimizer = torch.optim.AdamW(module.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    loss_fn = _Loss(o.dice_weight)
    ckpt = Checkpoint(cfg.checkpoint_dir, cfg.fingerprint())
    if restart:
        ckpt.clear()
    state = ckpt.load(module, optimizer, device)
    history = [EpochReport(**h) for h in state.get("history", [])]
    best_score = float(state.get("best_score", -1.0))
    best_epoch = int(state.get("best_epoch", -1))
    start = int(state.get("epoch", -1)) + 1
    resumed_from = start if state else None
    if resumed_from:
        log.info("resuming from %s at epoch %d", ckpt.path, start + 1)
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    std = torch.tensor(prep.spec.normalization.arrays(len(prep.spec.bands))[1][:, 0, 0])
    dtype = torch.float16 if cfg.weights_dtype == "float16" else None

    with _deterministic():
        for epoch in range(start, o.epochs):
            t0 = time.perf_counter()
            gen = torch.Generator().manual_seed(o.seed * 100_003 + epoch)
            epoch_chips = _random_chips(cfg, prep, epoch) if random_sampling else train_chips
            order = torch.randperm(len(epoch_chips), generator=gen).tolist()
            module.train()
            losses: list[float] = []
            lr = o.lr
            for b, batch in enumerate(_batches(epoch_chips, o.batch_size, order)):
                step = epoch * steps_per_epoch + b
                lr = o.lr * _lr_factor(step, total_steps, warmup)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x, y, unknown = _tensors(prep, batch, torch.device("cpu"), c.size)
                x, y = augment(x, y, gen, c.color_jitter, std)
                x, y, unknown = x.to(device), y.to(device), unknown.to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    logits = module(x)
                loss = loss_fn(logits.float(), y, unknown)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                if progress is not None:
                    progress(epoch, b + 1, steps_per_epoch)
            seconds = time.perf_counter() - t0
            val_loss, iou = evaluate_chips(module, prep, val_chips, o.batch_size, device, loss_fn)
            named = {c: float(v) for c, v in zip(prep.spec.classes, iou, strict=True)}
            fg = [v for v in iou[1:] if not np.isnan(v)]
            score = float(np.mean(fg)) if fg else 0.0
            is_best = score > best_score
            if is_best:
                best_score, best_epoch = score, epoch
                save_bundle(prep.spec, module.state_dict(), cfg.out, dtype=dtype)
            report = EpochReport(
                epoch=epoch,
                epochs=o.epochs,
                train_loss=float(np.mean(losses)),
                val_loss=val_loss,
                val_iou=named,
                score=score,
                best=is_best,
                lr=lr,
                chips_per_s=len(epoch_chips) / seconds,
                seconds=seconds,
            )
            history.append(report)
            ckpt.save(
                module,
                optimizer,
                {
                    "epoch": epoch,
                    "best_score": best_score,
                    "best_epoch": best_epoch,
                    "history": [asdict(h) for h in history],
                },
            )
            if on_epoch is not None:
                on_epoch(report)
    if best_epoch < 0 or not (cfg.out / "model.json").exists():
        raise ModelError(f"{cfg.out}: training finished without writing a bundle")
    return TrainResult(
        _store_seamless_halo(load_bundle(cfg.out), cfg),
        best_epoch,
        best_score,
        history,
        n_train,
        len(val_chips),
        resumed_from,
    )


def _store_seamless_halo(bundle: Bundle, cfg: TrainConfig) -> Bundle:
    """Measure the trained model's seamless halo on its training scenes; record it."""
    from rasterio.windows import Window

    from geoseg.halo import bundle_halo
    from geoseg.model import load_module, write_spec

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
) -> tuple[float, np.ndarray]:
    """(mean loss, per-class IoU) of ``module`` on ``chips``, without augmentation.

    The IoU of a class counts only chips whose scene labels it (valid pixels only); NaN for a
    class no validation chip labels or shows.
    """
    import torch

    k = len(prep.spec.classes)
    tp, fp, fn = np.zeros(k), np.zeros(k), np.zeros(k)
    losses = []
    module.eval()
    with torch.no_grad():
        for batch in _batches(chips, batch_size, range(len(chips))):
            x, y, unknown = _tensors(prep, batch, device)
            logits = module(x).float()
            losses.append(float(loss_fn(logits, y, unknown)) * len(batch))
            pred = logits.argmax(1).cpu().numpy()
            truth = y.cpu().numpy()
            known = known_classes(unknown).cpu().numpy()
            for i in range(len(batch)):
                keep = truth[i] != IGNORE
                for cls in np.flatnonzero(known[i]):
                    p, t = pred[i][keep] == cls, truth[i][keep] == cls
                    tp[cls] += np.count_nonzero(p & t)
                    fp[cls] += np.count_nonzero(p & ~t)
                    fn[cls] += np.count_nonzero(~p & t)
    denom = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(denom > 0, tp / denom, np.nan)
    return float(np.sum(losses) / max(1, len(chips))), iou


class Checkpoint:
    """Resumable state: weights (safetensors), optimizer (tensors only) and ``state.json``."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint

    def clear(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def load(
        self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
    ) -> dict[str, Any]:
        """Restore ``module`` and ``optimizer`` in place; return the saved state ({} if none)."""
        import torch
        from safetensors.torch import load_file

        state_file = self.path / STATE_FILE
        if not state_file.exists():
            return {}
        try:
            state = json.loads(state_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelError(f"{state_file}: unreadable checkpoint state ({exc})") from exc
        if state.get("fingerprint") != self.fingerprint:
            raise ConfigError(
                f"{self.path}: checkpoint was made with a different training config; "
                "restart training (--restart) or point checkpoint elsewhere"
            )
        try:
            module.load_state_dict(load_file(str(self.path / WEIGHTS_FILE)), strict=True)
            opt_state = torch.load(
                self.path / OPTIMIZER_FILE, map_location="cpu", weights_only=True
            )
            optimizer.load_state_dict(opt_state)
        except Exception as exc:  # safetensors/torch raise many types for damaged files
            raise ModelError(f"{self.path}: damaged checkpoint ({exc})") from exc
        module.to(device)
        for s in optimizer.state.values():
            for key, value in s.items():
                if isinstance(value, torch.Tensor) and key != "step":
                    s[key] = value.to(device)
        return dict(state)

    def save(
        self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        """Write all three files to a temporary directory, then swap it into place."""
        import torch
        from safetensors.torch import save_file

        tmp = self.path.with_name(f".{self.path.name}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            weights = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
            save_file(weights, str(tmp / WEIGHTS_FILE))
            follow_umask(tmp / WEIGHTS_FILE)
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
            body = {"fingerprint": self.fingerprint, **state}
            (tmp / STATE_FILE).write_text(json.dumps(body, indent=1, allow_nan=True) + "\n")
            old = self.path.with_name(f".{self.path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            if self.path.exists():
                os.replace(self.path, old)
            os.replace(tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
