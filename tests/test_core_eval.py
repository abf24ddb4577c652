"""End-to-end runs of the evaluator on real data: the embedded default, determinism, resume."""
from __future__ import annotations

import shutil

import pandas as pd
import pytest
import torch

from harness.api import run_eval
from harness.results.store import RunDir

DIGITS = ["dataset=digits", "n_samples=120", "batch_size=50", "defense.train.epochs=3"]


def _records(run_dir) -> pd.DataFrame:
    return pd.read_parquet(f"{run_dir}/samples.parquet").drop(columns=["time_s"])


def test_embedded_default_end_to_end(session_work):
    """`arena eval` with no overrides: small CNN on mnist5k, clean >= 95 %, PGD at 0.3 < 10 %."""
    summary = run_eval([], session_work)
    assert summary["n_samples"] == 1000
    assert summary["clean_acc"] >= 0.95
    assert summary["attacks"]["pgd-ce"]["robust_acc_after"] < 0.10
    assert summary["robust_acc"] <= summary["attacks"]["pgd-ce"]["robust_acc_after"]
    # cost is reported: PGD-20 spends 20 forward + 20 backward passes (+1 final check) per attacked sample
    pgd = summary["attacks"]["pgd-ce"]
    assert pgd["n_backward"] == 20 * pgd["attacked"]
    assert pgd["n_forward"] == 21 * pgd["attacked"]
    assert RunDir(__import__("pathlib").Path(summary["run_dir"])).is_done()


def test_finished_run_is_skipped(session_work):
    first = run_eval(DIGITS, session_work)
    again = run_eval(DIGITS, session_work)
    assert again["skipped"] and again["run_dir"] == first["run_dir"]


def test_same_seed_same_records(tmp_path):
    a = run_eval(DIGITS, tmp_path / "a")
    b = run_eval(DIGITS, tmp_path / "b")
    pd.testing.assert_frame_equal(_records(a["run_dir"]), _records(b["run_dir"]))
    c = run_eval(DIGITS + ["seed=1"], tmp_path / "c")
    assert c["run_dir"].split("/")[-1] != a["run_dir"].split("/")[-1]


def test_interrupted_run_resumes_to_identical_records(tmp_path):
    full = run_eval(DIGITS, tmp_path / "full")
    part = run_eval(DIGITS, tmp_path / "part")
    run = RunDir(__import__("pathlib").Path(part["run_dir"]))
    # simulate a kill after the first batch: only batch 0 survives, no marker, no final files
    for name in ("DONE", "samples.parquet", "summary.json"):
        (run.path / name).unlink()
    for p in sorted((run.path / "batches").iterdir())[1:]:
        p.unlink()
    resumed = run_eval(DIGITS, tmp_path / "part")
    assert not resumed["skipped"]
    pd.testing.assert_frame_equal(_records(full["run_dir"]), _records(resumed["run_dir"]))


def test_cascade_only_attacks_still_robust(tmp_path):
    s = run_eval(DIGITS, tmp_path)
    df = pd.read_parquet(f"{s['run_dir']}/samples.parquet")
    clean = df[df.attack == "clean"].set_index("sample_id")
    ce = df[df.attack == "pgd-ce"].set_index("sample_id")
    margin = df[df.attack == "pgd-margin"].set_index("sample_id")
    assert (ce.loc[clean.correct_draws == 0, "ran"] == False).all()  # noqa: E712
    assert (margin.loc[ce.success.fillna(False).astype(bool), "ran"] == False).all()  # noqa: E712
    # robust = clean correct and never fooled; recomputed by hand from the records
    broken = df[df.attack != "clean"].groupby("sample_id")["success"].any()
    expect = ((clean.correct_draws == 1) & ~broken.reindex(clean.index)).mean()
    assert s["robust_acc"] == pytest.approx(expect)
