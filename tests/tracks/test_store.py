"""The run store trusts nothing it reads back: batch files are resumed only when they were computed
for the plan, damaged finished runs are reported (by `arena eval`, `arena board build` and
`arena board check`), skipped by the board and recomputed by the next `arena eval`, and a file
system that refuses a write (full, read-only, a path through a file) is one line, exit status 2,
nothing half-written. Real runs on scikit-learn's digits."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import harness.core.atomic as atomic
from harness.cli.dispatch import main
from harness.core.atomic import StorageError, atomic_write, atomic_write_text
from harness.evasion.records import RECORD_COLUMNS

ARGS = ["eval", "dataset=digits", "n_samples=60", "batch_size=20", "defense.train.epochs=1", "attack=pgd",
        "attack.steps=3", "progress=false"]


def run(work: Path, *extra: str) -> int:
    return main([*ARGS, f"work_dir={work}", *extra])


def records(run_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "samples.parquet").drop(columns=["time_s"])


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A work dir with two finished runs (seed 0 and seed 1): (work dir, run of seed 0, run of seed 1)."""
    work = tmp_path_factory.mktemp("store")
    assert run(work, "seed=0") == 0 and run(work, "seed=1") == 0
    by_seed = {json.loads((p / "manifest.json").read_text())["seed"]: p for p in (work / "runs").iterdir()}
    return work, by_seed[0], by_seed[1]


@pytest.fixture
def copy(finished, tmp_path) -> tuple[Path, Path, Path]:
    work, r0, r1 = finished
    dst = tmp_path / "work"
    shutil.copytree(work, dst)
    return dst, dst / "runs" / r0.name, dst / "runs" / r1.name


def test_records_have_the_documented_columns(finished):
    _, r0, _ = finished
    assert tuple(pd.read_parquet(r0 / "samples.parquet").columns) == RECORD_COLUMNS
    meta = json.loads(pq.read_schema(r0 / "batches" / "00000.parquet").metadata[b"arena"])
    assert meta["run"] == r0.name and meta["seed"] == 0 and meta["rows"] == 40 and meta["attacks"] == ["clean", "pgd"]


def _rewrite(path: Path, df: pd.DataFrame, meta: bytes | None) -> None:
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata({b"arena": meta} if meta is not None else {})
    pq.write_table(table, path)


def test_resume_takes_only_batches_computed_for_the_plan(finished, copy, capsys):
    work, r0, r1 = copy
    want = records(finished[1])
    for name in ("DONE", "samples.parquet", "summary.json"):
        (r0 / name).unlink()
    batches = r0 / "batches"
    # batch 0: another seed's file (a valid batch of the seed-1 run)
    shutil.copy(r1 / "batches" / "00000.parquet", batches / "00000.parquet")
    # batch 1: 15 of its 20 samples, with metadata that agrees with the rows (a careful forger)
    t = pq.read_table(batches / "00001.parquet")
    meta = json.loads(t.schema.metadata[b"arena"])
    df = t.to_pandas()
    df = df[df["sample_id"].isin(df["sample_id"].unique()[:15])]
    _rewrite(batches / "00001.parquet", df, json.dumps({**meta, "rows": len(df), "n_samples": 15}).encode())
    # batch 2: the right rows but no record of what they were computed for
    _rewrite(batches / "00002.parquet", pq.read_table(batches / "00002.parquet").to_pandas(), None)
    capsys.readouterr()
    assert run(work, "seed=0") == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "does not match the plan" in line]
    assert len(lines) == 3, out
    assert "batches/00000.parquet does not match the plan (it was computed with seed=1; the plan has seed=0); recomputing it" in lines[0]
    assert "(it holds 15 samples; the plan's batch has 20)" in lines[1]
    assert "(it carries no record of what it was computed for)" in lines[2]
    pd.testing.assert_frame_equal(records(r0), want)  # the same records as the untouched run


def test_a_batch_of_another_attack_or_foreign_bytes_is_recomputed(finished, copy, capsys):
    work, r0, _ = copy
    want = records(finished[1])
    for name in ("DONE", "samples.parquet", "summary.json"):
        (r0 / name).unlink()
    t = pq.read_table(r0 / "batches" / "00000.parquet")
    df = t.to_pandas()
    df.loc[df["attack"] == "pgd", "attack"] = "apgd"
    _rewrite(r0 / "batches" / "00000.parquet", df, t.schema.metadata[b"arena"])
    (r0 / "batches" / "00001.parquet").write_bytes(b"PAR1 not really")
    capsys.readouterr()
    assert run(work, "seed=0") == 0
    out = capsys.readouterr().out
    assert "batches/00000.parquet does not match the plan (rows 20..39 are not stage 1 ('pgd'))" in out
    assert "batches/00001.parquet does not match the plan (unreadable (ArrowInvalid))" in out
    pd.testing.assert_frame_equal(records(r0), want)


def _drop_samples(r: Path) -> None:
    """A valid samples.parquet holding 45 of the run's 60 samples."""
    df = pd.read_parquet(r / "samples.parquet")
    df[~df["sample_id"].isin(df["sample_id"].unique()[:15])].to_parquet(r / "samples.parquet", index=False)


def _other(r: Path) -> str:
    return next(p.name for p in r.parent.iterdir() if p.name != r.name)


def _foreign_manifest(r: Path) -> None:
    manifest = json.loads((r / "manifest.json").read_text())
    (r / "manifest.json").write_text(json.dumps({**manifest, "config_hash": "0" * 16}))


DAMAGE = {
    "summary missing": (lambda r: (r / "summary.json").unlink(), "summary.json is missing"),
    "manifest truncated": (lambda r: (r / "manifest.json").write_text((r / "manifest.json").read_text()[:80]),
                           "manifest.json is truncated or not a run manifest"),
    "samples not parquet": (lambda r: (r / "samples.parquet").write_bytes(b"garbage"), "samples.parquet is unreadable (ArrowInvalid)"),
    "samples of 45 samples": (_drop_samples, "samples.parquet changed after the run finished (its sha256 is not the one DONE recorded)"),
    "samples of another run": (lambda r: shutil.copy(r.parent / _other(r) / "samples.parquet", r / "samples.parquet"),
                               "samples.parquet changed after the run finished (its sha256 is not the one DONE recorded)"),
    "marker garbage": (lambda r: (r / "DONE").write_text('{"sha256": '), "DONE is not a completion record (truncated or edited)"),
    "legacy marker, 45 samples": (lambda r: ((r / "DONE").write_text("ok\n"), _drop_samples(r)),
                                  "samples.parquet holds other samples than the manifest's (45 clean records)"),
    "manifest of another run": (_foreign_manifest, "manifest.json describes config 0000000000000000, not this run"),
    "summary a list": (lambda r: (r / "summary.json").write_text("[1, 2]"), "summary.json is truncated or not a JSON object"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_finished_run_is_reported_skipped_and_recomputed(finished, copy, capsys, kind):
    work, r0, r1 = copy
    damage, problem = DAMAGE[kind]
    damage(r0)
    capsys.readouterr()
    # the board skips it, names it, and builds the rest
    assert main(["board", "build", "--work-dir", str(work)]) == 0
    err = capsys.readouterr().err
    assert f"warning: skipped damaged run {r0.name} ({r0}): {problem};" in err, err
    board = pd.read_csv(work / "leaderboard" / "evasion.csv")
    assert list(board["config_hash"]) == [r1.name]
    # the check lists it, exit status 1
    assert main(["board", "check", "--work-dir", str(work)]) == 1
    out = capsys.readouterr().out
    assert f"damaged run {r0.name} ({r0}): {problem};" in out and "1 finished run(s) whole, 1 problem(s)" in out
    # the next evaluation of that config says so and recomputes it
    assert run(work, "seed=0") == 0
    out = capsys.readouterr().out
    assert f"[arena] run {r0.name} ({r0}) is marked complete but {problem}; recomputing it" in out
    pd.testing.assert_frame_equal(records(r0), records(finished[1]))
    assert main(["board", "check", "--work-dir", str(work)]) == 0
    assert "2 finished run(s) whole, 0 problem(s)" in capsys.readouterr().out
    assert len(pd.read_csv(work / "leaderboard" / "evasion.csv")) == 2


def test_a_damaged_run_does_not_stop_other_evaluations(copy, capsys):
    """One bad samples.parquet used to make every later `arena eval` and board build traceback."""
    work, r0, r1 = copy
    (r1 / "samples.parquet").write_bytes(b"")
    assert run(work, "seed=0") == 0  # r0 is finished: skipped, then the board is rebuilt
    captured = capsys.readouterr()
    assert "already complete; skipping" in captured.out
    assert f"warning: skipped damaged run {r1.name}" in captured.err and "Traceback" not in captured.err


def test_a_leaderboard_file_that_is_damaged_is_found_by_check(copy, capsys):
    work, _, _ = copy
    csv = work / "leaderboard" / "evasion.csv"
    csv.write_text(csv.read_text()[:-10])
    assert main(["board", "check", "--work-dir", str(work)]) == 1
    assert f"bad leaderboard '{csv}' is truncated (its last line is incomplete); rebuild it with `arena board build`" in capsys.readouterr().out
    assert main(["board", "build", "--work-dir", str(work)]) == 0
    assert main(["board", "check", "--work-dir", str(work)]) == 0


# ---------------------------------------------------------------------------- the atomic writer


def test_full_disk_at_rename_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "x.json"
    target.write_text("old\n")

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", full)
    with pytest.raises(StorageError, match=r"cannot write .*x.json: no space left on the device \(ENOSPC\); free some space"):
        atomic_write_text(target, "new\n")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


@pytest.mark.parametrize("code, needle", [(errno.EROFS, "the file system is read-only"), (errno.EACCES, "permission denied"),
                                          (errno.EDQUOT, "no space left on the device (EDQUOT)")])
def test_refusals_are_one_line_storage_errors(tmp_path, monkeypatch, code, needle):
    def refuse(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(atomic.os, "fsync", refuse)
    with pytest.raises(StorageError) as exc:
        atomic_write_text(tmp_path / "y.txt", "data")
    assert needle in str(exc.value) and "\n" not in str(exc.value)
    assert not list(tmp_path.iterdir())


def test_a_writer_failing_in_its_own_words_on_a_full_disk(tmp_path, monkeypatch):
    """torch.save reports a full disk as a RuntimeError ("unexpected pos"): the writer asks the file system."""
    class Full:
        f_bavail, f_frsize = 0, 4096

    def torn(path):
        path.write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 77120 vs 77008")

    monkeypatch.setattr(atomic.os, "statvfs", lambda p: Full)
    with pytest.raises(StorageError, match="no space left on the device"):
        atomic_write(tmp_path / "w.pt", torn)
    assert not list(tmp_path.iterdir())
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="unexpected pos"):  # with room on the disk it is a bug: re-raised
        atomic_write(tmp_path / "w.pt", torn)


def test_a_path_through_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(StorageError, match=r"f is a file, not a directory"):
        atomic_write_text(tmp_path / "f" / "sub" / "z.txt", "data")


def _mount_tmpfs(path: Path, options: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0


def test_a_real_full_disk(tmp_path, capsys):
    """A 256 KiB tmpfs: the run stops with one line and exit status 2; nothing is half-written and
    nothing is marked done; with room again the same command finishes."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "size=256k"):
        pytest.skip("needs root and permission to mount a tmpfs")
    try:
        capsys.readouterr()
        assert run(disk / "w", "seed=0") == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and "no space left on the device" in err[0] and "set work_dir=" in err[0], err
        left = [p for p in disk.rglob("*") if p.is_file()]
        assert not [p for p in left if p.name.endswith(".tmp") or p.name == "DONE"], left
        assert all(p.suffix == ".lock" for p in left), left  # only empty lock files remain
        assert os.statvfs(disk).f_bfree * os.statvfs(disk).f_frsize > 200_000, "the failed write still holds its space"
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)
