"""The converged poisoning recipe (issue 16): the experiment configs compose and validate, SGD is
heavy-ball unless Nesterov is asked for (and the manifest says which), EM's surrogate trajectory
and the poisons' effective norms reach the manifest, and UEraser pairs AR with its JPEG policy."""
from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir

import attacks.poisons  # noqa: F401
from attacks.poisons import build_poison, generate
from harness.data.datasets import load_dataset
from harness.core.errors import UserError
from harness.cli.hydra_app import CONF_DIR, to_plain
from harness.poisoning.board import build_table
from harness.poisoning.run import defense_spec, plan, run_poison
from harness.data.training import TrainConfig, lr_factor, make_optimizer

CPU = torch.device("cpu")


def composed(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_plain(compose(config_name="poison", overrides=list(overrides)))


@pytest.mark.parametrize("defense", ["standard", "ueraser_lite", "ueraser", "ueraser_max", "iss_jpeg", "pgd_at"])
def test_converged_experiment_composes_and_validates(defense):
    cfg = composed("experiment=poisoning_converged", "poison=em", f"defense={defense}")
    assert cfg["dataset"]["name"] == "fashion_mnist" and cfg["train_n"] == 10000 and cfg["test_n"] is None
    recipe = TrainConfig.from_dict(defense_spec(cfg)["train"])  # every defense gets the one recipe
    assert recipe.optimizer == "sgd" and recipe.nesterov is False and recipe.augment.startswith("crop")
    assert cfg["poison"]["surrogate"] == cfg["model"]  # EM's surrogate is the trained architecture
    run, semantic, _ = plan(cfg)
    assert semantic["train_n"] == 10000 and run.key


def test_cifar10_experiment_is_apbench_recipe():
    cfg = composed("experiment=poisoning_cifar10", "poison=lsp", "defense=ueraser")
    recipe = TrainConfig.from_dict(defense_spec(cfg)["train"])
    assert cfg["dataset"]["name"] == "cifar10" and cfg["model"]["name"] == "resnet18"
    assert (recipe.epochs, recipe.batch_size, recipe.lr, recipe.weight_decay, recipe.nesterov) == (200, 128, 0.1, 5e-4, False)
    assert recipe.augment == "crop_flip" and recipe.crop_pad == 4
    total = 200
    assert lr_factor(recipe, 99, total) == 1.0 and lr_factor(recipe, 100, total) == 0.5  # x0.5 at epoch 100


def test_sgd_is_heavy_ball_unless_nesterov_is_asked():
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert make_optimizer(params, TrainConfig()).param_groups[0]["nesterov"] is False
    assert make_optimizer(params, TrainConfig(nesterov=True)).param_groups[0]["nesterov"] is True
    with pytest.raises(UserError, match="nesterov"):
        TrainConfig(optimizer="adam", nesterov=True)
    with pytest.raises(UserError, match="unknown training option 'nesterow'"):
        TrainConfig.from_dict({"nesterow": True})


def test_effective_norm_after_clipping_is_recorded():
    data = load_dataset({"name": "mnist5k"})
    x, y = data.train_x[:200], data.train_y[:200]
    facts = generate(build_poison({"name": "lsp"}), x, y, num_classes=10, seed=0, device=CPU).facts
    budget = facts["budget"]["eps"]
    assert facts["nominal_norm_mean"] == pytest.approx(budget, rel=1e-5)
    # MNIST is mostly black: clipping at 0 removes a large share of an additive perturbation
    assert 0.3 < facts["effective_norm_fraction"] < 0.95
    assert facts["norm_mean"] == pytest.approx(facts["effective_norm_fraction"] * budget, rel=1e-6)


def tiny(tmp_path, poison: dict, defense: dict) -> dict:
    train = {"epochs": 1, "batch_size": 32, "optimizer": "sgd", "lr": 0.05, "weight_decay": 0.0}
    return {"dataset": {"name": "mnist5k"}, "model": {"name": "small_cnn", "width": 8, "hidden": 32, "batchnorm": True},
            "poison": poison, "defense": {**defense, "train": train}, "seed": 0, "train_n": 160, "test_n": 100,
            "work_dir": str(tmp_path), "device": "cpu", "progress": False}


def manifest(tmp_path, cfg: dict) -> dict:
    run, _, _ = plan(cfg)
    return json.loads((run.path / "manifest.json").read_text())


def test_em_trajectory_and_recipe_reach_the_manifest(tmp_path):
    em = {"name": "em", "max_rounds": 3, "stop_acc": 0.99, "train_steps": 2, "steps": 2, "batch_size": 80,
          "surrogate": {"name": "small_cnn", "width": 8, "hidden": 32}}
    cfg = tiny(tmp_path, em, {"name": "standard"})
    run_poison(cfg, log=lambda m: None)
    facts = manifest(tmp_path, cfg)["poison_facts"]
    assert facts["rounds"] == len(facts["surrogate_acc"]) <= 3
    assert facts["converged"] == (facts["surrogate_acc"][-1] > 0.99)
    assert facts["converged"] or facts["rounds"] == 3  # stopped by the criterion or at the stated cap
    recipe = manifest(tmp_path, cfg)["train"]["recipe"]
    assert recipe["optimizer"] == "sgd" and recipe["nesterov"] is False


def test_ueraser_pairs_ar_with_the_jpeg_policy_and_board_measures_against_clean_standard(tmp_path):
    lite = {"name": "ueraser_lite"}
    ar = tiny(tmp_path, {"name": "ar"}, lite)
    lsp = tiny(tmp_path, {"name": "lsp"}, lite)
    clean = tiny(tmp_path, {"name": "none"}, {"name": "standard"})
    for cfg in (ar, lsp, clean):
        run_poison(cfg, log=lambda m: None)
    assert manifest(tmp_path, ar)["defense_info"]["ueraser"]["policy"] == "jpeg"
    assert manifest(tmp_path, lsp)["defense_info"]["ueraser"]["policy"] == "default"
    board = build_table(tmp_path)
    ref = float(board[(board["poison"] == "none") & (board["defense"] == "standard")]["final_acc_mean"].iloc[0])
    row = board[(board["poison"] == "ar") & (board["defense"] == "ueraser_lite")].iloc[0]
    assert row["clean_standard_acc"] == ref
    assert row["drop_vs_clean_standard"] == pytest.approx(ref - row["final_acc_mean"], abs=0.011)
