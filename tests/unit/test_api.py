"""The Python API (`harness.evaluate`, `harness.attack`): the CLI's code path for a model in memory."""
from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import harness
from harness.api import run_eval
from harness.data.models import build_model
from harness.data.training import TrainConfig, train

from helpers import REPO
ARCH = {"name": "small_cnn", "width": 8, "hidden": 32}
COLUMNS = ["sample_id", "label", "attack", "order", "ran", "correct_draws", "draws", "success", "pred", "linf", "l2",
           "n_forward", "n_backward", "prepare_forward", "prepare_backward", "n_queries", "time_s", "violation", "stage",
           "budget_exhausted", "nonfinite_grad", "certified"]
EPS = 0.1


@pytest.fixture(scope="module")
def model(digits) -> nn.Module:
    torch.manual_seed(0)
    net = build_model(ARCH, 10, digits.input_shape)
    train(net, digits.train_x, digits.train_y, TrainConfig(epochs=3, batch_size=64, optimizer="adam", lr=0.005),
          device=torch.device("cpu"), seed=0, progress=False)
    return net.eval()


@pytest.fixture(scope="module")
def xy(digits):
    return digits.test_x[:48].float() / 255, digits.test_y[:48]


def test_evaluate_returns_accuracies_records_and_verified_adversarial_examples(model, xy):
    x, y = xy
    res = harness.evaluate(model, x, y, norm="Linf", eps=EPS, suite="quick")
    assert 0.0 <= res.robust_acc < res.clean_acc <= 1.0
    assert list(res.samples.columns) == COLUMNS and res.summary["suite"] == "quick@v1"
    assert res.summary["n_samples"] == 48 and res.run_dir is None
    broken = res.samples[(res.samples["attack"] != "clean") & res.samples["success"]]["sample_id"].unique()
    assert sorted(res.adversarial.ids.tolist()) == sorted(broken.tolist()) and len(res.adversarial) > 0
    ids = torch.from_numpy(res.adversarial.ids)
    xa = res.adversarial.x_adv
    assert xa.dtype == torch.float32 and xa.shape == (len(ids), 1, 8, 8)
    with torch.no_grad():
        assert (model(xa).argmax(1) != y[ids]).all()  # each one fools the model
    assert float((xa - x[ids]).abs().amax()) <= EPS + 1e-6 and float(xa.min()) >= 0 and float(xa.max()) <= 1
    clean_right = res.samples[(res.samples["attack"] == "clean") & (res.samples["correct_draws"] > 0)]
    assert res.clean_acc == pytest.approx(len(clean_right) / 48)
    assert set(res.adversarial.attack) <= {"pgd-ce", "pgd-margin"}


def test_same_records_as_arena_eval_on_the_same_model_and_data(model, digits, xy, tmp_path):
    """uint8 NHWC input, and the CLI on a model file + weights + npz: identical per-sample records."""
    x, y = xy
    u8 = digits.test_x[:48].permute(0, 2, 3, 1).numpy()
    api = harness.evaluate(model, u8, y.numpy(), eps=EPS, suite="quick").samples
    as_float = harness.evaluate(model, x, y, eps=EPS, suite="quick").samples
    np.savez(tmp_path / "d.npz", x=u8, y=y.numpy())
    torch.save(model.state_dict(), tmp_path / "w.pt")
    summary = run_eval(["dataset=npz", f"dataset.path={tmp_path / 'd.npz'}", "defense=checkpoint", "model=small_cnn",
                        "model.width=8", "model.hidden=32", f"defense.weights={tmp_path / 'w.pt'}", "threat.eps=0.1",
                        "n_samples=null"], tmp_path / "cli")
    cli = pd.read_parquet(Path(summary["run_dir"]) / "samples.parquet")
    keep = ["sample_id", "attack", "correct_draws", "success", "pred", "n_forward", "n_backward"]
    pd.testing.assert_frame_equal(api[keep], cli[keep])
    pd.testing.assert_frame_equal(as_float[keep], cli[keep])


def test_work_dir_stores_and_resumes_and_nothing_is_written_without_it(model, xy, tmp_path, monkeypatch):
    x, y = xy
    monkeypatch.chdir(tmp_path)
    harness.evaluate(model, x, y, eps=EPS, suite=["pgd"])
    assert list(tmp_path.iterdir()) == []  # no work dir, no cache, nothing
    first = harness.evaluate(model, x, y, eps=EPS, suite=["pgd"], work_dir=tmp_path / "w", name="tiny")
    run = first.run_dir
    assert (run / "DONE").is_file() and (run / "samples.parquet").is_file() and (run / "adversarial.npz").is_file()
    with np.load(run / "adversarial.npz") as f:
        assert f["x_adv"].dtype == np.float32 and sorted(f.files) == ["attack", "ids", "x_adv"]
        assert np.array_equal(f["ids"], first.adversarial.ids)
    again = harness.evaluate(model, x, y, eps=EPS, suite=["pgd"], work_dir=tmp_path / "w", name="tiny")
    assert again.run_dir == run and again.summary == first.summary  # the stored run, not a new one
    assert torch.equal(again.adversarial.x_adv, first.adversarial.x_adv)
    with torch.no_grad():  # another model (other weights) is another run
        model.fc2.bias.add_(0.01)
    try:
        other = harness.evaluate(model, x, y, eps=EPS, suite=["pgd"], work_dir=tmp_path / "w", name="tiny")
    finally:
        with torch.no_grad():
            model.fc2.bias.sub_(0.01)
    assert other.run_dir != run


def test_attack_returns_every_sample_with_the_harness_verdict(model, xy):
    x, y = xy
    out = harness.attack(model, x, y, "pgd", norm="Linf", eps=EPS, steps=10)
    assert out.x_adv.shape == x.shape and out.success.dtype == torch.bool and out.success.shape == (48,)
    with torch.no_grad():
        fooled = model(out.x_adv).argmax(1) != y
    assert torch.equal(out.success, fooled)  # the harness's verdict is the model's decision on x_adv
    assert float((out.x_adv - x).abs().amax()) <= EPS + 1e-6
    assert torch.equal(out.x_adv[~out.clean_correct], x[~out.clean_correct])  # not attacked: returned as given
    attacked = int(out.clean_correct.sum())
    assert out.costs["attacked"] == attacked and out.costs["n_backward"] == 10 * attacked
    preset = harness.attack(model, x[:8], y[:8], "apgd_ce", eps=EPS, n_iter=5)  # a conf/attack preset by name
    assert preset.samples["attack"].iloc[-1] == "apgd-ce"


def test_cli_save_adv_writes_the_verified_examples_and_survives_a_resume(tmp_path):
    args = ["dataset=digits", "n_samples=60", "batch_size=20", "defense.train.epochs=2", "attack=pgd", "save_adv=true"]
    summary = run_eval(args, tmp_path / "a")
    run = Path(summary["run_dir"])
    samples = pd.read_parquet(run / "samples.parquet")
    with np.load(run / "adversarial.npz") as f:
        full = {k: f[k] for k in f.files}
    assert sorted(full["ids"].tolist()) == sorted(samples[(samples["attack"] == "pgd") & samples["success"]]["sample_id"].tolist())
    for name in ("DONE", "samples.parquet", "summary.json", "adversarial.npz"):  # killed after batch 1 of 3
        (run / name).unlink()
    for p in sorted((run / "batches").glob("00002*")):
        p.unlink()
    run_eval(args, tmp_path / "a")
    with np.load(run / "adversarial.npz") as f:
        assert all(np.array_equal(f[k], full[k]) for k in full)


def test_bad_arguments_are_one_line_value_errors(model, xy):
    x, y = xy
    cases = [
        (dict(model="net"), "model is a str; give a torch.nn.Module"),
        (dict(x=x * 2), "x spans 0..2, outside [0, 1]"),
        (dict(y=y[:5]), "y has shape (5,)"),
        (dict(eps="big"), "eps='big' must be a number"),
        (dict(norm="L1"), "threat.norm='L1' is not supported"),
        (dict(suite="quik"), "unknown suite 'quik'"),
        (dict(suite=[{"name": "pgd", "stepz": 3}]), "did you mean 'steps'?"),
    ]
    for change, message in cases:
        kw = {"model": model, "x": x, "y": y, "eps": EPS, **change}
        with pytest.raises(ValueError, match=None) as err:
            harness.evaluate(kw.pop("model"), kw.pop("x"), kw.pop("y"), **kw)
        assert isinstance(err.value, harness.UserError) and message in str(err.value) and "\n" not in str(err.value)


def test_the_model_contract_is_checked_and_the_mode_restored(model, xy):
    x, y = xy
    with pytest.raises(harness.UserError, match="returns probabilities"):
        harness.evaluate(nn.Sequential(model, nn.Softmax(dim=1)), x, y, eps=EPS, suite=["pgd"])
    model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        harness.evaluate(model, x[:8], y[:8], eps=EPS, suite=["pgd"])
    assert model.training and any("training mode" in str(w.message) for w in caught)
    model.eval()


@pytest.mark.parametrize("first", ["attacks", "harness"])
def test_any_package_imports_first_and_harness_stays_light(first):
    """`import attacks` before `import harness` (and every other order) works; `import harness`
    loads no torch, Hydra or pandas until an API attribute is used."""
    code = (f"import {first}, sys; import harness; "
            "heavy = [m for m in ('torch', 'hydra', 'pandas') if m in sys.modules]; "
            f"assert '{first}' != 'harness' or not heavy, heavy; "
            "assert callable(harness.evaluate) and callable(harness.attack) and issubclass(harness.UserError, ValueError)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
