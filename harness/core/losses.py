"""Per-sample attack losses on logits (higher = closer to misclassification)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("ce", "margin", "dlr")


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """C&W margin: largest wrong logit minus the true logit (> 0 means misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    wrong = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return wrong - true


def dlr(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of logits ratio (Croce & Hein 2020): the margin scaled by z_pi1 - z_pi3."""
    top = logits.sort(dim=1, descending=True).values
    return margin(logits, y) / (top[:, 0] - top[:, 2] + 1e-12)


def attack_loss(name: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample loss to ascend."""
    if name == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if name == "margin":
        return margin(logits, y)
    return dlr(logits, y)
