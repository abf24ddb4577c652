"""The device check (issue 18.5): what the harness does on a CUDA GPU, in one run of under 8 minutes.

Run it through `bench/gpu_check.sh` (which refuses, exit status 2, on a machine without CUDA) or
directly; it refuses the same way. Parts, in order (`--parts` picks some), each timed, each
skipped with a note once `--budget-s` is spent:

1. tests: the `cuda`-marked tests (`pytest -m cuda`: the device=cuda variants of the PGD
   evaluation, the API, mixed precision, batch_size=auto and the host-sync rule).
2. pgd: harness PGD-50 vs a bare PyTorch PGD loop at L-inf 8/255 on the CIFAR-10 ResNet-18 that
   pyautoattack ships (`pyautoattack/examples/model_test.pt`, standard training; if absent, the
   ../shared ResNet-2B, and the results say so), the first `--n` CIFAR-10 test images of
   ../shared/data, batches of `--batch`. Same work as bench/bench_pgd.py: every implementation
   attacks the harness's clean-correct images in the harness's batches; `--rounds` interleaved
   rounds (order rotating, bench/_common.interleaved), wall time with the device synchronised at
   the end of each run, throughput ratio per round (min / median / max). The harness also runs
   with `evaluator.amp=bfloat16` (its verdict stays float32) as a third variant.
3. lafeat: LAFEAT (the budgeted untargeted + targeted configuration of bench/bench_lafeat.py) vs
   AutoAttack standard (the reference, `suite=standard`) on the ../shared ResNet-2B at L-inf 2/255,
   first `--lafeat-n` images, LAFEAT's head trained on the rest of the file (images n..999, disjoint,
   as bench/bench_lafeat.py does): robust accuracy
   of each, the paired difference with McNemar's exact interval (bench/_common.paired_difference),
   image-passes (head included) and wall time.
4. syncs: the host-sync counts of every attack (tests/unit/test_no_host_sync.py's cases, k and 2k
   iterations) on CUDA, where device-to-host copies are visible too, and on the CPU for comparison.

Writes bench/results/gpu.json and gpu.md (bench/_common.write_results).

    bench/gpu_check.sh                       # everything, defaults below
    python bench/bench_gpu.py --parts pgd --rounds 7
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import (REPO, format_paired, interleaved, load_average, load_shared_model, machine,  # noqa: E402
                           paired_difference, require_shared, spread, write_results)

PARTS = ("tests", "pgd", "lafeat", "syncs")
from bench.bench_pgd import EPS as EPS_PGD, STEPS, bare_pgd  # noqa: E402  (the same bare loop and settings)
EPS_LAFEAT = 2 / 255  # the ResNet-2B's training radius
# bench/bench_lafeat.py's budgeted configuration (LAFEAT_BASE + LAFEAT_UT there)
LAFEAT = {"name": "lafeat", "head": "conv", "head_epochs": 100, "head_augment": "auto", "iterations": 20, "targets": 9,
          "targeted_betas": [0.4], "targeted_iterations": 20}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench_gpu.py", description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--n", type=int, default=1000, help="pgd: first N CIFAR-10 test images (<= 1000)")
    ap.add_argument("--batch", type=int, default=500, help="pgd: evaluated images per batch")
    ap.add_argument("--rounds", type=int, default=5, help="pgd: interleaved rounds (>= 5 for a reported ratio)")
    ap.add_argument("--lafeat-n", type=int, default=200, help="lafeat: first N images (<= 500; the head trains on N..999)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="skip the remaining parts once this much time is spent")
    ap.add_argument("--device", default="cuda", help="the CUDA device to check (cuda or cuda:N)")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        ap.error(f"--parts={args.parts!r}: use a comma-separated subset of {','.join(PARTS)}")
    if not 1 <= args.n <= 1000 or args.batch < 1 or args.rounds < 1 or not 1 <= args.lafeat_n <= 500:
        ap.error("need 1 <= --n <= 1000, --batch >= 1, --rounds >= 1 and 1 <= --lafeat-n <= 500")
    if not str(args.device).startswith("cuda"):
        ap.error(f"--device={args.device!r}: this is the CUDA check; give cuda or cuda:N")
    args.parts = parts
    return args


def refuse_without_cuda() -> None:
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device is visible (torch.cuda.is_available() is False); "
              "run bench/gpu_check.sh on a machine with a CUDA GPU", file=sys.stderr)
        sys.exit(2)


def synced(device: torch.device, fn: Callable[[], Any]) -> Callable[[], Any]:
    """`fn` followed by a device synchronisation, so a wall-clock timing covers the queued work."""
    def run() -> Any:
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out
    return run


def cifar(n: int) -> tuple[torch.Tensor, torch.Tensor, Path]:
    path = require_shared("data", "cifar10_test_first1000.npz")
    with np.load(path) as f:
        return (torch.from_numpy(f["x"][:n]).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(f["y"][:n]).long(), path)


def pyautoattack_resnet18() -> tuple[torch.nn.Module, str]:
    """The ResNet-18 pyautoattack ships (examples/resnet.py + model_test.pt), else the shared ResNet-2B."""
    try:
        import pyautoattack

        folder = Path(pyautoattack.__file__).parent / "examples"
        spec = importlib.util.spec_from_file_location("pyautoattack_example_resnet", folder / "resnet.py")
        module = importlib.util.module_from_spec(spec)
        assert spec.loader is not None
        spec.loader.exec_module(module)
        net = module.ResNet18()
        net.load_state_dict(torch.load(folder / "model_test.pt", map_location="cpu", weights_only=True))
        return net.eval(), "pyautoattack examples/model_test.pt (ResNet-18, standard training)"
    except (ImportError, FileNotFoundError, OSError) as exc:
        return load_shared_model("cifar10_resnet2b"), f"../shared ResNet-2B (pyautoattack's ResNet-18 unavailable: {exc})"


# ------------------------------------------------------------------------------------------ parts
def part_tests(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-m", "cuda", "-p", "no:cacheprovider", "tests"]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    lines = (done.stdout + done.stderr).strip().splitlines()
    summary = next((ln for ln in reversed(lines) if " passed" in ln or " failed" in ln or " error" in ln), "")
    return {"command": " ".join(cmd[1:]), "returncode": done.returncode, "summary": summary.strip("= "),
            "wall_s": time.perf_counter() - start, "tail": lines[-40:]}


def part_pgd(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    import harness

    model, source = pyautoattack_resnet18()
    model.to(device)
    x, y, _ = cifar(args.n)
    xd, yd = x.to(device), y.to(device)
    with torch.no_grad():
        clean = torch.cat([model(xd[i:i + args.batch]).argmax(1) == yd[i:i + args.batch] for i in range(0, args.n, args.batch)])
    work = [(xd[i:i + args.batch][clean[i:i + args.batch]], yd[i:i + args.batch][clean[i:i + args.batch]])
            for i in range(0, args.n, args.batch)]
    attacked = int(clean.sum())
    robust: dict[str, float] = {}

    def run_bare() -> None:
        gen = torch.Generator(device=device).manual_seed(0)
        masks = torch.cat([bare_pgd(model, xb, yb, gen) for xb, yb in work])
        robust["bare"] = float(masks.float().mean())

    def harness_run(label: str, **extra: Any) -> Callable[[], None]:
        def run() -> None:
            out = harness.attack(model, x, y, "pgd", eps=EPS_PGD, steps=STEPS, restarts=1, batch_size=args.batch,
                                 device=str(device), **extra)
            robust[label] = float((~out.success[out.clean_correct]).float().mean())
        return run

    runs = {"harness": harness_run("harness"), "harness amp=bfloat16": harness_run("harness amp=bfloat16", amp="bfloat16"),
            "bare": run_bare}
    for fn in runs.values():  # warm-up: cuDNN autotuning, lazy imports, the CUDA context
        synced(device, fn)()
    load_start = load_average()
    times = interleaved({k: synced(device, fn) for k, fn in runs.items()}, args.rounds)
    wall = {k: [w for w, _ in v] for k, v in times.items()}
    ratio = {k: [wall["bare"][r] / wall[k][r] for r in range(args.rounds)] for k in wall}
    return {"model": source, "n": args.n, "batch": args.batch, "eps": EPS_PGD, "steps": STEPS, "rounds": args.rounds,
            "attacked": attacked, "wall_s": wall, "throughput_ratio_vs_bare": ratio,
            "robust_acc_of_attacked": robust, "load_avg_start": load_start, "load_avg_end": load_average()}


def _robust_mask(run_dir: Path) -> tuple[list[int], list[bool], dict[str, float]]:
    import pandas as pd

    from harness.results.metrics import per_sample_worst

    samples = pd.read_parquet(run_dir / "samples.parquet")
    worst = per_sample_worst(samples)
    attacks = samples[samples["attack"] != "clean"]
    cost = {"forward": float(attacks["n_forward"].sum()), "backward": float(attacks["n_backward"].sum())}  # prepare() included
    return worst.index.tolist(), (worst["worst"] >= worst["draws"]).tolist(), cost


def part_lafeat(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from harness.api import run_eval

    data = require_shared("data", "cifar10_test_first1000.npz")
    folder = require_shared("models", "cifar10_resnet2b")
    base = ["dataset=npz", f"dataset.path={data}", f"n_samples={args.lafeat_n}", "defense=checkpoint",
            f"defense.model_file={folder / 'model.py'}", f"defense.weights={folder / 'weights.pth'}",
            f"threat.eps={EPS_LAFEAT!r}", f"device={device}", "batch_size=500", "progress=false", "leaderboard.update=false"]
    head = [f"attack.head_holdout={1000 - args.lafeat_n}"]  # the head trains on images n..999, never on the reported ones
    lafeat = [f"attack.{k}={v}" for k, v in LAFEAT.items() if k != "name"]  # lists print as [0.4]
    out: dict[str, Any] = {"n": args.lafeat_n, "eps": EPS_LAFEAT, "lafeat": LAFEAT}
    masks = {}
    with tempfile.TemporaryDirectory() as wd:
        for label, overrides in (("lafeat", ["attack=lafeat", *lafeat, *head]), ("autoattack", ["suite=standard"])):
            start = time.perf_counter()
            summary = run_eval([*base, *overrides], Path(wd) / label)
            ids, mask, cost = _robust_mask(Path(summary["run_dir"]))
            masks[label] = (ids, mask)
            out[label] = {"robust_acc": summary["robust_acc"], "clean_acc": summary["clean_acc"], "wall_s": time.perf_counter() - start,
                          **cost}
    assert masks["lafeat"][0] == masks["autoattack"][0], "the two runs evaluated different images"
    out["paired_lafeat_minus_aa"] = paired_difference(masks["lafeat"][1], masks["autoattack"][1])
    aa = out["autoattack"]["forward"] + out["autoattack"]["backward"]
    out["passes_share_of_aa"] = (out["lafeat"]["forward"] + out["lafeat"]["backward"]) / aa if aa else None
    return out


def part_syncs(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "unit")]
    import test_no_host_sync as rule  # the test's cases and counting, not a copy of them

    from harness.core.ensemble import Ensemble
    from harness.data.datasets import load_dataset
    from helpers import trained_small_cnn

    digits = load_dataset({"name": "digits"})
    one, two = trained_small_cnn(digits, epochs=4), trained_small_cnn(digits, epochs=4, seed=1)
    models = {"cnn": one, "ensemble": Ensemble([one, two]).eval()}
    x, y = digits.test_x[:rule.N].float() / 255, digits.test_y[:rule.N]
    rows: dict[str, Any] = {}
    for name, case in sorted(rule.CASES.items()):
        model = models["ensemble" if name == "mora" else "cnn"]
        for dev in ("cpu", str(device)):
            knobs = [None] if case.knob is None else [case.k, 2 * case.k]
            counts = []
            for k in knobs:
                params = dict(case.params) if k is None else {**case.params, case.knob: k}
                c, _ = rule.counted_attack(model, x, y, name, params, dev)
                counts.append({"own": c.own, "third_party": c.third_party, "top": c.top(4)})
            extra = case.k * case.loops if case.knob else 0
            rows.setdefault(name, {})[dev] = {
                "counts": counts, "extra_iterations": extra, "allowed_per_iteration": case.allowed, "why": case.why,
                "own_per_extra_iteration": (counts[1]["own"] - counts[0]["own"]) / extra if extra else None}
    return {"cases": rows, "exit_every": rule.EXIT_EVERY, "host_side": rule.HOST_SIDE}


# ------------------------------------------------------------------------------------------ report
def markdown(payload: dict[str, Any]) -> str:
    m = payload["machine"]
    md = ["# The device check (bench/gpu_check.sh)", "",
          f"`{payload['command']}`; {m['date']}, {payload['gpu']}, {m['platform']}, torch {m['torch']}, CUDA "
          f"{payload['cuda']}; load average {payload['load_avg_start']} at the start. Parts skipped: "
          f"{', '.join(payload['skipped']) or 'none'}; total {payload['wall_s']:.0f} s.", ""]
    parts = payload["parts"]
    if "tests" in parts:
        t = parts["tests"]
        md += ["## CUDA tests", "", f"`{t['command']}`: {t['summary'] or 'no summary line'} (exit {t['returncode']}, "
               f"{t['wall_s']:.0f} s).", ""]
    if "pgd" in parts:
        p = parts["pgd"]

        def mmm(values: list[float], fmt: str = "{:.2f}") -> str:
            s = spread(values)
            return " / ".join(fmt.format(s[k]) for k in ("min", "median", "max"))

        md += [f"## PGD-{p['steps']}: harness vs a bare PyTorch loop", "",
               f"{p['model']}; first {p['n']} CIFAR-10 test images, batches of {p['batch']}, L-inf 8/255; every "
               f"implementation attacks the same {p['attacked']} clean-correct images; {p['rounds']} interleaved rounds "
               f"after one warm-up round; load {p['load_avg_start']} -> {p['load_avg_end']}.", "",
               "| implementation | wall s (min / median / max) | throughput vs bare, per round (min / median / max) | robust acc of attacked |",
               "|---|---|---|---|"]
        for k in p["wall_s"]:
            md.append(f"| {k} | {mmm(p['wall_s'][k])} | {mmm(p['throughput_ratio_vs_bare'][k], '{:.3f}')} | "
                      f"{100 * p['robust_acc_of_attacked'][k]:.1f} % |")
        med = spread(p["throughput_ratio_vs_bare"]["harness"])["median"]
        md += ["", f"Target (issue 18.3, here on a GPU): harness >= 0.95x the bare loop: median {med:.3f}x, "
                   f"{'met' if med >= 0.95 else '**missed**'}.", ""]
    if "lafeat" in parts:
        lf = parts["lafeat"]
        md += ["## LAFEAT vs AutoAttack (ResNet-2B, L-inf 2/255)", "",
               f"First {lf['n']} CIFAR-10 test images; LAFEAT's head trained on images {lf['n']}..999 (disjoint), its passes "
               f"included.", "", "| attack | clean | robust | forward passes | backward passes | wall s |", "|---|---|---|---|---|---|"]
        for k in ("lafeat", "autoattack"):
            r = lf[k]
            md.append(f"| {k} | {100 * r['clean_acc']:.1f} % | {100 * r['robust_acc']:.1f} % | {r['forward']:,.0f} | "
                      f"{r['backward']:,.0f} | {r['wall_s']:.1f} |")
        share = lf["passes_share_of_aa"]
        md += ["", f"LAFEAT minus AutoAttack, paired: {format_paired(lf['paired_lafeat_minus_aa'])}; LAFEAT's passes are "
                   f"{100 * share:.1f} % of AutoAttack's." if share is not None else "", ""]
    if "syncs" in parts:
        s = parts["syncs"]
        md += ["## Host synchronisations per attack", "",
               "Own code inside the attack's `run` (tests/unit/test_no_host_sync.py's cases: 8 digits, k and 2k "
               "iterations); third-party (pyautoattack's own loops) apart; on CUDA device-to-host copies are counted too.", "",
               "| attack | device | own at k / 2k | third-party at k / 2k | own per extra iteration | allowed |", "|---|---|---|---|---|---|"]
        for name, by_dev in s["cases"].items():
            for dev, r in by_dev.items():
                c = r["counts"]
                own = " / ".join(str(v["own"]) for v in c)
                third = " / ".join(str(v["third_party"]) for v in c)
                per = "n/a" if r["own_per_extra_iteration"] is None else f"{r['own_per_extra_iteration']:.2f}"
                md.append(f"| {name} | {dev} | {own} | {third} | {per} | {r['allowed_per_iteration']:.2f} |")
        md.append("")
    return "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    refuse_without_cuda()
    device = torch.device(args.device)
    start = time.perf_counter()
    runners = {"tests": part_tests, "pgd": part_pgd, "lafeat": part_lafeat, "syncs": part_syncs}
    results: dict[str, Any] = {}
    skipped: list[str] = []
    load_start = load_average()
    for part in args.parts:
        if time.perf_counter() - start > args.budget_s:
            skipped.append(f"{part} (time budget of {args.budget_s:.0f} s spent)")
            continue
        print(f"[bench_gpu] {part} ...", flush=True)
        t = time.perf_counter()
        results[part] = runners[part](args, device)
        print(f"[bench_gpu] {part} done in {time.perf_counter() - t:.0f} s", flush=True)
    command = "bench/gpu_check.sh " + " ".join(argv if argv is not None else sys.argv[1:])
    payload = {"command": command.strip(), "gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
               "machine": machine(), "load_avg_start": load_start, "parts": results, "skipped": skipped,
               "wall_s": time.perf_counter() - start}
    write_results("gpu", payload, markdown(payload))
    failed = results.get("tests", {}).get("returncode", 0)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
