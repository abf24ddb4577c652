"""A run kept in memory: what `harness.evaluate(...)` without `work_dir` records into.

Same interface as `harness.results.store.RunDir` (the evaluator cannot tell them apart), nothing
written anywhere: no resume, no leaderboard, the records live as long as the object.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from harness.core.hashing import stable_hash


@dataclass
class MemoryRun:
    """One run's records, manifest and summary, in memory."""

    key: str
    batches: dict[int, tuple[pd.DataFrame, dict[str, Any]]] = field(default_factory=dict)
    files: dict[str, Any] = field(default_factory=dict)
    done: bool = False
    path: None = None  # a run directory has one; this run has none

    @classmethod
    def for_config(cls, semantic: dict[str, Any]) -> "MemoryRun":
        return cls(stable_hash(semantic))

    def is_done(self) -> bool:
        return self.done

    def write_batch(self, index: int, records: pd.DataFrame, meta: dict[str, Any] | None = None) -> None:
        self.batches[index] = (records, dict(meta or {}))

    def read_batch(self, index: int) -> tuple[pd.DataFrame, dict[str, Any]] | None:
        return self.batches.get(index)

    def batch_path(self, index: int) -> str:
        return f"<memory>/batch {index}"

    def write_manifest(self, manifest: dict[str, Any], log=None) -> None:
        self.files["manifest.json"] = manifest

    def read_json(self, name: str) -> dict[str, Any] | None:
        return self.files.get(name)

    def finish(self, samples: pd.DataFrame, summary: dict[str, Any], extra_files: dict[str, str] | None = None) -> None:
        self.files.update(extra_files or {})
        self.files["samples"] = samples
        self.files["summary.json"] = summary
        self.done = True

    def samples(self) -> pd.DataFrame:
        return self.files["samples"]

    def load_checked(self, required_columns: tuple[str, ...] = ()) -> tuple[dict, dict, pd.DataFrame] | str:
        """Records in memory were never out of this object's hands: nothing to check."""
        if not self.done:
            return "the run is not finished"
        return self.files.get("manifest.json") or {}, self.files["summary.json"], self.files["samples"]

    def reopen(self) -> None:
        self.done = False
