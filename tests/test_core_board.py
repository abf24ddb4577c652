"""Leaderboard: rebuilt from stored runs, byte-identical, atomic; terminal view; wandb offline."""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from harness.evasion import board as leaderboard
from harness.api import run_eval
from harness.cli.dispatch import main

RUNS = [["dataset=digits", "n_samples=60", "batch_size=30", "defense.train.epochs=2", "threat.eps=0.1"],
        ["dataset=digits", "n_samples=60", "batch_size=30", "defense.train.epochs=2", "threat.eps=0.2"]]


@pytest.fixture(scope="module")
def board_work(tmp_path_factory) -> Path:
    wd = tmp_path_factory.mktemp("board")
    for overrides in RUNS:
        run_eval(overrides, wd)
    return wd


def test_rebuild_is_byte_identical(board_work, tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    leaderboard.build([board_work], a)
    leaderboard.build([board_work], b)
    assert a.read_bytes() == b.read_bytes()
    df = pd.read_csv(a)
    assert len(df) == 2
    assert list(df.columns) == leaderboard.COLUMNS
    # a stronger threat never yields a higher robust accuracy for the same model
    by_eps = df.set_index("eps")["robust_acc"]
    assert by_eps[0.2] <= by_eps[0.1]
    assert (df["robust_acc"] <= df["clean_acc"]).all()
    assert (df["best_known_acc"] <= df["robust_acc"]).all()
    assert df["command"].str.startswith("arena eval").all()
    assert not list(tmp_path.glob(".*.tmp")), "temporary files left behind"


def test_unfinished_runs_are_not_on_the_board(board_work, tmp_path):
    runs = sorted((board_work / "runs").iterdir())
    marker = runs[0] / "DONE"
    marker.rename(runs[0] / "DONE.off")
    try:
        df = leaderboard.build_table([board_work])
        assert len(df) == 1
    finally:
        (runs[0] / "DONE.off").rename(marker)


def test_board_cli_filters_and_sorts(board_work, capsys):
    csv = board_work / "leaderboard" / "evasion.csv"
    assert main(["board", "build", "--work-dir", str(board_work)]) == 0
    assert csv.is_file()
    capsys.readouterr()
    assert main(["board", "--work-dir", str(board_work), "--threat", "Linf-0.2", "--sort", "clean_acc"]) == 0
    out = capsys.readouterr().out
    assert "Linf-0.2" in out and "Linf-0.1" not in out
    assert main(["board", "--work-dir", str(board_work), "--sort", "nope"]) == 2
    assert "not a column" in capsys.readouterr().err


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    code = main(["eval", "dataset=digits", "n_samples=30", "defense.train.epochs=1", f"work_dir={tmp_path}",
                 "logger=wandb", "progress=false", "leaderboard.update=false"])
    assert code == 0
    runs = list(Path(tmp_path).rglob("offline-run-*"))
    assert runs, "no offline wandb run was written"
    assert any(p.suffix == ".wandb" for r in runs for p in r.iterdir())
