"""The augmentation baselines APBench runs against availability poisons: `cutout`, `mixup`, `cutmix`.

Each is standard training with a batch augmentation inside the loss, vectorised on the batch's
device and drawn from a private generator seeded by the run's seed (deterministic, and independent
of the global RNG):

- `cutout`: zero one square of side `size` per image, centre uniform over the image, clipped at the
  border (DeVries & Taylor 2017; APBench: 16 px on 32 px CIFAR; default here half the image side,
  i.e. 14 px on 28 x 28).
- `mixup`: x' = (1 - lam) x + lam x[perm], loss (1 - lam) CE(y) + lam CE(y[perm]), with a batch
  permutation and a per-sample lam uniform in `lambda_range` (kornia RandomMixUpV2's default (0, 1),
  which APBench uses).
- `cutmix`: paste a box of x[perm] into x, box area share 1 - lam with lam ~ U(0, 1) (Beta(1, 1),
  kornia RandomCutMixV2's default), centre uniform, clipped; the loss weights the labels by the
  pasted area actually kept.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.defense import BuildContext, Defense, register
from defenses.standard import train_defended
from harness.core.classifier import Classifier
from harness.core.errors import UserError
from harness.data.training import LossFn, TrainConfig


def box_masks(n: int, h: int, w: int, box_h: torch.Tensor, box_w: torch.Tensor,
              generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """(n, 1, h, w) bool masks of one box per image: sizes given, centres uniform, clipped to the image."""
    cy = torch.randint(0, h, (n,), generator=generator, device=device)
    cx = torch.randint(0, w, (n,), generator=generator, device=device)
    y0 = (cy - box_h // 2).clamp(0, h).view(n, 1, 1)
    y1 = (cy + (box_h - box_h // 2)).clamp(0, h).view(n, 1, 1)
    x0 = (cx - box_w // 2).clamp(0, w).view(n, 1, 1)
    x1 = (cx + (box_w - box_w // 2)).clamp(0, w).view(n, 1, 1)
    rows = torch.arange(h, device=device).view(1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, w)
    return ((rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)).unsqueeze(1)


def cutout(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Zero one `size` x `size` square per image (clipped at the border)."""
    n, _, h, w = x.shape
    side = torch.full((n,), int(size), device=x.device)
    return x.masked_fill(box_masks(n, h, w, side, side, generator, x.device), 0.0)


def mixup(x: torch.Tensor, y: torch.Tensor, lam_range: Sequence[float], generator: torch.Generator):
    """(mixed x, y, y[perm], lam per sample)."""
    n = x.shape[0]
    perm = torch.randperm(n, generator=generator, device=x.device)
    lo, hi = float(lam_range[0]), float(lam_range[1])
    lam = lo + (hi - lo) * torch.rand(n, generator=generator, device=x.device)
    view = lam.view(n, 1, 1, 1)
    return (1 - view) * x + view * x[perm], y, y[perm], lam


def cutmix(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator):
    """(mixed x, y, y[perm], pasted area share per sample)."""
    n, _, h, w = x.shape
    perm = torch.randperm(n, generator=generator, device=x.device)
    lam = torch.rand(n, generator=generator, device=x.device)
    cut = torch.sqrt(1.0 - lam)
    box_h, box_w = (cut * h).long(), (cut * w).long()
    mask = box_masks(n, h, w, box_h, box_w, generator, x.device)
    share = mask.flatten(1).float().mean(dim=1)
    return torch.where(mask, x[perm], x), y, y[perm], share


def mixed_ce(logits: torch.Tensor, ya: torch.Tensor, yb: torch.Tensor, share_b: torch.Tensor) -> torch.Tensor:
    """mean_i (1 - s_i) CE(logits_i, ya_i) + s_i CE(logits_i, yb_i)."""
    return ((1 - share_b) * F.cross_entropy(logits, ya, reduction="none")
            + share_b * F.cross_entropy(logits, yb, reduction="none")).mean()


class _Augmented(Defense):
    """Shared implementation: standard training with a loss built around one augmentation."""

    def __init__(self, train: dict[str, Any] | None = None) -> None:
        self.train = dict(train or {})

    def make_loss(self, generator: torch.Generator) -> LossFn:  # pragma: no cover - abstract
        raise NotImplementedError

    def build(self, ctx: BuildContext) -> Classifier:
        gen = torch.Generator(device=ctx.device).manual_seed(int(ctx.seed) + 104729)
        module, facts = train_defended(ctx, self, loss_fn=self.make_loss(gen), train_cfg=TrainConfig.from_dict(self.train))
        return Classifier(module, ctx.data.num_classes, ctx.data.input_shape, info=facts)


@register("cutout")
class Cutout(_Augmented):
    """Standard training on cut-out images."""

    def __init__(self, size: int | None = None, train: dict[str, Any] | None = None) -> None:
        if size is not None and int(size) < 1:
            raise UserError(f"defense.size={size} must be >= 1 pixels (16 on CIFAR; default half the image side)")
        super().__init__(train)
        self.size = None if size is None else int(size)

    def make_loss(self, generator: torch.Generator) -> LossFn:
        def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int) -> torch.Tensor:
            size = self.size if self.size is not None else max(1, x.shape[-1] // 2)
            return F.cross_entropy(model(cutout(x, size, generator)), y)

        return loss


@register("mixup")
class Mixup(_Augmented):
    """Standard training on mixed pairs of images with mixed labels."""

    def __init__(self, lambda_range: Sequence[float] = (0.0, 1.0), train: dict[str, Any] | None = None) -> None:
        lo, hi = (float(v) for v in lambda_range)
        if not 0.0 <= lo <= hi <= 1.0:
            raise UserError(f"defense.lambda_range={list(lambda_range)} must satisfy 0 <= low <= high <= 1")
        super().__init__(train)
        self.lambda_range = [lo, hi]

    def make_loss(self, generator: torch.Generator) -> LossFn:
        def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int) -> torch.Tensor:
            xm, ya, yb, lam = mixup(x, y, self.lambda_range, generator)
            return mixed_ce(model(xm), ya, yb, lam)

        return loss


@register("cutmix")
class Cutmix(_Augmented):
    """Standard training with a box of another image pasted in, labels weighted by area."""

    def make_loss(self, generator: torch.Generator) -> LossFn:
        def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int) -> torch.Tensor:
            xm, ya, yb, share = cutmix(x, y, generator)
            return mixed_ce(model(xm), ya, yb, share)

        return loss
