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

from geoseg.errors import ConfigError, ModelError
from geoseg.io.reader import read_padded
from geoseg.models.bundle import (
    Bundle,
    ModelSpec,
    build_module,
    check_weights,
    load_bundle,
    read_safetensors,
    save_bundle,
)
from geoseg.models.encoders import init_encoder
from geoseg.models.predictor import resolve_device
from geoseg.train.average import (
    averaged_out,
    clear_epoch_weights,
    epoch_weights_file,
    mean_weights,
    measure_batchnorm,
    save_epoch_weights,
)
from geoseg.train.cache import ChipCache
from geoseg.train.checkpoint import Checkpoint, Snapshot, position
from geoseg.train.chips import Chip
from geoseg.train.config import TrainConfig
from geoseg.train.control import (
    StopRequest,
    TrainingStopped,
    autocast_dtype,
    decode_generator,
    encode_generator,
)
from geoseg.train.dataset import Prepared, prepare
from geoseg.train.feed import Prefetch
from geoseg.train.scenes import expand_scene, no_georef_warning, open_image
from geoseg.train.step import (
    PartialLoss,
    augment,
    chip_batches,
    chip_tensors,
    evaluate_chips,
    lr_factor,
    random_chips,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "AveragedResult",
    "EpochReport",
    "Speedups",
    "TrainResult",
    "TrainingStopped",
    "halo_samples",
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
class AveragedResult:
    """The mean of the weights of epochs ``first``..``last`` (1-based; ``missing`` of them had
    no kept weights), BatchNorm measured again, validated like an epoch."""

    bundle: Bundle
    first: int
    last: int
    score: float
    val_iou: dict[str, float]
    val_iou_by_scene: dict[str, dict[str, float]]
    missing: list[int] = field(default_factory=list)


@dataclass
class TrainResult:
    """What a run produced: the best bundle and the history of every epoch so far; with
    ``optim.average_from_epoch`` also the averaged bundle."""

    bundle: Bundle
    best_epoch: int
    best_score: float
    history: list[EpochReport] = field(default_factory=list)
    train_chips: int = 0
    val_chips: int = 0
    resumed_from: int | None = None
    averaged: AveragedResult | None = None


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
        from geoseg.models.bundle import with_input_filter

        # what the forward passes run: the module behind the spec's input filter, if any (the
        # optimizer, checkpoints and bundle hold the module's own weights)
        self.net = with_input_filter(module, prep.spec)
        self.optimizer = torch.optim.AdamW(
            module.parameters(), lr=o.lr, weight_decay=o.weight_decay
        )
        self.loss_fn = PartialLoss(o.dice_weight, o.lovasz_weight)
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
        gsd = prep.spec.gsd_m
        self.blur = (gsd, cfg.chips.blur_m) if cfg.chips.blur_m and gsd else None
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
            clear_epoch_weights(self.ckpt.path)
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
        for b, batch in enumerate(chip_batches(chips, self.cfg.optim.batch_size, order)):
            if b < first:
                continue
            x, y, unknown = chip_tensors(self.prep, batch, cpu, c.size, self.cache)
            x, y = augment(x, y, gen, c.color_jitter, self.std, self.blur)
            yield b, x.contiguous(memory_format=self.memory_format), y, unknown, gen.get_state()

    def _step(self, x: torch.Tensor, y: torch.Tensor, unknown: torch.Tensor, lr: float) -> float:
        import torch

        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y, unknown = x.to(self.device), y.to(self.device), unknown.to(self.device)
        dtype = self.autocast or torch.float32
        with torch.autocast(self.device.type, dtype=dtype, enabled=self.autocast is not None):
            logits = self.net(x)
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
            chips = random_chips(self.cfg, self.prep, epoch)
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
                lr = o.lr * lr_factor(epoch * self.steps + b, self.total_steps, self.warmup)
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

    def _validate(self) -> tuple[float, dict[str, float], float, dict[str, dict[str, float]]]:
        """(loss, IoU per class, score, IoU per class of each scene) on the validation chips."""
        o = self.cfg.optim
        val_loss, iou, per_scene = evaluate_chips(
            self.net,
            self.prep,
            self.val_chips,
            o.batch_size,
            self.device,
            self.loss_fn,
            cache=self.cache,
            autocast=self.autocast,
        )
        classes = self.prep.spec.classes
        named = {c: float(v) for c, v in zip(classes, iou, strict=True)}
        fg = [v for v in iou[1:] if not np.isnan(v)]
        by_scene = {
            scene: {c: float(v) for c, v in zip(classes, values, strict=True) if not np.isnan(v)}
            for scene, values in per_scene.items()
        }
        return val_loss, named, float(np.mean(fg)) if fg else 0.0, by_scene

    def _finish(
        self, epoch: int, losses: list[float], lr: float, n_chips: int, seconds: float
    ) -> EpochReport:
        """Validate, keep the best bundle (and the epoch's weights when averaging), save the
        state; the epoch's report."""
        o = self.cfg.optim
        val_loss, named, score, by_scene = self._validate()
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
            val_iou_by_scene=by_scene,
            score=score,
            best=is_best,
            lr=lr,
            chips_per_s=n_chips / seconds if seconds > 0 else math.nan,
            seconds=seconds,
        )
        self.history.append(report)
        if o.average_from_epoch is not None and epoch + 1 >= o.average_from_epoch:
            save_epoch_weights(self.module, epoch_weights_file(self.ckpt.path, epoch))
        self.done_epoch = epoch
        self.save(None)
        return report

    def average(self) -> AveragedResult:
        """The mean of the kept epochs' weights, its BatchNorm statistics measured on a draw
        of training chips that no epoch used, validated and written to ``<out>-averaged``."""
        import torch

        o, c = self.cfg.optim, self.cfg.chips
        assert o.average_from_epoch is not None
        epochs = range(o.average_from_epoch - 1, o.epochs)
        files = {e: epoch_weights_file(self.ckpt.path, e) for e in epochs}
        missing = [e + 1 for e, f in files.items() if not f.is_file()]
        if missing:
            log.warning(
                "%s: no kept weights of epochs %s (a run resumed from a snapshot, or averaging "
                "set during the run); averaging the others",
                self.ckpt.path / "epochs",
                ", ".join(map(str, missing)),
            )
        kept = [f for e, f in files.items() if e + 1 not in missing]
        if not kept:
            raise ModelError(f"{self.ckpt.path}: no kept epoch weights to average")
        self.module.load_state_dict(mean_weights(kept), strict=True)
        self.module.to(self.device)
        chips = self.train_chips
        if self.random_sampling:  # a draw that no epoch trained on
            chips = random_chips(self.cfg, self.prep, o.epochs)
        cpu = torch.device("cpu")
        batches = (
            chip_tensors(self.prep, batch, cpu, c.size, self.cache)[0].contiguous(
                memory_format=self.memory_format
            )
            for batch in chip_batches(chips, o.batch_size, range(len(chips)))
        )
        measure_batchnorm(self.net, batches, self.device, self.autocast)
        _, named, score, by_scene = self._validate()
        out = averaged_out(self.cfg.out)
        first, last = o.average_from_epoch, o.epochs
        left_out = f" (left out, without kept weights: {missing})" if missing else ""
        note = f"Its weights are the mean of those after epochs {first}-{last}{left_out}."
        spec = self.prep.spec
        spec = spec.model_copy(update={"description": f"{spec.description} {note}".strip()})
        save_bundle(
            spec,
            self.module.state_dict(),
            out,
            dtype=_torch_dtype(self.cfg.weights_dtype),
        )
        bundle = _store_seamless_halo(load_bundle(out), self.cfg)
        return AveragedResult(bundle, first, last, score, named, by_scene, missing)


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
    start = None
    if cfg.init is not None:
        cfg, start = _fine_tune_start(cfg)
    prep = prepare(cfg)
    o = cfg.optim

    torch.manual_seed(o.seed)
    module = build_module(prep.spec)
    if start is None:
        source = init_encoder(
            module, prep.spec.encoder, prep.spec.encoder_depth, cfg.model.encoder_weights
        )
    else:
        module.load_state_dict(read_safetensors(start.weights_path), strict=True)
        source = (
            f"fine-tuned from the bundle {start.spec.name!r} (weights sha256 "
            f"{start.sha256[:12]}…), whose encoder started from "
            f"{start.spec.encoder_weights or 'random weights'}"
        )
        log.info("starting from the weights of %s", start.path)
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
    best = _store_seamless_halo(load_bundle(cfg.out), cfg)
    averaged = run.average() if o.average_from_epoch is not None else None
    return TrainResult(
        best,
        run.best_epoch,
        run.best_score,
        run.history,
        run.n_train,
        len(run.val_chips),
        resumed_from,
        averaged,
    )


#: the spec fields a bundle must share with the config to start its training (``init``)
_INIT_FIELDS = ("arch", "encoder", "encoder_depth", "decoder_channels", "bands", "classes")


def _fine_tune_start(cfg: TrainConfig) -> tuple[TrainConfig, Bundle]:
    """The ``init`` bundle, its weights checked against the config's model, and the config
    with the bundle's normalization (the inputs those weights were trained on)."""
    assert cfg.init is not None
    bundle = load_bundle(cfg.init)
    check_weights(bundle)
    want, have = cfg.model, bundle.spec
    for name in _INIT_FIELDS:
        if getattr(want, name) != getattr(have, name):
            raise ConfigError(
                f"{cfg.init}: cannot start training from this bundle: {name} "
                f"{getattr(have, name)!r} there, {getattr(want, name)!r} in the config's model"
            )
    given, kept = want.normalization, have.normalization
    same = given.scale == kept.scale and (
        not given.mean
        or (
            np.allclose(given.mean, kept.mean, rtol=1e-6, atol=1e-9)
            and np.allclose(given.std, kept.std, rtol=1e-6, atol=1e-9)
        )
    )
    if not same:
        raise ConfigError(
            f"{cfg.init}: its weights were trained on inputs normalized as {kept.model_dump()}, "
            f"the config's model.normalization is {given.model_dump()}; leave mean and std out "
            "to keep the bundle's"
        )
    model = want.model_copy(update={"normalization": kept})
    return cfg.model_copy(update={"model": model}), bundle


def _store_seamless_halo(bundle: Bundle, cfg: TrainConfig) -> Bundle:
    """Measure the trained model's seamless halo on its training scenes; record it."""
    from geoseg.models.bundle import load_module, write_spec
    from geoseg.models.halo import bundle_halo

    samples = halo_samples(cfg, bundle.spec)
    halo = bundle_halo(load_module(bundle), bundle.spec, samples=samples)
    if halo == bundle.spec.halo:
        return bundle
    spec = bundle.spec.model_copy(update={"halo": halo})
    write_spec(bundle.path, spec)
    return Bundle(bundle.path, spec, bundle.sha256)


def halo_samples(cfg: TrainConfig, spec: ModelSpec) -> list[np.ndarray]:
    """A normalized window from the middle of each training scene (of a glob: the largest of
    its first 16 images), large enough for the halo measurement's core and its largest halo."""
    from rasterio.windows import Window

    size = 128 + 2 * 512  # the measurement's core plus twice its largest halo, px
    samples = []
    for s in cfg.scenes:
        images = expand_scene(s)
        scenes = [open_image(i.image, s.gsd_m) for i in images[:16]]
        scene = max(scenes, key=lambda sc: sc.width * sc.height)
        win = Window(scene.width // 2 - size // 2, scene.height // 2 - size // 2, size, size)
        with no_georef_warning():
            data, valid = read_padded(scene, win, spec.bands)
        samples.append(spec.normalization.apply(data, valid))
    return samples
