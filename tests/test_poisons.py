"""Availability poisons: budgets on every written sample, determinism, ratio, caching, registry errors.

Real data throughout: 400 mnist5k training digits (and 8x8 sklearn digits where noted).
"""
from __future__ import annotations

import math

import pytest
import torch

from attacks.poisons import REGISTRY, Budget, PoisonBudgetError, apply_poison, build_poison, generate
from attacks.poisons.ar import draw_filters
from harness.core.poison import Poison, PoisonContext, poison_mask, quantize_within_budget, register_poison
from harness.data.datasets import load_dataset
from harness.core.errors import UserError
from harness.poisoning.run import stratified_subset

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def mnist():
    data = load_dataset({"name": "mnist5k"})
    idx = stratified_subset(data.train_y, 400, 10)  # 40 per class (the source is sorted by class)
    return data.with_train(data.train_x[idx].clone(), data.train_y[idx].clone())


def independent_norms(clean: torch.Tensor, poisoned: torch.Tensor) -> dict[str, torch.Tensor]:
    """Norms recomputed here, not with the module's Budget helper."""
    d = (poisoned.double() - clean.double()) / 255.0
    return {
        "Linf": d.flatten(1).abs().max(dim=1).values,
        "L2": d.flatten(1).pow(2).sum(dim=1).sqrt(),
        "L0": (d != 0).any(dim=1).flatten(1).sum(dim=1).double(),
    }


FAST_EM = {"name": "em", "max_rounds": 2, "train_steps": 5, "steps": 2, "batch_size": 100}
SPECS = [{"name": "lsp"}, {"name": "ar"}, {"name": "ops"}, FAST_EM,
         {"name": "lsp", "pixel_eps": 0.2}, {"name": "ar", "eps": 3.0}, {"name": "ops", "pixels": 3}]
_GENERATED: dict[str, object] = {}


def generated(mnist, spec):
    """Generate once per spec in this module (EM is the slow one)."""
    key = repr(sorted(spec.items()))
    if key not in _GENERATED:
        _GENERATED[key] = generate(build_poison(spec), mnist.train_x, mnist.train_y, num_classes=10, seed=0, device=CPU)
    return _GENERATED[key]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "-".join(f"{v}" for v in s.values()))
def test_every_written_sample_is_within_budget(mnist, spec):
    poison = build_poison(spec)
    out = generated(mnist, spec)
    budget = poison.budget(tuple(mnist.train_x.shape[1:]))
    norms = independent_norms(mnist.train_x, out.x)[budget.norm]
    assert out.x.dtype == torch.uint8 and out.x.shape == mnist.train_x.shape
    assert bool((norms <= budget.eps * (1 + 1e-6)).all()), f"max {budget.norm} {float(norms.max())} > {budget.eps}"
    # the poison does something: most samples change, and the budget is used, not left idle
    changed = (out.x != mnist.train_x).flatten(1).any(dim=1).float().mean()
    assert changed > 0.9
    assert float(norms.max()) > 0.5 * budget.eps


def test_budgets_follow_the_specs():
    grey, colour = (1, 28, 28), (3, 32, 32)
    assert build_poison({"name": "lsp"}).budget(colour).eps == pytest.approx(math.sqrt(3072) * 6 / 255)
    assert build_poison({"name": "lsp"}).budget(grey).eps == pytest.approx(28 * 6 / 255)
    assert build_poison({"name": "ar"}).budget(grey) == Budget("L2", 1.0)
    assert build_poison({"name": "ops"}).budget(grey) == Budget("L0", 1.0)
    assert build_poison({"name": "em"}).budget(grey) == Budget("Linf", 8 / 255)


def test_rounding_never_pushes_a_sample_over_its_l2_budget():
    # mid-grey images: no clipping, so only quantisation decides; a delta exactly at the budget
    gen = torch.Generator().manual_seed(0)
    x = torch.full((64, 1, 28, 28), 128, dtype=torch.uint8)
    delta = torch.randn(64, 1, 28, 28, generator=gen)
    budget = Budget("L2", 0.5)
    delta = delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * budget.eps
    plain = ((x.float() + torch.round(delta * 255)) - x.float()) / 255
    assert bool((plain.flatten(1).norm(dim=1) > budget.eps).any())  # naive rounding would break it
    out = quantize_within_budget(x, delta, budget)
    norms = independent_norms(x, out)["L2"]
    assert bool((norms <= budget.eps * (1 + 1e-6)).all())
    assert float(norms.min()) > 0.95 * budget.eps  # and keeps almost all of it


def test_a_poison_that_breaks_its_budget_is_refused(mnist):
    @register_poison("_too_loud")
    class TooLoud(Poison):
        def budget(self, input_shape):
            return Budget("Linf", 0.01)

        def perturb(self, ctx: PoisonContext) -> torch.Tensor:
            return torch.full(ctx.x.shape, 0.02)  # twice its own budget

    try:
        poison = build_poison({"name": "_too_loud"})
        # quantisation truncates toward zero but cannot rescue a delta twice the budget
        with pytest.raises(PoisonBudgetError, match="outside its budget"):
            generate(poison, mnist.train_x, mnist.train_y, num_classes=10, seed=0, device=CPU)
    finally:
        REGISTRY.pop("_too_loud", None)


@pytest.mark.parametrize("name", ["lsp", "ar", "ops"])
def test_model_free_poisons_are_deterministic_under_a_seed(mnist, name):
    poison = build_poison({"name": name})
    a = generate(poison, mnist.train_x, mnist.train_y, num_classes=10, seed=3, device=CPU)
    b = generate(build_poison({"name": name}), mnist.train_x, mnist.train_y, num_classes=10, seed=3, device=CPU)
    c = generate(poison, mnist.train_x, mnist.train_y, num_classes=10, seed=4, device=CPU)
    assert torch.equal(a.x, b.x)
    assert not torch.equal(a.x, c.x)  # the seed matters (OPS: only through tie-breaking)


def test_ratio_poisons_a_seeded_subset_and_leaves_the_rest_clean(mnist):
    poison = build_poison({"name": "lsp", "ratio": 0.25})
    out = generate(poison, mnist.train_x, mnist.train_y, num_classes=10, seed=0, device=CPU)
    assert int(out.mask.sum()) == 100
    assert torch.equal(out.x[~out.mask], mnist.train_x[~out.mask])
    assert bool((out.x[out.mask] != mnist.train_x[out.mask]).flatten(1).any(dim=1).all())
    assert torch.equal(poison_mask(400, 0.25, 0), out.mask)
    assert not torch.equal(poison_mask(400, 0.25, 1), out.mask)
    assert int(poison_mask(400, 0.0, 0).sum()) == 0 and bool(poison_mask(400, 1.0, 0).all())


def test_ops_writes_one_class_wise_pixel_with_a_corner_colour(mnist):
    out = generated(mnist, {"name": "ops"})
    pixels = out.facts["pixels"]
    assert len(pixels) == 10
    assert len({(p["row"], p["col"], tuple(p["colour"])) for p in pixels}) == 10
    for p in pixels:
        members = mnist.train_y == p["class"]
        values = out.x[members, 0, p["row"], p["col"]]
        assert bool((values == int(255 * p["colour"][0])).all())


def test_ar_filters_are_causal_and_normalised():
    filters = draw_filters(10, 3, torch.Generator().manual_seed(0))
    assert filters.shape == (10, 3, 3, 3)
    assert bool((filters[:, :, 2, 2] == 0).all())
    assert torch.allclose(filters.sum(dim=(-1, -2)), torch.ones(10, 3, dtype=torch.float64))
    assert float(filters.abs().max()) <= 1.0


def test_lsp_noise_is_patch_constant_and_class_clustered():
    # on mid-grey images (no clipping) the perturbation is one value per 7x7 patch, up to the
    # one grey level quantisation may take to stay inside the L2 budget
    x = torch.full((50, 1, 28, 28), 128, dtype=torch.uint8)
    y = torch.arange(50) % 10
    out = generate(build_poison({"name": "lsp"}), x, y, num_classes=10, seed=0, device=CPU)
    d = (out.x.int() - 128).float()
    patches = d.view(50, 4, 7, 4, 7).permute(0, 1, 3, 2, 4).reshape(50, 16, 49)
    assert float((patches.amax(-1) - patches.amin(-1)).max()) <= 1
    assert float(patches.abs().amax()) >= 2  # not rounded away
    # same-class perturbations point the same way (one cluster per class, class_sep 10)
    flat = torch.nn.functional.normalize(d.flatten(1), dim=1)
    cos = flat @ flat.T
    same = y.view(-1, 1) == y.view(1, -1)
    assert float(cos[same].mean()) > float(cos[~same].mean()) + 0.3


def test_em_lowers_the_surrogates_loss_and_records_its_rounds(mnist):
    out = generated(mnist, FAST_EM)
    assert out.facts["rounds"] == 2 and len(out.facts["surrogate_acc"]) == 2
    assert out.facts["surrogate_acc"][-1] >= out.facts["surrogate_acc"][0]


def test_apply_poison_caches_and_never_touches_the_test_split(mnist, tmp_path):
    poison = build_poison({"name": "ar"})
    test_before = mnist.test_x.clone()
    first, mask, facts = apply_poison(poison, mnist, seed=0, device=CPU, cache_dir=tmp_path)
    again, mask2, facts2 = apply_poison(build_poison({"name": "ar"}), mnist, seed=0, device=CPU, cache_dir=tmp_path)
    assert not facts["cache_hit"] and facts2["cache_hit"]
    assert torch.equal(first.train_x, again.train_x) and torch.equal(mask, mask2)
    assert torch.equal(first.test_x, test_before) and torch.equal(mnist.test_x, test_before)
    assert first.fingerprint() != mnist.fingerprint()
    other, _, facts3 = apply_poison(build_poison({"name": "ar"}), mnist, seed=1, device=CPU, cache_dir=tmp_path)
    assert not facts3["cache_hit"] and facts3["cache_key"] != facts["cache_key"]


def test_config_errors_are_one_line_user_errors():
    with pytest.raises(UserError, match="unknown poison 'nope'"):
        build_poison({"name": "nope"})
    with pytest.raises(UserError, match="no parameter 'epsilon'"):
        build_poison({"name": "ar", "epsilon": 1.0})
    with pytest.raises(UserError, match="ratio"):
        build_poison({"name": "lsp", "ratio": 1.5})
    with pytest.raises(UserError, match="init"):
        build_poison({"name": "em", "init": "gaussian"})
