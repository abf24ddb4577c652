"""`none`: the clean control. No sample changes (budget L0 = 0), so the poison x defense matrix
carries each defense's accuracy when trained on clean data, the reference the others are read against."""
from __future__ import annotations

import torch

from harness.core.poison import Budget, Poison, PoisonContext, register_poison


@register_poison("none")
class NoPoison(Poison):
    """Identity: delta = 0 everywhere."""

    def budget(self, input_shape: tuple[int, int, int]) -> Budget:
        return Budget("L0", 0.0)

    def perturb(self, ctx: PoisonContext) -> torch.Tensor:
        return torch.zeros(ctx.x.shape, dtype=torch.float32)
