"""`advms`: Adversarially trained Model Switching (Wang et al., ICASSP 2020, arXiv 2002.08439).

No AdvMS code is public; this follows the reconstruction in methods.md 5.3 on top of the same
group's HRS (IJCAI 2019), whose code was read:

- The base architecture (the `model` group) is cut into B blocks (`defenses.switching`); block b
  gets S channels, each with its own weights. Inference draws one channel per block
  (`switching: batch` = one path per call, the HRS reference; `sample` = one path per sample).
- Flat form, B = 1: random switching among S independently PGD-trained models.
- Hierarchical form, B >= 2, trained bottom-up as in HRS: for block b = 0..B-1 and each channel
  c, a fresh copy of the base network's blocks b..B-1 is trained end to end on top of the
  already-trained, frozen lower blocks (which keep switching at random during training, in the
  configured granularity); only block b's slice is kept, the temporary tail is discarded.
- Every channel is adversarially trained: Madry PGD-k at radius eps, generated against the model
  being trained (frozen switching lower blocks + the channel + its tail), inner attack in eval
  mode (`defenses.adv_examples`).

Multi-cost facts go to `Classifier.info["multi_cost"]`: models trained, training passes, parameters
held (sum over blocks of S x block size) against one base model, the number of paths, switching
granularity. The clean-accuracy cost is the leaderboard's clean accuracy against the `standard`
row on the same data (docs/defenses.md). Each channel's training is cached separately; the cache
key of a block-0 channel leaves out S, B and the switching mode (its training does not depend on
them: a block-0 channel is a whole base network), so a sweep over S trains each channel once.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from harness.core.defense import BuildContext, Defense, register
from defenses.pgd_at import add_input_gradient_passes, at_loss, check_at_params, seeded_model
from defenses.standard import train_defended
from defenses.switching import MODES, Chain, ExpectedModel, FixedPaths, RandomSwitching, split_model
from harness.core.classifier import Classifier
from harness.core.errors import UserError
from harness.data.training import TrainConfig


class _Frozen(nn.Module):
    """Already-trained lower blocks: no parameter gradients, always in eval mode, still switching."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        for p in inner.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "_Frozen":
        self.training = mode
        self.inner.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class _ChannelJob:
    """Identity of one channel's training for `train_defended`'s cache key."""

    name = "advms"

    def __init__(self, params: dict[str, Any]) -> None:
        self._params = params

    def describe(self) -> dict[str, Any]:
        return dict(self._params)


def channel_seed(seed: int, block: int, channel: int) -> int:
    """Seed of channel (block, channel): init and data order. Channel (0, 0) uses the run's seed."""
    return seed + 1000 * block + channel


@register("advms")
class AdvMS(Defense):
    """Adversarially trained random model switching.

    Args:
        blocks: B, the number of switching blocks (1 = flat switching among S whole models).
        channels: S, channels per block (an int, or a list of B ints).
        switching: batch (one path per forward call, the HRS reference) | sample (one per sample).
        eps, norm, steps, step_size, random_start: the channels' PGD-AT (step_size relative to eps).
        fixed_seed: seed of the `fixed` view (the fixed-randomness control).
        max_expected_paths: build the exact `expected` view when the path count is at most this.
        train: TrainConfig fields for each channel's training.
    """

    def __init__(self, blocks: int = 1, channels: int | list[int] = 3, switching: str = "batch",
                 eps: float = 0.3, norm: str = "Linf", steps: int = 10, step_size: float = 0.25,
                 random_start: bool = True, fixed_seed: int = 1234, max_expected_paths: int = 100,
                 train: dict[str, Any] | None = None) -> None:
        if int(blocks) < 1:
            raise UserError(f"defense 'advms': blocks={blocks} must be >= 1")
        chans = [int(channels)] * int(blocks) if isinstance(channels, (int, float, str)) else [int(c) for c in channels]
        if len(chans) != int(blocks) or any(c < 1 for c in chans):
            raise UserError(f"defense 'advms': channels={channels} must be a positive int or a list of {blocks} positive ints")
        if switching not in MODES:
            raise UserError(f"defense 'advms': switching={switching!r} unknown; use one of: {', '.join(MODES)}")
        self.blocks = int(blocks)
        self.channels = chans
        self.switching = switching
        self.eps = float(eps)
        self.norm = norm
        self.steps = int(steps)
        self.step_size = float(step_size)
        self.random_start = bool(random_start)
        self.fixed_seed = int(fixed_seed)
        self.max_expected_paths = int(max_expected_paths)
        self.train = dict(train or {})
        self._threat = check_at_params("advms", self.eps, norm, self.steps, self.step_size)
        self._train_cfg = TrainConfig.from_dict(self.train)

    def _job(self, block: int, channel: int) -> _ChannelJob:
        params: dict[str, Any] = {"eps": self.eps, "norm": self.norm, "steps": self.steps, "step_size": self.step_size,
                                  "random_start": self.random_start, "train": self.train, "block": block, "channel": channel}
        if block > 0:  # the lower blocks and the tail's shape matter only above block 0
            params.update(blocks=self.blocks, channels_below=self.channels[:block], switching=self.switching)
        return _ChannelJob(params)

    def build(self, ctx: BuildContext) -> Classifier:
        arch = str(ctx.model_cfg.get("name"))
        loss = at_loss(self._threat, steps=self.steps, step_size=self.step_size, random_start=self.random_start)
        trained: list[list[nn.Module]] = []
        records: list[dict[str, Any]] = []
        base_params = 0
        for b in range(self.blocks):
            block_channels: list[nn.Module] = []
            for c in range(self.channels[b]):
                seed = channel_seed(ctx.seed, b, c)
                fresh = seeded_model(ctx, seed)
                base_params = sum(p.numel() for p in fresh.parameters())
                pieces = split_model(fresh, arch, self.blocks)
                if b == 0:
                    temp: nn.Module = fresh  # a whole base network: same cache entry whatever B, S
                else:
                    lower = _Frozen(RandomSwitching(trained, self.switching))
                    temp = Chain(lower, *pieces[b:])
                _, facts = train_defended(dataclasses.replace(ctx, seed=seed), self._job(b, c), loss_fn=loss,
                                          train_cfg=self._train_cfg, module=temp)
                facts = add_input_gradient_passes(facts, self.steps)
                records.append({"block": b, "channel": c, "seed": seed, **facts})
                block_channels.append(pieces[b])
            trained.append(block_channels)
        switching = RandomSwitching(trained, self.switching).to(ctx.device).eval()
        for p in switching.parameters():
            p.requires_grad_(True)  # lower blocks were frozen while training the upper ones
        return self._classifier(ctx, switching, records, base_params)

    def _classifier(self, ctx: BuildContext, switching: RandomSwitching, records: list[dict[str, Any]],
                    base_params: int) -> Classifier:
        trains = [r["train"] for r in records]
        total = {key: sum(t.get(key, 0) for t in trains)
                 for key in ("epochs", "steps", "forward_passes", "backward_passes", "param_backward_passes",
                             "input_grad_passes", "wall_s")}
        total["train_acc"] = sum(t.get("train_acc", 0.0) for t in trains) / max(len(trains), 1)
        held = sum(p.numel() for p in switching.parameters())
        num_paths = switching.num_paths
        views: dict[str, nn.Module] = {"fixed": FixedPaths(switching, self.fixed_seed)}
        if num_paths <= self.max_expected_paths:
            views["expected"] = ExpectedModel(switching)
        for view in views.values():
            view.eval()
        info = {
            "train": {**total, "models_trained": len(records)},
            "parameters": held,
            "multi_cost": {
                "models_trained": len(records),
                "training_passes": total["forward_passes"] + total["backward_passes"],
                "parameters_held": held,
                "base_parameters": base_params,
                "parameter_ratio": held / max(base_params, 1),
                "num_paths": num_paths,
                "switching": self.switching,
                "blocks": self.blocks,
                "channels": self.channels,
                "eps_train": self.eps,
                "steps": self.steps,
                "inference_cost": "one base network per draw" if self.switching == "batch"
                else "per-sample: every channel of a block runs on the batch (S x compute), one path's output kept",
            },
            # per-channel training facts ("parameters" of the temporary training stack would mislead)
            "channels": [{k: v for k, v in r.items() if k not in ("train", "parameters")} | {
                "train_acc": r["train"].get("train_acc"), "wall_s": r["train"].get("wall_s"),
                "epochs": r["train"].get("epochs")} for r in records],
            "views": sorted(views),
        }
        return Classifier(switching, ctx.data.num_classes, ctx.data.input_shape, randomized=num_paths > 1,
                          info=info, views=views)
