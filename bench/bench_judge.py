"""Cost of the judge's guards (harness/evasion/judge.py): the same batch evaluated with and without.

"With" is the evaluator as shipped: the model snapshot compared before and after every stage,
passes counted a second time by hooks at the model, the query ledger, every output the verdict
uses checked. "Without" swaps exactly those pieces for no-ops inside this process (the records
stay identical apart from the cost columns, which this bench checks). Rounds alternate the two,
so machine drift hits both alike; min / median / max of wall and CPU time per round are reported.

Cases: the embedded default (mnist5k, small CNN, quick suite: PGD-CE then PGD-margin), the shared
CIFAR-10 ResNet-2B (quick suite at 2/255) and Square on the small CNN (many small oracle calls:
the worst case for the per-call hook cost).

    python bench/bench_judge.py --rounds 5            # writes bench/results/judge.{json,md}
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import machine, require_shared, write_results  # noqa: E402


class _NullTally:
    """What `PassTally` looks like to the evaluator, doing nothing."""

    def __init__(self, roots: Any, n: int, device: torch.device) -> None:
        self.forward = self.backward = 0
        self._mask = torch.zeros(n, dtype=torch.bool, device=device)

    def __enter__(self) -> "_NullTally":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def nonfinite_mask(self) -> torch.Tensor:
        return self._mask


@contextlib.contextmanager
def judge_off() -> Iterator[None]:
    """Swap the judge's guards for no-ops in `harness.evasion.cascade` (and restore them)."""
    from harness.evasion import cascade, judge

    saved = {k: getattr(cascade, k) for k in ("PassTally", "_check_counts", "model_self_changes", "output_problem")}
    changes = judge.ModelSnapshot.changes
    cascade.PassTally = _NullTally
    cascade._check_counts = lambda *a, **k: None
    cascade.model_self_changes = lambda *a, **k: None
    cascade.output_problem = lambda *a, **k: None
    judge.ModelSnapshot.changes = lambda self, extra=(): None
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(cascade, k, v)
        judge.ModelSnapshot.changes = changes


def prepare(overrides: list[str], work: Path) -> tuple[Any, Any, Any]:
    """Plan, build the defense and prepare the attacks exactly as `arena eval` does (the run's own
    `_Prepared`), without writing a run directory."""
    import attacks  # noqa: F401
    import defenses  # noqa: F401
    from harness.api import compose_config
    from harness.evasion.plan import plan_evaluation
    from harness.evasion.run import _Prepared

    cfg = compose_config([*overrides, f"work_dir={work}", "progress=false", "device=cpu"])
    plan = plan_evaluation(cfg)
    state = _Prepared(plan, cfg, work / "cache", lambda _line: None, None, None, None, write_manifest=False)
    clf = state.get()
    return plan, clf, state.snapshot


def time_case(name: str, overrides: list[str], work: Path, rounds: int) -> dict[str, Any]:
    from harness.evasion.cascade import evaluate_batch

    plan, clf, snapshot = prepare(overrides, work)
    n = int(plan.x.shape[0])
    times: dict[str, list[tuple[float, float]]] = {"with": [], "without": []}
    records: dict[str, Any] = {}
    for r in range(rounds):
        for variant in (("with", "without") if r % 2 == 0 else ("without", "with")):
            ctx = judge_off() if variant == "without" else contextlib.nullcontext()
            with ctx:
                w0, c0 = time.perf_counter(), time.process_time()
                df = evaluate_batch(plan, clf, 0, plan.ids, plan.x, plan.y, snapshot=snapshot)
                times[variant].append((time.perf_counter() - w0, time.process_time() - c0))
            records[variant] = df
    same = ["sample_id", "attack", "ran", "correct_draws", "success", "pred", "linf", "l2", "n_queries", "violation"]
    identical = bool(records["with"][same].equals(records["without"][same]))

    def stats(i: int, v: str) -> dict[str, float]:
        vals = [t[i] for t in times[v]]
        return {"min": min(vals), "median": statistics.median(vals), "max": max(vals)}

    out = {"case": name, "overrides": overrides, "n": n, "rounds": rounds, "records_identical": identical,
           "wall_s": {v: stats(0, v) for v in times}, "cpu_s": {v: stats(1, v) for v in times}}
    out["overhead_median_wall"] = out["wall_s"]["with"]["median"] / out["wall_s"]["without"]["median"] - 1
    out["overhead_median_cpu"] = out["cpu_s"]["with"]["median"] / out["cpu_s"]["without"]["median"] - 1
    print(f"{name}: wall with {out['wall_s']['with']['median']:.2f} s, without {out['wall_s']['without']['median']:.2f} s "
          f"({100 * out['overhead_median_wall']:+.1f} %), records identical: {identical}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=250, help="images per case (one batch)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/arena-bench-judge"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--load", default="unknown", help="what else ran on the machine (written to the results)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = require_shared("data", "cifar10_test_first1000.npz")
    model = require_shared("models", "cifar10_resnet2b")
    n = args.n
    cases = [
        ("embedded default (mnist5k, small CNN, quick suite, Linf 0.3)", [f"n_samples={n}", f"batch_size={n}"]),
        ("ResNet-2B (CIFAR-10, quick suite, Linf 2/255)",
         ["dataset=npz", f"dataset.path={data}", "defense=checkpoint", f"defense.model_file={model / 'model.py'}",
          f"defense.weights={model / 'weights.pth'}", "threat.eps=0.00784313725", f"n_samples={n}", f"batch_size={n}"]),
        ("Square, 1,000 queries (mnist5k, small CNN, Linf 0.3)",
         ["attack=square", "attack.budget=1000", f"n_samples={n}", f"batch_size={n}"]),
    ]
    results = [time_case(name, ov, args.work, args.rounds) for name, ov in cases]
    cmd = f"python bench/bench_judge.py --rounds {args.rounds} --n {n} --threads {args.threads} --load '{args.load}'"
    lines = ["# Cost of the judge's guards", "",
             f"Command: `{cmd}`. Machine: {machine()['platform']}, torch {torch.__version__}, "
             f"{args.threads} thread(s); load: {args.load}. n = {n} images per case, one batch, {args.rounds} interleaved "
             "rounds per variant (wall-clock numbers are only meaningful alone on the machine; "
             "**measured under load** unless the load line says otherwise).", "",
             "| case | wall with (min / median / max) | wall without | CPU with (median) | CPU without (median) | "
             "overhead (median wall) | overhead (median CPU) | records identical |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        w, c = r["wall_s"], r["cpu_s"]
        lines.append(f"| {r['case']} | {w['with']['min']:.2f} / {w['with']['median']:.2f} / {w['with']['max']:.2f} s | "
                     f"{w['without']['min']:.2f} / {w['without']['median']:.2f} / {w['without']['max']:.2f} s | "
                     f"{c['with']['median']:.2f} s | {c['without']['median']:.2f} s | "
                     f"{100 * r['overhead_median_wall']:+.1f} % | {100 * r['overhead_median_cpu']:+.1f} % | {r['records_identical']} |")
    lines += ["", "Per stage the judge adds: two comparisons of the model against its private snapshot (one host "
              "sync each), clones of the stage's images and labels, two Python hooks and one autograd identity per "
              "model call (one row-sum reduction per backward, for the non-finite-gradient flag), one output check "
              "(one sync) per verdict forward."]
    write_results("judge", {"machine": machine(), "load": args.load, "command": cmd, "cases": results}, "\n".join(lines))


if __name__ == "__main__":
    main()
