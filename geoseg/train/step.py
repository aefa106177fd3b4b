"""One batch's way through training: chips read into tensors, each epoch's random chips,
augmentation, the loss for partial labels and the learning-rate schedule; and the validation
metrics (:func:`evaluate_chips`)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
from rasterio.windows import Window

from geoseg.train.cache import ChipCache
from geoseg.train.chips import Chip, load_chip, random_windows
from geoseg.train.config import TrainConfig
from geoseg.train.dataset import Prepared
from geoseg.train.labels import IGNORE

if TYPE_CHECKING:
    import torch

__all__ = [
    "PartialLoss",
    "augment",
    "chip_batches",
    "chip_tensors",
    "evaluate_chips",
    "known_classes",
    "lovasz_softmax",
    "lr_factor",
    "random_chips",
]


def augment(
    x: torch.Tensor,
    y: torch.Tensor,
    gen: torch.Generator,
    color: float = 0.0,
    std: torch.Tensor | None = None,
    blur: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flips and 90° rotations, the same for each image (N, C, H, W) and label (N, H, W);
    with ``color`` > 0 also a random brightness gain and per-band gain and offset of up to that
    fraction (in scaled pixel units, ``std`` (C,) the normalization's std); with ``blur``
    (the chips' ground resolution, the coarsest) also a Gaussian blur of each image to an
    effective resolution drawn uniformly between the two (``chips.blur_m``)."""
    import torch

    from geoseg.models.input_filter import blur_sigma_px
    from geoseg.models.lowpass import gaussian_blur

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
        if blur is not None:
            gsd, coarsest = blur
            draw = float(torch.rand((), generator=gen))
            sigma = blur_sigma_px(gsd, gsd + draw * (coarsest - gsd))
            if sigma > 0:
                xi = gaussian_blur(xi[None], sigma)[0]
        xs.append(xi)
        ys.append(yi)
    return torch.stack(xs), torch.stack(ys)


def known_classes(unknown: torch.Tensor) -> torch.Tensor:
    """(N, K) bool: the classes each chip's scene labels completely, from ``unknown``;
    background is known only on chips whose scene labels every class."""
    known = ~unknown
    known[:, 0] = ~unknown.any(dim=1)
    return known


class PartialLoss:
    """Cross-entropy + Dice (+ Lovász-softmax) for partial labels.

    ``unknown`` (N, K) marks, per chip, the classes its scene does not label. An unburned pixel
    (class 0) of such a chip is "background or one of those": its cross-entropy is
    -log of the summed probability of that set, so no unlabelled class is ever taught as
    background. Dice and Lovász of class k are computed over the chips whose scene labels k.
    """

    def __init__(self, dice_weight: float, lovasz_weight: float = 0.0) -> None:
        self.dice_weight = dice_weight
        self.lovasz_weight = lovasz_weight

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
        if self.lovasz_weight:
            loss = loss + self.lovasz_weight * lovasz_softmax(logp.exp(), target, keep, unknown)
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


def lovasz_softmax(
    probs: torch.Tensor, target: torch.Tensor, keep: torch.Tensor, unknown: torch.Tensor
) -> torch.Tensor:
    """Lovász-softmax loss (Berman et al. 2018, the convex surrogate of 1 − IoU), the mean over
    the classes present: each class over the valid pixels of the chips whose scene labels it
    (``known_classes``), all those chips' pixels pooled."""
    import torch

    labelled = known_classes(unknown)
    losses = []
    for cls in range(probs.shape[1]):
        chips = labelled[:, cls]
        if not chips.any():
            continue
        valid = keep[chips]
        fg = (target[chips] == cls)[valid].to(probs.dtype)
        if not fg.any():
            continue
        errors = (fg - probs[chips, cls][valid]).abs()
        errors, order = torch.sort(errors, descending=True)
        fg = fg[order]
        total = fg.sum()
        jaccard = 1.0 - (total - fg.cumsum(0)) / (total + (1.0 - fg).cumsum(0))
        grad = torch.cat((jaccard[:1], jaccard[1:] - jaccard[:-1]))
        losses.append(torch.dot(errors, grad))
    if not losses:
        return probs.sum() * 0.0
    return torch.stack(losses).mean()


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 1% at ``total`` steps."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))


def chip_batches(chips: Sequence[Chip], size: int, order: Sequence[int]) -> Iterator[list[Chip]]:
    for i in range(0, len(order), size):
        yield [chips[j] for j in order[i : i + size]]


def chip_tensors(
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


def random_chips(cfg: TrainConfig, prep: Prepared, epoch: int) -> list[Chip]:
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


def evaluate_chips(
    module: torch.nn.Module,
    prep: Prepared,
    chips: Sequence[Chip],
    batch_size: int,
    device: torch.device,
    loss_fn: PartialLoss,
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
        for batch in chip_batches(chips, batch_size, range(len(chips))):
            x, y, unknown = chip_tensors(prep, batch, device, cache=cache)
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
