"""Launcher presets (conf/launcher/): joblib and submitit's local executor run real sweeps with the
same results as the in-process launcher; a pre-empted submitit job is requeued and resumes from its
last finished batch; Slurm and Ray presets compose (Ray runs only where it is installed)."""
from __future__ import annotations

import importlib.util
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

import attacks  # noqa: F401  (imported before forking)
import defenses  # noqa: F401
import harness.cli.eval  # noqa: F401
from harness.cli import dispatch as cli
from harness.api import run_eval
from harness.cli.hydra_app import CONF_DIR
from harness.core.device import gpu_for_job

BASE = ["dataset=digits", "n_samples=30", "batch_size=10", "defense.train.epochs=1", "attack=pgd", "attack.steps=5",
        "progress=false"]


def launcher(name: str) -> str:
    """`launcher=NAME` once conf/eval.yaml lists the group in its defaults, `+launcher=NAME` before."""
    defaults = yaml.safe_load((CONF_DIR / "eval.yaml").read_text()).get("defaults", [])
    listed = any(isinstance(d, dict) and "launcher" in d for d in defaults)
    return f"launcher={name}" if listed else f"+launcher={name}"


def fork_cli(argv: list[str], log: Path) -> int:
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = open(1, "w", buffering=1, closefd=False)
            sys.stderr = open(2, "w", buffering=1, closefd=False)
            torch.set_num_threads(1)
            code = cli.main(argv)
            ray = sys.modules.get("ray")
            if ray is not None and ray.is_initialized():
                ray.shutdown()  # os._exit skips atexit: stop the local Ray instance here
            loky = sys.modules.get("joblib.externals.loky.reusable_executor")
            if loky is not None and loky._executor is not None:
                loky._executor.shutdown(wait=True)  # and joblib's worker processes
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def wait(pid: int, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError("sweep did not finish in time")


def records(work: Path) -> dict[str, pd.DataFrame]:
    return {p.parent.name: pd.read_parquet(p).drop(columns="time_s") for p in sorted((work / "runs").glob("*/samples.parquet"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, pd.DataFrame]:
    """seed=0 and seed=1 run in-process, one after the other."""
    work = tmp_path_factory.mktemp("inprocess")
    for seed in (0, 1):
        run_eval([*BASE, f"seed={seed}"], work)
    return records(work)


@pytest.mark.slow
@pytest.mark.parametrize("name, extra", [("joblib", ["hydra.launcher.n_jobs=2"]), ("submitit_local", [])])
def test_parallel_launchers_give_the_in_process_results(tmp_path, reference, name, extra):
    work = tmp_path / "w"
    log = tmp_path / "sweep.log"
    code = wait(fork_cli(["eval", "-m", launcher(name), *extra, *BASE, "seed=0,1", f"work_dir={work}"], log))
    assert code == 0, log.read_text()[-3000:]
    got = records(work)
    assert sorted(got) == sorted(reference)
    for key in reference:
        pd.testing.assert_frame_equal(got[key], reference[key])
    assert len(pd.read_csv(work / "leaderboard" / "evasion.csv")) == 2
    if name == "submitit_local":
        assert list((work / "hydra").glob("multirun-*/.submitit/*")), "submitit did not run the jobs"


def _job_pids(marker: str) -> list[int]:
    """Processes running `python -m submitit.core._submit <folder>` with `marker` in the folder."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "submitit.core._submit" in cmd and marker in cmd:
                pids.append(int(entry.name))
    return pids


@pytest.mark.slow
def test_preempted_submitit_job_is_requeued_and_resumes(tmp_path):
    """SIGUSR2 is submitit's pre-emption/timeout signal: the job checkpoints, exits, is requeued,
    recomputes the same run directory and continues from its last finished batch."""
    args = ["dataset=digits", "n_samples=300", "batch_size=10", "defense.train.epochs=1", "attack=pgd",
            "attack.steps=20", "progress=false", "leaderboard.update=false"]
    work = tmp_path / "w"
    log = tmp_path / "sweep.log"
    pid = fork_cli(["eval", "-m", launcher("submitit_local"), *args, "seed=0", f"work_dir={work}"], log)
    deadline = time.monotonic() + 240
    while not list(work.glob("runs/*/batches/00002.parquet")) and time.monotonic() < deadline:
        time.sleep(0.02)
    jobs = _job_pids(str(tmp_path))
    assert jobs, log.read_text()[-2000:]
    kept = {p: p.stat().st_ino for p in work.glob("runs/*/batches/*.parquet")}
    for job in jobs:
        os.kill(job, signal.SIGUSR2)
    assert wait(pid) == 0, log.read_text()[-3000:]
    job_logs = "".join(p.read_text() for p in work.glob("hydra/multirun-*/.submitit/*/*.out"))
    assert "Requeued job" in job_logs, job_logs[-3000:]
    (run,) = list((work / "runs").iterdir())
    assert (run / "DONE").is_file()
    assert all(p.stat().st_ino == ino for p, ino in kept.items()), "finished batches were recomputed"
    assert len(list((run / "batches").glob("*.parquet"))) == 30
    ref = run_eval([*args, "seed=0"], tmp_path / "ref")
    pd.testing.assert_frame_equal(pd.read_parquet(run / "samples.parquet").drop(columns="time_s"),
                                  pd.read_parquet(Path(ref["run_dir"]) / "samples.parquet").drop(columns="time_s"))


def _hydra_launcher(name: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[launcher(name)], return_hydra_config=True)
    return dict(cfg.hydra.launcher)


def test_presets_compose_with_their_settings():
    assert _hydra_launcher("local")["_target_"].endswith("BasicLauncher")
    job = _hydra_launcher("joblib")
    assert job["_target_"].endswith("JoblibLauncher") and job["n_jobs"] >= 1
    slurm = _hydra_launcher("slurm")
    assert slurm["_target_"].endswith("SlurmLauncher")
    assert slurm["gpus_per_node"] == 1 and slurm["max_num_timeout"] > 0 and slurm["timeout_min"] > 0
    assert _hydra_launcher("submitit_local")["_target_"].endswith("LocalLauncher")


def test_ray_preset(tmp_path, capsys):
    if importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is None:
        code = cli.main(["eval", "-m", launcher("ray"), *BASE, f"work_dir={tmp_path}"])
        err = capsys.readouterr().err.strip()
        assert code == 2
        assert err == ("arena eval: error: launcher=ray needs the Hydra plugin 'hydra_ray_launcher', which is not "
                       "installed; pip install 'robustarena[ray]' (hydra-ray-launcher and ray)")
        return
    ray_cfg = _hydra_launcher("ray")
    assert ray_cfg["_target_"].endswith("RayLauncher") and ray_cfg["ray"]["remote"]["max_retries"] >= 1


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install 'robustarena[ray]')")
def test_ray_sweep_on_a_local_instance(tmp_path, reference):
    """A local Ray instance on loopback (ray.init with no address), two jobs as Ray tasks."""
    work = tmp_path / "w"
    log = tmp_path / "sweep.log"
    code = wait(fork_cli(["eval", "-m", launcher("ray"), "hydra.launcher.ray.init.num_cpus=2",
                          "hydra.launcher.ray.init.object_store_memory=100000000",
                          "+hydra.launcher.ray.init.include_dashboard=false", *BASE, "seed=0,1", f"work_dir={work}"], log), 600)
    assert code == 0, log.read_text()[-3000:]
    got = records(work)
    for key in reference:
        pd.testing.assert_frame_equal(got[key], reference[key])


def test_one_job_per_gpu_round_robin():
    assert [gpu_for_job(k, 4) for k in range(6)] == [0, 1, 2, 3, 0, 1]
    assert [gpu_for_job(k, 1) for k in range(3)] == [0, 0, 0]
    assert gpu_for_job(5, 0) == 0
