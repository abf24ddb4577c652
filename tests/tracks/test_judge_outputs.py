"""Every model output the judge uses is checked on every batch, and non-finite gradients inside an
attack are recorded per sample and flag the leaderboard row (issue 14, item 4).

The models are nearest-centroid classifiers on scikit-learn's digits (real data, ~90 % clean
accuracy, no training needed) that break the contract only where the 8-input contract probe does
not look: on batches larger than 8, or in their gradients.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from harness.api import run_eval
from harness.cli.dispatch import main

MODEL = '''
import torch
from torch import nn
from sklearn.datasets import load_digits

MODE = "{mode}"


class Centroids(nn.Module):
    def __init__(self):
        super().__init__()
        d = load_digits()
        x = torch.tensor(d.data, dtype=torch.float32) / 16.0
        y = torch.tensor(d.target)
        self.register_buffer("means", torch.stack([x[y == c].mean(0) for c in range(10)]))
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        if MODE == "stateful":
            self.calls += 1  # state that changes with every call: every verdict would depend on the history
        f = x.flatten(1)
        if MODE == "nan_grad":
            f = f + torch.sqrt(f - f)  # the same value, but a NaN gradient (inf - inf)
        logits = -((f[:, None, :] - self.means[None]) ** 2).sum(-1) * 10
        if MODE == "nan_off_grid":  # NaN on inputs that are not 8-bit images: only adversarial ones
            off = ((x * 255 - (x * 255).round()).abs() > 1e-3).flatten(1).any(1)
            logits = torch.where(off[:, None], float("nan"), logits)
        if x.shape[0] > 8:  # the contract probe sees 8 inputs: break the contract only beyond
            if MODE == "nan_big":
                logits = torch.where(torch.arange(x.shape[0])[:, None] == 3, float("nan"), logits)
            elif MODE == "probs_big":
                logits = logits.softmax(1)
            elif MODE == "shape_big":
                logits = logits[:, :5]
        return logits


def create():
    return Centroids()
'''

BASE = ["dataset=digits", "n_samples=20", "batch_size=20", "defense=checkpoint", "threat.eps=0.1", "progress=false"]


def model_file(tmp: Path, mode: str) -> Path:
    path = tmp / f"{mode}.py"
    path.write_text(MODEL.format(mode=mode))
    return path


@pytest.mark.parametrize("mode, expected", ids=["nan_big", "probs_big", "shape_big"], argvalues=[
    ("nan_big", "arena eval: error: the model's output contains NaN or Inf in 1 of 20 rows (clean pass on batch 0); "
                "nothing of this batch is recorded and the run stops: the model must return finite logits of shape (N, C) on every batch"),
    ("probs_big", "arena eval: error: the model returns probabilities (every row in [0,1] summing to 1), not logits "
                  "(clean pass on batch 0); nothing of this batch is recorded and the run stops: "
                  "the model must return finite logits of shape (N, C) on every batch"),
    ("shape_big", "arena eval: error: the model's output has shape (20, 5) for 20 inputs; it must be logits of shape (20, 10) "
                  "(clean pass on batch 0); nothing of this batch is recorded and the run stops: "
                  "the model must return finite logits of shape (N, C) on every batch"),
])
def test_outputs_past_the_contract_probe_are_checked(tmp_path, capsys, mode, expected):
    code = main(["eval", *BASE, f"defense.model_file={model_file(tmp_path, mode)}", f"work_dir={tmp_path / 'w'}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert err == [expected]
    runs = tmp_path / "w" / "runs"
    assert not runs.exists() or not any(runs.iterdir()), "a run directory was written"


def test_outputs_on_adversarial_inputs_are_checked(tmp_path, capsys):
    code = main(["eval", *BASE, f"defense.model_file={model_file(tmp_path, 'nan_off_grid')}", "attack=pgd", "attack.steps=1",
                 f"work_dir={tmp_path / 'w'}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert len(err) == 1 and err[0].startswith("arena eval: error: the model's output contains NaN or Inf in ")
    assert "(verifying attack 'pgd' on batch 0); nothing of this batch is recorded" in err[0]
    runs = tmp_path / "w" / "runs"
    assert not runs.exists() or not any(runs.iterdir()), "a run directory was written"


def test_a_model_whose_forward_changes_its_state_is_refused(tmp_path, capsys):
    code = main(["eval", *BASE, f"defense.model_file={model_file(tmp_path, 'stateful')}", f"work_dir={tmp_path / 'w'}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert err == ["arena eval: error: the model changed the values of the buffer 'model.calls' during a forward pass on the "
                   "contract probe; the harness needs a forward pass that leaves parameters, buffers, modes and hooks "
                   "unchanged (no BatchNorm in train mode, no state updated in forward)"]


def test_nan_gradients_are_recorded_and_flag_the_row(tmp_path):
    """PGD cannot move on a model whose gradients are NaN: the row looks robust, and says why not."""
    s = run_eval([*BASE, f"defense.model_file={model_file(tmp_path, 'nan_grad')}", "attack=pgd", "attack.steps=5"],
                 tmp_path / "w", update_board=True)
    df = pd.read_parquet(f"{s['run_dir']}/samples.parquet")
    attacked = df[(df.attack == "pgd") & df.ran]
    assert len(attacked) >= 15 and attacked.nonfinite_grad.all()
    assert not df[df.attack == "clean"].nonfinite_grad.any()
    assert s["robust_acc"] == s["clean_acc"] >= 0.75  # the attack got nowhere ...
    assert s["nonfinite_grad"] == len(attacked)  # ... and the summary says why
    board = pd.read_csv(tmp_path / "w" / "leaderboard" / "evasion.csv")
    assert board.loc[0, "nonfinite_grad"] == len(attacked)


def test_finite_gradients_leave_no_flag(tmp_path):
    s = run_eval([*BASE, f"defense.model_file={model_file(tmp_path, 'plain')}", "attack=pgd", "attack.steps=5"],
                 tmp_path / "w")
    df = pd.read_parquet(f"{s['run_dir']}/samples.parquet")
    assert not df.nonfinite_grad.any() and s["nonfinite_grad"] == 0
    assert s["robust_acc"] < s["clean_acc"]
