"""Bad input: one line naming the value and the fix, exit status 2, nothing written."""
from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.cli.dispatch import main

FAST = ["dataset=digits", "n_samples=20", "defense.train.epochs=1"]


def run_cli(tmp_path: Path, args: list[str], capsys) -> tuple[int, str]:
    code = main(["eval", f"work_dir={tmp_path / 'w'}", "progress=false", *args])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_clean_failure(tmp_path: Path, code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    runs = tmp_path / "w" / "runs"
    assert not runs.exists() or not any(runs.iterdir()), "a run directory was written"


@pytest.mark.parametrize("args, needles", [
    (["dataset=nope"], ["unknown dataset 'nope'", "mnist5k"]),
    (["model=nope"], ["unknown model 'nope'", "small_cnn"]),
    (["defense=nope"], ["unknown defense 'nope'", "standard"]),
    (["suite=nope"], ["unknown suite 'nope'", "quick"]),
    (["attack=nope"], ["unknown attack 'nope'", "pgd"]),
    (["threat.eps=0"], ["threat.eps=0", "> 0"]),
    (["threat.eps=-0.1"], ["threat.eps=-0.1"]),
    (["threat.eps=2"], ["threat.eps=2", "exceeds 1"]),
    (["threat.norm=L7"], ["threat.norm='L7'"]),
    (["batch_size=0"], ["batch_size=0", "> 0"]),
    (["n_samples=100000"], ["n_samples=100000", "n_samples<=360"]),
    (["attack=pgd", "attack.loss=hinge"], ["loss='hinge'"]),
    (["+attack.name=pgd", "+attack.stepz=3"], ["no parameter 'stepz'"]),
    (["device=cuda"], ["device='cuda'"]) if not torch.cuda.is_available() else (["device=tpu"], ["device='tpu'"]),
    (["nosuchkey=1"], ["nosuchkey"]),
])
def test_bad_config(tmp_path, capsys, args, needles):
    code, err = run_cli(tmp_path, FAST + args, capsys)
    assert_clean_failure(tmp_path, code, err, *needles)


def _model_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "model.py"
    path.write_text("import torch\nfrom torch import nn\n" + body)
    return path


CKPT = ["dataset=digits", "n_samples=20", "defense=checkpoint"]


def test_model_returning_probabilities(tmp_path, capsys):
    f = _model_file(tmp_path, "def create():\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Softmax(dim=1))\n")
    code, err = run_cli(tmp_path, CKPT + [f"defense.model_file={f}"], capsys)
    assert_clean_failure(tmp_path, code, err, "probabilities", "remove the final softmax")


def test_model_with_wrong_output_shape(tmp_path, capsys):
    f = _model_file(tmp_path, "def create():\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Flatten(0))\n")
    code, err = run_cli(tmp_path, CKPT + [f"defense.model_file={f}"], capsys)
    assert_clean_failure(tmp_path, code, err, "shape", "(N, C)")


def test_model_with_nan_output(tmp_path, capsys):
    f = _model_file(tmp_path, "class M(nn.Module):\n    def forward(self, x):\n        return torch.full((x.shape[0], 10), float('nan'))\n"
                               "def create():\n    return M()\n")
    code, err = run_cli(tmp_path, CKPT + [f"defense.model_file={f}"], capsys)
    assert_clean_failure(tmp_path, code, err, "NaN")


def test_undeclared_randomness(tmp_path, capsys):
    f = _model_file(tmp_path, "class M(nn.Module):\n    def __init__(self):\n        super().__init__(); self.l = nn.Linear(64, 10)\n"
                               "    def forward(self, x):\n        return self.l(x.flatten(1) + torch.randn_like(x.flatten(1)))\n"
                               "def create():\n    return M()\n")
    code, err = run_cli(tmp_path, CKPT + [f"defense.model_file={f}"], capsys)
    assert_clean_failure(tmp_path, code, err, "changes between two calls", "randomized=true")


@pytest.mark.parametrize("kind, needle", [
    ("missing", "does not exist"),
    ("empty", "is empty"),
    ("html", "HTML page"),
    ("truncated", "truncated"),
    ("pickle", "arbitrary Python objects"),
])
def test_bad_checkpoints(tmp_path, capsys, kind, needle):
    from harness.data.models import build_model

    path = tmp_path / "w.pt"
    good = build_model({"name": "small_cnn"}, 10, (1, 8, 8)).state_dict()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "html":
        path.write_text("<!DOCTYPE html><html><body>Virus scan warning</body></html>")
    elif kind == "truncated":
        torch.save(good, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "pickle":
        torch.save({"state_dict": good, "evil": Path("/etc/passwd")}, path)
    code, err = run_cli(tmp_path, CKPT + ["model=small_cnn", f"defense.weights={path}"], capsys)
    assert_clean_failure(tmp_path, code, err, needle)


@pytest.mark.parametrize("arrays, needle", [
    ({"x": np.zeros((5, 8, 8), np.float32), "y": np.zeros(5, np.int64)}, "dtype float32"),
    ({"x": np.zeros((5, 8), np.uint8), "y": np.zeros(5, np.int64)}, "shape (5, 8)"),
    ({"images": np.zeros((5, 8, 8), np.uint8), "y": np.zeros(5, np.int64)}, "needs 'x'"),
    ({"x": np.zeros((5, 8, 8), np.uint8), "y": np.zeros(4, np.int64)}, "y has shape (4,)"),
    ({"x": np.zeros((5, 8, 8), np.uint8), "y": np.array([0, 1, 2, 3, 12])}, "outside 0..9"),
])
def test_bad_data_files(tmp_path, capsys, arrays, needle):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    extra = ["dataset.num_classes=10"] if "12" in repr(arrays.get("y")) else []
    code, err = run_cli(tmp_path, ["dataset=npz", f"dataset.path={path}", "defense=checkpoint", "defense.weights=/nonexistent", *extra], capsys)
    assert_clean_failure(tmp_path, code, err, needle)


def test_missing_dataset_root(tmp_path, capsys):
    code, err = run_cli(tmp_path, ["dataset=cifar10", f"dataset.root={tmp_path / 'empty'}"], capsys)
    assert_clean_failure(tmp_path, code, err, "not found", "dataset.download=true")


def test_real_process_exit_status(tmp_path):
    """The installed console script itself exits 2 with one line on stderr."""
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "eval", "dataset=nope", f"work_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown dataset 'nope'" in proc.stderr
