"""Sharding: `shard=i/n` evaluates a deterministic slice; `arena board build` merges the shards of
one configuration into one result identical, per sample and in the summary, to the unsharded run."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from harness.evasion import board as leaderboard
from harness.api import run_eval
from harness.cli.dispatch import main
from harness.core.errors import UserError
from harness.evasion.plan import parse_shard
from harness.results.metrics import accuracies

BASE = ["dataset=digits", "n_samples=50", "batch_size=10", "defense.train.epochs=1", "attack=pgd", "attack.steps=5"]
MEASURED = ["attack_time_s", "train_time_s", "finished", "command"]


def samples(summary: dict) -> pd.DataFrame:
    return pd.read_parquet(Path(summary["run_dir"]) / "samples.parquet")


def board_rows(work: Path) -> pd.DataFrame:
    out = work / "board.csv"
    assert main(["board", "build", "--work-dir", str(work), "--csv", str(out)]) == 0
    return pd.read_csv(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, object]:
    """The unsharded run in one work dir, its three shards (uneven: 1, 2, 2 batches) in another."""
    whole_dir, shard_dir = tmp_path_factory.mktemp("whole"), tmp_path_factory.mktemp("shards")
    whole = run_eval(BASE, whole_dir)
    shards = [run_eval([*BASE, f"shard={i}/3"], shard_dir) for i in range(3)]
    return {"whole": whole, "shards": shards, "whole_dir": whole_dir, "shard_dir": shard_dir}


def test_shards_are_disjoint_batch_aligned_slices_covering_everything():
    for n, bs, k in [(50, 10, 3), (1000, 250, 4), (7, 2, 4), (101, 10, 7), (5, 1, 5)]:
        slices = [parse_shard(f"{i}/{k}", n, bs)[0] for i in range(k)]
        covered = [j for s in slices for j in range(s.start, s.stop)]
        assert covered == list(range(n)), (n, bs, k)
        assert all(s.start % bs == 0 for s in slices), "a shard starts inside a batch"
        assert all(s.stop > s.start for s in slices), "an empty shard"
    assert parse_shard(None, 50, 10) == (slice(0, 50), None)


@pytest.mark.parametrize("shard, message", [
    ("3/3", "shard='3/3' needs 0 <= i < n (e.g. shard=0/4 .. shard=3/4)"),
    ("-1/2", "shard='-1/2' needs 0 <= i < n (e.g. shard=0/4 .. shard=3/4)"),
    ("1/0", "shard='1/0' needs 0 <= i < n (e.g. shard=0/4 .. shard=3/4)"),
    ("half", "shard='half' is not of the form i/n (e.g. shard=0/4)"),
    ("1/2/3", "shard='1/2/3' is not of the form i/n (e.g. shard=0/4)"),
    ("0/6", "shard='0/6': 50 samples make only 5 batches of batch_size=10; use at most 5 shards or a smaller batch_size"),
])
def test_bad_shards_are_user_errors(shard, message):
    with pytest.raises(UserError) as err:
        parse_shard(shard, 50, 10)
    assert str(err.value) == message


def test_merged_shards_equal_the_unsharded_run_per_sample_and_in_summary(runs):
    whole, shards = runs["whole"], runs["shards"]
    assert [s["n_samples"] for s in shards] == [10, 20, 20]
    assert len({s["run_dir"] for s in shards} | {whole["run_dir"]}) == 4  # distinct run directories
    merged = pd.concat([samples(s) for s in shards], ignore_index=True)
    reference = samples(whole)
    # every record identical, costs included (time_s is wall clock)
    pd.testing.assert_frame_equal(merged.drop(columns="time_s"), reference.drop(columns="time_s"))
    a, b = accuracies(merged), accuracies(reference)
    for key in ("clean_acc", "robust_acc", "robust_acc_mean", "robust_acc_majority", "forward_per_sample",
                "backward_per_sample", "queries_per_sample", "violations"):
        assert a[key] == b[key], key
    assert {k: v["robust_acc_after"] for k, v in a["attacks"].items()} == {k: v["robust_acc_after"] for k, v in b["attacks"].items()}


def test_board_build_merges_the_shards_into_the_unsharded_row(runs):
    whole_board = board_rows(runs["whole_dir"])
    shard_board = board_rows(runs["shard_dir"])
    assert len(whole_board) == len(shard_board) == 1
    # the merged row carries the unsharded configuration's key and every number of the unsharded run
    pd.testing.assert_frame_equal(shard_board.drop(columns=MEASURED), whole_board.drop(columns=MEASURED))
    assert "shard=" not in shard_board.loc[0, "command"]


def test_incomplete_or_mixed_shard_sets(runs, tmp_path):
    # two of three shards: nothing on the board yet
    partial = tmp_path / "partial"
    for s in runs["shards"][:2]:
        src = Path(s["run_dir"])
        dst = partial / "runs" / src.name
        dst.mkdir(parents=True)
        for f in src.iterdir():
            if f.is_file():
                (dst / f.name).write_bytes(f.read_bytes())
    assert leaderboard.build_table([partial]).empty
    # a 0/2 shard of the same configuration does not spoil the complete 3-way set
    run_eval([*BASE, "shard=0/2"], runs["shard_dir"])
    rows = board_rows(runs["shard_dir"])
    assert len(rows) == 1 and rows.loc[0, "n_samples"] == 50
    whole = board_rows(runs["whole_dir"])
    pd.testing.assert_frame_equal(rows.drop(columns=MEASURED), whole.drop(columns=MEASURED))


def test_shards_through_a_sweep(tmp_path):
    """`arena eval -m shard=0/2,1/2` (the way a cluster runs shards as separate jobs)."""
    work = tmp_path / "w"
    code = main(["eval", "-m", *BASE, "shard=0/2,1/2", f"work_dir={work}", "progress=false"])
    assert code == 0
    rows = pd.read_csv(work / "leaderboard" / "evasion.csv")
    assert len(rows) == 1 and rows.loc[0, "n_samples"] == 50
