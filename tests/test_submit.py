"""`arena submit`: example bundles get the right verdict, and an accepted one gets a leaderboard row.

The bundles under tests/bundles/ hold model.py and a defense.yaml template; the weights are a real
small CNN trained here on mnist5k (a few seconds), written next to each card with its sha256.
Verdicts: clean (accepted, not flagged), masked by input quantisation (accepted, flagged),
probabilities (rejected), randomised but declared deterministic (rejected), stale checksum
(rejected). The ../shared CIFAR-10 ResNet-2B submitted as a bundle gets clean accuracy 70.3 %.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from harness.submit.bundle import CardError, load_bundle, validate_card
from harness.core.classifier import Classifier
from harness.core.errors import UserError
from harness.core.hashing import file_sha256
from harness.submit.score import Rejection, SubmitOptions, submit

BUNDLES = Path(__file__).resolve().parent / "bundles"
SHARED = Path(__file__).resolve().parents[2] / "shared"
SMOKE = "submission_smoke"


def _import(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[dict[str, torch.Tensor], float]:
    """A small CNN trained on the mnist5k training split: (state dict, test accuracy)."""
    from harness.data.datasets import load_dataset
    from harness.data.models import SmallCNN
    from harness.data.training import TrainConfig, accuracy, train

    data = load_dataset({"name": "mnist5k"})
    torch.manual_seed(0)  # the initial weights too: the same model on every run
    net = SmallCNN(1, 10, width=8, hidden=32)
    train(net, data.train_x, data.train_y, TrainConfig(epochs=3, batch_size=32, optimizer="adam", lr=0.003, weight_decay=0.0),
          device=torch.device("cpu"), seed=0, progress=False)
    acc = accuracy(net, data.test_x, data.test_y, device=torch.device("cpu"))
    assert acc > 0.75, f"the test CNN trained badly ({acc:.3f}); the verdicts below would mean little"
    return net.state_dict(), acc


@pytest.fixture(scope="module")
def make_bundle(tmp_path_factory, trained):
    """Copy a bundle from tests/bundles into a temp dir, write its trained weights and fill in the card."""
    root = tmp_path_factory.mktemp("bundles")
    state, acc = trained

    def make(example: str, **card_changes) -> Path:
        dst = root / f"{example}-{len(list(root.iterdir()))}"
        shutil.copytree(BUNDLES / example, dst)
        module = _import(dst / "model.py", f"bundle_{dst.name.replace('-', '_')}").create()
        for part in getattr(module, "members", None) or [module.net]:
            part.load_state_dict(state)
        torch.save(module.state_dict(), dst / "weights.pt")
        text = (dst / "defense.yaml").read_text()
        text = text.replace("FILLED_IN_BY_THE_TEST", file_sha256(dst / "weights.pt")).replace("CLEAN_ACCURACY", f"{100 * acc:.1f}")
        card = yaml.safe_load(text)
        card.update(card_changes)
        (dst / "defense.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
        return dst

    return make


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("arena-work")


def _opts(work_dir: Path, **kw) -> SubmitOptions:
    return SubmitOptions(work_dir=work_dir, suite=kw.pop("suite", SMOKE), seed=kw.pop("seed", 0), device="cpu", **kw)


def _row(work_dir: Path, name: str) -> pd.Series:
    board = pd.read_csv(work_dir / "leaderboard" / "evasion.csv")
    rows = board[board["defense"] == name]
    assert len(rows) == 1, board[["defense", "suite"]]
    return rows.iloc[0]


# ------------------------------------------------------------------------ accepted bundles


@pytest.mark.slow
def test_clean_bundle_is_accepted_and_not_flagged(make_bundle, work_dir):
    bundle = make_bundle("clean")
    result = submit(bundle, _opts(work_dir, seed=None), log=lambda s: None)
    assert not result.masking_suspected
    report = result.health["Linf-0.3"]
    assert not [c.name for c in report.checks if c.status == "fail"]
    assert {c.id for c in report.checks} >= {1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12, 18, 19}
    row = _row(work_dir, "test-clean")
    assert bool(row["submission"]) and not bool(row["masking_suspected"])
    assert row["suite"] == f"{SMOKE}@v1" and row["threat"] == "Linf-0.3"
    assert abs(row["clean_acc"] - result.clean["measured"]) < 1e-6
    run_dir = Path(result.runs[0]["run_dir"])
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["submission"] is True and manifest["card"]["name"] == "test-clean"
    assert manifest["scoring"]["seed_source"] == "harness" and manifest["scoring"]["seed"] == result.seed == manifest["seed"]
    assert manifest["bundle"]["weights_sha256"] == file_sha256(bundle / "weights.pt")
    health = json.loads((run_dir / "health.json").read_text())
    assert health["masking_suspected"] is False and health["threat"] == "Linf-0.3"
    assert json.loads((run_dir / "summary.json").read_text())["masking_suspected"] is False


@pytest.mark.slow
def test_gradient_masked_bundle_is_flagged(make_bundle, work_dir):
    result = submit(make_bundle("masked"), _opts(work_dir), log=lambda s: None)
    assert result.masking_suspected
    report = result.health["Linf-0.3"]
    grads = report.get("gradients")
    assert grads.status == "fail" and grads.evidence["zero_gradient"] == grads.evidence["n"] > 0
    assert len(grads.evidence["zero_ids"]) > 0
    assert report.get("large_eps").status == "fail"  # the whole box does not bring accuracy to chance
    assert report.get("whitebox_vs_blackbox").status == "fail"  # Square breaks what PGD cannot
    assert report.get("whitebox_vs_blackbox").evidence["suite"]["blackbox_only"] > 0
    row = _row(work_dir, "test-masked")
    assert bool(row["masking_suspected"]) and bool(row["submission"])
    health = json.loads((Path(result.runs[0]["run_dir"]) / "health.json").read_text())
    assert health["masking_suspected"] is True
    assert {c["name"]: c["status"] for c in health["checks"]}["gradients"] == "fail"
    # the plots are drawn from the same runs (health curves included)
    from harness.results.plots import write_plots

    paths = write_plots([work_dir], work_dir / "plots")
    assert [p.name for p in paths] == ["robust_acc_vs_eps.png", "queries_to_success.png", "attack_convergence.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000 for p in paths)


# ------------------------------------------------------------------------ rejected bundles


def _rejected(bundle: Path, work_dir: Path, capsys) -> str:
    from harness.cli.dispatch import main

    rc = main(["submit", str(bundle), "--work-dir", str(work_dir), "--suite", SMOKE, "--seed", "0", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert not (work_dir / "runs").exists() or not any((work_dir / "runs").iterdir()), "a rejected bundle wrote a run"
    return err


def test_probability_outputs_are_rejected(make_bundle, tmp_path, capsys):
    err = _rejected(make_bundle("probabilities"), tmp_path, capsys)
    assert "rejected by the contract check" in err and "probabilities" in err


def test_randomized_model_declared_deterministic_is_rejected(make_bundle, tmp_path, capsys):
    err = _rejected(make_bundle("randomized"), tmp_path, capsys)
    assert "rejected by the contract check" in err and "randomized: false" in err


def test_wrong_checksum_is_rejected(make_bundle, tmp_path, capsys):
    bundle = make_bundle("wrong_checksum")
    err = _rejected(bundle, tmp_path, capsys)
    assert "rejected by the checksum check" in err
    assert file_sha256(bundle / "weights.pt") in err and "e3b0c442" in err


def test_declared_clean_accuracy_must_be_reproduced(make_bundle, tmp_path):
    with pytest.raises(Rejection) as exc:
        submit(make_bundle("clean", clean_accuracy=99.9), _opts(tmp_path, check_only=True), log=lambda s: None)
    assert exc.value.check == "clean_accuracy" and "99.9%" in str(exc.value)


def test_declared_randomness_must_be_observed(make_bundle, tmp_path):
    with pytest.raises(Rejection) as exc:
        submit(make_bundle("clean", randomized=True), _opts(tmp_path, check_only=True), log=lambda s: None)
    assert exc.value.check == "contract" and "randomized: true" in str(exc.value)


def test_declared_randomized_bundle_is_accepted_for_the_randomized_suite(make_bundle, tmp_path):
    """Declared randomness passes the contract; clean accuracy is the mean over draws."""
    from harness.data.datasets import load_dataset, select_eval

    bundle = make_bundle("randomized", randomized=True, name="test-randomized-declared")
    model = _import(bundle / "model.py", "randomized_check").create()
    model.load_state_dict(torch.load(bundle / "weights.pt", weights_only=True))
    _, x, y = select_eval(load_dataset({"name": "mnist5k"}), 200)
    torch.manual_seed(123)
    with torch.no_grad():
        acc = sum(float((model.eval()(x.float() / 255).argmax(1) == y).float().mean()) for _ in range(10)) / 10
    card = yaml.safe_load((bundle / "defense.yaml").read_text())
    card["clean_accuracy"] = round(100 * acc, 1)
    (bundle / "defense.yaml").write_text(yaml.safe_dump(card))
    result = submit(bundle, _opts(tmp_path, suite=None, check_only=True), log=lambda s: None)
    assert result.suite == "submission_randomized"
    assert abs(result.clean["measured"] - 100 * acc) < 6.0  # two estimates over 10 noise draws each (s.e. ~1.5 points)


def test_ensemble_bundle_gets_the_ensemble_suite(make_bundle, tmp_path):
    result = submit(make_bundle("ensemble"), _opts(tmp_path, suite=None, check_only=True), log=lambda s: None)
    assert result.suite == "submission_ensemble"


@pytest.mark.parametrize("change, message", [
    ({"ensemble": {"members": 3, "aggregation": "softmax"}}, "has 2 members"),
    ({"ensemble": {"members": 2, "aggregation": "logits"}}, "aggregated by 'softmax'"),
    ({"ensemble": None}, "declares ensemble: null"),
])
def test_ensemble_structure_must_match_the_card(make_bundle, change, message):
    from defenses.checkpoint import Checkpoint
    from harness.submit.score import check_contract

    bundle = load_bundle(make_bundle("ensemble"))
    card = {**bundle.card, **change}
    clf = Classifier(Checkpoint(str(bundle.model_file), str(bundle.weights_file)).build(_ctx()).module, 10, (1, 28, 28))
    with pytest.raises(UserError) as exc:
        check_contract(clf, torch.rand(16, 1, 28, 28), card)
    assert message in str(exc.value)


def _ctx():
    from types import SimpleNamespace

    from harness.core.defense import BuildContext

    data = SimpleNamespace(num_classes=10, input_shape=(1, 28, 28))
    return BuildContext(data=data, model_cfg={}, device=torch.device("cpu"), seed=0, cache_dir=Path("."))


class _Payload:
    """An arbitrary object: a weights file carrying one must be refused by weights_only loading."""


def test_weights_with_arbitrary_objects_are_refused(make_bundle, tmp_path):
    bundle = make_bundle("clean")
    torch.save({"net.fc1.weight": torch.zeros(1), "payload": _Payload()}, bundle / "weights.pt")
    card = yaml.safe_load((bundle / "defense.yaml").read_text())
    card["weights"]["sha256"] = file_sha256(bundle / "weights.pt")
    (bundle / "defense.yaml").write_text(yaml.safe_dump(card))
    with pytest.raises(Rejection) as exc:
        submit(bundle, _opts(tmp_path, check_only=True), log=lambda s: None)
    assert exc.value.check == "loading" and "weights_only" in str(exc.value)


# ------------------------------------------------------------------------------ the card


def _good_card() -> dict:
    return yaml.safe_load((BUNDLES / "clean" / "defense.yaml").read_text().replace(
        "FILLED_IN_BY_THE_TEST", "a" * 64).replace("CLEAN_ACCURACY", "90"))


@pytest.mark.parametrize("change, field", [
    ({"license": None}, "license"),
    ({"threat_models": [{"norm": "Linf", "eps": "eight"}]}, "threat_models[0].eps"),
    ({"threat_models": [{"norm": "Linf", "eps": 0.3}, {"norm": "L3", "eps": 1}]}, "threat_models[1].norm"),
    ({"licence": "MIT"}, "licence"),
    ({"ensemble": {"members": 1, "aggregation": "softmax"}}, "ensemble.members"),
    ({"weights": {"file": "weights.pt", "sha256": "abc"}}, "weights.sha256"),
    ({"weights": {"file": "../weights.pt", "sha256": "a" * 64}}, "weights.file"),
    ({"training_data": {"description": "mnist"}}, "training_data.extra_data"),
    ({"paper": "arxiv 2103.06624"}, "paper"),
    ({"name": "my defense!"}, "name"),
])
def test_card_schema_errors_name_the_field(change, field):
    card = _good_card()
    card.update(change)
    if change.get("license", "") is None:
        del card["license"]
    with pytest.raises(CardError) as exc:
        validate_card(card)
    assert exc.value.field == field, str(exc.value)
    assert f"defense.yaml: {field}:" in str(exc.value)


def test_card_normalises_fraction_eps():
    card = _good_card()
    card["threat_models"] = [{"norm": "Linf", "eps": "8/255"}]
    assert validate_card(card)["threat_models"] == [{"norm": "Linf", "eps": 8 / 255}]


def test_card_error_is_a_rejection_from_the_cli(make_bundle, tmp_path, capsys):
    bundle = make_bundle("clean")
    text = (bundle / "defense.yaml").read_text().replace("license: MIT", "license: ''")
    (bundle / "defense.yaml").write_text(text)
    err = _rejected(bundle, tmp_path, capsys)
    assert "rejected by the card check" in err and "license" in err


def test_template_writes_a_valid_skeleton(tmp_path, capsys):
    from harness.submit.score import check_loading, main

    d = tmp_path / "new-bundle"
    assert main(["--template", str(d)]) == 0
    assert (d / "defense.yaml").is_file() and (d / "model.py").is_file()
    model = _import(d / "model.py", "template_model").create()
    torch.save(model.state_dict(), d / "weights.pt")
    with pytest.raises(Rejection) as exc:  # the placeholder checksum is refused, naming the field
        submit(d, _opts(tmp_path / "w"), log=lambda s: None)
    assert exc.value.check == "card" and "weights.sha256" in str(exc.value)
    text = (d / "defense.yaml").read_text().replace("REPLACE_WITH_SHA256_OF_WEIGHTS", file_sha256(d / "weights.pt"))
    (d / "defense.yaml").write_text(text)
    bundle = load_bundle(d)
    check_loading(bundle)  # weights_only load + create() import
    assert bundle.card["dataset"] == {"name": "mnist5k"}
    with pytest.raises(Exception):  # never overwrite a bundle
        main(["--template", str(d)])


# ------------------------------------------------------------------ the real ResNet-2B


@pytest.mark.slow
@pytest.mark.shared
def test_shared_resnet2b_bundle_gets_its_clean_accuracy(tmp_path):
    model_dir, data = SHARED / "models" / "cifar10_resnet2b", SHARED / "data" / "cifar10_test_first1000.npz"
    if not (model_dir / "weights.pth").is_file() or not data.is_file():
        pytest.skip(f"../shared is absent ({SHARED}): no CIFAR-10 ResNet-2B to submit")
    bundle = tmp_path / "resnet2b"
    shutil.copytree(BUNDLES / "resnet2b", bundle)
    shutil.copy(model_dir / "model.py", bundle / "model.py")  # into the temp bundle only, never the repo
    shutil.copy(model_dir / "weights.pth", bundle / "weights.pth")
    text = (bundle / "defense.yaml").read_text().replace("FILLED_IN_BY_THE_TEST", file_sha256(bundle / "weights.pth"))
    (bundle / "defense.yaml").write_text(text)
    work = tmp_path / "work"
    result = submit(bundle, _opts(work, n_samples=1000, data=data), log=lambda s: None)
    row = _row(work, "resnet2b-pgd")
    assert row["clean_acc"] == pytest.approx(70.3, abs=1e-6)
    assert row["dataset"] == "cifar10" and row["threat"] == f"Linf-{2 / 255:.4g}" and bool(row["submission"])
    assert 50.0 < row["robust_acc"] < 60.0  # PGD-10 + Square-300 at 2/255 (README: CE-PGD-20 57.0 %)
    assert not result.masking_suspected
    assert result.health[f"Linf-{2 / 255:.4g}"].get("transfer").status == "skip"  # no training split in the npz
