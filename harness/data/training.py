"""A reusable, seeded training loop that every trained defense goes through.

Defenses differ only in their loss (`LossFn`): standard CE, gradient regularisation, PGD-AT,
ensemble diversity terms, UEraser's max-over-K augmentation loss. The loop owns batching,
augmentation, the optimiser and schedule, determinism, cost accounting and the progress bar.
Data enters as uint8 NCHW tensors and is scaled to [0, 1] on the device, batch by batch.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.access import CountingModule, PassCounter
from harness.core.errors import UserError
from harness.core.progress import progress_bar

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, int], torch.Tensor]
"""(model, x in [0, 1] on device, y, epoch) -> scalar loss. The model is in train mode."""

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "step", "constant")
AUGMENTS = ("none", "crop", "crop_flip")


@dataclass
class TrainConfig:
    """Training recipe. Part of the checkpoint cache key, so every field must change the weights."""

    epochs: int = 5
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    augment: str = "none"
    shuffle: bool = True

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"train.optimizer={self.optimizer!r} unknown; use one of: {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"train.schedule={self.schedule!r} unknown; use one of: {', '.join(SCHEDULES)}")
        if self.augment not in AUGMENTS:
            raise UserError(f"train.augment={self.augment!r} unknown; use one of: {', '.join(AUGMENTS)}")
        if self.epochs < 0:
            raise UserError(f"train.epochs={self.epochs} must be >= 0")
        if self.batch_size <= 0:
            raise UserError(f"train.batch_size={self.batch_size} must be > 0")

    @classmethod
    def from_dict(cls, cfg: dict[str, Any] | None) -> "TrainConfig":
        cfg = dict(cfg or {})
        valid = set(cls.__dataclass_fields__)
        for key in cfg:
            if key not in valid:
                raise UserError(f"unknown training option {key!r}; valid options: {', '.join(sorted(valid))}")
        return cls(**cfg)


@dataclass
class TrainStats:
    """Cost and outcome of one training run (goes into manifests and leaderboard rows)."""

    epochs: int = 0
    steps: int = 0
    forward_passes: int = 0
    backward_passes: int = 0
    wall_s: float = 0.0
    final_loss: float = float("nan")
    train_acc: float = float("nan")
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ce_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int) -> torch.Tensor:
    """Plain cross-entropy: the standard-training loss."""
    return F.cross_entropy(model(x), y)


def to_unit(x_u8: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1] on `device` (non-blocking copy)."""
    return x_u8.to(device, non_blocking=True).float().div_(255.0)


def augment_batch(x: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding 4, as in the CIFAR recipe) and optional horizontal flip.

    Vectorised on the batch's device: one padded copy and a gather, no per-image Python loop.
    """
    if kind == "none":
        return x
    n, _, h, w = x.shape
    pad = 4 if h >= 28 else 2
    padded = F.pad(x, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=x.device)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=x.device)
    rows = (dy.view(n, 1) + torch.arange(h, device=x.device).view(1, h))  # (n, h)
    cols = (dx.view(n, 1) + torch.arange(w, device=x.device).view(1, w))  # (n, w)
    idx_n = torch.arange(n, device=x.device).view(n, 1, 1)
    out = padded.permute(0, 2, 3, 1)[idx_n, rows.view(n, h, 1), cols.view(n, 1, w)].permute(0, 3, 1, 2)
    if kind == "crop_flip":
        flip = torch.rand(n, generator=generator, device=x.device) < 0.5
        out = torch.where(flip.view(n, 1, 1, 1), out.flip(3), out)
    return out.contiguous()


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)


def lr_factor(cfg: TrainConfig, step: int, total: int) -> float:
    """Learning-rate multiplier at `step` of `total` (per-step schedules are batch-size agnostic)."""
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))
    if cfg.schedule == "step":
        return 0.1 ** (int(step >= 0.5 * total) + int(step >= 0.75 * total))
    return 1.0


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    *,
    loss_fn: LossFn = ce_loss,
    device: torch.device,
    seed: int,
    progress: bool = True,
    desc: str = "train",
    params: list[nn.Parameter] | None = None,
    on_epoch_end: Callable[[int, nn.Module], dict[str, float]] | None = None,
) -> TrainStats:
    """Train `model` in place on uint8 NCHW `x` and labels `y`; return its cost.

    `on_epoch_end(epoch, model)` may return extra numbers to record per epoch (the model is in
    eval mode during the call). Deterministic for a given seed and device: shuffling and augmentation draw from a private
    generator, and the global torch RNG is seeded for anything inside `loss_fn` (dropout, PGD).
    """
    if x.dtype != torch.uint8:
        raise UserError(f"training data must be uint8 images, got {x.dtype}")
    torch.manual_seed(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    cpu_gen = torch.Generator().manual_seed(seed)
    model.to(device)
    counter = PassCounter()
    counted = CountingModule(model, counter)
    opt = make_optimizer(params if params is not None else [p for p in model.parameters() if p.requires_grad], cfg)
    base_lrs = [g["lr"] for g in opt.param_groups]
    n = x.shape[0]
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    stats = TrainStats()
    start = time.perf_counter()
    step = 0
    with progress_bar(total, desc=desc, enabled=progress) as bar:
        for epoch in range(cfg.epochs):
            model.train()
            order = torch.randperm(n, generator=cpu_gen) if cfg.shuffle else torch.arange(n)
            loss_sum = torch.zeros((), device=device)
            for b in range(steps_per_epoch):
                idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                xb = augment_batch(to_unit(x[idx], device), cfg.augment, gen)
                yb = y[idx].to(device, non_blocking=True)
                for g, base in zip(opt.param_groups, base_lrs):
                    g["lr"] = base * lr_factor(cfg, step, total)
                loss = loss_fn(counted, xb, yb, epoch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                stats.backward_passes += xb.shape[0]
                loss_sum += loss.detach() * xb.shape[0]
                step += 1
                bar.advance()
            record = {"epoch": epoch, "loss": float(loss_sum) / n}
            if on_epoch_end is not None:  # e.g. clean test accuracy per epoch (poisoning track)
                model.eval()
                record.update(on_epoch_end(epoch, model))
            stats.history.append(record)
    model.eval()
    stats.epochs = cfg.epochs
    stats.steps = step
    stats.forward_passes = counter.forward
    stats.wall_s = time.perf_counter() - start
    stats.final_loss = stats.history[-1]["loss"] if stats.history else float("nan")
    stats.train_acc = accuracy(model, x, y, device=device)
    return stats


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, device: torch.device, batch_size: int = 500) -> float:
    """Top-1 accuracy of `model` (eval mode) on uint8 images."""
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    for i in range(0, x.shape[0], batch_size):
        pred = model(to_unit(x[i : i + batch_size], device)).argmax(1)
        correct += (pred == y[i : i + batch_size].to(device)).sum()
    return float(correct) / max(x.shape[0], 1)
