"""Gradient regularisation: the penalty against finite differences (value and double-backprop
weight gradient) on a tiny float64 model, and a real training run on mnist5k that lowers the
input-gradient norm relative to standard training on the same data and seed."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness.core.defense import BuildContext
from defenses.gradreg import GradReg, gradreg_loss, gradreg_penalty, margin_and_input_gradient
from defenses.standard import Standard
from harness.core.access import CountingModule, PassCounter
from harness.data.datasets import load_dataset
from harness.core.errors import UserError


def _tiny() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    x = torch.rand(6, 1, 3, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    return model, x, y


def _fd_input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    """Central differences of d(x) = z_t* - z_y (t* fixed at x) per input coordinate."""
    with torch.no_grad():
        z = model(x)
        t = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), float("-inf")).argmax(1)
        idx = torch.arange(x.shape[0])

        def margin(xx: torch.Tensor) -> torch.Tensor:
            zz = model(xx)
            return zz[idx, t] - zz[idx, y]

        g = torch.zeros_like(x)
        flat = g.view(x.shape[0], -1)
        for j in range(flat.shape[1]):
            e = torch.zeros_like(x).view(x.shape[0], -1)
            e[:, j] = h
            e = e.view_as(x)
            flat[:, j] = (margin(x + e) - margin(x - e)) / (2 * h)
        return g, margin(x)


@pytest.mark.parametrize("p,r,variant", [(2, 2, "plain"), (1, 1, "plain"), (math.inf, 1.5, "plain"),
                                         (2, 2, "scale_invariant"), (1, 2, "scale_invariant")])
def test_penalty_matches_finite_differences(p, r, variant):
    model, x, y = _tiny()
    pen, z = gradreg_penalty(model, x, y, p=p, r=r, variant=variant, margin_c=0.5, create_graph=False)
    g_fd, d = _fd_input_gradient(model, x, y)
    norm = torch.linalg.vector_norm(g_fd.flatten(1), ord=p, dim=1)
    if variant == "scale_invariant":
        norm = norm / (d.abs() + 0.5)
    assert torch.allclose(pen, norm**r, rtol=1e-6, atol=1e-9)
    assert torch.allclose(z, model(x))


@pytest.mark.parametrize("variant", ["plain", "scale_invariant"])
def test_double_backprop_weight_gradient_matches_finite_differences(variant):
    """d(mean penalty)/d(weights) by double back-propagation, through the training loop's counting
    wrapper, equals central differences of the penalty in weight space."""
    model, x, y = _tiny()
    counted = CountingModule(model, PassCounter())
    params = list(model.parameters())
    pen = gradreg_penalty(counted, x, y, p=2, r=2, variant=variant)[0].mean()
    grads = torch.autograd.grad(pen, params, allow_unused=True)  # the last bias cannot move g
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    h = 1e-6
    for p, g in zip(params, grads):
        fd = torch.zeros_like(p)
        for j in range(p.numel()):
            with torch.no_grad():
                p.view(-1)[j] += h
            up = gradreg_penalty(model, x, y, variant=variant, create_graph=False)[0].mean()
            with torch.no_grad():
                p.view(-1)[j] -= 2 * h
            down = gradreg_penalty(model, x, y, variant=variant, create_graph=False)[0].mean()
            with torch.no_grad():
                p.view(-1)[j] += h
            fd.view(-1)[j] = (up - down) / (2 * h)
        assert torch.allclose(g, fd, rtol=1e-5, atol=1e-8)


def test_loss_is_ce_plus_lambda_times_mean_per_sample_penalty():
    model, x, y = _tiny()
    model.train()
    loss = gradreg_loss(lam=0.3, p=2, r=2, variant="plain", margin_c=1.0, penalty_forward="auto")(model, x, y, 0)
    pen, z = gradreg_penalty(model, x, y)
    assert torch.allclose(loss, F.cross_entropy(z, y) + 0.3 * pen.mean())
    # per sample: one sample's penalty does not depend on the others in the batch
    alone, _ = gradreg_penalty(model, x[:1], y[:1])
    assert torch.allclose(alone, pen[:1])


def test_batchnorm_models_get_an_eval_mode_penalty_forward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double()
    x = torch.rand(8, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    ref = copy.deepcopy(model)  # the loss's train-mode forward updates BN statistics
    model.train()
    loss = gradreg_loss(lam=1.0, p=2, r=2, variant="plain", margin_c=1.0, penalty_forward="auto")(model, x, y, 0)
    assert model.training  # mode restored
    ref.eval()
    pen, _ = gradreg_penalty(ref, x, y)
    alone, _ = gradreg_penalty(ref, x[:1], y[:1])
    assert torch.allclose(alone, pen[:1])  # eval mode: samples independent
    ref.train()
    assert torch.allclose(loss, F.cross_entropy(ref(x), y) + pen.mean())


def test_bad_configs_are_user_errors():
    with pytest.raises(UserError, match="p="):
        GradReg(p=3)
    with pytest.raises(UserError, match="variant"):
        GradReg(variant="fancy")
    with pytest.raises(UserError, match="lam"):
        GradReg(lam=-1)
    assert GradReg(p="inf").p == "inf"


def _margin_grad_norm(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    _, _, g = margin_and_input_gradient(model, x, y, create_graph=False)
    return float(g.flatten(1).norm(dim=1).mean())


def test_gradreg_lowers_the_input_gradient_norm_against_standard_training(tmp_path):
    data = load_dataset({"name": "mnist5k"})
    data = data.with_train(data.train_x[::2], data.train_y[::2])  # 2,000 images, 200 per class
    ctx = BuildContext(data=data, model_cfg={"name": "small_cnn", "width": 16, "hidden": 64}, device=torch.device("cpu"),
                       seed=0, cache_dir=tmp_path, progress=False)
    recipe = {"epochs": 2, "batch_size": 32, "optimizer": "adam", "lr": 0.003}
    torch.manual_seed(ctx.seed)  # Standard initialises from the global RNG; GradReg seeds its own init
    std = Standard(train=recipe).build(ctx)
    reg = GradReg(lam=1.0, train=recipe).build(ctx)
    x, y = data.test_x[:200].float() / 255, data.test_y[:200]
    n_std, n_reg = _margin_grad_norm(std.module, x, y), _margin_grad_norm(reg.module, x, y)
    with torch.no_grad():
        acc = float((reg.module(x).argmax(1) == y).float().mean())
    assert acc > 0.6, "gradreg collapsed (a constant model has zero gradient)"
    assert n_reg < 0.6 * n_std, (n_reg, n_std)
    # training cost: one first-order input-gradient pass per image and epoch on top of train()'s
    train = reg.info["train"]
    n = data.train_x.shape[0]
    assert train["input_grad_passes"] == 2 * n and train["backward_passes"] == 4 * n
    assert train["forward_passes"] == 2 * n and train["wall_s"] > 0
