"""Statelessness audit: replay a random sample of the attack worker's requests in fresh workers.

A model that remembers what it was shown (e.g. returns the logits of a clean input for anything
near it) can fool the attacks themselves, and then every example they return looks robust even to
a fresh judge. What it cannot do is answer the same request the same way in a process that has not
seen its history. So while the suite runs, a reservoir keeps `per_batch` random requests of every
evaluation batch (forward passes and, when the attack asked for one, the VJP), chosen with the
operating system's randomness (not the scoring seed, which a submitter may know). Afterwards audit
worker j, started fresh, replays the j-th kept request of each batch with the same seed: batches
hold disjoint samples, so no audit worker sees two requests about the same image, and a stateless
model must reproduce every logit and gradient (to float tolerance). Any mismatch rejects the
submission (`stateful_model`): its attacks may have been steered, so no number from it is honest.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from harness.submit.remote import Exchange, Session

LOGIT_RTOL = 1e-3  # per row: max |a - b| <= LOGIT_RTOL * (1 + max(|a|, |b|))
GRAD_RTOL = 1e-2  # per row: ||a - b|| <= GRAD_RTOL * (||a|| + ||b||)


class Reservoir:
    """Keeps `per_batch` uniformly random exchanges of each batch (Algorithm R, OS randomness)."""

    def __init__(self, per_batch: int) -> None:
        self.per_batch = int(per_batch)
        self.group: int | None = None
        self.seen: dict[int, int] = {}
        self.kept: dict[int, list[Exchange]] = {}
        self._rng = secrets.SystemRandom()
        self._slot: int | None = None

    def begin(self, group: int) -> None:
        """Requests from now on belong to evaluation batch `group`."""
        self.group = int(group)
        self.seen.setdefault(self.group, 0)
        self.kept.setdefault(self.group, [])

    def wants(self) -> bool:
        """Decide (before anything is copied) whether the next exchange is kept."""
        self._slot = None
        if self.group is None or self.per_batch <= 0:
            return False
        self.seen[self.group] += 1
        k, kept = self.seen[self.group], self.kept[self.group]
        if k <= self.per_batch:
            self._slot = len(kept)
            return True
        j = self._rng.randrange(k)
        if j < self.per_batch:
            self._slot = j
            return True
        return False

    def keep(self, ex: Exchange) -> None:
        assert self.group is not None and self._slot is not None
        kept = self.kept[self.group]
        if self._slot == len(kept):
            kept.append(ex)
        else:
            kept[self._slot] = ex

    def rounds(self) -> list[list[tuple[int, Exchange]]]:
        """Round j: the j-th kept exchange of every batch that has one (one audit worker per round)."""
        out = []
        for j in range(self.per_batch):
            items = [(g, ex[j]) for g, ex in sorted(self.kept.items()) if len(ex) > j]
            if items:
                out.append(items)
        return out

    def facts(self) -> dict[str, Any]:
        return {"per_batch": self.per_batch, "requests_seen": int(sum(self.seen.values())),
                "kept": int(sum(len(v) for v in self.kept.values()))}


def _row_max(a: np.ndarray) -> np.ndarray:
    return np.abs(a).reshape(a.shape[0], -1).max(axis=1) if a.size else np.zeros(a.shape[0])


def logits_mismatch(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rows whose logits differ beyond float tolerance (NaN matches only NaN)."""
    both_nan = np.isnan(a) & np.isnan(b)
    diff = np.where(both_nan, 0.0, np.abs(a - b))
    diff = np.nan_to_num(diff, nan=np.inf, posinf=np.inf)
    scale = np.maximum(np.nan_to_num(_row_max(a), nan=0.0, posinf=0.0), np.nan_to_num(_row_max(b), nan=0.0, posinf=0.0))
    return diff.max(axis=1) > LOGIT_RTOL * (1.0 + scale)


def grads_mismatch(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    fa, fb = a.reshape(a.shape[0], -1).astype(np.float64), b.reshape(b.shape[0], -1).astype(np.float64)
    fa, fb = np.nan_to_num(fa, nan=1e300), np.nan_to_num(fb, nan=1e300)
    diff = np.linalg.norm(fa - fb, axis=1)
    return diff > GRAD_RTOL * (np.linalg.norm(fa, axis=1) + np.linalg.norm(fb, axis=1)) + 1e-12


@dataclass
class AuditResult:
    replayed: int = 0
    with_gradient: int = 0
    mismatched: list[dict[str, Any]] = field(default_factory=list)
    workers: int = 0
    reservoir: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.mismatched

    def as_dict(self) -> dict[str, Any]:
        return {"replayed_requests": self.replayed, "with_gradient": self.with_gradient, "workers": self.workers,
                "mismatched_requests": len(self.mismatched), "mismatches": self.mismatched[:10], **self.reservoir}


def replay(reservoir: Reservoir, fresh: Callable[[str], Session]) -> AuditResult:
    """Replay every kept exchange in fresh workers (one per round) and compare the answers."""
    result = AuditResult(reservoir=reservoir.facts())
    for j, items in enumerate(reservoir.rounds()):
        session = fresh(f"audit-{j}")
        result.workers += 1
        try:
            for group, ex in items:
                x = torch.from_numpy(ex.x)
                grad = ex.grad_out is not None
                out, handle, _ = session.model.forward(x, ex.target, grad=grad, seed=ex.seed)
                bad_rows = logits_mismatch(ex.out, out.numpy())
                what = "logits"
                if grad and handle is not None and not bad_rows.any():
                    g = session.model.vjp(handle, torch.from_numpy(ex.grad_out), tuple(x.shape), torch.device("cpu"))
                    bad_rows = grads_mismatch(ex.grad_in, g.numpy())
                    what = "input gradient"
                    result.with_gradient += 1
                elif grad and handle is None:
                    bad_rows = np.ones(x.shape[0], dtype=bool)
                    what = "differentiability"
                if handle is not None:
                    session.model.release(handle)
                result.replayed += 1
                if bad_rows.any():
                    diff = float(np.nan_to_num(np.abs(ex.out - out.numpy()), nan=math.inf).max()) if what == "logits" else None
                    result.mismatched.append({"batch": group, "round": j, "inputs": int(x.shape[0]), "rows": int(bad_rows.sum()),
                                              "what": what, "grad": grad, "max_logit_diff": diff})
        finally:
            session.close()
    return result
