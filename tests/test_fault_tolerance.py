"""Fault injection: SIGKILL a real `arena eval -m` sweep at >= 10 random points, rerun it, and get
exactly the leaderboard and per-sample records of an uninterrupted sweep.

Each attempt runs the CLI (`harness.cli.dispatch`, the same code path as the `arena` command) in a
forked process that is killed with SIGKILL at one point drawn at random: the n-th optimiser step
(during training), the n-th model call of an attack, the n-th atomic write of a result file (after
part of the bytes are written, before the rename), the n-th leaderboard build (inside the lock,
before the CSV is written), or a random wall-clock moment (from outside). Between attempts the
test checks the invariants: a completion marker (DONE) only on a whole, correct run; a leaderboard
that parses and holds only correct rows. The fork keeps the test cheap (no re-import of torch)
while the killed process is still a real process dying mid-write.
"""
from __future__ import annotations

import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest
import torch

import harness.core.access
import harness.core.atomic
import harness.data.weights
import harness.evasion.run
import harness.evasion.board
import harness.results.store
from harness.cli import dispatch as cli
from harness.evasion.board import COLUMNS

import attacks  # noqa: F401,E402  (imported once here, so the forked children start warm)
import defenses  # noqa: F401,E402
import harness.cli.eval  # noqa: F401,E402
import sklearn.datasets  # noqa: F401,E402

SWEEP = ["-m", "dataset=digits", "n_samples=60", "batch_size=10", "defense.train.epochs=2", "attack=pgd",
         "attack.steps=5", "seed=0,1", "progress=false"]
N_JOBS = 2
MEASURED = ["attack_time_s", "train_time_s", "finished"]  # wall-clock facts, different on every run
SITES = ["train", "attack", "write", "board", "clock"]


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_on_call(owner: object, attr: str, n: int, after: Callable[..., None] | None = None) -> None:
    """Make the n-th call of owner.attr SIGKILL this process (before the call's effect)."""
    original = getattr(owner, attr)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            kill_self()
        return original(*args, **kwargs)

    setattr(owner, attr, wrapper)


def kill_in_attack(n: int) -> None:
    """SIGKILL at the n-th counted model call made by an attack (calls inside evaluate_batch that go
    through CountingModule; training's counted calls happen outside it)."""
    inside = [False]
    calls = [0]
    forward, evaluate_batch = harness.core.access.CountingModule.forward, harness.evasion.run.evaluate_batch

    def counted(self, x):
        if inside[0]:
            calls[0] += 1
            if calls[0] == n:
                kill_self()
        return forward(self, x)

    def batch(*args, **kwargs):
        inside[0] = True
        try:
            return evaluate_batch(*args, **kwargs)
        finally:
            inside[0] = False

    harness.core.access.CountingModule.forward = counted
    harness.evasion.run.evaluate_batch = batch


def kill_mid_write(n: int, only: str) -> None:
    """The n-th atomic write whose path contains `only`: write the bytes, cut them in half, SIGKILL
    before fsync and rename (what a kill during a large write leaves behind)."""
    calls = [0]
    for module in (harness.core.atomic, harness.results.store, harness.evasion.board, harness.data.weights):
        original = module.atomic_write

        def patched(path, write, _original=original):
            if only in str(path):
                calls[0] += 1
                if calls[0] == n:
                    def torn(tmp):
                        write(tmp)
                        size = Path(tmp).stat().st_size
                        with open(tmp, "r+b") as fh:
                            fh.truncate(size // 2)
                        kill_self()
                    return _original(path, torn)
            return _original(path, write)

        module.atomic_write = patched


def install(site: str, n: int) -> None:
    if site == "train":
        kill_on_call(torch.optim.Adam, "step", n)
    elif site == "attack":
        kill_in_attack(n)
    elif site == "write":
        kill_mid_write(n, only=os.sep + "runs" + os.sep)
    elif site == "board":
        if n % 2:
            kill_on_call(harness.evasion.board, "build_table", n // 2 + 1)
        else:
            kill_mid_write(n // 2, only="evasion.csv")


def run_cli(argv: list[str], log: Path, site: str | None = None, n: int = 0, delay: float | None = None) -> int | str:
    """Fork, run `arena <argv>` in the child; return its exit code, or 'killed' on SIGKILL."""
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 99
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = open(1, "w", buffering=1, closefd=False)  # line-buffered: a kill loses nothing
            sys.stderr = open(2, "w", buffering=1, closefd=False)
            torch.set_num_threads(1)
            if site is not None:
                install(site, n)
            code = cli.main(argv)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    if delay is not None:
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline:
            if os.waitpid(pid, os.WNOHANG) != (0, 0):
                break  # finished before the kill: a late clock point
            time.sleep(0.02)
        else:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            return "killed" if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL else os.waitstatus_to_exitcode(status)
        return 0
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return "killed"
    return os.waitstatus_to_exitcode(status)


def finished_runs(work: Path) -> dict[str, pd.DataFrame]:
    out = {}
    for run in sorted((work / "runs").glob("*")) if (work / "runs").is_dir() else []:
        if (run / "DONE").is_file():
            out[run.name] = pd.read_parquet(run / "samples.parquet").drop(columns=["time_s"])
    return out


def board(work: Path, drop: list[str] = MEASURED) -> pd.DataFrame:
    df = pd.read_csv(work / "leaderboard" / "evasion.csv")
    assert list(df.columns) == COLUMNS
    df["command"] = df["command"].str.replace(str(work), "WORK", regex=False)
    return df.drop(columns=drop).sort_values("config_hash").reset_index(drop=True)


def batch_inodes(work: Path) -> dict[str, int]:
    return {str(p): p.stat().st_ino for p in (work / "runs").glob("*/batches/*.parquet")} if (work / "runs").is_dir() else {}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict[str, pd.DataFrame], float]:
    """The same sweep, uninterrupted (and its wall time, to place the clock kills)."""
    work = tmp_path_factory.mktemp("uninterrupted")
    start = time.monotonic()
    code = run_cli(["eval", *SWEEP, f"work_dir={work}"], work / "log.txt")
    wall = time.monotonic() - start
    assert code == 0, (work / "log.txt").read_text()[-3000:]
    runs = finished_runs(work)
    assert len(runs) == N_JOBS
    return work, runs, wall


def check_invariants(work: Path, ref_work: Path, ref_runs: dict[str, pd.DataFrame]) -> None:
    """After a kill: DONE only on whole, correct runs; the board (if any) parses and is correct."""
    for key, samples in finished_runs(work).items():
        assert key in ref_runs, f"unexpected finished run {key}"
        pd.testing.assert_frame_equal(samples, ref_runs[key])
        assert (work / "runs" / key / "summary.json").is_file()
    for run in (work / "runs").glob("*") if (work / "runs").is_dir() else []:
        if not (run / "DONE").is_file():
            assert not (run / "summary.json").exists() or (run / "samples.parquet").exists()
    if (work / "leaderboard" / "evasion.csv").is_file():
        # best_known_acc is a union over the runs present so far: only final once all are there
        got = board(work, MEASURED + ["best_known_acc"])
        want = board(ref_work, MEASURED + ["best_known_acc"])
        assert not got["config_hash"].duplicated().any()
        merged = got.merge(want, how="left", indicator=True)
        assert (merged["_merge"] == "both").all(), merged[merged["_merge"] != "both"]


@pytest.mark.slow
def test_sigkill_at_random_points_then_rerun_gives_identical_board(tmp_path, reference):
    ref_work, ref_runs, ref_wall = reference
    work = tmp_path / "faulted"
    argv = ["eval", *SWEEP, f"work_dir={work}"]
    rng = random.Random(int(os.environ.get("ARENA_FAULT_SEED", "20240607")))
    kills: list[tuple[str, float]] = []
    kept_batches: dict[str, int] = {}
    attempts = 0
    # every phase early (a training kill only lands while a model is untrained, a write or attack
    # kill while work remains), then sites at random; the kill points themselves are random
    schedule = ["train", "attack", "write", "train", "attack", "write", "clock", "attack", "write", "board",
                "clock", "board"] + [rng.choice(SITES) for _ in range(30)]
    for site in schedule:
        if len(kills) >= 12 and {"train", "attack", "write", "board"} <= {s for s, _ in kills}:
            break
        attempts += 1
        before = batch_inodes(work)
        log = tmp_path / f"attempt{attempts:02d}-{site}.log"
        if site == "clock":
            point = round(rng.uniform(0.1, 0.9) * ref_wall, 2)
            code = run_cli(argv, log, delay=point)
        else:
            point = {"train": rng.randint(1, 40), "attack": rng.randint(1, 15), "write": rng.randint(1, 4),
                     "board": rng.randint(1, 3)}[site]
            code = run_cli(argv, log, site=site, n=point)
        assert code in ("killed", 0), log.read_text()[-3000:]
        if code == "killed":
            kills.append((site, point))
        # a finished batch is never recomputed: resume from the last finished batch
        after = batch_inodes(work)
        assert all(after.get(p) == ino for p, ino in before.items()), "a finished batch was rewritten"
        kept_batches.update(before)
        check_invariants(work, ref_work, ref_runs)
    print(f"{len(kills)} SIGKILLs in {attempts} attempts (site, point): {kills}")
    assert len(kills) >= 10, f"only {len(kills)} kills landed: {kills}"
    assert {"train", "attack", "write", "board"} <= {s for s, _ in kills}, kills

    final_log = tmp_path / "final.log"
    assert run_cli(argv, final_log) == 0, final_log.read_text()[-3000:]
    text = "".join(p.read_text() for p in sorted(tmp_path.glob("*.log")))
    assert "already complete; skipping" in text  # finished jobs are skipped on rerun

    # identical results: same finished runs, same per-sample records, same board (timings aside)
    got_runs = finished_runs(work)
    assert sorted(got_runs) == sorted(ref_runs)
    for key in ref_runs:
        pd.testing.assert_frame_equal(got_runs[key], ref_runs[key])
    pd.testing.assert_frame_equal(board(work), board(ref_work))
    assert len(board(work)) == N_JOBS and not board(work)["config_hash"].duplicated().any()
    # a rebuild from the stored runs gives the same board
    assert cli.main(["board", "build", "--work-dir", str(work)]) == 0
    pd.testing.assert_frame_equal(board(work), board(ref_work))
    assert kept_batches, "no batch survived a kill: nothing was resumed"


def test_killed_job_leaves_no_done_and_resumes_to_the_same_records(tmp_path):
    """One job, killed in its third batch: no DONE, the two finished batches are kept, and the
    resumed run's samples.parquet equals an uninterrupted run's (per sample, costs included)."""
    args = ["eval", "dataset=digits", "n_samples=50", "batch_size=10", "defense.train.epochs=1", "attack=pgd",
            "attack.steps=5", "progress=false", "leaderboard.update=false"]
    ref = tmp_path / "ref"
    assert run_cli([*args, f"work_dir={ref}"], tmp_path / "ref.log") == 0
    work = tmp_path / "work"
    # writes: manifest, batch 0, batch 1, then die half-way through writing batch 2
    code = run_cli([*args, f"work_dir={work}"], tmp_path / "kill.log", site="write", n=4)
    assert code == "killed"
    (run,) = list((work / "runs").iterdir())
    assert not (run / "DONE").exists() and not (run / "samples.parquet").exists()
    done_batches = sorted(p.name for p in (run / "batches").glob("*.parquet"))
    assert done_batches == ["00000.parquet", "00001.parquet"], done_batches
    inodes = batch_inodes(work)
    assert run_cli([*args, f"work_dir={work}"], tmp_path / "resume.log") == 0
    assert all(batch_inodes(work)[p] == i for p, i in inodes.items())
    (ref_run,) = list((ref / "runs").iterdir())
    assert ref_run.name == run.name
    pd.testing.assert_frame_equal(pd.read_parquet(run / "samples.parquet").drop(columns=["time_s"]),
                                  pd.read_parquet(ref_run / "samples.parquet").drop(columns=["time_s"]))
