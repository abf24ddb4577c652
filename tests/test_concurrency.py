"""Concurrency: several processes writing runs (some the very same configuration) and building the
leaderboard in one work dir at once lose and duplicate nothing, train each model once, and a reader
polling the CSV all the while never sees a partial file."""
from __future__ import annotations

import io
import json
import os
import sys
import time
import traceback
from pathlib import Path

import pandas as pd
import torch

import attacks  # noqa: F401  (imported before forking, so the children start warm)
import defenses  # noqa: F401
import harness.cli.eval  # noqa: F401
import sklearn.datasets  # noqa: F401
from harness.cli import dispatch as cli
from harness.evasion import board as leaderboard
from harness.evasion.board import COLUMNS

BASE = ["dataset=digits", "n_samples=20", "batch_size=10", "defense.train.epochs=1", "attack=pgd", "attack.steps=5",
        "progress=false"]
WRITERS = ["threat.eps=0.05,0.1", "threat.eps=0.15,0.2", "threat.eps=0.25,0.3", "threat.eps=0.3,0.1,0.2"]
DISTINCT = 6  # eps in {0.05, 0.1, 0.15, 0.2, 0.25, 0.3}


def fork(fn, log: Path) -> int:
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = open(1, "w", buffering=1, closefd=False)
            sys.stderr = open(2, "w", buffering=1, closefd=False)
            torch.set_num_threads(1)
            code = int(fn() or 0)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def wait(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def read_loop(csv: Path, stop: Path, report: Path) -> int:
    """Poll the CSV until told to stop; record every read and every inconsistency."""
    reads, problems, last_rows = 0, [], 0
    while not stop.exists():
        try:
            data = csv.read_bytes()
        except FileNotFoundError:
            time.sleep(0.005)
            continue
        reads += 1
        try:
            text = data.decode()
            df = pd.read_csv(io.StringIO(text))
            if list(df.columns) != COLUMNS:
                problems.append(f"header {list(df.columns)[:3]}...")
            if not text.endswith("\n") or text.count("\n") != len(df) + 1:
                problems.append(f"torn file: {len(df)} rows, {text.count(chr(10))} lines")
            if df[["defense", "config_hash", "robust_acc", "n_samples"]].isna().any().any() or (df["n_samples"] != 20).any():
                problems.append("incomplete row")
            if df["config_hash"].duplicated().any():
                problems.append("duplicated row")
            if len(df) < last_rows:
                problems.append(f"rows went back from {last_rows} to {len(df)} (a stale board overwrote a newer one)")
            last_rows = len(df)
        except Exception as exc:  # an unreadable CSV is exactly what must never happen
            problems.append(f"{type(exc).__name__}: {exc}")
    report.write_text(json.dumps({"reads": reads, "problems": problems[:20]}))
    return 0


def test_concurrent_writers_builders_and_a_reader(tmp_path):
    work = tmp_path / "w"
    csv = work / "leaderboard" / "evasion.csv"
    stop, report = tmp_path / "stop", tmp_path / "reader.json"
    reader = fork(lambda: read_loop(csv, stop, report), tmp_path / "reader.log")
    writers = [fork(lambda sweep=sweep: cli.main(["eval", "-m", *BASE, sweep, f"work_dir={work}"]), tmp_path / f"writer{i}.log")
               for i, sweep in enumerate(WRITERS)]

    writers_done = tmp_path / "writers-done"

    def builder() -> int:  # `arena board build` over and over while the runs land
        while not writers_done.exists():
            assert cli.main(["board", "build", "--work-dir", str(work)]) == 0
            time.sleep(0.02)
        return 0

    builders = [fork(builder, tmp_path / f"builder{i}.log") for i in range(2)]
    codes = [wait(pid) for pid in writers]
    writers_done.write_text("")
    codes += [wait(pid) for pid in builders]
    stop.write_text("")
    assert wait(reader) == 0
    logs = "\n".join(p.read_text()[-2000:] for p in sorted(tmp_path.glob("*.log")))
    assert codes == [0] * len(codes), logs

    seen = json.loads(report.read_text())
    assert seen["problems"] == [], seen
    assert seen["reads"] > 0

    # nothing lost, nothing doubled: one finished run and one row per distinct configuration
    runs = [p for p in (work / "runs").iterdir() if (p / "DONE").is_file()]
    assert len(runs) == DISTINCT
    final = pd.read_csv(csv)
    assert len(final) == DISTINCT and not final["config_hash"].duplicated().any()
    assert sorted(final["config_hash"]) == sorted(p.name for p in runs)
    assert sorted(final["eps"]) == [0.05, 0.1, 0.15, 0.2, 0.25, 0.3]
    # the last board written is the board of all finished runs
    pd.testing.assert_frame_equal(final, leaderboard.build_table([work]).pipe(
        lambda df: pd.read_csv(io.StringIO(df.to_csv(index=False, float_format="%.4g", lineterminator="\n")))))
    # every record complete; the model shared by all runs was trained once
    for run in runs:
        samples = pd.read_parquet(run / "samples.parquet")
        assert len(samples) == 20 * 2 and samples["sample_id"].nunique() == 20
    assert len(list((work / "cache" / "checkpoints").glob("*.pt"))) == 1
    hashes = {json.loads((run / "manifest.json").read_text())["model_hash"] for run in runs}
    assert len(hashes) == 1


def test_a_slow_builder_never_overwrites_a_newer_board(tmp_path):
    """Builder A reads the runs, then stalls (SIGSTOP) before writing; meanwhile run 2 finishes and
    its own board build starts. That build must wait for A (it holds the lock from reading to
    writing), so the board written last has seen both runs: no stale board, no lost row."""
    import signal

    from harness.api import run_eval

    work = tmp_path / "w"
    csv = work / "leaderboard" / "evasion.csv"
    run_eval([*BASE, "threat.eps=0.1"], work)
    paused = tmp_path / "paused"

    def stalling_builder() -> int:
        build_table = leaderboard.build_table

        def stall(work_dirs):
            df = build_table(work_dirs)
            paused.write_text(str(len(df)))
            os.kill(os.getpid(), signal.SIGSTOP)  # a builder descheduled between read and write
            return df

        leaderboard.build_table = stall
        return cli.main(["board", "build", "--work-dir", str(work)])

    a = fork(stalling_builder, tmp_path / "a.log")
    while not paused.exists():
        time.sleep(0.01)
    assert paused.read_text() == "1"
    b = fork(lambda: cli.main(["eval", *BASE, "threat.eps=0.2", f"work_dir={work}"]), tmp_path / "b.log")
    try:
        done = lambda: len([p for p in (work / "runs").glob("*/DONE")]) == 2  # noqa: E731
        deadline = time.monotonic() + 120
        while not done() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert done(), (tmp_path / "b.log").read_text()[-2000:]
        time.sleep(1.0)  # ample time for run 2's board build, were it not waiting for A
        assert os.waitpid(b, os.WNOHANG) == (0, 0), "run 2's board build did not wait for the stalled builder"
    finally:
        os.kill(a, signal.SIGCONT)
    assert wait(a) == 0 and wait(b) == 0, (tmp_path / "b.log").read_text()[-2000:]
    final = pd.read_csv(csv)
    assert len(final) == 2 and sorted(final["eps"]) == [0.1, 0.2]
