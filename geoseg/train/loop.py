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

from geoseg._smp import import_smp
from geoseg.errors import ConfigError, InputError, ModelError
from geoseg.model import Bundle, ModelSpec, build_module, load_bundle, save_bundle
from geoseg.predict import check_compatible, resolve_device
from geoseg.raster import open_scene, read_padded
from geoseg.train.chips import Chip, ChipSet, band_statistics, load_chip, mean_gsd, plan_chips
from geoseg.train.config import TrainConfig
from geoseg.train.labels import IGNORE, load_scene_labels

if TYPE_CHECKING:
    import torch

__all__ = ["EpochReport", "TrainResult", "augment", "confusion", "iou_scores", "prepare", "train"]

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
    """Chips and the spec with statistics filled in, ready to train on."""

    spec: ModelSpec
    chips: ChipSet


def prepare(cfg: TrainConfig) -> Prepared:
    """Open scenes, check labels, compute band statistics and plan the chips."""
    spec = cfg.model
    scenes = [open_scene(s.image) for s in cfg.scenes]
    for scene in scenes:
        check_compatible(scene, spec)
    labels = [
        load_scene_labels(s, scene, spec.classes)
        for s, scene in zip(cfg.scenes, scenes, strict=True)
    ]
    norm = band_statistics(scenes, spec.bands, spec.normalization.scale)
    spec = spec.model_copy(update={"normalization": norm, "gsd_m": round(mean_gsd(scenes), 4)})
    spec = ModelSpec.model_validate(spec.model_dump())
    c = cfg.chips
    chips = plan_chips(
        labels,
        spec.bands,
        size=c.size,
        stride=c.stride,
        block=c.block,
        val_fraction=c.val_fraction,
        seed=cfg.optim.seed,
    )
    n_train, n_val = len(chips.split("train")), len(chips.split("val"))
    if n_train == 0:
        raise InputError("no training chips: every chip is nodata or in a validation region")
    if n_val == 0:
        raise ConfigError(
            "no validation chips: make chips.block smaller than the scenes so that each scene "
            "has several regions, or set chips.val_fraction above 0"
        )
    log.info(
        "%d training and %d validation chips (%d all-nodata skipped); normalization %s",
        n_train,
        n_val,
        chips.skipped,
        norm.model_dump(),
    )
    return Prepared(spec, chips)


def augment(
    x: torch.Tensor, y: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flips and 90° rotations, the same for each image (N, C, H, W) and label (N, H, W)."""
    import torch

    xs, ys = [], []
    for xi, yi in zip(x, y, strict=True):
        k, flip = (int(v) for v in torch.randint(0, 4, (2,), generator=gen))
        xi, yi = torch.rot90(xi, k, (1, 2)), torch.rot90(yi, k, (0, 1))
        if flip & 1:
            xi, yi = torch.flip(xi, (2,)), torch.flip(yi, (1,))
        xs.append(xi)
        ys.append(yi)
    return torch.stack(xs), torch.stack(ys)


def confusion(
    pred: np.ndarray, truth: np.ndarray, n_classes: int, ignore: int = IGNORE
) -> np.ndarray:
    """(K, K) int64 counts, rows = truth, columns = prediction; ``ignore`` pixels left out."""
    keep = truth != ignore
    idx = truth[keep].astype(np.int64) * n_classes + pred[keep].astype(np.int64)
    return np.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def iou_scores(cm: np.ndarray) -> np.ndarray:
    """Per-class IoU from a confusion matrix; NaN for a class absent from truth and prediction."""
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, tp / denom, np.nan)


class _Loss:
    def __init__(self, dice_weight: float) -> None:
        smp = import_smp()
        import torch

        self.ce = torch.nn.CrossEntropyLoss(ignore_index=IGNORE)
        self.dice = smp.losses.DiceLoss("multiclass", ignore_index=IGNORE, from_logits=True)
        self.dice_weight = dice_weight

    def __call__(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self.ce(logits, y)
        if self.dice_weight:
            loss = loss + self.dice_weight * self.dice(logits, y)
        return loss


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
    prep: Prepared, batch: Sequence[Chip], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    pairs = [load_chip(prep.chips.labels[c.scene], c.window, prep.spec) for c in batch]
    x = torch.from_numpy(np.stack([p[0] for p in pairs]))
    y = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64))
    return x.to(device), y.to(device)


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
    steps_per_epoch = math.ceil(len(train_chips) / o.batch_size)
    total_steps = steps_per_epoch * o.epochs
    warmup = round(o.warmup_epochs * steps_per_epoch)

    torch.manual_seed(o.seed)
    module = build_module(prep.spec).to(device)
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

    with _deterministic():
        for epoch in range(start, o.epochs):
            t0 = time.perf_counter()
            gen = torch.Generator().manual_seed(o.seed * 100_003 + epoch)
            order = torch.randperm(len(train_chips), generator=gen).tolist()
            module.train()
            losses: list[float] = []
            lr = o.lr
            for b, batch in enumerate(_batches(train_chips, o.batch_size, order)):
                step = epoch * steps_per_epoch + b
                lr = o.lr * _lr_factor(step, total_steps, warmup)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x, y = _tensors(prep, batch, torch.device("cpu"))
                x, y = augment(x, y, gen)
                x, y = x.to(device), y.to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    logits = module(x)
                loss = loss_fn(logits.float(), y)
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
                save_bundle(prep.spec, module.state_dict(), cfg.out)
            report = EpochReport(
                epoch=epoch,
                epochs=o.epochs,
                train_loss=float(np.mean(losses)),
                val_loss=val_loss,
                val_iou=named,
                score=score,
                best=is_best,
                lr=lr,
                chips_per_s=len(train_chips) / seconds,
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
        len(train_chips),
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
    for s in cfg.scenes:
        scene = open_scene(s.image)
        win = Window(scene.width // 2 - size // 2, scene.height // 2 - size // 2, size, size)
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
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[float, np.ndarray]:
    """(mean loss, per-class IoU) of ``module`` on ``chips``, without augmentation."""
    import torch

    k = len(prep.spec.classes)
    cm = np.zeros((k, k), dtype=np.int64)
    losses = []
    module.eval()
    with torch.no_grad():
        for batch in _batches(chips, batch_size, range(len(chips))):
            x, y = _tensors(prep, batch, device)
            logits = module(x).float()
            losses.append(float(loss_fn(logits, y)) * len(batch))
            pred = logits.argmax(1).cpu().numpy()
            cm += confusion(pred, y.cpu().numpy(), k)
    return float(np.sum(losses) / max(1, len(chips))), iou_scores(cm)


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
