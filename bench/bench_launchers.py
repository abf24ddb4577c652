"""Scale-out on Hydra's joblib launcher: a 4-job sweep with 2 workers against 1 worker.

The sweep is the real command, `arena eval -m launcher=joblib hydra.launcher.n_jobs=K seed=0,1,2,3`
on a small but complete job (mnist5k, small_cnn trained for 3 epochs, PGD-40 on 1,000 test digits),
each worker with one torch thread (OMP_NUM_THREADS=1). Every sweep starts from an empty work dir
(no cache, no resume), so both sides do the same work: 4 trainings and 4 evaluations. The two
configurations alternate for `--rounds` rounds (1, 2, 2, 1, ...); the speed-up is taken per
round (wall of the 1-worker sweep / wall of the 2-worker sweep) and reported as min / median /
max, with the CPU time of the whole process tree beside it. On a 2-core machine the ceiling is
2x; process start-up and imports in each worker are part of what a user pays and are included.

    OMP_NUM_THREADS=1 python bench/bench_launchers.py --rounds 5
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import load_average, machine, spread, write_results  # noqa: E402

JOB = ["dataset=mnist5k", "n_samples=1000", "defense.train.epochs=3", "attack=pgd", "attack.steps=40",
       "threat.eps=0.1", "progress=false", "leaderboard.update=false"]


def sweep(workers: int) -> tuple[float, float]:
    """(wall s, CPU s of the process tree) of one 4-job sweep on `workers` joblib workers."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as wd:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "harness.cli", "eval", "-m", "launcher=joblib",
                        f"hydra.launcher.n_jobs={workers}", "seed=0,1,2,3", f"work_dir={wd}", *JOB],
                       check=True, cwd=wd, env=env, capture_output=True)
        wall = time.perf_counter() - t
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    load_start = load_average()
    times: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
    for r in range(args.rounds):
        for k in ((1, 2) if r % 2 == 0 else (2, 1)):
            times[k].append(sweep(k))
            print(f"round {r}: {k} worker(s) {times[k][-1][0]:.1f} s wall", flush=True)
    load_end = load_average()
    wall = {k: [w for w, _ in v] for k, v in times.items()}
    cpu = {k: [c for _, c in v] for k, v in times.items()}
    speedup = [wall[1][r] / wall[2][r] for r in range(args.rounds)]
    command = f"OMP_NUM_THREADS=1 python bench/bench_launchers.py --rounds {args.rounds}"
    payload = {"job": JOB, "jobs": 4, "rounds": args.rounds, "wall_s": wall, "cpu_s": cpu, "speedup_2_vs_1": speedup,
               "load_avg_start": load_start, "load_avg_end": load_end, "cpus": os.cpu_count(), "machine": machine(),
               "command": command}

    def mmm(values: list[float], digits: int = 1) -> str:
        s = spread(values)
        return " / ".join(f"{s[k]:.{digits}f}" for k in ("min", "median", "max"))

    med = spread(speedup)["median"]
    md = ["# Scale-out: joblib launcher, 2 workers vs 1, one 4-job sweep", "",
          f"`{command}`; {machine()['date']}, {machine()['platform']}, {os.cpu_count()} CPUs, one torch thread per "
          f"worker; {args.rounds} rounds, the order alternating; load average {load_start} at the start, {load_end} at "
          f"the end. Job: `arena eval {' '.join(JOB)}` with seeds 0-3, each sweep from an empty work dir.", "",
          "| workers | sweep wall s (min / median / max) | CPU s of the process tree (min / median / max) |", "|---|---|---|"]
    for k in (1, 2):
        md.append(f"| {k} | {mmm(wall[k])} | {mmm(cpu[k])} |")
    verdict = "met" if med >= 1.8 else "**missed**"
    md += ["", f"Speed-up of 2 workers over 1, per round (min / median / max): {mmm(speedup, 2)}x; "
               f"target >= 1.8x on 2 cores: {verdict}."]
    write_results("launchers", payload, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
