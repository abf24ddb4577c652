"""The health report: each check gives pass / warn / fail with evidence, on real small models.

A small CNN is trained on scikit-learn's 8x8 digits (seconds); the "defenses" wrap it: input
quantisation (masked gradients), a forward pass that optimises its input (a dynamic defense),
test-time BN adaptation, Gaussian input noise (randomised), a final softmax (probabilities).
Suite checks run on real evaluator records, including those of a rogue attack that returns
examples outside the ball.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness.core.attack import Attack, AttackResult, register
from harness.core.access import Capability
from harness.core.classifier import Classifier
from harness.health.report import (STATUSES, HealthConfig, build_surrogate, check_determinism, check_inference_optimisation,
                            check_probability_outputs, extra_success_status, mark_summary, run_health, suite_checks,
                            write_report)
from harness.core.threat import ThreatModel

THREAT = ThreatModel("Linf", 0.3)
CFG = HealthConfig(n_samples=60, steps=10, eps_factors=(0.5, 1.0, 2.0), noise_draws=10, square_budget=200, surrogate_epochs=2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(trained CNN, eval x in [0,1], y, ids, surrogate classifier)."""
    from harness.data.datasets import load_dataset
    from harness.data.models import SmallCNN
    from harness.data.training import TrainConfig, accuracy, to_unit, train

    data = load_dataset({"name": "digits"})
    torch.manual_seed(0)  # the initial weights too: the same model on every run
    net = SmallCNN(1, 10, width=8, hidden=32)
    train(net, data.train_x, data.train_y, TrainConfig(epochs=8, batch_size=32, optimizer="adam", lr=0.005, weight_decay=0.0),
          device=torch.device("cpu"), seed=0, progress=False)
    assert accuracy(net, data.test_x, data.test_y, device=torch.device("cpu")) > 0.8
    surrogate, why = build_surrogate(data, CFG, torch.device("cpu"), 1, tmp_path_factory.mktemp("cache"))
    assert surrogate is not None, why
    x = to_unit(data.test_x[:60], torch.device("cpu"))
    return net.eval(), x, data.test_y[:60], data.test_ids[:60], surrogate


class Quantised(nn.Module):
    """Input quantisation to 8 levels: zero gradients almost everywhere (gradient masking)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.round(x * 7) / 7)


class Purifier(nn.Module):
    """A dynamic defense: two gradient steps on the input (entropy minimisation) inside forward."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.detach()
        with torch.enable_grad():
            for _ in range(2):
                z = z.clone().requires_grad_(True)
                p = F.softmax(self.net(z), 1)
                entropy = -(p * p.clamp_min(1e-12).log()).sum()
                z = (z - 0.01 * torch.autograd.grad(entropy, z)[0].sign()).clamp(0, 1).detach()
        return self.net(z)


class Adapting(nn.Module):
    """Test-time adaptation: a BatchNorm layer that updates its statistics on every batch."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(1)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.bn.train()
        z = self.bn(x)
        self.bn.eval()
        return self.net(z.clamp(0, 1))


class Noisy(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x + 0.3 * torch.randn_like(x)).clamp(0, 1))


def _report(model: nn.Module, setup, randomized: bool = False, surrogate: bool = True):
    net, x, y, ids, sur = setup
    clf = Classifier(model, 10, (1, 8, 8), randomized=randomized)
    return run_health(clf, x, y, ids, [THREAT], CFG, seed=0, surrogate=sur if surrogate else None,
                      surrogate_reason="not in this test")[THREAT.name]


def test_clean_model_passes_every_check(setup):
    report = _report(setup[0], setup)
    assert not report.masking_suspected
    statuses = {c.name: c.status for c in report.checks}
    assert "fail" not in statuses.values(), statuses
    assert {c.id for c in report.checks} == {1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12, 19}
    assert all(c.status in STATUSES and c.summary and c.evidence for c in report.checks)
    assert report.get("large_eps").evidence["accuracy"] <= 0.1
    d = report.to_dict()
    assert json.loads(json.dumps(d))["counts"]["fail"] == 0 and len(d["sample_ids"]) == 60
    assert len(d["curves"]["pgd_2x"]["acc"]) == 2 * CFG.steps + 1


def test_quantised_input_is_flagged_with_evidence(setup):
    report = _report(Quantised(setup[0]), setup)
    assert report.masking_suspected
    grads = report.get("gradients")
    ids = set(int(i) for i in setup[3])
    assert grads.status == "fail" and grads.evidence["zero_gradient"] == 60 and set(grads.evidence["zero_ids"]) <= ids
    big = report.get("large_eps")
    assert big.status == "fail" and big.evidence["accuracy"] > 0.5 and big.evidence["survivor_ids"]
    bb = report.get("whitebox_vs_blackbox")
    assert bb.status == "fail" and bb.evidence["probe"]["square_only"] > 0
    assert set(bb.evidence["probe"]["square_only_ids"]) <= ids
    assert report.get("transfer").status in ("warn", "fail")  # an undefended surrogate transfers better than PGD


def test_dynamic_defense_is_detected(setup):
    net, x, *_ = setup
    check = check_inference_optimisation(Classifier(Purifier(net), 10, (1, 8, 8)), x[:16])
    assert check.status == "fail" and check.masking
    assert sum(check.evidence["autograd_calls_in_forward"].values()) >= 4  # 2 steps x 2 forward passes


def test_test_time_adaptation_is_detected(setup):
    report = _report(Adapting(setup[0]), setup, surrogate=False)
    assert report.get("inference_time_optimisation").status == "fail"
    assert "bn.running_mean" in report.get("inference_time_optimisation").evidence["state_changed_by_forward"]
    mode = report.get("model_mode")
    assert mode.status == "fail" and "bn.running_mean" in mode.evidence["state_changed_by_probes"]
    assert report.get("transfer").status == "skip"


def test_randomness_declared_or_not(setup):
    net, x, _, ids, _ = setup
    undeclared = check_determinism(Classifier(Noisy(net), 10, (1, 8, 8)), x, ids, passes=5)
    assert undeclared.status == "fail" and undeclared.evidence["samples_with_prediction_change"] > 0
    assert set(undeclared.evidence["changed_ids"]) <= set(int(i) for i in ids)
    declared = check_determinism(Classifier(Noisy(net), 10, (1, 8, 8), randomized=True), x, ids, passes=5)
    assert declared.status == "pass"
    assert check_determinism(Classifier(net, 10, (1, 8, 8)), x, ids, passes=5).status == "pass"


def test_probability_outputs_fail(setup):
    net, x, *_ = setup
    probs = check_probability_outputs(Classifier(nn.Sequential(net, nn.Softmax(1)), 10, (1, 8, 8)), x)
    assert probs.status == "fail"
    logp = check_probability_outputs(Classifier(nn.Sequential(net, nn.LogSoftmax(1)), 10, (1, 8, 8)), x)
    assert logp.status == "pass" and logp.evidence["log_probabilities"]


def test_extra_success_thresholds():
    cfg = HealthConfig(fail_fraction=0.05, fail_min=2)
    assert extra_success_status(0, 100, cfg) == "pass"
    assert extra_success_status(2, 100, cfg) == "warn"
    assert extra_success_status(5, 100, cfg) == "warn"
    assert extra_success_status(6, 100, cfg) == "fail"
    assert extra_success_status(3, 20, cfg) == "fail"


@register("test_outside_ball")
class OutsideBall(Attack):
    """A broken attack: returns x + 2 eps (outside the ball) for every sample."""

    requires = Capability.GRADIENTS

    def run(self, access, x, y, threat, generator) -> AttackResult:
        return AttackResult((x + 2 * threat.eps).clamp(0, 1))


def test_norm_box_validity_from_real_records(tmp_path):
    from harness.api import compose_config
    from harness.evasion.run import run_evaluation
    from harness.results.store import RunDir

    base = ["dataset=digits", "model=small_cnn", "model.width=8", "model.hidden=32", "defense.train.epochs=1", "n_samples=40",
            f"work_dir={tmp_path}", "progress=false", "threat.eps=0.3"]
    reports = {}
    for name, attack in (("rogue", {"name": "test_outside_ball"}), ("pgd", {"name": "pgd", "steps": 5})):
        cfg = compose_config(base)
        cfg["attack"] = attack
        summary = run_evaluation(cfg, log=lambda *a: None)
        run_dir = Path(summary["run_dir"])
        samples = RunDir(run_dir).samples()
        checks = suite_checks(samples, THREAT, [], CFG)
        assert [c.name for c in checks] == ["norm_box_validity"]
        reports[name] = (checks[0], samples, run_dir)
    rogue, samples, run_dir = reports["rogue"]
    attacked = int(samples[(samples["attack"] != "clean") & samples["ran"]].shape[0])
    assert rogue.status == "fail" and rogue.evidence["violations"] == attacked > 0
    assert rogue.evidence["per_attack"] == {"test_outside_ball": attacked} and rogue.evidence["violating_ids"]
    assert reports["pgd"][0].status == "pass" and reports["pgd"][0].evidence["examples_checked"] > 0
    # the report is stored with the run and the summary gains the flag (other keys kept)
    from harness.health.report import HealthReport

    report = HealthReport(THREAT.name, 40, [], [rogue])
    write_report(run_dir, report)
    before = json.loads((run_dir / "summary.json").read_text())
    mark_summary(run_dir, report)
    after = json.loads((run_dir / "summary.json").read_text())
    assert after["masking_suspected"] is False  # a broken attack is not the defense's masking
    assert after["health"]["failed"] == ["norm_box_validity"]
    assert {k: v for k, v in after.items() if k not in ("masking_suspected", "health")} == before
    assert json.loads((run_dir / "health.json").read_text())["checks"][0]["status"] == "fail"
