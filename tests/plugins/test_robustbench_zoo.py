"""RobustBench's zoo by name (`defense=robustbench defense.name=... defense.threat_model=...`),
through the robustbench package's own `load_model`, offline.

The test places a checkpoint where `load_model` looks first, `<model_dir>/cifar10/Linf/Ding2020MMA.pt`
(model_dir = <work_dir>/cache/robustbench): the state dict of the zoo's real architecture for that
entry (robustbench's WideResNet-28-4, 5.8 M parameters) with seeded random weights, so nothing is
downloaded (the download functions are replaced by ones that fail the test). The evaluation runs
on real CIFAR-10 test images from ../shared and must give the clean accuracy that the same
model, loaded by robustbench directly, gives on them.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from harness.cli.dispatch import main
from harness.core.errors import UserError
from conftest import shared_path  # not `tests.conftest`: robustbench 1.1.1 installs a top-level `tests` package

NAME = "Ding2020MMA"  # the smallest single-checkpoint model of the cifar10 Linf zoo


@pytest.fixture(scope="module")
def rb():
    from defenses.robustbench import robustbench

    try:
        return robustbench()
    except UserError as exc:
        pytest.skip(str(exc))


@pytest.fixture()
def offline(rb, monkeypatch):
    import robustbench.utils as utils

    def no_network(*args, **kwargs):
        raise ConnectionError("offline: the test must not download anything")

    for fn in ("download_gdrive", "download_gdrive_new"):
        if hasattr(utils, fn):
            monkeypatch.setattr(utils, fn, no_network)
    return utils


def _place_checkpoint(work: Path) -> Path:
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    torch.manual_seed(0)
    model = model_dicts[BenchmarkDataset.cifar_10][ThreatModel.Linf][NAME]["model"]()
    path = work / "cache" / "robustbench" / "cifar10" / "Linf" / f"{NAME}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def test_zoo_model_by_name_offline(tmp_path, offline, capsys):
    data = shared_path("data", "cifar10_test_first1000.npz")
    ckpt = _place_checkpoint(tmp_path)
    args = ["eval", "defense=robustbench", f"defense.name={NAME}", "defense.threat_model=Linf", "dataset=npz",
            f"dataset.path={data}", "n_samples=16", "attack=pgd", "attack.steps=2", "threat.eps=0.0313725",
            f"work_dir={tmp_path}", "progress=false"]
    assert main(args) == 0, capsys.readouterr().err
    (run,) = (tmp_path / "runs").iterdir()
    manifest = json.loads((run / "manifest.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    info = manifest["defense_info"]["robustbench"]
    assert info["name"] == NAME and info["dataset"] == "cifar10" and info["checkpoint"] == str(ckpt)
    assert manifest["defense_info"]["weights_sha256"] == __import__("hashlib").sha256(ckpt.read_bytes()).hexdigest()
    # the same model through robustbench directly, on the same 16 images
    import numpy as np

    arrays = np.load(data)
    x = torch.from_numpy(arrays["x"][:16]).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(arrays["y"][:16])
    model = offline.load_model(NAME, model_dir=str(tmp_path / "cache" / "robustbench"), dataset="cifar10", threat_model="Linf")
    with torch.no_grad():
        direct = float((model(x).argmax(1) == y).float().mean())
    assert summary["clean_acc"] == pytest.approx(direct)
    # the row exports as a RobustBench entry of the cifar10 Linf leaderboard
    assert main(["board", "export", "--format", "robustbench", str(tmp_path / "rb"), "--work-dir", str(tmp_path)]) == 0
    entry = json.loads((tmp_path / "rb" / "cifar10" / "Linf" / f"{NAME}.json").read_text())
    assert entry["dataset"] == "cifar10" and entry["eps"] == "8/255" and entry["architecture"] == "Ding2020MMANet"
    assert entry["clean_acc"] == f"{100 * direct:.2f}"


def test_missing_checkpoint_offline_is_one_line(tmp_path, offline, capsys):
    data = shared_path("data", "cifar10_test_first1000.npz")
    code = main(["eval", "defense=robustbench", "defense.name=Wong2020Fast", "dataset=npz", f"dataset.path={data}",
                 "n_samples=8", "attack=pgd", f"work_dir={tmp_path}", "progress=false"])
    lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1, lines
    where = tmp_path / "cache" / "robustbench" / "cifar10" / "Linf" / "Wong2020Fast.pt"
    assert "robustbench could not load Wong2020Fast (ConnectionError" in lines[0]
    assert f"with internet it downloads to {where}, offline place the checkpoint there" in lines[0]


@pytest.mark.parametrize("override, needle", [
    ("defense.name=Ding2020MMAA", "defense.name='Ding2020MMAA' is not in RobustBench's cifar10 Linf zoo; did you mean Ding2020MMA"),
    ("defense.threat_model=L3", "defense.threat_model='L3' unknown; RobustBench's threat models are: Linf, L2, corruptions"),
])
def test_bad_zoo_names_are_one_line(tmp_path, rb, capsys, override, needle):
    data = shared_path("data", "cifar10_test_first1000.npz")
    code = main(["eval", "defense=robustbench", override, "dataset=npz", f"dataset.path={data}", "n_samples=8",
                 f"work_dir={tmp_path}", "progress=false"])
    lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0], lines


def test_dataset_without_a_zoo_is_one_line(tmp_path, rb, capsys):
    code = main(["eval", "defense=robustbench", "dataset=digits", "n_samples=8", f"work_dir={tmp_path}", "progress=false"])
    lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1
    assert "dataset 'digits' has no RobustBench zoo; choose dataset=cifar10 or cifar100" in lines[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
