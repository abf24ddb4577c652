"""The score oracle: the only thing a black-box (`Capability.SCORES`) attack receives.

A `QueryOracle` answers "what scores does the model give these images?" and nothing else. It

- holds the model privately: no public attribute leads to the module, and asking for one
  (`oracle.model`, `oracle.parameters`, ...) raises `OracleAccessError`;
- returns detached scores computed under `torch.no_grad()`: probabilities (`output="probs"`, the
  default and the stricter setting) or logits (`output="logits"`), so no gradient can flow back;
- counts queries per sample: every call names, row by row, the batch-local sample each query
  belongs to (`idx`), and one row is one query of one image;
- enforces the per-sample budget *before* evaluating anything: a call that would take any sample
  past `budget` raises `QueryBudgetExceeded` and neither counts nor evaluates a single row. The
  attack therefore learns nothing from an over-budget call, and a well-behaved attack asks
  `affordable(cost)` first and queries only the samples that can pay for a whole step.

Why raise rather than silently refuse over-budget rows: a refused row would have to come back as
something (NaN, zeros), which an attack can misread as a score; an exception cannot be misread.

The evaluator builds one oracle per batch with `make_oracle`, handing it a `QueryLedger` of its
own: the oracle's scorer charges every evaluated row to the ledger, which no attribute of the
oracle leads to. The oracle's own tally (`_queries`, which enforces the budget) is reachable by an
attack that insists (`oracle._queries.zero_()`); the evaluator therefore checks three ways that
nothing was bent: ledger per sample == the oracle's tally, ledger total == the oracle's model calls
== the passes the judge counts at the model itself (`harness.evasion.judge.PassTally`), and
ledger max <= budget. Records take the ledger's counts.

Python cannot make the module truly unreachable (introspection of closures and the garbage
collector remain); the guard is against accidents and makes a violation explicit in code review.
The evaluator re-verifies every returned example on its own, so a cheating attack still cannot
inflate a result.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from harness.core.errors import UserError

OUTPUTS = ("probs", "logits")
DEFAULT_MAX_ROWS = 8192  # rows per model forward inside one oracle call (memory, not semantics)
_PUBLIC = frozenset(
    {"budget", "n", "num_classes", "input_shape", "output", "queries", "total", "passes",
     "remaining", "exhausted", "affordable", "mark_exhausted", "max_rows"}
)


class QueryBudgetExceeded(RuntimeError):
    """A call would take at least one sample past its query budget (nothing was counted)."""


class OracleAccessError(RuntimeError):
    """A black-box attack asked the oracle for something other than scores (the model, gradients)."""


class QueryLedger:
    """The evaluator's own per-sample query count for one batch (see the module docstring).

    Charged by the oracle's scorer for every row it evaluates, before the model sees it; held by
    the evaluator, reachable from the oracle only through closure introspection.
    """

    def __init__(self, n: int, device: torch.device | str = "cpu") -> None:
        self.queries = torch.zeros(n, dtype=torch.long, device=torch.device(device))
        self.rows = 0  # rows evaluated (== queries.sum(), counted without a device sync)

    def charge(self, idx: torch.Tensor) -> None:
        self.queries.index_add_(0, idx.to(self.queries.device), torch.ones_like(idx, device=self.queries.device))
        self.rows += int(idx.shape[0])


def _make_scorer(module: nn.Module, output: str, max_rows: int,
                 ledger: QueryLedger) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A closure over the module and the ledger: (images, sample idx) -> detached scores, in
    chunks of at most `max_rows`; every row is charged to the ledger before it is evaluated."""

    @torch.no_grad()
    def score(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ledger.charge(idx)
        outs = [module(chunk) for chunk in torch.split(x.detach(), max_rows)]
        logits = torch.cat(outs).float() if outs else torch.empty(0, 0, device=x.device)
        if output == "probs" and logits.numel():
            return torch.softmax(logits, dim=1)
        return logits

    return score


class QueryOracle:
    """Counted, budgeted score queries for one batch of `n` samples.

    Call it as `oracle(x_rows, idx)`: `x_rows` (R, C, H, W) images in [0, 1] float, `idx` (R,) the
    batch-local sample (0..n-1) each row belongs to. Returns (R, num_classes) scores.
    """

    __slots__ = ("_score", "_queries", "_total", "_passes", "_exhausted", "_budget", "_n",
                 "_num_classes", "_input_shape", "_output", "_max_rows")

    def __init__(
        self,
        module: nn.Module,
        *,
        n: int,
        budget: int,
        num_classes: int,
        input_shape: tuple[int, ...],
        output: str = "probs",
        device: torch.device | str = "cpu",
        max_rows: int = DEFAULT_MAX_ROWS,
        ledger: QueryLedger | None = None,
    ) -> None:
        if output not in OUTPUTS:
            raise UserError(f"oracle output={output!r} is not supported; use one of: {', '.join(OUTPUTS)}")
        if not isinstance(budget, int) or budget < 1:
            raise UserError(f"query budget={budget!r} must be a positive integer, e.g. budget=10000")
        if n < 0:
            raise ValueError(f"n={n} must be >= 0")
        device = torch.device(device)
        module.eval()
        counter = {"passes": 0}

        def counted(x: torch.Tensor) -> torch.Tensor:  # raw model image-passes, counted at the model
            counter["passes"] += x.shape[0]
            return module(x)

        ledger = ledger if ledger is not None else QueryLedger(n, device)
        object.__setattr__(self, "_score", _make_scorer(counted, output, max_rows, ledger))  # type: ignore[arg-type]
        object.__setattr__(self, "_passes", counter)
        object.__setattr__(self, "_queries", torch.zeros(n, dtype=torch.long, device=device))
        object.__setattr__(self, "_exhausted", torch.zeros(n, dtype=torch.bool, device=device))
        object.__setattr__(self, "_total", 0)
        object.__setattr__(self, "_budget", int(budget))
        object.__setattr__(self, "_n", int(n))
        object.__setattr__(self, "_num_classes", int(num_classes))
        object.__setattr__(self, "_input_shape", tuple(input_shape))
        object.__setattr__(self, "_output", output)
        object.__setattr__(self, "_max_rows", int(max_rows))

    # ----------------------------------------------------------------------------------- queries
    def __call__(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Scores of `x` (one query per row, charged to sample `idx[row]`)."""
        if x.dim() != 1 + len(self._input_shape) or tuple(x.shape[1:]) != self._input_shape:
            raise ValueError(f"oracle expects images of shape (R, {self._input_shape}); got {tuple(x.shape)}")
        if idx.dim() != 1 or idx.shape[0] != x.shape[0] or idx.dtype != torch.long:
            raise ValueError(f"idx must be a LongTensor of shape ({x.shape[0]},); got {idx.dtype} {tuple(idx.shape)}")
        if x.shape[0] == 0:
            return torch.empty(0, self._num_classes, device=self._queries.device)
        idx = idx.to(self._queries.device)
        bad_idx = (idx < 0) | (idx >= self._n)
        counts = torch.zeros_like(self._queries).index_add_(
            0, idx.clamp(0, max(self._n - 1, 0)), torch.ones_like(idx)
        )
        after = self._queries + counts
        over = after > self._budget
        if bool(bad_idx.any() | over.any()):  # the one host sync per call: enforcement needs it
            if bad_idx.any():
                raise ValueError(f"idx values must lie in [0, {self._n}); got {idx[bad_idx][:5].tolist()}")
            who = over.nonzero().flatten()[:5].tolist()
            raise QueryBudgetExceeded(
                f"query budget {self._budget} per sample would be exceeded for samples {who} "
                f"(had {self._queries[who].tolist()}, asked {counts[who].tolist()}); nothing was evaluated"
            )
        scores = self._score(x, idx)
        if scores.shape != (x.shape[0], self._num_classes):
            raise RuntimeError(f"model returned {tuple(scores.shape)}, expected ({x.shape[0]}, {self._num_classes})")
        self._queries.copy_(after)
        object.__setattr__(self, "_total", self._total + x.shape[0])
        return scores

    def affordable(self, cost: int) -> torch.Tensor:
        """Bool (n,): samples that can still pay `cost` queries. Those that cannot are marked
        exhausted (a failure there is a failure *at budget*, not at an iteration cap)."""
        ok = self._queries + int(cost) <= self._budget
        self._exhausted.logical_or_(~ok)
        return ok

    def mark_exhausted(self, mask: torch.Tensor) -> None:
        """Record that the attack stopped these samples because their budget ran out."""
        self._exhausted.logical_or_(mask.to(self._exhausted.device))

    # -------------------------------------------------------------------------------- read-only
    @property
    def queries(self) -> torch.Tensor:
        """Per-sample query tally (a copy: attacks cannot rewrite it)."""
        return self._queries.clone()

    @property
    def remaining(self) -> torch.Tensor:
        return self._budget - self._queries

    @property
    def exhausted(self) -> torch.Tensor:
        return self._exhausted.clone()

    @property
    def total(self) -> int:
        """All queries answered so far (sum of `queries`)."""
        return self._total

    @property
    def passes(self) -> int:
        """Raw model image-passes spent (counted at the model call; equals `total`)."""
        return self._passes["passes"]

    @property
    def budget(self) -> int:
        return self._budget

    @property
    def n(self) -> int:
        return self._n

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._input_shape

    @property
    def output(self) -> str:
        return self._output

    @property
    def max_rows(self) -> int:
        return self._max_rows

    # ------------------------------------------------------------------------------- the guard
    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        raise OracleAccessError(
            f"a black-box attack may only query scores: QueryOracle has no {name!r} "
            f"(public: {', '.join(sorted(_PUBLIC))}); the model and its gradients are not reachable"
        )

    def __setattr__(self, name: str, value: Any) -> None:
        raise OracleAccessError(f"QueryOracle is read-only; cannot set {name!r}")

    def __reduce__(self):  # pickling would copy the module out
        raise OracleAccessError("QueryOracle cannot be pickled or copied (it would expose the model)")

    def __repr__(self) -> str:
        return (f"QueryOracle(n={self._n}, budget={self._budget}, output={self._output!r}, "
                f"total={self._total})")


def make_oracle(classifier: Any, attack: Any, batch_size: int, device: torch.device | str,
                ledger: QueryLedger | None = None) -> QueryOracle:
    """The oracle the evaluator hands a `Capability.SCORES` attack for one batch of `batch_size`.

    `ledger`: the evaluator's independent per-sample count (see `QueryLedger`).

    Reads the attack's `budget` (queries per sample, required) and `output` ("probs" default or
    "logits"); an attack `view` selects one of the classifier's views as the queried model.
    """
    budget = getattr(attack, "budget", None)
    if budget is None:
        raise UserError(f"attack {getattr(attack, 'name', attack)!r} needs a query budget: set budget=<int>")
    module = classifier.module
    view = getattr(attack, "view", None)
    if view:
        if view not in classifier.views:
            raise UserError(f"attack view={view!r} is not offered by this defense; available: {sorted(classifier.views)}")
        module = classifier.views[view]
    return QueryOracle(
        module,
        n=batch_size,
        budget=int(budget),
        num_classes=classifier.num_classes,
        input_shape=tuple(classifier.input_shape),
        output=getattr(attack, "output", "probs"),
        device=device,
        max_rows=int(getattr(attack, "max_rows", DEFAULT_MAX_ROWS) or DEFAULT_MAX_ROWS),
        ledger=ledger,
    )


def log_scores(scores: torch.Tensor, output: str) -> torch.Tensor:
    """Log-probabilities from oracle scores: log-softmax of logits, or the log of probabilities.

    For probabilities the top class is taken as log1p(-sum of the other probabilities), not
    log(p_top): a float32 p_top rounds to exactly 1.0 once the logit margin exceeds about 17, so
    log(p_top) would be 0 and every finite difference of it (the ZO gradient of log p_y, the
    Fisher) would vanish, while the others' sum still holds the information. The other classes
    are small (< 0.5 whenever the top class is above 0.5), so their plain log is accurate; they are
    clamped at 1e-30 because float32 softmax underflows to exactly 0 beyond a margin of ~100.
    """
    if output == "logits":
        return torch.log_softmax(scores, dim=1)
    logp = scores.clamp_min(1e-30).log()
    top = scores.argmax(1, keepdim=True)
    p_top = scores.gather(1, top)
    rest = scores.scatter(1, top, 0.0).sum(1, keepdim=True)  # sum_{j != top} p_j, no cancellation
    log_top = torch.where(p_top > 0.5, torch.log1p(-rest.clamp(0.0, 0.5)), p_top.clamp_min(1e-30).log())
    return logp.scatter(1, top, log_top)


def query_summary(
    queries: torch.Tensor | np.ndarray,
    success: torch.Tensor | np.ndarray,
    exhausted: torch.Tensor | np.ndarray | None = None,
) -> dict[str, Any]:
    """Black-box summary of one attack: success rate, mean/median queries over successes,
    failures, and failures at budget (exhausted samples that did not succeed)."""
    q = np.asarray(torch.as_tensor(queries).cpu(), dtype=np.int64)
    s = np.asarray(torch.as_tensor(success).cpu(), dtype=bool)
    n = int(s.size)
    out: dict[str, Any] = {
        "n": n,
        "successes": int(s.sum()),
        "success_rate": float(s.mean()) if n else float("nan"),
        "mean_queries": float(q[s].mean()) if s.any() else float("nan"),
        "median_queries": float(np.median(q[s])) if s.any() else float("nan"),
        "total_queries": int(q.sum()),
        "failures": int((~s).sum()),
    }
    if exhausted is not None:
        e = np.asarray(torch.as_tensor(exhausted).cpu(), dtype=bool)
        out["failures_at_budget"] = int((~s & e).sum())
    return out
