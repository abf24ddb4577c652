"""`standard`: train the configured model with plain cross-entropy (the undefended baseline).

Also home of `train_defended`, the cached training path every trained defense shares: the
checkpoint key covers the defense config, the model config, the training data's identity and the
seed, so a sweep trains each configuration once and a poisoned training set never hits a clean
checkpoint.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from harness.core.defense import BuildContext, Defense, register
from harness.data.weights import cached_training
from harness.core.classifier import Classifier
from harness.core.hashing import stable_hash
from harness.data.models import build_model
from harness.data.training import LossFn, TrainConfig, ce_loss, train


def train_defended(
    ctx: BuildContext,
    defense: Defense,
    *,
    loss_fn: LossFn = ce_loss,
    train_cfg: TrainConfig,
    module: nn.Module | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build (or take) the model, train it with `loss_fn` on ctx.data's train split, cache it."""
    data = ctx.data
    if data.train_x is None:
        from harness.core.errors import UserError

        raise UserError(
            f"defense {defense.name!r} trains a model but dataset {data.name!r} has no training split; "
            f"use a dataset with one (mnist5k, digits, cifar10, ...) or defense=checkpoint"
        )
    if module is None:
        torch.manual_seed(ctx.seed)  # initial weights are part of what the cache key promises
        module = build_model(ctx.model_cfg, data.num_classes, data.input_shape)
    key = stable_hash({
        "defense": defense.name, "params": defense.describe(), "model": ctx.model_cfg,
        "data": data.fingerprint(), "seed": ctx.seed, "device_type": ctx.device.type,
    })

    def run(m: nn.Module) -> dict[str, Any]:
        stats = train(m, data.train_x, data.train_y, train_cfg, loss_fn=loss_fn, device=ctx.device,
                      seed=ctx.seed, progress=ctx.progress, desc=f"train {defense.name}",
                      on_epoch_end=ctx.on_epoch_end)
        return {"train": stats.to_dict(), "checkpoint_key": key}

    module, facts, hit = cached_training(ctx.cache_dir / "checkpoints", key, module, run)
    facts = {**facts, "cache_hit": hit, "parameters": sum(p.numel() for p in module.parameters())}
    return module.to(ctx.device).eval(), facts


@register("standard")
class Standard(Defense):
    """Plain cross-entropy training of the configured architecture."""

    def __init__(self, train: dict[str, Any] | None = None) -> None:
        self.train = dict(train or {})

    def build(self, ctx: BuildContext) -> Classifier:
        module, facts = train_defended(ctx, self, train_cfg=TrainConfig.from_dict(self.train))
        return Classifier(module, ctx.data.num_classes, ctx.data.input_shape, info=facts)
