"""Leaderboard rows that do not mislead: one row per attack configuration and per data content,
ranked by the best known accuracy, and a randomised defense evaluated without EOT marked as an
upper bound that never ranks above a properly evaluated row. Real runs on scikit-learn's digits."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.cli.dispatch import main
from harness.evasion import board as leaderboard
from harness.evasion.board import COLUMNS, rank

LINEAR = "import torch\nfrom torch import nn\ndef create():\n    torch.manual_seed(0)\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))\n"
NOISY = ("import torch\nfrom torch import nn\nclass M(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
         "        torch.manual_seed(0); self.l = nn.Linear(64, 10)\n"
         "    def forward(self, x):\n        return self.l(x.flatten(1) + 0.3 * torch.randn_like(x.flatten(1)))\n"
         "def create():\n    return M()\n")


def board(work: Path) -> pd.DataFrame:
    assert main(["board", "build", "--work-dir", str(work)]) == 0
    return leaderboard.read(work / "leaderboard" / "evasion.csv")


def test_two_attack_settings_of_a_sweep_are_two_rows(tmp_path):
    """`-m attack.steps=2,3` used to leave one row (the later replaced the earlier)."""
    work = tmp_path / "w"
    assert main(["eval", "-m", "dataset=digits", "n_samples=20", "defense.train.epochs=1", "attack=pgd", "attack.steps=2,3",
                 "threat.eps=0.05", "progress=false", f"work_dir={work}"]) == 0
    (sweep,) = (work / "hydra").iterdir()  # Hydra's only output: the sweep's config, no per-job folders or logs
    assert [p.name for p in sweep.iterdir()] == ["multirun.yaml"]
    df = board(work)
    assert len(df) == 2 and df["suite"].tolist() == ["pgd", "pgd"] and df["attacks_hash"].nunique() == 2
    assert df["defense_id"].nunique() == 1 and df["data_hash"].nunique() == 1


def test_two_npz_files_are_two_rows_named_by_stem_and_content(tmp_path):
    """Two different files named data.npz used to share one row called "npz"."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.round(d.images * (255 / 16)).astype(np.uint8)
    for folder, lo in (("a", 0), ("b", 30)):
        (tmp_path / folder).mkdir()
        np.savez(tmp_path / folder / "data.npz", x=x[lo:lo + 30], y=d.target[lo:lo + 30].astype(np.int64))
    (tmp_path / "lin.py").write_text(LINEAR)
    work = tmp_path / "w"
    assert main(["eval", "-m", "dataset=npz", f"dataset.path={tmp_path}/a/data.npz,{tmp_path}/b/data.npz", "n_samples=30", "defense=checkpoint",
                 f"defense.model_file={tmp_path}/lin.py", "attack=pgd", "attack.steps=2", "progress=false", f"work_dir={work}"]) == 0
    df = board(work)
    assert df["dataset"].tolist() == ["data", "data"] and df["data_hash"].nunique() == 2
    assert df["defense_id"].nunique() == 1


def test_a_randomised_defense_without_eot_is_an_upper_bound_ranked_last(tmp_path):
    (tmp_path / "noisy.py").write_text(NOISY)
    work = tmp_path / "w"
    common = ["dataset=digits", "n_samples=30", "defense=checkpoint", f"defense.model_file={tmp_path}/noisy.py",
              "defense.randomized=true", "evaluator.draws=3", "threat.eps=0.02", "attack=pgd", "attack.steps=3",
              "progress=false", f"work_dir={work}"]
    assert main(["eval", *common]) == 0
    assert main(["eval", *common, "attack.eot=4"]) == 0
    df = board(work)
    assert len(df) == 2
    plain = df[df["attacks_hash"] == df.loc[df["upper_bound"], "attacks_hash"].iloc[0]]
    assert plain["upper_bound"].tolist() == [True]
    assert df["upper_bound"].tolist() == [False, True]  # the EOT row first, whatever the accuracies
    assert "upper-bound" in _shown(work)


def _shown(work: Path) -> str:
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["board", "--work-dir", str(work)]) == 0
    return out.getvalue()


def test_ranking_is_by_best_known_accuracy_with_upper_bounds_last():
    def row(name, robust, best, upper=False):
        return {**{c: "" for c in COLUMNS}, "defense": name, "dataset": "d", "threat": "Linf-0.1", "suite": "s",
                "config_hash": name, "robust_acc": robust, "best_known_acc": best, "upper_bound": upper}

    df = pd.DataFrame([row("a", 94.0, 89.5), row("b", 90.0, 90.0), row("c", 93.0, 90.5), row("d", 99.0, 99.0, upper=True)])
    assert rank(df)["defense"].tolist() == ["c", "b", "a", "d"]


@pytest.mark.parametrize("spec, params, eot", [
    ({"name": "pgd"}, {"eot": 1}, False), ({"name": "pgd", "eot": 10}, {}, True), ({"name": "pgd"}, {"eot": 5}, True),
    ({"name": "autoattack", "version": "rand"}, {}, True), ({"name": "autoattack", "version": "standard"}, {}, False),
    ({"name": "pgd", "view": "expected"}, {}, True), ({"name": "pgd", "view": "fixed"}, {}, False),
])
def test_what_counts_as_an_eot_evaluation(spec, params, eot):
    assert leaderboard.uses_eot(spec, params) is eot
