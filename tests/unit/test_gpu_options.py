"""Device, mixed precision and batch_size=auto (issue 18.4; docs/gpu.md), on CPU and, where a GPU
is visible, on CUDA (the `cuda` variants: bench/gpu_check.sh runs them).

- `device=cuda` variants of device-agnostic paths: a PGD evaluation end to end through `arena
  eval`'s code, and `harness.evaluate` (the sync rule's CUDA variant is in test_no_host_sync.py).
- `evaluator.amp`: the attacks' passes run under autocast where the attack is safe under it, the
  verdict (clean pass and verification) never does, even under a caller's own autocast; the
  manifest says which attacks ran in which precision; float16 on a CPU is a one-line error.
- `batch_size=auto`: 250 on a CPU, the largest batch that fits on a GPU; the run's hash keeps
  `auto`, the manifest records the size, and a resumed run takes the recorded size.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import harness
from harness.api import run_eval
from harness.core.device import AUTO_BATCH_CAP, fit_batch_size, largest_fitting
from harness.evasion import cascade

from helpers import DEVICES, REPO, trained_small_cnn

EPS = 0.1


@pytest.fixture(scope="module")
def cnn(digits) -> nn.Module:
    return trained_small_cnn(digits, epochs=3)


@pytest.fixture(scope="module")
def xy(digits):
    return digits.test_x[:40].float() / 255, digits.test_y[:40]


class Watched(nn.Module):
    """A model that notes, per call, whether autocast was on and whether the harness's verdict called it."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.calls: list[tuple[bool, bool]] = []  # (autocast on, inside the verdict)
        self.in_verdict = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((torch.is_autocast_enabled(x.device.type), self.in_verdict))
        return self.net(x)


def watch_verdicts(monkeypatch, model: Watched) -> None:
    original = cascade.correct_draws

    def judged(*args, **kwargs):
        model.in_verdict = True
        try:
            return original(*args, **kwargs)
        finally:
            model.in_verdict = False

    monkeypatch.setattr(cascade, "correct_draws", judged)


# ------------------------------------------------------------------------------ device variants


@pytest.mark.parametrize("device", DEVICES)
def test_pgd_evaluation_end_to_end_on_each_device(cnn, tmp_path, device):
    """`arena eval`'s path on the device, with a checkpoint trained on the CPU (so that both devices
    evaluate the same weights; the device is not part of the run's hash, hence one work dir each)."""
    torch.save(cnn.state_dict(), tmp_path / "w.pt")
    args = ["dataset=digits", "n_samples=60", "batch_size=30", "defense=checkpoint", "model=small_cnn", "model.width=8",
            "model.hidden=32", f"defense.weights={tmp_path / 'w.pt'}", "attack=pgd", "attack.steps=10", "threat.eps=0.2"]
    summary = run_eval([*args, f"device={device}"], tmp_path / device)
    manifest = json.loads((Path(summary["run_dir"]) / "manifest.json").read_text())
    assert manifest["device"].startswith(device)
    assert 0.0 <= summary["robust_acc"] < summary["clean_acc"] and summary["attacks"]["pgd"]["violations"] == 0
    if device != "cpu":  # the same evaluation on the CPU: the same verdicts up to float rounding at the boundary
        cpu = run_eval([*args, "device=cpu"], tmp_path / "cpu")
        assert abs(cpu["clean_acc"] - summary["clean_acc"]) <= 1 / 60 + 1e-9
        assert abs(cpu["robust_acc"] - summary["robust_acc"]) <= 5 / 60 + 1e-9


@pytest.mark.parametrize("device", DEVICES)
def test_api_evaluate_on_each_device(cnn, xy, device):
    x, y = xy
    res = harness.evaluate(cnn, x.to(device), y.to(device), eps=EPS, suite="quick", device=device)
    cnn.to("cpu")
    assert 0.0 <= res.robust_acc < res.clean_acc and len(res.adversarial) > 0
    assert res.adversarial.x_adv.device.type == "cpu"  # results come back to the host, once, at the end
    with torch.no_grad():
        assert (cnn(res.adversarial.x_adv).argmax(1) != y[torch.from_numpy(res.adversarial.ids)]).all()


# ------------------------------------------------------------------------------ mixed precision


@pytest.mark.parametrize("device, dtype", [("cpu", "bfloat16"), pytest.param("cuda", "bfloat16", marks=pytest.mark.cuda),
                                           pytest.param("cuda", "float16", marks=pytest.mark.cuda)])
def test_amp_runs_safe_attacks_under_autocast_and_the_verdict_in_float32(cnn, xy, tmp_path, monkeypatch, device, dtype):
    x, y = xy
    model = Watched(cnn).eval().to(device)
    watch_verdicts(monkeypatch, model)
    try:
        res = harness.evaluate(model, x, y, eps=EPS, suite=["pgd", {"name": "square", "budget": 20}], amp=dtype,
                               device=device, work_dir=tmp_path)
    finally:
        cnn.to("cpu")
    verdict = [on for on, judged in model.calls if judged]
    attack = [on for on, judged in model.calls if not judged]
    assert verdict and not any(verdict)  # clean pass and every verification: float32
    assert any(attack)  # pgd's passes ran under autocast ...
    assert not all(attack)  # ... square's did not (score differences stay float32)
    manifest = json.loads((res.run_dir / "manifest.json").read_text())
    assert manifest["amp"] == {"dtype": dtype, "verdict": "float32", "autocast": ["pgd"], "float32": ["square"]}
    assert manifest["config"]["evaluator"]["amp"] == dtype and manifest["attacks"]["pgd"]["amp"] == dtype
    assert set(res.samples["attack"]) == {"clean", "pgd", "square"} and res.samples["ran"].any()
    assert 0.0 <= res.robust_acc <= res.clean_acc


def test_the_verdict_is_float32_under_the_callers_own_autocast(cnn, xy, monkeypatch):
    x, y = xy
    model = Watched(cnn).eval()
    watch_verdicts(monkeypatch, model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        harness.attack(model, x, y, "pgd", eps=EPS, steps=3)
    assert any(j for _, j in model.calls) and not any(on for on, j in model.calls if j)


def test_amp_off_keeps_the_run_hash_and_float16_on_cpu_is_refused(cnn, xy, tmp_path):
    x, y = xy
    plain = harness.evaluate(cnn, x, y, eps=EPS, suite=["pgd"], work_dir=tmp_path)
    off = harness.evaluate(cnn, x, y, eps=EPS, suite=["pgd"], amp=False, work_dir=tmp_path)
    on = harness.evaluate(cnn, x, y, eps=EPS, suite=["pgd"], amp="bf16", work_dir=tmp_path)
    assert plain.run_dir == off.run_dir != on.run_dir  # runs from before amp existed keep their hash
    assert "amp" not in json.loads((plain.run_dir / "manifest.json").read_text())["config"]["evaluator"]
    with pytest.raises(harness.UserError, match=r"^evaluator.amp=float16 needs a CUDA device .*use evaluator.amp=bfloat16"):
        harness.evaluate(cnn, x, y, eps=EPS, suite=["pgd"], amp="float16", device="cpu")
    with pytest.raises(harness.UserError, match=r"^evaluator.amp=int8 is not a precision"):
        harness.evaluate(cnn, x, y, eps=EPS, suite=["pgd"], amp="int8")


# ------------------------------------------------------------------------------ batch_size=auto


def test_largest_fitting_doubles_until_the_first_size_that_does_not_fit():
    tried: list[int] = []

    def fits(size: int) -> bool:
        tried.append(size)
        return size <= 300

    assert largest_fitting(1000, fits) == 256 and tried == [16, 32, 64, 128, 256, 512]
    assert largest_fitting(200, lambda s: True) == 200  # capped at the limit
    assert largest_fitting(10, lambda s: True) == 10
    assert largest_fitting(1000, lambda s: False) == 0


def test_batch_size_auto_is_the_default_on_cpu_recorded_and_hashed_as_auto(tmp_path):
    args = ["dataset=digits", "n_samples=30", "defense.train.epochs=1", "attack=fgsm", "batch_size=auto", "device=cpu"]
    first = run_eval(args, tmp_path)
    run = Path(first["run_dir"])
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["config"]["batch_size"] == "auto" and manifest["batch_size_resolved"] == 250
    assert manifest["batch_size_rule"] == "default on cpu"
    assert run_eval(args, tmp_path)["skipped"]  # the same run
    fixed = run_eval([a for a in args if not a.startswith("batch_size")] + ["batch_size=250"], tmp_path)
    assert fixed["run_dir"] != first["run_dir"] and fixed["robust_acc"] == first["robust_acc"]


def test_a_resumed_auto_run_keeps_the_batch_size_it_started_with(tmp_path):
    """A run started on a GPU that chose 10 and resumed on another machine cuts the same batches of 10."""
    from harness.api import compose_config
    from harness.evasion.plan import plan_evaluation
    from harness.evasion.run import execute

    cfg = compose_config(["dataset=digits", "n_samples=30", "defense.train.epochs=1", "attack=fgsm", "batch_size=auto",
                          "device=cpu", f"work_dir={tmp_path}", "progress=false"])
    run = plan_evaluation(cfg).run  # what the first attempt left: its manifest, which says 10
    run.path.mkdir(parents=True)
    (run.path / "manifest.json").write_text(json.dumps({"config_hash": run.key, "batch_size_resolved": 10}))
    out = execute(cfg, log=lambda *_: None)
    assert out.run.path == run.path
    assert sorted(p.name for p in (run.path / "batches").iterdir()) == ["00000.parquet", "00001.parquet", "00002.parquet"]
    manifest = json.loads((run.path / "manifest.json").read_text())
    assert manifest["batch_size_resolved"] == 10 and manifest["batch_size_rule"].startswith("as recorded")


def test_batch_size_auto_with_shards_is_refused_in_one_line(tmp_path):
    with pytest.raises(harness.UserError, match=r"^shard='0/2' needs a fixed batch_size .*set batch_size=250"):
        run_eval(["dataset=digits", "n_samples=30", "attack=fgsm", "batch_size=auto", "shard=0/2"], tmp_path)


@pytest.mark.cuda
def test_batch_size_auto_probes_the_gpu(cnn, digits):
    device = torch.device("cuda")
    size, facts = fit_batch_size(cnn.to(device), digits.test_x[:64].float().div(255).to(device), 2000, device)
    cnn.to("cpu")
    assert 16 <= size <= min(2000, AUTO_BATCH_CAP) and facts["batch_size_probe_peak_bytes"]
    assert fit_batch_size(cnn, digits.test_x[:4].float(), 100, torch.device("cpu"))[0] == 250


# ------------------------------------------------------------------------------ the device check


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is what a machine without CUDA gets")
def test_gpu_check_refuses_without_cuda_in_one_line():
    results = REPO / "bench" / "results" / "gpu.json"
    before = results.stat().st_mtime_ns if results.exists() else None
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == ["gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); "
                                                "run it on a machine with a CUDA GPU"]
    assert (results.stat().st_mtime_ns if results.exists() else None) == before  # nothing written


def test_bench_gpu_checks_its_arguments_before_anything_else():
    done = subprocess.run([sys.executable, str(REPO / "bench" / "bench_gpu.py"), "--parts", "pgd,nope"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2 and "error: --parts='pgd,nope': use a comma-separated subset of tests,pgd,lafeat,syncs" in done.stderr
