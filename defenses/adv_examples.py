"""In-training adversarial examples for PGD-AT, TRADES and AdvMS.

Separate from `attacks.pgd` on purpose: that attack is an evaluation tool (restarts, success
bookkeeping, EOT over a randomised model, verified by the harness); this is a few lines of PGD
inside a training loss, where every extra pass is paid once per batch per epoch.

Mode (documented choice): examples are generated with the model in **eval mode** (BatchNorm
uses its running statistics and is not updated by the attack's forward passes, dropout is off),
then the model's previous mode is restored so the training forward on the adversarial batch
runs in train mode. This is what the TRADES reference does; Madry et al.'s MNIST/CIFAR models had
no BatchNorm, so it is the only choice that keeps BN statistics those of the training inputs.
Gradients are taken with `torch.autograd.grad` with respect to the input only, so no parameter
gradient accumulates. Randomness (the random start) comes from the global torch RNG on the
input's device, which `harness.data.training.train` seeds. No host synchronisation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.threat import ThreatModel


def _l2_normalize(g: torch.Tensor) -> torch.Tensor:
    norm = g.flatten(1).norm(dim=1).clamp_min(1e-12)
    return g / norm.view(-1, *([1] * (g.dim() - 1)))


def _random_start(x: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
    if threat.norm == "Linf":
        noise = (torch.rand_like(x) * 2 - 1) * threat.eps
    else:
        direction = _l2_normalize(torch.randn_like(x))
        radius = torch.rand(x.shape[0], device=x.device, dtype=x.dtype) * threat.eps
        noise = direction * radius.view(-1, *([1] * (x.dim() - 1)))
    return (x + noise).clamp(0.0, 1.0)


def _step(x_adv: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, threat: ThreatModel, alpha: float) -> torch.Tensor:
    direction = grad.sign() if threat.norm == "Linf" else _l2_normalize(grad)
    return threat.project(x_adv + alpha * direction, x)


class _EvalMode:
    """Context manager: put `model` in eval mode, restore its previous mode on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.was_training = model.training

    def __enter__(self) -> nn.Module:
        self.model.eval()
        return self.model

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


def pgd_examples(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: ThreatModel,
    *,
    steps: int,
    step_size: float,
    random_start: bool = True,
) -> torch.Tensor:
    """Madry et al.'s PGD on the cross-entropy: `steps` steps of `step_size * eps` (eval mode).

    Returns detached adversarial inputs inside the threat model's ball and the [0, 1] box. With
    `steps == 0` returns `x` unchanged (plain training through the same code path).
    """
    if steps <= 0:
        return x.detach()
    alpha = step_size * threat.eps
    x = x.detach()
    x_adv = _random_start(x, threat) if random_start else x.clone()
    with _EvalMode(model):
        for _ in range(steps):
            x_adv.requires_grad_(True)
            loss = F.cross_entropy(model(x_adv), y, reduction="sum")
            grad = torch.autograd.grad(loss, x_adv)[0]
            x_adv = _step(x_adv.detach(), grad, x, threat, alpha)
    return x_adv.detach()


def trades_examples(
    model: nn.Module,
    x: torch.Tensor,
    threat: ThreatModel,
    *,
    steps: int,
    step_size: float,
) -> torch.Tensor:
    """TRADES' inner maximisation: ascend KL(p(x) || p(x')) from x + 0.001 N(0, I) (eval mode).

    As in the TRADES reference (Zhang et al. 2019): the clean distribution is fixed (no gradient),
    the start is a tiny Gaussian perturbation (KL has zero gradient at x' = x), sign steps for Linf.
    """
    alpha = step_size * threat.eps
    x = x.detach()
    x_adv = threat.project(x + 0.001 * torch.randn_like(x), x)
    with _EvalMode(model):
        with torch.no_grad():
            p_clean = F.softmax(model(x), dim=1)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), p_clean, reduction="sum")
            grad = torch.autograd.grad(kl, x_adv)[0]
            x_adv = _step(x_adv.detach(), grad, x, threat, alpha)
    return x_adv.detach()
