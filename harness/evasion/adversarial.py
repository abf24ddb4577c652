"""The verified adversarial examples of a run: collected per batch, kept or saved on request.

What is kept is exactly what the harness judged: each attack's returned input after the float
fix-up projection (float32, NCHW, [0, 1]), with the harness's verdict. `harness.evaluate` returns
them; `arena eval save_adv=true` writes `adversarial.npz` in the run directory:

- `ids` (int64): sample ids of the broken samples,
- `x_adv` (float32, N x C x H x W): the verified adversarial example of each (not quantised to
  uint8: rounding could move it out of the ball or back to the right class),
- `attack` (str): the label of the first attack in suite order that broke it.

While a run with `save_adv` is in progress, `batches/NNNNN.adv.npz` holds every verified candidate
of a batch (broken or not), so an interrupted run resumes without losing them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from harness.core.atomic import atomic_write

FILE = "adversarial.npz"


def _savez(path: Path, save, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as fh:  # a file object: numpy would append ".npz" to the temporary name
        save(fh, **arrays)


@dataclass
class Candidates:
    """Every verified candidate of one batch, in attack order."""

    labels: list[str] = field(default_factory=list)
    ids: list[np.ndarray] = field(default_factory=list)
    x_adv: list[np.ndarray] = field(default_factory=list)
    success: list[np.ndarray] = field(default_factory=list)

    def add(self, label: str, ids: torch.Tensor, x_adv: torch.Tensor, success: torch.Tensor) -> None:
        """The `on_verified` hook of `harness.evasion.cascade.evaluate_batch`."""
        self.labels.append(label)
        self.ids.append(ids.detach().cpu().numpy().astype(np.int64))
        self.x_adv.append(x_adv.detach().float().cpu().numpy())
        self.success.append(success.detach().cpu().numpy().astype(bool))

    def save(self, path: Path) -> None:
        arrays = {"labels": np.array(self.labels, dtype=str)}
        for i in range(len(self.labels)):
            arrays.update({f"ids{i}": self.ids[i], f"x{i}": self.x_adv[i], f"ok{i}": self.success[i]})
        atomic_write(path, lambda p: _savez(p, np.savez, arrays))

    @classmethod
    def load(cls, path: Path) -> "Candidates | None":
        try:
            with np.load(path, allow_pickle=False) as f:
                labels = [str(v) for v in f["labels"]]
                return cls(labels, [f[f"ids{i}"] for i in range(len(labels))], [f[f"x{i}"] for i in range(len(labels))],
                           [f[f"ok{i}"] for i in range(len(labels))])
        except Exception:  # absent, foreign or damaged: the batch is recomputed
            return None


def batch_path(run_path: Path, index: int) -> Path:
    return Path(run_path) / "batches" / f"{index:05d}.adv.npz"


def broken(batches: list[Candidates], order: list[str]) -> dict[str, np.ndarray]:
    """`ids`, `x_adv`, `attack` of every broken sample: the first attack in `order` that broke it."""
    rank = {label: i for i, label in enumerate(order)}
    seen: dict[int, tuple[int, np.ndarray, str]] = {}
    for cand in batches:
        for label, ids, x, ok in zip(cand.labels, cand.ids, cand.x_adv, cand.success):
            for j in np.flatnonzero(ok):
                sid = int(ids[j])
                if sid not in seen or rank[label] < seen[sid][0]:
                    seen[sid] = (rank[label], x[j], label)
    sids = sorted(seen)
    shape = next((c.x_adv[0].shape[1:] for c in batches if c.x_adv), (0,))
    x_adv = np.stack([seen[s][1] for s in sids]).astype(np.float32) if sids else np.zeros((0, *shape), np.float32)
    return {"ids": np.array(sids, dtype=np.int64), "x_adv": x_adv, "attack": np.array([seen[s][2] for s in sids], dtype=str)}


def save(run_path: Path, adversarial: dict[str, np.ndarray]) -> Path:
    path = Path(run_path) / FILE
    atomic_write(path, lambda p: _savez(p, np.savez_compressed, adversarial))
    return path


def load(run_path: Path) -> dict[str, np.ndarray] | None:
    path = Path(run_path) / FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in ("ids", "x_adv", "attack")}
