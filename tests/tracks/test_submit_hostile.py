"""`arena submit` against a hostile submitter: each bundle is rejected or scored at its honest number,
and nothing outside the work directory changes.

Fast: card tricks (the card choosing or labelling the data, a download, duplicate keys, an infinite
eps), links out of the bundle, a FIFO, every bad flag, a model that sleeps at import. Slow (full
scorings, kept small: 60 samples, the smoke suite): a model that attacks the machine at import, one
that replaces the harness's verdict at import, one that answers from a memory of the clean inputs,
and the reduced-isolation fallback's label. The reference is the clean bundle scored the same way.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from harness.core.hashing import file_sha256
from harness.submit.bundle import CardError, parse_card_text
from harness.submit.sandbox import SandboxLimits, detect_isolation
from harness.submit.score import Rejection, SubmitOptions, submit

from helpers import BUNDLES, Listener

SMOKE = "submission_smoke"
N = 60
HEX64 = re.compile(r"\b[0-9a-f]{64}\b")
VERDICT_COLUMNS = ["sample_id", "attack", "ran", "correct_draws", "success", "pred", "linf", "l2", "n_forward", "n_backward",
                   "n_queries"]


def _cli(args: list[str], capsys) -> tuple[int, str]:
    from harness.cli.dispatch import main

    rc = main(["submit", *args])
    return rc, capsys.readouterr().err


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): file_sha256(p) for p in sorted(path.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------- the card


def test_duplicate_card_keys_are_refused_listing_the_known_keys():
    with pytest.raises(CardError) as exc:
        parse_card_text("name: a\nlicense: MIT\nname: b\n")
    assert exc.value.field == "name" and "lines 1 and 3" in str(exc.value) and "threat_models" in str(exc.value)
    with pytest.raises(CardError) as exc:
        parse_card_text("threat_models:\n  - {norm: Linf, eps: 0.3, eps: 0.5}\n")
    assert exc.value.field == "threat_models[0].eps" and "norm, eps" in str(exc.value)


def test_yaml_aliases_are_refused():
    with pytest.raises(CardError, match="anchors and aliases"):
        parse_card_text("a: &x [1, 2]\nb: *x\n")


def test_an_infinite_eps_is_a_card_error():
    from harness.submit.bundle import validate_card

    card = yaml.safe_load((BUNDLES / "clean" / "defense.yaml").read_text()
                          .replace("FILLED_IN_BY_THE_TEST", "a" * 64).replace("CLEAN_ACCURACY", "90"))
    card["threat_models"] = [{"norm": "L2", "eps": float("inf")}]
    with pytest.raises(CardError) as exc:
        validate_card(card)
    assert exc.value.field == "threat_models[0].eps" and "finite" in str(exc.value)


@pytest.mark.parametrize("dataset, field", [
    ({"name": "npz", "path": "easy.npz", "label": "digits"}, "dataset.label"),
    ("npz", "dataset"),
    ({"name": "cifar10", "root": "ROOT", "download": True}, "dataset.download"),
    ({"name": "mnist5k", "path": "easy.npz"}, "dataset.path"),
])
def test_the_card_cannot_choose_label_or_download_the_data(submit_bundle, tmp_path, capsys, dataset, field):
    root = tmp_path / "would-be-download-root"
    if isinstance(dataset, dict) and dataset.get("root"):
        dataset = {**dataset, "root": str(root)}
    bundle = submit_bundle("clean", dataset=dataset)
    (bundle / "easy.npz").write_bytes(b"")  # the file the card points at exists: it must not matter
    work = tmp_path / "work"
    rc, err = _cli([str(bundle), "--work-dir", str(work), "--seed", "0", "--device", "cpu", "--check-only"], capsys)
    assert rc == 2 and "rejected by the card check" in err and f"{field}:" in err, err
    assert len(err.strip().splitlines()) == 1
    assert not root.exists() and not work.exists()


# --------------------------------------------------------------------------- bundle hygiene


def _link_weights_outside(bundle: Path, outside: Path) -> None:
    target = outside / "other-weights.pt"
    target.write_bytes(os.urandom(64))  # a different file: its hash must never be printed
    (bundle / "weights.pt").unlink()
    (bundle / "weights.pt").symlink_to(target)


def _link_model_outside(bundle: Path, outside: Path) -> None:
    target = outside / "model.py"
    target.write_text((bundle / "model.py").read_text())
    (bundle / "model.py").unlink()
    (bundle / "model.py").symlink_to(target)


def _link_card_outside(bundle: Path, outside: Path) -> None:
    target = outside / "defense.yaml"
    target.write_text((bundle / "defense.yaml").read_text())
    (bundle / "defense.yaml").unlink()
    (bundle / "defense.yaml").symlink_to(target)


def _link_folder(bundle: Path, outside: Path) -> None:
    (bundle / "extra").symlink_to(outside, target_is_directory=True)


def _fifo(bundle: Path, outside: Path) -> None:
    os.mkfifo(bundle / "pipe")


def _link_loop(bundle: Path, outside: Path) -> None:
    (bundle / "a").symlink_to("b")
    (bundle / "b").symlink_to("a")


@pytest.mark.parametrize("trick", [_link_weights_outside, _link_model_outside, _link_card_outside, _link_folder, _fifo,
                                   _link_loop], ids=["weights", "model_file", "card", "folder", "fifo", "loop"])
def test_links_out_of_the_bundle_and_special_files_are_refused(submit_bundle, tmp_path, capsys, trick):
    bundle = submit_bundle("clean")
    outside = tmp_path / "outside"
    outside.mkdir()
    trick(bundle, outside)
    before = _tree(outside)
    work = tmp_path / "work"
    start = time.monotonic()
    rc, err = _cli([str(bundle), "--work-dir", str(work), "--seed", "0", "--device", "cpu", "--check-only"], capsys)
    assert rc == 2 and "rejected by the bundle check" in err, err
    assert len(err.strip().splitlines()) == 1 and not HEX64.search(err), err  # no hash of whatever the link points at
    assert time.monotonic() - start < 30 and not work.exists() and _tree(outside) == before


def test_a_link_that_stays_inside_the_bundle_is_fine(submit_bundle, tmp_path):
    bundle = submit_bundle("clean")
    (bundle / "store").mkdir()
    (bundle / "weights.pt").rename(bundle / "store" / "real.pt")
    (bundle / "weights.pt").symlink_to(Path("store") / "real.pt")
    result = submit(bundle, SubmitOptions(work_dir=tmp_path / "w", suite=SMOKE, seed=0, device="cpu", check_only=True),
                    log=lambda s: None)
    assert result.clean["measured"] > 75


# ------------------------------------------------------------------------------------ flags


@pytest.mark.parametrize("flags", [
    ["--batch-size", "0"], ["--batch-size", "abc"], ["--health-samples", "0"], ["--health-samples", "-3"],
    ["--n-samples", "0"], ["--seed", str(10**23)], ["--seed", "-1"], ["--isolation", "none"],
    ["--audit-per-batch", "99"], ["--sandbox", "load_s=-1"], ["--sandbox", "nonsense=3"], ["--sandbox", "load_s"],
    ["--data", "missing.npz"], ["--device", "tpu"], ["--suite", "nope"], ["--work-dir", "INSIDE"], ["--unknown-flag"],
], ids=lambda f: "_".join(f).strip("-"))
def test_every_bad_flag_is_one_line_exit_2_and_writes_nothing(submit_bundle, tmp_path, capsys, flags):
    bundle = submit_bundle("clean")
    before = _tree(bundle)
    work = tmp_path / "work"
    flags = [str(bundle / "w") if f == "INSIDE" else f for f in flags]
    args = [str(bundle), "--device", "cpu", "--check-only", *flags]
    if "--work-dir" not in flags:
        args += ["--work-dir", str(work)]
    rc, err = _cli(args, capsys)
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not work.exists() and _tree(bundle) == before and not (bundle / "w").exists()


def test_submitted_code_is_never_imported_into_the_harness_process(submit_bundle, tmp_path):
    import builtins
    import sys

    bundle = submit_bundle("clean")
    (bundle / "model.py").write_text("import builtins\nbuiltins.ARENA_BUNDLE_RAN_HERE = True\n" + (bundle / "model.py").read_text())
    result = submit(bundle, SubmitOptions(work_dir=tmp_path / "w", suite=SMOKE, seed=0, device="cpu", check_only=True),
                    log=lambda s: None)
    assert result.clean["measured"] > 75  # the model did run: in its worker
    assert not hasattr(builtins, "ARENA_BUNDLE_RAN_HERE")
    assert not [m for m in list(sys.modules.values()) if "arena-bundle-" in str(getattr(m, "__file__", "") or "")]


def test_a_model_that_sleeps_at_import_is_rejected_by_the_loading_check(submit_bundle, tmp_path):
    bundle = submit_bundle("clean")
    (bundle / "model.py").write_text("import time\ntime.sleep(3600)\n" + (bundle / "model.py").read_text())
    start = time.monotonic()
    with pytest.raises(Rejection) as exc:
        submit(bundle, SubmitOptions(work_dir=tmp_path / "w", suite=SMOKE, seed=0, device="cpu", check_only=True,
                                     sandbox=SandboxLimits(load_s=3)), log=lambda s: None)
    assert exc.value.check == "loading" and "within 3 s" in str(exc.value)
    assert time.monotonic() - start < 120


# ------------------------------------------------------------------------ full scorings (slow)


def _score(bundle: Path, work: Path, **kw) -> object:
    opts = SubmitOptions(work_dir=work, suite=SMOKE, seed=0, device="cpu", n_samples=N, health_samples=20, **kw)
    return submit(bundle, opts, log=lambda s: None)


def _records(result) -> pd.DataFrame:
    run = Path(result.runs[0]["run_dir"])
    return pd.read_parquet(run / "samples.parquet")[VERDICT_COLUMNS].sort_values(["sample_id", "attack"]).reset_index(drop=True)


def _row(work: Path) -> pd.Series:
    board = pd.read_csv(work / "leaderboard" / "evasion.csv")
    assert len(board) == 1, board
    return board.iloc[0]


@pytest.fixture(scope="module")
def clean_reference(submit_bundle, tmp_path_factory):
    work = tmp_path_factory.mktemp("clean-reference")
    result = _score(submit_bundle("clean"), work)
    return result, _records(result), _row(work)


@pytest.mark.slow
def test_a_bundle_that_attacks_the_machine_at_import_changes_nothing_and_scores_as_clean(
        submit_bundle, tmp_path, monkeypatch, clean_reference, full_isolation):
    outside = tmp_path / "outside"
    outside.mkdir()
    listener = Listener()
    monkeypatch.setenv("ARENA_TEST_SECRET", "s3cret")
    bundle = submit_bundle("hostile_import", replace={"OUTSIDE_DIR": str(outside), "LISTENER_PORT": str(listener.port)})
    before = _tree(bundle)
    try:
        result = _score(bundle, tmp_path / "work")
    finally:
        time.sleep(0.5)
        listener.close()
    assert listener.received == [] and list(outside.iterdir()) == [] and _tree(bundle) == before
    pd.testing.assert_frame_equal(_records(result), clean_reference[1])
    row = _row(tmp_path / "work")
    assert row["isolation"] == "full" and row["robust_acc"] == clean_reference[2]["robust_acc"]


@pytest.mark.slow
def test_a_bundle_that_replaces_the_verdict_at_import_changes_nothing(submit_bundle, tmp_path, clean_reference):
    result = _score(submit_bundle("forging"), tmp_path / "work")
    pd.testing.assert_frame_equal(_records(result), clean_reference[1])
    row, ref = _row(tmp_path / "work"), clean_reference[2]
    assert (row["clean_acc"], row["robust_acc"], row["stateful_model"]) == (ref["clean_acc"], ref["robust_acc"], False)


@pytest.mark.slow
def test_a_model_that_answers_from_memory_is_rejected_by_the_audit(submit_bundle, tmp_path):
    work = tmp_path / "work"
    with pytest.raises(Rejection) as exc:
        _score(submit_bundle("caching"), work)
    assert exc.value.check == "stateful_model" and "answered differently" in str(exc.value)
    assert not (work / "runs").exists() or not any((work / "runs").iterdir())
    assert not (work / "leaderboard").exists()


@pytest.mark.slow
def test_without_the_audit_fresh_verdicts_give_the_caching_model_its_honest_number(submit_bundle, tmp_path, clean_reference):
    work = tmp_path / "work"
    result = _score(submit_bundle("caching"), work, audit_per_batch=0)
    records = pd.read_parquet(Path(result.runs[0]["run_dir"]) / "samples.parquet")
    attacked = records[records["attack"] != "clean"]
    attack_time_robust = 1 - attacked.groupby("sample_id")["attack_success"].any().mean()
    row, ref = _row(work), clean_reference[2]
    assert attack_time_robust > 0.5  # what the caching trick would have scored at attack time
    assert row["robust_acc"] <= ref["robust_acc"] + 10.0  # the fresh verdicts: (near) the honest number
    assert bool(row["stateful_model"]) and bool(row["masking_suspected"])
    health = json.loads((Path(result.runs[0]["run_dir"]) / "health.json").read_text())
    check = {c["name"]: c for c in health["checks"]}["stateful_model"]
    assert check["status"] == "fail" and check["evidence"]["verdicts"]["attack_correct_fresh_wrong"] > 0


@pytest.mark.slow
def test_the_reduced_fallback_scores_the_same_and_says_so_on_the_row(submit_bundle, tmp_path, clean_reference):
    work = tmp_path / "work"
    result = _score(submit_bundle("clean"), work, isolation="reduced")
    pd.testing.assert_frame_equal(_records(result), clean_reference[1])
    row = _row(work)
    assert row["isolation"] == "reduced" and clean_reference[2]["isolation"] == detect_isolation("auto").level
    manifest = json.loads((Path(result.runs[0]["run_dir"]) / "manifest.json").read_text())
    assert manifest["isolation"]["level"] == "reduced" and manifest["isolation"]["filesystem_isolated"] is False


@pytest.mark.slow
def test_a_model_that_stalls_mid_attack_is_rejected_and_leaves_no_run(submit_bundle, tmp_path):
    """It passes every check (small batches), then hangs on the suite's first large gradient batch."""
    bundle = submit_bundle("clean")
    text = (bundle / "model.py").read_text().replace(
        "        return self.net(x)",
        "        if torch.is_grad_enabled() and x.shape[0] > 40:\n            import time\n            time.sleep(3600)\n"
        "        return self.net(x)")
    (bundle / "model.py").write_text(text)
    work = tmp_path / "work"
    start = time.monotonic()
    with pytest.raises(Rejection) as exc:
        _score(bundle, work, sandbox=SandboxLimits(request_s=5))
    assert exc.value.check == "suite" and "within 5 s" in str(exc.value)
    assert not (work / "runs").exists() or not any((work / "runs").iterdir())
    assert time.monotonic() - start < 600


@pytest.mark.slow
def test_under_reduced_isolation_a_worker_that_rewrites_the_staged_bundle_is_caught(submit_bundle, tmp_path):
    """Reduced isolation cannot stop a write to the staged copy; the next worker start notices it."""
    bundle = submit_bundle("clean")
    (bundle / "model.py").write_text(
        "import os\nwith open(os.path.abspath(__file__), 'a') as _f:\n    _f.write('\\n# rewritten by the worker\\n')\n"
        + (bundle / "model.py").read_text())
    before = _tree(bundle)
    with pytest.raises(Rejection) as exc:
        _score(bundle, tmp_path / "work", isolation="reduced")
    assert exc.value.check == "suite" and "staged copy of the bundle changed" in str(exc.value)
    assert _tree(bundle) == before  # the submitted bundle itself is never touched
