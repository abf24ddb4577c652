"""Content-addressed run directories: the per-sample store that leaderboards are rebuilt from.

Layout of one run, `<work_dir>/<kind>/<config hash>/`:
- `manifest.json`  resolved semantic config, package versions, git revision, seed, sample-id hash;
- `batches/NNNNN.parquet`  per-sample records of each finished batch (the resume points), each
  carrying in its Parquet metadata what it was computed for (run hash, batch, seed, sample ids,
  row count, attack labels), so a resume takes a batch only when it matches the plan;
- `samples.parquet`  all records once the run is complete;
- `summary.json`  aggregates (accuracies, cost);
- `DONE`  completion marker, written last, with the sha256 of `samples.parquet` and
  `manifest.json`. A directory without it is unfinished: it is resumed, never read by a
  leaderboard build.
Every file is written atomically, so a killed process leaves either nothing or a whole file. The
store trusts nothing it reads back: `damage` names what is wrong with a finished run (a file
missing, truncated, unparsable, or not this run's), leaderboard builds skip such runs with a
warning, and the next evaluation of that config recomputes it (`reopen`).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from harness.core.atomic import atomic_write, atomic_write_json, atomic_write_text, strict_dumps
from harness.core.hashing import file_sha256, stable_hash

DONE = "DONE"
BATCH_META = b"arena"  # Parquet key-value metadata of a batch file: what it was computed for
FINAL_FILES = ("samples.parquet", "summary.json")  # in the order `finish` writes them
SEALED = ("samples.parquet", "manifest.json")  # their sha256 is in DONE (summary.json is updated later by health reports)
PACKAGES = ("robustarena", "torch", "torchvision", "hydra-core", "pandas", "pyarrow", "pyautoattack", "kornia", "numpy")


@lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    out["python"] = platform.python_version()
    return out


@lru_cache(maxsize=1)
def git_revision() -> str:
    """`<sha>[+dirty]` of the source tree the harness runs from, or `unknown` outside git."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5).stdout.strip()
        if not sha:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass(frozen=True)
class RunDir:
    """One run's directory."""

    path: Path

    @classmethod
    def for_config(cls, work_dir: Path, kind: str, semantic: dict[str, Any]) -> "RunDir":
        return cls(Path(work_dir) / kind / stable_hash(semantic))

    @property
    def key(self) -> str:
        return self.path.name

    def is_done(self) -> bool:
        return (self.path / DONE).is_file()

    def batch_path(self, index: int) -> Path:
        return self.path / "batches" / f"{index:05d}.parquet"

    def write_batch(self, index: int, records: pd.DataFrame, meta: dict[str, Any] | None = None) -> None:
        """Write one batch's records with `meta` (what they were computed for) in the file itself:
        records and their identity land in one atomic write, so they can never disagree."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(records, preserve_index=False)
        if meta is not None:
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), BATCH_META: strict_dumps(meta, None).encode()})
        atomic_write(self.batch_path(index), lambda p: pq.write_table(table, p))

    def read_batch(self, index: int) -> tuple[pd.DataFrame, dict[str, Any]] | str | None:
        """(records, meta) of a stored batch; None when there is none; a reason (str) when the file
        exists but cannot be used (unreadable, no metadata)."""
        import pyarrow.parquet as pq

        path = self.batch_path(index)
        if not path.is_file():
            return None
        try:
            table = pq.read_table(path)
            raw = (table.schema.metadata or {}).get(BATCH_META)
            records = table.to_pandas()
        except Exception as exc:  # a foreign or damaged file: recompute the batch
            return f"unreadable ({type(exc).__name__})"
        if raw is None:
            return "it carries no record of what it was computed for"
        try:
            meta = json.loads(raw)
        except ValueError:
            return "its metadata is not valid JSON"
        if not isinstance(meta, dict):
            return "its metadata is not a mapping"
        return records, meta

    def write_manifest(self, manifest: dict[str, Any], log=print) -> None:
        existing = self.read_json("manifest.json")
        if existing is not None and existing.get("config_hash") not in (None, manifest.get("config_hash")):
            # a directory under this run's name holding another config's manifest (copied or edited
            # by hand): its batches carry the other run's hash and are recomputed, the manifest replaced
            log(f"[arena] run {self.key}: manifest.json ({self.path}) belongs to config {existing.get('config_hash')}; replacing it")
        atomic_write_json(self.path / "manifest.json", manifest)

    def read_json(self, name: str) -> dict[str, Any] | None:
        """A JSON object from the run directory; None when missing, unreadable, or not an object."""
        path = self.path / name
        if not path.is_file():
            return None
        try:
            obj = json.loads(path.read_text())
        except (ValueError, OSError):  # JSONDecodeError, UnicodeDecodeError, I/O errors
            return None
        return obj if isinstance(obj, dict) else None

    def load_checked(self, required_columns: tuple[str, ...] = ()) -> tuple[dict, dict, pd.DataFrame] | str:
        """(manifest, summary, samples) of a finished run, or what is wrong with its files (a str).

        Checks: manifest.json and summary.json parse as JSON objects; the manifest's config hashes
        to this directory's name; samples.parquet reads, has `required_columns` and records.
        """
        for name in ("manifest.json", "summary.json", "samples.parquet"):
            if not (self.path / name).is_file():
                return f"{name} is missing"
        manifest = self.read_json("manifest.json")
        if manifest is None or not isinstance(manifest.get("config"), dict):
            return "manifest.json is truncated or not a run manifest"
        summary = self.read_json("summary.json")
        if summary is None:
            return "summary.json is truncated or not a JSON object"
        if manifest.get("config_hash") != self.key or stable_hash(manifest["config"]) != self.key:
            return f"manifest.json describes config {manifest.get('config_hash')}, not this run"
        try:
            samples = pd.read_parquet(self.path / "samples.parquet")
        except Exception as exc:
            return f"samples.parquet is unreadable ({type(exc).__name__})"
        missing = [c for c in required_columns if c not in samples.columns]
        if missing:
            return f"samples.parquet lacks the columns {missing}"
        if samples.empty:
            return "samples.parquet holds no records"
        sealed = self._sealed()
        if isinstance(sealed, str):
            return sealed
        for name, digest in sealed.items():
            if file_sha256(self.path / name) != digest:
                return f"{name} changed after the run finished (its sha256 is not the one {DONE} recorded)"
        return manifest, summary, samples

    def _sealed(self) -> dict[str, str] | str:
        """The checksums the completion marker recorded ({} for runs finished before it recorded any),
        or what is wrong with the marker."""
        try:
            text = (self.path / DONE).read_text()
        except (OSError, UnicodeDecodeError):
            return f"{DONE} is unreadable"
        if text == "ok\n":  # written by harness versions before the checksums
            return {}
        try:
            marker = json.loads(text)
            sealed = marker["sha256"]
            assert isinstance(sealed, dict) and all(isinstance(v, str) for v in sealed.values())
        except (ValueError, KeyError, TypeError, AssertionError):
            return f"{DONE} is not a completion record (truncated or edited)"
        unknown = [name for name in sealed if name not in SEALED]
        if unknown:
            return f"{DONE} seals unknown files {unknown}"
        return sealed

    def damage(self, required_columns: tuple[str, ...] = ()) -> str | None:
        """What is wrong with a finished run's files (None when they are whole and this run's)."""
        loaded = self.load_checked(required_columns)
        return loaded if isinstance(loaded, str) else None

    def reopen(self) -> None:
        """Turn a damaged finished run back into an unfinished one: DONE first (so no reader takes
        it as finished meanwhile), then the final files; the validated batches are kept."""
        (self.path / DONE).unlink(missing_ok=True)
        for name in reversed(FINAL_FILES):  # the reverse of `finish`: never a summary without its records
            (self.path / name).unlink(missing_ok=True)

    def finish(self, samples: pd.DataFrame, summary: dict[str, Any], extra_files: dict[str, str] | None = None) -> None:
        """Write the final records and summary, then the completion marker (last).

        The marker records the sha256 of the records and the manifest, so a file replaced or
        changed after the run finished is found (`load_checked`), not read as this run's.
        """
        atomic_write(self.path / "samples.parquet", lambda p: samples.to_parquet(p, index=False))
        for name, text in (extra_files or {}).items():
            atomic_write_text(self.path / name, text)
        atomic_write_json(self.path / "summary.json", summary)
        sealed = {name: file_sha256(self.path / name) for name in SEALED}
        atomic_write_text(self.path / DONE, strict_dumps({"format": 1, "sha256": sealed}, None) + "\n")

    def samples(self) -> pd.DataFrame:
        return pd.read_parquet(self.path / "samples.parquet")


def base_manifest(semantic: dict[str, Any], seed: int) -> dict[str, Any]:
    """Provenance common to every run kind."""
    return {
        "config": semantic,
        "config_hash": stable_hash(semantic),
        "seed": seed,
        "versions": package_versions(),
        "git": git_revision(),
        "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }


def all_runs(work_dir: Path, kind: str) -> list[RunDir]:
    """Every run directory of a kind, finished or not, in a deterministic order (by key)."""
    root = Path(work_dir) / kind
    if not root.is_dir():
        return []
    return [RunDir(p) for p in sorted(root.iterdir()) if p.is_dir()]


def completed_runs(work_dir: Path, kind: str) -> list[RunDir]:
    """Finished runs of a kind, in a deterministic order (by key)."""
    root = Path(work_dir) / kind
    if not root.is_dir():
        return []
    return [RunDir(p) for p in sorted(root.iterdir()) if p.is_dir() and (p / DONE).is_file()]
