"""The poisoning track end to end: a poison lowers standard training's clean accuracy on real data,
the runner's records, skip-on-rerun, the leaderboard (byte-identical rebuild, matrix), the CLI,
and the ISS / augmentation-baseline defenses."""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import defenses.augment_baselines  # noqa: F401
import defenses.iss  # noqa: F401
from defenses.augment_baselines import box_masks, cutmix, cutout, mixup
from harness.core.defense import BuildContext, build_defense
from defenses.iss import bdr_u8, gray_u8, jpeg_u8
from harness.data.datasets import load_dataset
from harness.poisoning.board import build_poisoning_board, matrix
from harness.poisoning.run import run_poison, stratified_subset

CPU = torch.device("cpu")


def cfg(tmp_path, poison: str, defense: str = "standard", seed: int = 0, train_n: int = 300, epochs: int = 2,
        batch_size: int = 32, **extra) -> dict:
    train = {"epochs": epochs, "batch_size": batch_size, "optimizer": "adam", "lr": 0.003, "weight_decay": 0.0}
    return {
        "dataset": {"name": "mnist5k"}, "model": {"name": "small_cnn", "width": 16, "hidden": 64},
        "poison": {"name": poison, **extra}, "defense": {"name": defense, "train": train},
        "seed": seed, "train_n": train_n, "test_n": 200, "work_dir": str(tmp_path), "device": "cpu", "progress": False,
    }


def test_a_poison_lowers_clean_accuracy_of_standard_training_on_real_digits(tmp_path):
    # Real MNIST digits, 600 training images, 4 epochs. MNIST's strokes are learned within the
    # first epoch, so a 4-epoch test needs a louder shortcut than the spec's 6/255 per pixel:
    # LSP at 0.15 per pixel (L2 4.2 on 784 pixels; measured: 81 % -> 52 % clean test accuracy).
    clean = run_poison(cfg(tmp_path, "none", train_n=600, epochs=4, batch_size=16), log=lambda m: None)
    poisoned = run_poison(cfg(tmp_path, "lsp", train_n=600, epochs=4, batch_size=16, pixel_eps=0.15), log=lambda m: None)
    assert clean["final_test_acc"] > 0.7
    # the shortcut is learned instead of the digits: the poisoned training data is fitted while
    # clean test accuracy falls far below clean training's
    assert poisoned["train_acc_poisoned_data"] > 0.9
    assert clean["final_test_acc"] - poisoned["final_test_acc"] > 0.15


def test_runner_records_skip_and_board(tmp_path):
    logs = []
    first = run_poison(cfg(tmp_path, "lsp", seed=0), log=logs.append)
    run_poison(cfg(tmp_path, "lsp", seed=1), log=logs.append)
    run_poison(cfg(tmp_path, "none", seed=0), log=logs.append)
    for key in ("final_test_acc", "best_test_acc", "best_epoch", "train_acc_poisoned_data", "train_wall_s",
                "train_backward_passes", "poison_wall_s"):
        assert key in first
    assert first["best_from_curve"] and first["best_test_acc"] >= first["final_test_acc"]
    assert first["n_train"] == 300 and first["n_test"] == 200 and first["n_poisoned"] == 300
    runs = sorted((tmp_path / "poison-runs").iterdir())
    assert len(runs) == 3 and all((r / "DONE").is_file() for r in runs)
    samples = pd.read_parquet(runs[0] / "samples.parquet")
    assert list(samples.columns) == ["sample_id", "label", "pred", "correct"] and len(samples) == 200
    history = pd.read_csv(runs[0] / "history.csv")
    assert list(history["epoch"]) == [0, 1] and "test_acc" in history

    again = run_poison(cfg(tmp_path, "lsp", seed=0), log=logs.append)  # finished: skipped, same summary
    assert "already finished" in logs[-1] and again == first

    out = tmp_path / "board.csv"
    df = build_poisoning_board(tmp_path, out)
    text = out.read_bytes()
    build_poisoning_board(tmp_path, out)
    assert out.read_bytes() == text  # byte-identical rebuild
    assert len(df) == 2
    lsp = df[df["poison"] == "lsp"].iloc[0]
    assert lsp["n_seeds"] == 2 and lsp["seeds"] == "0;1" and lsp["final_acc_std"] == lsp["final_acc_std"]
    assert lsp["clean_acc"] == df[df["poison"] == "none"].iloc[0]["final_acc_mean"]
    assert abs(lsp["acc_drop"] - (lsp["clean_acc"] - lsp["final_acc_mean"])) < 0.02
    # the board's accuracy is the mean over seeds of each run's per-sample records
    lsp_runs = [r for r in runs if '"name": "lsp"' in (r / "manifest.json").read_text()]
    accs = [pd.read_parquet(r / "samples.parquet")["correct"].mean() for r in lsp_runs]
    assert len(accs) == 2 and abs(100 * np.mean(accs) - lsp["final_acc_mean"]) < 0.006
    view = matrix(pd.read_csv(out))
    assert list(view.index) == ["none", "lsp"] and list(view.columns) == ["standard"]
    assert "±" in view.loc["lsp", "standard"]


def test_cli_runs_a_config_and_rejects_a_bad_poison(tmp_path, capsys):
    from harness.cli.poison import main

    args = ["poison=ops", "defense=iss_bdr", "train_n=300", "test_n=200", "train.epochs=1", "device=cpu",
            "progress=false", f"work_dir={tmp_path}"]
    assert main(args) == 0
    board = pd.read_csv(tmp_path / "leaderboard" / "poisoning.csv")
    assert list(board["poison"]) == ["ops"] and list(board["defense"]) == ["iss_bdr"]
    assert board["command"].iloc[0].startswith("arena poison ")
    assert main(["poison=nope", f"work_dir={tmp_path}"]) == 2
    assert "unknown poison 'nope'" in capsys.readouterr().err


def test_stratified_subset_is_balanced_nested_and_fixed():
    y = load_dataset({"name": "mnist5k"}).train_y
    a, b = stratified_subset(y, 300, 10), stratified_subset(y, 600, 10)
    assert torch.equal(a, stratified_subset(y, 300, 10))
    assert set(a.tolist()) <= set(b.tolist())
    assert torch.bincount(y[a], minlength=10).tolist() == [30] * 10


# ---- ISS and augmentation baselines ------------------------------------------------------------


def test_iss_jpeg_tiled_equals_coding_each_image_alone():
    x = load_dataset({"name": "mnist5k"}).train_x[:20]
    tiled = jpeg_u8(x, 10)
    for i in range(len(x)):
        buf = io.BytesIO()
        Image.fromarray(x[i, 0].numpy(), mode="L").save(buf, format="JPEG", quality=10)
        alone = torch.from_numpy(np.array(Image.open(io.BytesIO(buf.getvalue()))))
        assert torch.equal(tiled[i, 0], alone)
    assert not torch.equal(tiled, x)


def test_iss_bdr_and_gray():
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    assert set(bdr_u8(x, 2).unique().tolist()) == {0, 64, 128, 192}
    assert torch.equal(gray_u8(x), x)
    rgb = torch.tensor([255, 0, 0], dtype=torch.uint8).view(1, 3, 1, 1)
    assert gray_u8(rgb).flatten().tolist() == [76, 76, 76]  # Pillow's "L" of pure red


def test_cutout_and_cutmix_boxes():
    gen = torch.Generator().manual_seed(0)
    x = torch.ones(64, 1, 28, 28)
    out = cutout(x, 14, gen)
    zeros = (out == 0).flatten(1).sum(dim=1)
    assert bool((zeros > 0).all()) and bool((zeros <= 14 * 14).all())
    assert int(zeros.max()) == 14 * 14  # a square fully inside the image
    masks = box_masks(3, 10, 10, torch.tensor([4, 4, 4]), torch.tensor([2, 2, 2]), gen, CPU)
    assert masks.shape == (3, 1, 10, 10) and bool((masks.flatten(1).sum(1) <= 8).all())
    a = torch.zeros(32, 1, 8, 8)
    a[16:] = 1.0
    y = torch.arange(32)
    mixed, ya, yb, share = cutmix(a, y, gen)
    from_b = (mixed != a).flatten(1).float().mean(dim=1)
    assert bool((from_b <= share + 1e-6).all())  # only the pasted box can change
    mx, ya, yb, lam = mixup(a, y, (0.0, 1.0), gen)
    perm = yb  # labels are the indices, so the partner labels name the partner images
    assert torch.allclose(mx, (1 - lam.view(-1, 1, 1, 1)) * a + lam.view(-1, 1, 1, 1) * a[perm])
    assert bool(((lam >= 0) & (lam <= 1)).all()) and not torch.equal(ya, yb)


@pytest.mark.parametrize("name", ["iss_jpeg", "iss_gray", "iss_bdr", "cutout", "mixup", "cutmix"])
def test_training_defenses_build_on_real_digits(tmp_path, name):
    data = load_dataset({"name": "digits"})
    defense = build_defense({"name": name, "train": {"epochs": 2, "batch_size": 64, "optimizer": "adam", "lr": 0.003}})
    ctx = BuildContext(data=data, model_cfg={"name": "small_cnn", "width": 8, "hidden": 32}, device=CPU, seed=0,
                       cache_dir=tmp_path, progress=False)
    clf = defense.build(ctx)
    logits = clf.module(data.test_x[:8].float() / 255)
    assert logits.shape == (8, 10)
    assert clf.info["train"]["epochs"] == 2
    again = build_defense({"name": name, "train": {"epochs": 2, "batch_size": 64, "optimizer": "adam", "lr": 0.003}}).build(ctx)
    assert again.info["cache_hit"]  # cached by config and data
