"""`em`: sample-wise error-minimising noise (Huang et al. 2021, "unlearnable examples").

Bi-level min-min optimisation with a surrogate network trained during generation:

    repeat (a "round"):
      1. train the surrogate for `train_steps` SGD steps on the currently poisoned data
         (lr 0.1, momentum 0.9, weight decay 5e-4, gradient-norm clip 5: APBench's settings);
      2. for every training sample, run `steps` signed-gradient steps that *minimise* the
         surrogate's cross-entropy on x + delta, projecting to the L-inf ball and the [0, 1] box;
      3. stop once the surrogate's accuracy on the poisoned data exceeds `stop_acc` (0.99).

Budget L-inf 8/255; APBench uses 5 steps of eps/5 per round (the original EM 20 steps of 0.8/255),
zero initial noise. The surrogate is the harness's `small_cnn` by default (APBench: ResNet-18),
the CPU-friendly choice for 28 x 28 grey data; `max_rounds` bounds the cost where the 99 %
criterion is never met (the reference loops forever), and the reached accuracy is recorded.

Runs batched on the context's device; deterministic under the seed on a given device type.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from harness.core.poison import Budget, Poison, PoisonContext, register_poison
from harness.core.errors import UserError
from harness.data.models import build_model
from harness.core.progress import progress_bar


@register_poison("em")
class EM(Poison):
    """Error-minimising noise from alternating surrogate training and noise descent."""

    needs_model = True

    def __init__(self, eps: float = 8 / 255, steps: int = 5, step_size: float | None = None, train_steps: int = 10,
                 lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4, grad_clip: float = 5.0,
                 batch_size: int = 128, stop_acc: float = 0.99, max_rounds: int = 10, init: str = "zeros",
                 surrogate: dict[str, Any] | None = None) -> None:
        if not 0 < float(eps) <= 1:
            raise UserError(f"poison.eps={eps} must be in (0, 1] (L-inf, [0,1] pixel units; 8/255 = 0.0314 in the reference)")
        if init not in ("zeros", "uniform"):
            raise UserError(f"poison.init={init!r} unknown; use zeros (APBench) or uniform (original EM)")
        if int(steps) < 1 or int(train_steps) < 0 or int(max_rounds) < 1 or int(batch_size) < 1:
            raise UserError("poison=em needs steps >= 1, train_steps >= 0, max_rounds >= 1 and batch_size >= 1")
        self.eps = float(eps)
        self.steps = int(steps)
        self.step_size = float(step_size) if step_size is not None else self.eps / self.steps
        self.train_steps = int(train_steps)
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.grad_clip = float(grad_clip)
        self.batch_size = int(batch_size)
        self.stop_acc = float(stop_acc)
        self.max_rounds = int(max_rounds)
        self.init = init
        self.surrogate = dict(surrogate or {"name": "small_cnn"})

    def budget(self, input_shape: tuple[int, int, int]) -> Budget:
        return Budget("Linf", self.eps)

    def perturb(self, ctx: PoisonContext) -> torch.Tensor:
        device = ctx.device
        x = ctx.x01(device)
        y = ctx.y.to(device)
        n = len(x)
        gen = torch.Generator(device=device).manual_seed(int(ctx.seed))
        order_gen = torch.Generator().manual_seed(int(ctx.seed))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(int(ctx.seed))
            model = build_model(self.surrogate, ctx.num_classes, tuple(x.shape[1:])).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        if self.init == "uniform":
            delta = (torch.rand(x.shape, generator=gen, device=device) * 2 - 1) * self.eps
        else:
            delta = torch.zeros_like(x)
        delta = (x + delta).clamp_(0, 1) - x
        order, cursor = torch.randperm(n, generator=order_gen), 0
        history = []
        acc = 0.0
        with progress_bar(self.max_rounds, desc="poison em", enabled=ctx.progress) as bar:
            for round_ in range(self.max_rounds):
                model.train()
                for _ in range(self.train_steps):  # 1. surrogate steps on the poisoned data
                    if cursor >= n:
                        order, cursor = torch.randperm(n, generator=order_gen), 0
                    idx = order[cursor:cursor + self.batch_size].to(device)
                    cursor += self.batch_size
                    loss = F.cross_entropy(model(x[idx] + delta[idx]), y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
                    opt.step()
                model.eval()
                for p in model.parameters():
                    p.requires_grad_(False)
                correct = torch.zeros((), dtype=torch.long, device=device)
                for b in range(0, n, self.batch_size):  # 2. error-minimising steps, every sample
                    xb, yb = x[b:b + self.batch_size], y[b:b + self.batch_size]
                    delta[b:b + self.batch_size] = self._minimise(model, xb, yb, delta[b:b + self.batch_size])
                    with torch.no_grad():
                        correct += (model(xb + delta[b:b + self.batch_size]).argmax(1) == yb).sum()
                for p in model.parameters():
                    p.requires_grad_(True)
                acc = float(correct) / max(n, 1)  # 3. stop criterion (one sync per round)
                history.append(round(acc, 4))
                bar.advance()
                if acc > self.stop_acc:
                    break
        ctx.facts.update({"rounds": len(history), "surrogate_acc": history, "converged": acc > self.stop_acc})
        return delta

    def _minimise(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """`steps` signed-gradient descent steps on CE(model(x + delta), y) within the L-inf ball and box."""
        delta = delta.clone()
        for _ in range(self.steps):
            delta.requires_grad_(True)
            loss = F.cross_entropy(model(x + delta), y)
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta = (delta - self.step_size * grad.sign()).clamp_(-self.eps, self.eps)
                delta = (x + delta).clamp_(0, 1) - x
        return delta.detach()
