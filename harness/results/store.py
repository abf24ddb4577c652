"""Content-addressed run directories: the per-sample store that leaderboards are rebuilt from.

Layout of one run, `<work_dir>/<kind>/<config hash>/`:
- `manifest.json`  resolved semantic config, package versions, git revision, seed, sample-id hash;
- `batches/NNNNN.parquet`  per-sample records of each finished batch (the resume points);
- `samples.parquet`  all records once the run is complete;
- `summary.json`  aggregates (accuracies, cost);
- `DONE`  completion marker, written last. A directory without it is unfinished: it is resumed,
  never read by a leaderboard build.
Every file is written atomically, so a killed process leaves either nothing or a whole file.
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

from harness.core.atomic import atomic_write, atomic_write_json, atomic_write_text
from harness.core.hashing import stable_hash

DONE = "DONE"
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

    def write_batch(self, index: int, records: pd.DataFrame) -> None:
        atomic_write(self.batch_path(index), lambda p: records.to_parquet(p, index=False))

    def read_batch(self, index: int) -> pd.DataFrame | None:
        path = self.batch_path(index)
        if not path.is_file():
            return None
        try:
            return pd.read_parquet(path)
        except Exception:  # a foreign or damaged file: recompute the batch
            return None

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        existing = self.read_json("manifest.json")
        if existing is not None and existing.get("config_hash") not in (None, manifest.get("config_hash")):
            raise RuntimeError(f"run directory {self.path} belongs to another config")
        atomic_write_json(self.path / "manifest.json", manifest)

    def read_json(self, name: str) -> dict[str, Any] | None:
        path = self.path / name
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None

    def finish(self, samples: pd.DataFrame, summary: dict[str, Any], extra_files: dict[str, str] | None = None) -> None:
        """Write the final records and summary, then the completion marker (last)."""
        atomic_write(self.path / "samples.parquet", lambda p: samples.to_parquet(p, index=False))
        for name, text in (extra_files or {}).items():
            atomic_write_text(self.path / name, text)
        atomic_write_json(self.path / "summary.json", summary)
        atomic_write_text(self.path / DONE, "ok\n")

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


def completed_runs(work_dir: Path, kind: str) -> list[RunDir]:
    """Finished runs of a kind, in a deterministic order (by key)."""
    root = Path(work_dir) / kind
    if not root.is_dir():
        return []
    return [RunDir(p) for p in sorted(root.iterdir()) if p.is_dir() and (p / DONE).is_file()]
