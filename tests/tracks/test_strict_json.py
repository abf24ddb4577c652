"""Every JSON file the project writes is strict JSON: `null`, never `NaN` or `Infinity` (which
JavaScript, `jq` and most parsers refuse). Checked with a strict parser over every JSON file a real
evaluation, a poisoning run, a board build (with its HTML page) and a submission leave behind, and
structurally: no module serialises JSON except through `harness.core.atomic.strict_dumps`."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from harness.cli.dispatch import main
from harness.core.atomic import atomic_write_json, strict_dumps
from harness.core.hashing import file_sha256
from helpers import BUNDLES, REPO



def strict_loads(text: str):
    def refuse(constant: str):
        raise ValueError(f"non-strict JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def check_tree(root: Path) -> list[Path]:
    """Parse every *.json under `root` strictly; return the files checked."""
    files = sorted(root.rglob("*.json"))
    for path in files:
        try:
            strict_loads(path.read_text())
        except ValueError as exc:
            raise AssertionError(f"{path}: {exc}") from None
    return files


def test_the_writer_turns_non_finite_numbers_into_null(tmp_path):
    path = tmp_path / "x.json"
    atomic_write_json(path, {"nan": float("nan"), "inf": [float("inf"), -float("inf")], "t": torch.tensor(float("nan")),
                             "ok": 1.5, "n": torch.tensor([1.0, float("nan")])})
    assert strict_loads(path.read_text()) == {"inf": [None, None], "n": [1.0, None], "nan": None, "ok": 1.5, "t": None}
    assert strict_dumps({"a": (1, 2)}, indent=None) == '{"a": [1, 2]}'


def test_an_evaluation_and_a_board_build_write_strict_json(tmp_path, monkeypatch):
    """suite=quick at eps 0.3: PGD-CE breaks every sample, so PGD-margin attacks none and its
    success rate and median queries are undefined (NaN in memory, null on disk). Hydra itself
    writes nothing for a single run: no hydra/ folder, no .hydra, no log file."""
    work = tmp_path / "w"
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "dataset=digits", "n_samples=20", "defense.train.epochs=1", "progress=false", f"work_dir={work}"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"] and sorted(p.name for p in work.iterdir()) == ["cache", "leaderboard", "runs"]
    (summary,) = work.glob("runs/*/summary.json")
    text = summary.read_text()
    assert strict_loads(text)["attacks"]["pgd-margin"]["success_rate"] is None and "NaN" not in text
    files = check_tree(work)
    assert {p.name for p in files} >= {"manifest.json", "summary.json"} and any(p.parent.name == "checkpoints" for p in files)
    assert main(["board", "build", "--work-dir", str(work)]) == 0
    assert main(["board", "html", str(tmp_path / "b.html"), "--work-dir", str(work)]) == 0
    (meta,) = re.findall(r'<script type="application/json" id="board-meta">(.*?)</script>', (tmp_path / "b.html").read_text())
    strict_loads(meta.replace("<\\/", "</"))


def test_a_poisoning_run_writes_strict_json(tmp_path):
    """train.epochs=0: no training step, so the training facts' final loss is undefined (null)."""
    work = tmp_path / "w"
    assert main(["poison", "dataset=digits", "poison=lsp", "train_n=200", "test_n=50", "train.epochs=0", "device=cpu",
                 "progress=false", f"work_dir={work}"]) == 0
    files = check_tree(work)
    assert {"manifest.json", "summary.json"} <= {p.name for p in files}
    (facts,) = work.glob("cache/checkpoints/*.json")
    assert strict_loads(facts.read_text())["train"]["final_loss"] is None
    assert main(["board", "--track", "poisoning", "--work-dir", str(work)]) == 0  # the board reads null back


@pytest.mark.slow
def test_a_submission_writes_strict_json(tmp_path):
    """A real `arena submit` of a small CNN with the smoke suite: manifest, summary, health.json."""
    from harness.data.datasets import load_dataset
    from harness.data.models import SmallCNN
    from harness.data.training import TrainConfig, accuracy, train

    data = load_dataset({"name": "mnist5k"})
    torch.manual_seed(0)
    net = SmallCNN(1, 10, width=8, hidden=32)
    train(net, data.train_x[:1000], data.train_y[:1000], TrainConfig(epochs=1, batch_size=32, optimizer="adam", lr=0.003,
                                                                     weight_decay=0.0), device=torch.device("cpu"), seed=0, progress=False)
    acc = accuracy(net, data.test_x[:100], data.test_y[:100], device=torch.device("cpu"))
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLES / "clean", bundle)
    torch.save({f"net.{k}": v for k, v in net.state_dict().items()}, bundle / "weights.pt")
    card = yaml.safe_load((bundle / "defense.yaml").read_text().replace("FILLED_IN_BY_THE_TEST", file_sha256(bundle / "weights.pt"))
                          .replace("CLEAN_ACCURACY", f"{100 * acc:.1f}"))
    card["clean_accuracy"] = round(100 * acc, 1)
    (bundle / "defense.yaml").write_text(yaml.safe_dump(card))
    work = tmp_path / "w"
    assert main(["submit", str(bundle), "--suite", "submission_smoke", "--n-samples", "100", "--health-samples", "20",
                 "--seed", "0", "--device", "cpu", "--work-dir", str(work)]) == 0
    files = check_tree(work)
    assert {"manifest.json", "summary.json", "health.json"} <= {p.name for p in files}


def test_no_module_writes_json_around_the_strict_writer():
    """Structural: `json.dump(s)` appears only in the strict writer and in hashing (never written)."""
    allowed = {REPO / "harness" / "core" / "atomic.py", REPO / "harness" / "core" / "hashing.py",
               REPO / "harness" / "poisoning" / "run.py",  # a cache key for lru_cache, never written
               REPO / "harness" / "submit" / "wire.py"}  # the worker protocol's compact header, allow_nan=False
    offenders = []
    for folder in ("harness", "attacks", "defenses", "bench"):
        for path in (REPO / folder).rglob("*.py"):
            if path not in allowed and re.search(r"\bjson\.dumps?\(", path.read_text()):
                offenders.append(str(path.relative_to(REPO)))
    assert not offenders, f"serialise JSON with harness.core.atomic.strict_dumps / atomic_write_json: {offenders}"
