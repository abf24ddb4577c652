"""UEraser (Qin, Gao et al. 2023): train through availability poisons with strong augmentations and
a loss-maximising choice among several augmented draws.

Three registered defenses share one implementation and differ only in the schedule:

- `ueraser_lite`: one policy draw per batch, every epoch (APBench `--repeat_epoch 0`).
- `ueraser`: the max-over-K loss for the first `adv_fraction` of the epochs (APBench: 50 of 200
  epochs = 0.25), then single draws.
- `ueraser_max`: the max-over-K loss in every epoch (APBench `--repeat_epoch 300` > 200 epochs).

The max-over-K loss: for a batch, draw K augmented views, take each sample's cross-entropy under
every view, keep per sample the largest and average: L = mean_i max_k CE(f(A_k(x_i)), y_i). The
gradient flows only through each sample's arg-max view (`torch.max`'s backward). As in APBench and
the LSP script, each view is its own policy call and its own forward pass (BatchNorm statistics per
view; `joint_forward: true` does the root repo's single forward over the K-tiled batch instead).

The policy (`UEraserPolicy`) is kornia on the batch's device: RandomPlasmaBrightness (roughness
0.3-0.7, intensity 0.5-1.0), RandomPlasmaContrast (roughness 0.3-0.7), RandomChannelShuffle (p 0.5;
the identity on grey images) and TrivialAugment. Plasma probability 1.0 as in APBench (the root
`ueraser.py` uses 0.5). `policy: jpeg` is APBench's variant for AR/TAP poisons: a random JPEG of
quality uniform in [10, 100) first (kornia's differentiable codec, per image, on the device; grey
images are coded as R=G=B), then the same ops with plasma p = 0.8. kornia draws from the global
torch RNG, which `harness.data.training.train` seeds, so a run is deterministic for a seed and device;
the kornia version joins the checkpoint key (it changes what TrivialAugment samples).
"""
from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.defense import BuildContext, Defense, register
from defenses.standard import train_defended
from harness.core.classifier import Classifier
from harness.core.errors import UserError
from harness.data.training import TrainConfig

POLICIES = ("default", "jpeg")


def random_jpeg(x: torch.Tensor, low: float = 10.0, high: float = 100.0) -> torch.Tensor:
    """JPEG-code every image at a quality drawn uniformly from [low, high), batched on x's device.

    Never modifies `x` (the root repo's helper scales its input in place). Grey images are coded as
    three equal channels and read back as their mean.
    """
    from kornia.enhance import jpeg_codec_differentiable

    n, c = x.shape[:2]
    quality = low + (high - low) * torch.rand(n, device=x.device)
    rgb = x.expand(-1, 3, -1, -1) if c == 1 else x
    out = jpeg_codec_differentiable(rgb.clamp(0, 1), quality)
    return (out.mean(dim=1, keepdim=True) if c == 1 else out).clamp(0, 1)


class UEraserPolicy(nn.Module):
    """One random draw of the UEraser augmentation policy for a whole batch (kornia, on x's device)."""

    def __init__(self, policy: str = "default", plasma_p: float | None = None) -> None:
        super().__init__()
        import kornia.augmentation as K

        if policy not in POLICIES:
            raise UserError(f"defense.policy={policy!r} unknown; use one of: {', '.join(POLICIES)}")
        self.policy = policy
        p = float(plasma_p) if plasma_p is not None else (0.8 if policy == "jpeg" else 1.0)
        self.ops = K.AugmentationSequential(
            K.RandomPlasmaBrightness(roughness=(0.3, 0.7), intensity=(0.5, 1.0), same_on_batch=False, p=p, keepdim=True),
            K.RandomPlasmaContrast(roughness=(0.3, 0.7), p=p),
            K.RandomChannelShuffle(same_on_batch=False, p=0.5, keepdim=True),
            K.auto.TrivialAugment(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # augmentation of data, not part of the model's graph
            if self.policy == "jpeg":
                x = random_jpeg(x)
            return self.ops(x).clamp(0, 1)


def per_view_losses(model: nn.Module, views: Sequence[torch.Tensor], y: torch.Tensor, joint_forward: bool = False) -> torch.Tensor:
    """(K, B) per-sample cross-entropies of the K views."""
    k = len(views)
    if joint_forward:
        logits = model(torch.cat(list(views)))
        return F.cross_entropy(logits, y.repeat(k), reduction="none").view(k, -1)
    return torch.stack([F.cross_entropy(model(v), y, reduction="none") for v in views])


def max_over_k_loss(model: nn.Module, views: Sequence[torch.Tensor], y: torch.Tensor,
                    joint_forward: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """mean_i max_k CE(model(views[k][i]), y_i) and the chosen view per sample.

    The backward pass reaches each sample's arg-max view only (the other views get zero gradient).
    """
    losses = per_view_losses(model, views, y, joint_forward)
    worst, chosen = losses.max(dim=0)
    return worst.mean(), chosen


class _UEraser(Defense):
    """Shared implementation; subclasses fix the default schedule (`default_adv_fraction`)."""

    default_adv_fraction: ClassVar[float] = 0.0

    def __init__(self, k: int = 5, adv_fraction: float | None = None, policy: str = "default",
                 plasma_p: float | None = None, joint_forward: bool = False, train: dict[str, Any] | None = None) -> None:
        if int(k) < 1:
            raise UserError(f"defense.k={k} must be >= 1 (the number of augmented draws per sample; 5 in UEraser)")
        frac = self.default_adv_fraction if adv_fraction is None else float(adv_fraction)
        if not 0.0 <= frac <= 1.0:
            raise UserError(f"defense.adv_fraction={adv_fraction} must be in [0, 1] (share of epochs using the max-over-K loss)")
        if policy not in POLICIES:
            raise UserError(f"defense.policy={policy!r} unknown; use one of: {', '.join(POLICIES)}")
        if plasma_p is not None and not 0.0 <= float(plasma_p) <= 1.0:
            raise UserError(f"defense.plasma_p={plasma_p} must be a probability in [0, 1]")
        self.k = int(k)
        self.adv_fraction = frac
        self.policy = policy
        self.plasma_p = None if plasma_p is None else float(plasma_p)
        self.joint_forward = bool(joint_forward)
        self.train = dict(train or {})

    def describe(self) -> dict[str, Any]:
        import kornia

        return {**super().describe(), "kornia": kornia.__version__}

    def adv_epochs(self, epochs: int) -> int:
        """Number of leading epochs that use the max-over-K loss."""
        return int(round(self.adv_fraction * epochs)) if self.k > 1 else 0

    def loss_fn(self, policy: UEraserPolicy, adv_epochs: int):
        def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int) -> torch.Tensor:
            if epoch < adv_epochs:
                views = [policy(x) for _ in range(self.k)]
                return max_over_k_loss(model, views, y, self.joint_forward)[0]
            return F.cross_entropy(model(policy(x)), y)

        return loss

    def build(self, ctx: BuildContext) -> Classifier:
        cfg = TrainConfig.from_dict(self.train)
        policy = UEraserPolicy(self.policy, self.plasma_p).to(ctx.device)
        adv = self.adv_epochs(cfg.epochs)
        module, facts = train_defended(ctx, self, loss_fn=self.loss_fn(policy, adv), train_cfg=cfg)
        train = dict(facts.get("train", {}))
        # K views cost K forward and K backward image-passes per sample in the adversarial epochs
        n = int(train.get("backward_passes", 0)) // max(cfg.epochs, 1)
        train["backward_passes"] = int(train.get("backward_passes", 0)) + (self.k - 1) * n * adv
        facts = {**facts, "train": train, "ueraser": {"k": self.k, "adv_epochs": adv, "policy": self.policy}}
        return Classifier(module, ctx.data.num_classes, ctx.data.input_shape, info=facts)


@register("ueraser_lite")
class UEraserLite(_UEraser):
    """One augmented draw per batch in every epoch."""

    default_adv_fraction = 0.0


@register("ueraser")
class UEraser(_UEraser):
    """Max-over-K for the first quarter of the epochs (APBench: 50 of 200), then single draws."""

    default_adv_fraction = 0.25


@register("ueraser_max")
class UEraserMax(_UEraser):
    """Max-over-K in every epoch."""

    default_adv_fraction = 1.0
