"""AdvMS and random switching: block splits, path draws (per batch / per sample), seeding, views,
EOT averaging, bottom-up training and its multi-cost record (real digits / mnist5k data)."""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from defenses.advms import AdvMS
from harness.core.defense import BuildContext, build_defense
from defenses.switching import ExpectedModel, FixedPaths, RandomSwitching, split_model
from harness.core.access import ModelAccess, PassCounter
from harness.data.datasets import load_dataset
from harness.core.errors import UserError
from harness.data.models import build_model


@pytest.fixture(scope="module")
def digits():
    return load_dataset({"name": "digits"})


def _x(data, n: int = 32) -> torch.Tensor:
    return data.test_x[:n].float() / 255


def _seeded(cfg: dict, seed: int, shape=(1, 8, 8)) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(cfg, 10, shape).eval()


CNN = {"name": "small_cnn", "width": 8, "hidden": 32}


def _switching(blocks: int, channels: int, mode: str) -> RandomSwitching:
    """S independently initialised small CNNs cut into B blocks (untrained: behaviour only)."""
    nets = [split_model(_seeded(CNN, 100 + c), "small_cnn", blocks) for c in range(channels)]
    return RandomSwitching([[nets[c][b] for c in range(channels)] for b in range(blocks)], mode).eval()


@pytest.mark.parametrize("arch,cfg,shape,blocks", [
    ("small_cnn", CNN, (1, 28, 28), 2), ("small_cnn", CNN, (1, 28, 28), 3), ("small_cnn", CNN, (1, 8, 8), 3),
    ("resnet20", {"name": "resnet20", "mean": [0.5], "std": [0.25]}, (3, 32, 32), 2),
    ("resnet20", {"name": "resnet20"}, (3, 32, 32), 3),
    ("resnet18", {"name": "resnet18"}, (3, 32, 32), 2),
    ("preact_resnet18", {"name": "preact_resnet18"}, (3, 32, 32), 3),
    ("wrn", {"name": "wrn", "depth": 10, "widen": 1, "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.3, 0.25]}, (3, 32, 32), 2),
])
def test_split_pieces_compose_to_the_model(arch, cfg, shape, blocks):
    model = _seeded(cfg, 0, shape)
    x = torch.rand(2, *shape)
    pieces = split_model(model, arch, blocks)
    assert len(pieces) == blocks
    h = x
    for piece in pieces:
        h = piece(h)
    with torch.no_grad():
        assert torch.allclose(h, model(x), atol=1e-5)
    # pieces share the model's weights and together hold all of them
    held = {id(p) for piece in pieces for p in piece.parameters()}
    assert held == {id(p) for p in model.parameters()}


def test_split_refuses_unknown_block_counts():
    with pytest.raises(UserError, match="blocks=5"):
        split_model(_seeded(CNN, 0), "small_cnn", 5)
    assert split_model(_seeded(CNN, 0), "anything", 1)[0] is not None  # B = 1 needs no split


def _path_outputs(sw: RandomSwitching, x: torch.Tensor) -> dict[tuple[int, ...], torch.Tensor]:
    with torch.no_grad():
        return {p: sw.forward_path(x, p) for p in sw.paths()}


def _which_path(out: torch.Tensor, paths: dict) -> list[tuple[int, ...] | None]:
    """Per row, the path whose output the row equals (None if none does)."""
    rows = []
    for i in range(out.shape[0]):
        match = [p for p, z in paths.items() if torch.allclose(out[i], z[i], atol=1e-6)]
        rows.append(match[0] if match else None)
    return rows


@pytest.mark.parametrize("blocks", [1, 2])
def test_paths_differ_between_calls_and_are_reproducible_under_a_seed(digits, blocks):
    sw = _switching(blocks, 3, "batch")
    x = _x(digits)
    with torch.no_grad():
        outs = [sw(x) for _ in range(20)]
        distinct = {tuple(o[0].tolist()) for o in outs}
        assert len(distinct) > 1, "20 calls drew a single path"
        torch.manual_seed(7)
        a = [sw(x) for _ in range(5)]
        torch.manual_seed(7)
        b = [sw(x) for _ in range(5)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_per_batch_mode_shares_one_path_per_call(digits):
    sw = _switching(2, 3, "batch")
    x = _x(digits)
    paths = _path_outputs(sw, x)
    seen = set()
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(30):
            rows = _which_path(sw(x), paths)
            assert None not in rows
            assert len(set(rows)) == 1, "per-batch switching mixed paths within one call"
            seen.add(rows[0])
    assert len(seen) >= 5  # 9 paths, 30 uniform draws


def test_per_sample_mode_draws_an_independent_path_per_sample(digits):
    sw = _switching(2, 3, "sample")
    x = _x(digits, 200)
    paths = _path_outputs(sw, x)
    torch.manual_seed(0)
    with torch.no_grad():
        rows = _which_path(sw(x), paths)
    assert None not in rows, "a row matches no path: per-sample gather is wrong"
    counts = torch.tensor([rows.count(p) for p in paths], dtype=torch.float)
    assert (counts > 0).all()  # 200 samples over 9 paths
    expected = len(rows) / len(paths)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 30  # 8 dof; p < 1e-3 beyond ~26 (seeded, so deterministic)
    # gradients flow only through each sample's own path
    xg = x[:4].clone().requires_grad_(True)
    torch.manual_seed(1)
    out = sw(xg)
    torch.manual_seed(1)
    with torch.no_grad():
        chosen = _which_path(sw(x[:4]), {p: z[:4] for p, z in paths.items()})
    grad = torch.autograd.grad(out[:, 0].sum(), xg)[0]
    for i, p in enumerate(chosen):
        xi = x[i : i + 1].clone().requires_grad_(True)
        gi = torch.autograd.grad(sw.forward_path(xi, p)[:, 0].sum(), xi)[0]
        assert torch.allclose(grad[i : i + 1], gi, atol=1e-6)


def test_fixed_view_is_deterministic_and_leaves_global_rng_alone(digits):
    sw = _switching(2, 3, "sample")
    fixed = FixedPaths(sw, seed=5)
    x = _x(digits, 50)
    torch.manual_seed(3)
    state = torch.get_rng_state()
    with torch.no_grad():
        a, b = fixed(x), fixed(x)
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), state)
    with torch.no_grad():
        assert not torch.equal(a, FixedPaths(sw, seed=6)(x))  # another seed, other paths
        rows = _which_path(a, _path_outputs(sw, x))
    assert None not in rows and len(set(rows)) > 1


@pytest.mark.parametrize("blocks,channels", [(1, 3), (2, 3)])
def test_expected_view_is_the_exact_mean_probability_over_paths(digits, blocks, channels):
    sw = _switching(blocks, channels, "batch")
    x = _x(digits)
    with torch.no_grad():
        probs = torch.stack([F.softmax(z, 1) for z in _path_outputs(sw, x).values()]).mean(0)
        exp = ExpectedModel(sw)(x)
    assert sw.num_paths == channels**blocks
    assert torch.allclose(F.softmax(exp, 1), probs, atol=1e-6)
    assert torch.allclose(exp.exp(), probs, atol=1e-6)  # logits are log mean probabilities


def test_eot_gradient_averages_the_drawn_paths(digits):
    """ModelAccess.eot_logits (what EOT attacks use) averages independent draws: its gradient is
    the mean of the drawn paths' gradients, and converges to the expected model's gradient."""
    sw = _switching(1, 3, "batch")
    x = _x(digits, 16)
    y = digits.test_y[:16]
    k = 8
    access = ModelAccess(sw, 10, PassCounter(), randomized=True, eot=k)
    xg = x.clone().requires_grad_(True)
    torch.manual_seed(11)
    g_eot = torch.autograd.grad(F.cross_entropy(access.eot_logits(xg), y, reduction="sum"), xg)[0]
    torch.manual_seed(11)  # replay: batch mode draws one randint per call
    drawn = [int(torch.randint(3, (1,))) for _ in range(k)]
    assert len(set(drawn)) > 1
    xr = x.clone().requires_grad_(True)
    mean_logits = torch.stack([sw.forward_path(xr, (p,)) for p in drawn]).mean(0)
    g_ref = torch.autograd.grad(F.cross_entropy(mean_logits, y, reduction="sum"), xr)[0]
    assert torch.allclose(g_eot, g_ref, atol=1e-5)

    # many draws: the mean of per-draw loss gradients approaches the exact mean over paths
    def loss_grad(model_fn) -> torch.Tensor:
        xi = x.clone().requires_grad_(True)
        return torch.autograd.grad(F.cross_entropy(model_fn(xi), y, reduction="sum"), xi)[0]

    exact = torch.stack([loss_grad(lambda z, p=p: sw.forward_path(z, p)) for p in sw.paths()]).mean(0)
    torch.manual_seed(12)
    single = loss_grad(sw)
    torch.manual_seed(12)
    many = torch.stack([loss_grad(sw) for _ in range(300)]).mean(0)
    cos = lambda a, b: float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))
    assert cos(many, exact) > 0.99
    assert cos(many, exact) > cos(single, exact)


def _ctx(data, tmp_path: Path, seed: int = 0, n_train: int = 600) -> BuildContext:
    data = data.with_train(data.train_x[:n_train], data.train_y[:n_train])
    return BuildContext(data=data, model_cfg=dict(CNN), device=torch.device("cpu"), seed=seed,
                        cache_dir=tmp_path / "cache", progress=False)


RECIPE = {"epochs": 3, "batch_size": 32, "optimizer": "adam", "lr": 0.005}


def test_advms_flat_build_records_multi_cost_and_reuses_channels(digits, tmp_path):
    ctx = _ctx(digits, tmp_path)
    two = build_defense({"name": "advms", "blocks": 1, "channels": 2, "eps": 0.1, "steps": 1, "train": RECIPE}).build(ctx)
    assert two.randomized and set(two.views) == {"fixed", "expected"}
    mc = two.info["multi_cost"]
    base = sum(p.numel() for p in build_model(CNN, 10, (1, 8, 8)).parameters())
    assert mc["models_trained"] == 2 and mc["num_paths"] == 2 and mc["base_parameters"] == base
    assert mc["parameters_held"] == 2 * base == sum(p.numel() for p in two.module.parameters())
    n_train = ctx.data.train_x.shape[0]
    train = two.info["train"]
    assert train["epochs"] == 2 * RECIPE["epochs"]
    assert train["forward_passes"] == 2 * RECIPE["epochs"] * n_train * (1 + 1)  # PGD-1 + the training pass
    assert train["backward_passes"] == 2 * RECIPE["epochs"] * n_train * (1 + 1)
    assert mc["training_passes"] == train["forward_passes"] + train["backward_passes"]
    ch = two.module.blocks[0]
    assert not torch.equal(ch[0].conv1.weight, ch[1].conv1.weight)  # independent channels
    # S = 3 reuses the two block-0 channels from the cache and trains one more
    three = AdvMS(blocks=1, channels=3, eps=0.1, steps=1, train=RECIPE).build(ctx)
    assert [c["cache_hit"] for c in three.info["channels"]] == [True, True, False]
    for a, b in zip(two.module.parameters(), list(three.module.parameters())[: len(list(two.module.parameters()))]):
        assert torch.equal(a, b)
    # one channel: a deterministic model (plain PGD-AT)
    one = AdvMS(blocks=1, channels=1, eps=0.1, steps=1, train=RECIPE).build(ctx)
    assert not one.randomized and one.info["multi_cost"]["num_paths"] == 1


def test_advms_hierarchical_trains_bottom_up_on_frozen_switching_blocks(digits, tmp_path):
    ctx = _ctx(digits, tmp_path)
    flat = AdvMS(blocks=1, channels=2, eps=0.1, steps=1, train=RECIPE).build(ctx)
    hier = AdvMS(blocks=2, channels=2, switching="sample", eps=0.1, steps=1, train=RECIPE, max_expected_paths=3).build(ctx)
    assert hier.randomized and hier.info["multi_cost"]["num_paths"] == 4
    assert "expected" not in hier.views  # 4 paths > max_expected_paths
    assert [(c["block"], c["channel"]) for c in hier.info["channels"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    # block-0 channels are whole PGD-trained networks' stems, shared with the flat model's cache
    # entries, and stayed frozen while block 1 trained on top of them
    assert [c["cache_hit"] for c in hier.info["channels"][:2]] == [True, True]
    for c in range(2):
        stem = hier.module.blocks[0][c]
        assert torch.equal(stem.parts["conv1"].weight, flat.module.blocks[0][c].conv1.weight)
        assert torch.equal(stem.parts["conv2"].weight, flat.module.blocks[0][c].conv2.weight)
    heads = hier.module.blocks[1]
    assert not torch.equal(heads[0].parts["fc2"].weight, heads[1].parts["fc2"].weight)
    assert all(p.requires_grad for p in hier.module.parameters())
    x = _x(digits, 64)
    acc = [(hier.module.forward_path(x, p).argmax(1) == digits.test_y[:64]).float().mean() for p in hier.module.paths()]
    assert min(acc) > 0.3  # every path is a working classifier (chance is 0.1)


def test_advms_rejects_bad_configs():
    with pytest.raises(UserError, match="channels"):
        AdvMS(blocks=2, channels=[2, 2, 2])
    with pytest.raises(UserError, match="switching"):
        AdvMS(switching="layer")
    with pytest.raises(UserError, match="blocks"):
        AdvMS(blocks=0)


def test_randomized_suite_config_holds_the_four_attacks():
    from harness.core.attack import build_attack
    from harness.api import compose_config

    cfg = compose_config(["suite=randomized", "defense=advms"])
    specs = {a["label"]: a for a in cfg["suite"]["attacks"]}
    assert specs["aa-rand"]["name"] == "autoattack" and specs["aa-rand"]["version"] == "rand"
    assert specs["eot-pgd"]["name"] == "pgd" and specs["eot-pgd"]["eot"] >= 2 and "view" not in specs["eot-pgd"]
    assert specs["pgd-fixed"]["view"] == "fixed" and specs["pgd-expected"]["view"] == "expected"
    for spec in specs.values():
        build_attack({k: v for k, v in spec.items() if k != "view"})
    assert build_defense(cfg["defense"]).describe()["channels"] == [3]


@pytest.mark.slow
@pytest.mark.parametrize("switching", ["batch", "sample"])
def test_randomized_run_reports_mean_majority_worst_in_order(tmp_path, switching):
    """A real `arena eval` of AdvMS under the randomized suite (shrunk): decisions over R draws,
    worst <= majority and worst <= mean for clean and robust accuracy, EOT draws counted."""
    from harness.api import run_eval

    attacks = ("[{name:pgd,label:pgd-expected,view:expected,steps:5},{name:pgd,label:pgd-fixed,view:fixed,steps:5},"
               "{name:pgd,label:eot-pgd,steps:5,eot:4},{name:autoattack,label:aa-rand,version:rand,n_iter:3}]")
    summary = run_eval([
        "dataset=digits", "model=small_cnn", "model.width=8", "model.hidden=32", "defense=advms", "defense.channels=3",
        f"defense.switching={switching}", "defense.steps=1", "defense.train.epochs=3", "defense.train.optimizer=adam",
        "defense.train.lr=0.005", "threat.eps=0.1", "suite=randomized", f"suite.attacks={attacks}",
        "n_samples=48", "batch_size=24", "evaluator.draws=7", "evaluator.cascade=false",
    ], tmp_path)
    assert summary["randomized"] is True
    three = {"clean": (summary["clean_acc_worst"], summary["clean_acc"], summary["clean_acc_majority"]),
             "robust": (summary["robust_acc"], summary["robust_acc_mean"], summary["robust_acc_majority"])}
    for name, (worst, mean, majority) in three.items():
        assert worst <= majority + 1e-12 and worst <= mean + 1e-12, (name, worst, mean, majority)
    assert summary["clean_acc"] > 0.5
    assert summary["robust_acc"] <= summary["clean_acc_worst"]
    eot = summary["attacks"]["eot-pgd"]
    assert eot["n_backward"] >= 4 * 5 * eot["attacked"]  # 4 draws per step, 5 steps
    import pandas as pd

    records = pd.read_parquet(Path(summary["run_dir"]) / "samples.parquet")
    assert (records["draws"] == 7).all()
