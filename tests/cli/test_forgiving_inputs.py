"""Inputs as researchers type them: radii as fractions, board filters without the exact spelling.

The refusals (a filter that matches nothing, a misspelt key, `+foo=1`) are rows of
tests/cli/test_bad_input_corpus.py; here are the inputs that must *work*.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from harness.cli.board import match_rows
from harness.cli.dispatch import main
from harness.core.errors import UserError
from harness.core.numbers import as_number
from harness.core.threat import ThreatModel

BOARD = pd.DataFrame({
    "suite": ["quick@v1", "standard@v1", "standard_plus@v2"],
    "threat": ["Linf-0.1", "Linf-0.3", "L2-0.5"],
    "dataset": ["mnist5k", "mnist", "cifar10"],
})


@pytest.mark.parametrize("column,value,rows", [
    ("suite", "quick", ["quick@v1"]),                  # version-free
    ("suite", "QUICK@V1", ["quick@v1"]),               # case-insensitive
    ("suite", "standard", ["standard@v1"]),            # an exact (version-free) name wins over a longer prefix
    ("suite", "standard_", ["standard_plus@v2"]),      # prefix
    ("threat", "linf", ["Linf-0.1", "Linf-0.3"]),
    ("dataset", "mnist", ["mnist"]),                   # exact beats the prefix match on mnist5k
    ("dataset", "mnist5", ["mnist5k"]),
])
def test_board_filters_match_as_typed(column, value, rows):
    assert match_rows(BOARD, column, value)[column].tolist() == rows


def test_a_filter_miss_lists_what_exists():
    with pytest.raises(UserError, match=r"--dataset 'imagenet' matches no row of this leaderboard; it has: cifar10, mnist, mnist5k"):
        match_rows(BOARD, "dataset", "imagenet")


@pytest.mark.parametrize("text,value", [("8/255", 8 / 255), (" 2 / 255 ", 2 / 255), ("0.5", 0.5), ("1.5/3", 0.5)])
def test_fractions_read_as_numbers(text, value):
    assert as_number(text) == pytest.approx(value, rel=0, abs=0)
    assert ThreatModel("Linf", text).eps == value


@pytest.mark.parametrize("text", ["eight", "8/0", "nan", "1/2/3"])
def test_what_is_not_a_number_stays_text(text):
    assert as_number(text) == text


def test_eps_as_a_fraction_on_the_command_line_reaches_the_defense_and_the_record(tmp_path: Path):
    """`threat.eps=8/255` is the float 8/255 for the threat, for a defense that follows it (PGD-AT
    trains at the evaluation's radius) and in the run's identity; the fraction is kept beside it."""
    work = tmp_path / "w"
    assert main(["eval", "dataset=digits", "n_samples=8", "threat.eps=8/255", "attack=fgsm", "defense=pgd_at",
                 "defense.steps=1", "defense.train.epochs=1", "progress=false", "leaderboard.update=false",
                 f"work_dir={work}"]) == 0
    (manifest_path,) = (work / "runs").glob("*/manifest.json")
    manifest = json.loads(manifest_path.read_text())
    assert manifest["config"]["threat"]["eps"] == 8 / 255
    assert manifest["config"]["defense"]["eps"] == 8 / 255
    assert manifest["threat_eps_text"] == "8/255"
    # the same radius written as a float is the same run (the fraction text is no part of its identity)
    again = main(["eval", "dataset=digits", "n_samples=8", f"threat.eps={8 / 255!r}", "attack=fgsm", "defense=pgd_at",
                  "defense.steps=1", "defense.train.epochs=1", "progress=false", "leaderboard.update=false",
                  f"work_dir={work}"])
    assert again == 0 and len(list((work / "runs").glob("*/manifest.json"))) == 1
