"""What isolation costs `arena submit`: the scoring suite through the sandboxed worker vs in process.

Same model, same images, same seed, same suite, same evaluator (`harness.evasion.run.run_evaluation`):
once with the model imported into this process (`defense=checkpoint`, what `arena submit` did before
issue 13), once with the model in a sandboxed worker behind the `nn.Module` proxy (what it does now).
The two are interleaved for `--rounds` rounds (the order alternates), and wall time and CPU time
(this process plus every waited child: the workers) are reported as min / median / max. The worker
column "suite" includes starting the attack worker; "verify" is what the sandbox adds after the suite
(the statelessness audit's fresh workers and the fresh-process verdicts). CPU time is this
process's plus, for the worker path, each worker's whole process tree read from /proc just before
it ends. The records of the two paths must be identical (the proxy is exact on the CPU); the
script checks that.

Models: the ../shared LeNet-5 (PGD-trained, MNIST, Linf 0.3) and ResNet-2B (CIFAR-10, Linf 2/255),
first N test images of ../shared/data. Alone on the machine (the lead's timing run):

    OMP_NUM_THREADS=2 python bench/bench_submit.py --rounds 5 --n-lenet 100 --n-resnet 100 --suite submission

(from a worktree without ../shared beside it: `ARENA_SHARED=/path/to/shared python bench/...`)

Quick look (any time, labelled "measured under load" when the machine is busy):

    python bench/bench_submit.py --rounds 2 --n-lenet 16 --n-resnet 16 --suite submission_smoke
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import machine, require_shared, write_results  # noqa: E402

MODELS = {
    "lenet5": {"folder": "mnist_lenet5", "weights": "weights_pgd.pt", "data": "mnist_test_first1000.npz",
               "threat": ("linf", 0.3), "label": "LeNet-5 (PGD-trained), MNIST, Linf 0.3"},
    "resnet2b": {"folder": "cifar10_resnet2b", "weights": "weights.pth", "data": "cifar10_test_first1000.npz",
                 "threat": ("linf", 2 / 255), "label": "ResNet-2B, CIFAR-10, Linf 2/255"},
}
COLUMNS = ["sample_id", "attack", "ran", "correct_draws", "success", "pred", "n_forward", "n_backward", "n_queries"]


def cpu_seconds() -> float:
    """CPU time of this process (the workers' is added from their own process trees, see WorkerStats.cpu_s)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def config(spec: dict[str, Any], bundle: Path, work: Path, suite: str, n: int, batch: int) -> dict[str, Any]:
    from harness.api import compose_config

    norm, eps = spec["threat"]
    cfg = compose_config(["defense=checkpoint", f"suite={suite}", "dataset=npz", f"threat={norm}"])
    cfg["dataset"] = {**cfg["dataset"], "path": str(require_shared("data", spec["data"])), "label": spec["folder"], "num_classes": 10}
    cfg["defense"] = {**cfg["defense"], "model_file": str(bundle / "model.py"), "weights": str(bundle / spec["weights"]),
                      "label": spec["folder"]}
    cfg["threat"] = {"norm": "Linf", "eps": float(eps)}
    cfg.update(seed=0, work_dir=str(work), device="cpu", batch_size=batch, progress=False, n_samples=n)
    return cfg


def timed(fn) -> tuple[Any, float, float]:
    w0, c0 = time.perf_counter(), cpu_seconds()
    out = fn()
    return out, time.perf_counter() - w0, cpu_seconds() - c0


def in_process(cfg: dict[str, Any]) -> tuple[pd.DataFrame, float, float]:
    from harness.evasion.run import run_evaluation

    summary, wall, cpu = timed(lambda: run_evaluation(cfg, log=lambda *a: None))
    return pd.read_parquet(Path(summary["run_dir"]) / "samples.parquet"), wall, cpu


def through_worker(cfg: dict[str, Any], spec: dict[str, Any], bundle: Path, isolation: Any, audit: int) -> dict[str, Any]:
    from harness.data.datasets import load_dataset, select_eval
    from harness.evasion.run import execute
    from harness.submit.audit import Reservoir, replay
    from harness.submit.rejudge import rejudge
    from harness.submit.remote import open_session
    from harness.submit.sandbox import SandboxLimits
    from harness.submit.score import examples_of_candidates

    data = load_dataset(dict(cfg["dataset"]))
    ids, x_u8, y = select_eval(data, cfg["n_samples"])

    workers: list[Any] = []

    def fresh(role: str):
        session = open_session(bundle, "model.py", spec["weights"], isolation=isolation, limits=SandboxLimits(), device="cpu",
                               num_classes=10, input_shape=tuple(data.input_shape), randomized=False, digest=b"\0" * 32,
                               role=role)
        workers.append(session.worker)
        return session

    reservoir = Reservoir(audit)
    captured: dict[str, Any] = {}
    holder: dict[str, Any] = {}

    def attack_classifier():
        holder["session"] = fresh("attack")
        holder["session"].model.tap = reservoir
        return holder["session"].classifier

    def capture(samples, candidates):
        holder.pop("session").close()
        captured["samples"], captured["adv"] = samples, examples_of_candidates(candidates)
        return samples, {}

    cfg = {**cfg, "submission": {"isolation": isolation.level, "verdicts": "bench"}}
    _, suite_wall, suite_cpu = timed(lambda: execute(cfg, log=lambda *a: None, classifier=attack_classifier,
                                                     keep_adversarial=True, before_batch=reservoir.begin, finalize=capture))
    suite_cpu += sum(w.stats.cpu_s for w in workers)  # the attack worker's process tree
    suite_workers = len(workers)

    def verify():
        result = replay(reservoir, fresh)
        clean = {int(i): (x_u8[k].float() / 255).numpy() for k, i in enumerate(ids.tolist())}
        labels = {int(i): int(v) for i, v in zip(ids.tolist(), y.tolist())}
        rej = rejudge(captured["samples"], captured["adv"], clean, labels, fresh, draws=1, randomized=False,
                      batch_size=int(cfg["batch_size"]), seed=0, device=torch.device("cpu"))
        return result, rej

    (audit_result, rej), verify_wall, verify_cpu = timed(verify)
    verify_cpu += sum(w.stats.cpu_s for w in workers[suite_workers:])  # audit and judge workers
    return {"samples": captured["samples"], "suite_wall": suite_wall, "suite_cpu": suite_cpu, "verify_wall": verify_wall,
            "verify_cpu": verify_cpu, "audit_ok": audit_result.passed, "audit_replayed": audit_result.replayed,
            "disagreements": rej.facts["disagreements"], "judges": rej.facts["judges"]}


def stats(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def fmt(s: dict[str, float]) -> str:
    return f"{s['min']:.1f} / {s['median']:.1f} / {s['max']:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n-lenet", type=int, default=100)
    ap.add_argument("--n-resnet", type=int, default=100)
    ap.add_argument("--suite", default="submission")
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--audit-per-batch", type=int, default=2)
    ap.add_argument("--models", default="lenet5,resnet2b")
    ap.add_argument("--isolation", default="auto")
    args = ap.parse_args()

    import attacks  # noqa: F401
    import defenses  # noqa: F401
    from harness.submit.sandbox import detect_isolation

    isolation = detect_isolation(args.isolation)
    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M")
    results: dict[str, Any] = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench-submit-"))
    try:
        for name in [m for m in args.models.split(",") if m]:
            spec = MODELS[name]
            n = args.n_lenet if name == "lenet5" else args.n_resnet
            bundle = tmp / f"bundle-{name}"
            bundle.mkdir()
            for f in ("model.py", spec["weights"]):  # into a temporary bundle, never into the repository
                shutil.copy(require_shared("models", spec["folder"], f), bundle / f)
            rows: dict[str, list[float]] = {k: [] for k in ("in_wall", "in_cpu", "suite_wall", "suite_cpu", "verify_wall", "verify_cpu")}
            exact, facts = True, {}
            for r in range(args.rounds):
                order = ("in", "worker") if r % 2 == 0 else ("worker", "in")
                for which in order:
                    work = tmp / f"work-{name}-{r}-{which}"
                    cfg = config(spec, bundle, work, args.suite, n, args.batch)
                    if which == "in":
                        ref, wall, cpu = in_process(cfg)
                        rows["in_wall"].append(wall)
                        rows["in_cpu"].append(cpu)
                        results.setdefault(name, {})["reference"] = ref
                    else:
                        out = through_worker(cfg, spec, bundle, isolation, args.audit_per_batch)
                        for k in ("suite_wall", "suite_cpu", "verify_wall", "verify_cpu"):
                            rows[k].append(out[k])
                        results.setdefault(name, {})["worker"] = out["samples"]
                        facts = {k: out[k] for k in ("audit_ok", "audit_replayed", "disagreements", "judges")}
                    print(f"{name} round {r} {which}: " + ", ".join(f"{k}={v[-1]:.1f}" for k, v in rows.items() if v), flush=True)
                a = results[name]["reference"][COLUMNS].sort_values(["sample_id", "attack"]).reset_index(drop=True)
                b = results[name]["worker"][COLUMNS].sort_values(["sample_id", "attack"]).reset_index(drop=True)
                exact = exact and a.equals(b)
            s = {k: stats(v) for k, v in rows.items()}
            from harness.results.metrics import accuracies

            robust = accuracies(results[name]["reference"])["robust_acc"]
            results[name] = {"spec": spec["label"], "n": n, "stats": s, "exact": exact, **facts,
                             "suite_ratio_wall": s["suite_wall"]["median"] / s["in_wall"]["median"],
                             "suite_ratio_cpu": s["suite_cpu"]["median"] / s["in_cpu"]["median"],
                             "total_ratio_wall": (s["suite_wall"]["median"] + s["verify_wall"]["median"]) / s["in_wall"]["median"],
                             "total_ratio_cpu": (s["suite_cpu"]["median"] + s["verify_cpu"]["median"]) / s["in_cpu"]["median"],
                             "robust_attack_time": float(robust)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = os.getloadavg()
    busy = max(load_before[0], load_after[0]) > 1.5
    label = (f"**measured under load** (load average {load_before[0]:.1f} at the start, {load_after[0]:.1f} at the end, "
             f"on a machine with {os.cpu_count()} cores): ratios are indicative only; re-time alone"
             if busy else f"measured alone (load average {load_before[0]:.1f} / {load_after[0]:.1f})")
    command = "python bench/bench_submit.py " + " ".join(sys.argv[1:])
    lines = [
        "# arena submit: the scoring suite through the sandboxed worker vs in process",
        "",
        f"Written by `bench/bench_submit.py` ({started}). Command: `{command}`.",
        f"Machine: {machine()}; isolation {isolation.level} ({isolation.mechanism}). {label}.",
        f"Suite `{args.suite}`, seed 0, first N test images, batch {args.batch}, CPU, {args.rounds} interleaved rounds "
        f"(order alternating); audit {args.audit_per_batch} request(s) per batch. Times in seconds, min / median / max; "
        f"CPU = this process plus (worker path) every worker's process tree.",
        "",
        "| model | N | in process: wall | CPU | worker suite (incl. start): wall | CPU | ratio wall | ratio CPU | "
        "+ audit & fresh verdicts: wall | CPU | total ratio wall | CPU | records identical |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        s = r["stats"]
        lines.append(f"| {r['spec']} | {r['n']} | {fmt(s['in_wall'])} | {fmt(s['in_cpu'])} | {fmt(s['suite_wall'])} | "
                     f"{fmt(s['suite_cpu'])} | {r['suite_ratio_wall']:.2f}x | {r['suite_ratio_cpu']:.2f}x | {fmt(s['verify_wall'])} | "
                     f"{fmt(s['verify_cpu'])} | {r['total_ratio_wall']:.2f}x | {r['total_ratio_cpu']:.2f}x | "
                     f"{'yes' if r['exact'] else 'NO'} |")
    lines += ["", "Goal: suite ratio <= 1.3x on the CPU. Per model: robust accuracy "
              + ", ".join(f"{k} {100 * v['robust_attack_time']:.1f} %" for k, v in results.items())
              + "; audit replays and fresh-verdict judges per run: "
              + ", ".join(f"{k} {v.get('audit_replayed')} replays (passed: {v.get('audit_ok')}), {v.get('judges')} judges, "
                          f"{v.get('disagreements')} disagreements" for k, v in results.items()) + ".",
              "", "The worker suite pays one worker start (interpreter + torch, about 2-3 s CPU) and two pipe crossings "
              "of float32 tensors per forward pass and per gradient; the verify column pays one worker start per audit "
              "round and per judge (clean + each stage), each judging one example per sample."]
    payload = {"command": command, "machine": machine(), "load": [load_before, load_after], "isolation": isolation.as_dict(),
               "suite": args.suite, "rounds": args.rounds, "results": results}
    write_results("submit", payload, "\n".join(lines))


if __name__ == "__main__":
    main()
