"""The threat-geometry helpers on `ThreatModel`, per norm: start, direction, step, projection.

Every attack, in-training attack and health probe uses these, so they are checked directly:
results stay in the ball and the box, the ascent direction has unit norm in the threat's own norm
(so a step of size a moves exactly a), and the random starts have the documented distributions.
"""
from __future__ import annotations

import math

import pytest
import torch

from harness.core.threat import ThreatModel

SHAPE = (512, 1, 6, 6)


def _inside(t: ThreatModel, x_adv: torch.Tensor, x: torch.Tensor) -> bool:
    return not bool(t.violations(x_adv, x).any())


def _x(seed: int = 0) -> torch.Tensor:
    """Images with pixels at the box's edges as well as inside it, where clipping matters."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(SHAPE, generator=g)
    x[:, :, 0] = 0.0
    x[:, :, 1] = 1.0
    return x


@pytest.mark.parametrize("norm,eps", [("Linf", 0.1), ("L2", 0.8)])
def test_projection_lands_in_ball_and_box_and_keeps_inner_points(norm, eps):
    t = ThreatModel(norm, eps)
    x = _x()
    far = x + 3 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    p = t.project(far, x)
    assert _inside(t, p, x)
    assert torch.equal(t.project(p, x), p) if norm == "Linf" else torch.allclose(t.project(p, x), p, atol=1e-6)
    inner = t.project(x + 0.01 * eps * torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)), x)
    assert torch.equal(t.project(inner, x), inner) if norm == "Linf" else torch.allclose(t.project(inner, x), inner)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_ascent_direction_has_unit_norm_and_ascends(norm):
    t = ThreatModel(norm, 0.5)
    g = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    d = t.ascent_direction(g)
    flat = d.flatten(1)
    size = flat.abs().amax(1) if norm == "Linf" else flat.norm(dim=1)
    assert torch.allclose(size, torch.ones_like(size), atol=1e-6)
    assert bool(((d * g).flatten(1).sum(1) > 0).all())  # a first-order ascent direction
    # among directions of unit norm it is the steepest: <d, g> equals the dual norm of g
    dual = g.flatten(1).abs().sum(1) if norm == "Linf" else g.flatten(1).norm(dim=1)
    assert torch.allclose((d * g).flatten(1).sum(1), dual, rtol=1e-5)
    zero = t.ascent_direction(torch.zeros(SHAPE))
    assert torch.equal(zero, torch.zeros(SHAPE))  # no gradient, no step, no NaN


@pytest.mark.parametrize("norm,eps", [("Linf", 0.1), ("L2", 0.8)])
def test_step_moves_by_its_size_then_projects(norm, eps):
    t = ThreatModel(norm, eps)
    x = torch.full(SHAPE, 0.5)  # interior, so the box does not clip a small step
    g = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    one = t.step(x, g, x, 0.25 * eps)
    delta = (one - x).flatten(1)
    size = delta.abs().amax(1) if norm == "Linf" else delta.norm(dim=1)
    assert torch.allclose(size, torch.full_like(size, 0.25 * eps), atol=1e-6)
    far = x
    for _ in range(20):  # many steps the same way stay on the ball's surface, never outside
        far = t.step(far, g, x, 0.5 * eps)
    assert _inside(t, far, x)
    edge = t.step(_x(), g, _x(), 0.5 * eps)
    assert _inside(t, edge, _x())


def test_linf_random_start_is_uniform_in_the_ball():
    t = ThreatModel("Linf", 0.1)
    x = torch.full(SHAPE, 0.5)
    s = t.random_start(x, torch.Generator().manual_seed(5))
    d = (s - x).flatten()
    assert _inside(t, s, x)
    assert abs(float(d.mean())) < 0.003  # U[-eps, eps]: mean 0, variance eps^2 / 3
    assert abs(float(d.var()) - 0.1 ** 2 / 3) < 2e-4
    assert float(d.abs().max()) > 0.099  # fills the whole ball, not just its middle


def test_l2_random_start_radius_is_uniform_and_direction_isotropic():
    eps = 0.8
    t = ThreatModel("L2", eps)
    x = torch.full(SHAPE, 0.5)
    s = t.random_start(x, torch.Generator().manual_seed(6))
    delta = (s - x).flatten(1)
    assert _inside(t, s, x)
    radius = delta.norm(dim=1)
    assert abs(float(radius.mean()) - eps / 2) < 0.04  # U[0, eps]
    assert abs(float(radius.var()) - eps ** 2 / 12) < 0.01
    unit = delta / radius.unsqueeze(1)
    assert float(unit.mean(0).norm()) < 3 / math.sqrt(SHAPE[0])  # no preferred direction


@pytest.mark.parametrize("norm,eps", [("Linf", 0.1), ("L2", 0.3)])  # small enough that 0.5 +- noise stays in the box
def test_sphere_start_sits_on_the_sphere(norm, eps):
    t = ThreatModel(norm, eps)
    x = torch.full(SHAPE, 0.5)
    s = t.random_start(x, torch.Generator().manual_seed(7), sphere=True)
    delta = (s - x).flatten(1)
    size = delta.abs().amax(1) if norm == "Linf" else delta.norm(dim=1)
    assert torch.allclose(size, torch.full_like(size, eps), atol=1e-6)
    clipped = t.random_start(_x(), torch.Generator().manual_seed(7), sphere=True)
    assert _inside(t, clipped, _x())  # the box clips; the ball still holds


def test_random_start_is_reproducible_and_uses_the_global_rng_without_a_generator():
    t = ThreatModel("Linf", 0.1)
    x = torch.full((4, 1, 3, 3), 0.5)
    a = t.random_start(x, torch.Generator().manual_seed(8))
    b = t.random_start(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    torch.manual_seed(9)
    c = t.random_start(x)
    torch.manual_seed(9)
    assert torch.equal(c, (x + (torch.rand_like(x) * 2 - 1) * 0.1).clamp(0, 1))


def test_shrunk_ball_is_smaller_by_the_margin():
    t = ThreatModel("Linf", 8 / 255)
    assert t.shrunk(1.9e-8).eps == pytest.approx(8 / 255 - 1.9e-8) and t.shrunk(1.9e-8).norm == "Linf"
    assert ThreatModel("L2", 1e-8).shrunk(1.0).eps == pytest.approx(0.5e-8)  # never below half
