"""The robustness health report: automated checks that catch a broken or masked evaluation.

This automates the catalogue of `specs/anchors.md` §4.3 (AutoAttack's `checks.py`, Carlini et al.
2019, Athalye et al. 2018, Pintor et al.'s indicators of attack failure). Each check returns
`pass`, `warn`, `fail` (or `skip`, with the reason, when it cannot run, e.g. no training split for
a transfer surrogate) and its evidence: counts and the sample ids concerned. The report replaces
a maintainer's hand-set "potentially unreliable" bit: a defense is `masking_suspected` when any
check that indicates masked gradients or an unreliable evaluation fails.

Three groups:

- model checks (threat-independent, on the health subset): determinism (1), probability outputs
  (2), inference-time optimisation (3), zero / NaN gradients (4), model mode (19);
- probe-attack checks (per threat model, on the health subset's clean-correct samples): iterative
  at least as strong as single-step (6), success monotone in eps (7), large eps reaching chance
  accuracy (8), white-box at least as strong as black-box per sample (9), transfer from an
  undefended surrogate (10), random-noise search (11), convergence when doubling the iterations
  (12). The probes are the harness's own small attacks, independent of the suite under test;
- suite checks (from the run's per-sample records): norm and box validity of every returned
  example (18) and the suite's own black-box stage against its white-box stages (9).

"Extra success" checks compare a set of samples broken by some means with the set the white-box
probes broke; k samples outside it give pass (k = 0), warn (k small) or fail (k > max(fail_min,
fail_fraction * attacked)). Probe PGD uses the C&W margin loss (no softmax saturation) with step
2.5 eps / steps (Madry) and keeps any iterate that fools the model.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from harness.core.losses import margin
from attacks.pgd import random_start
from harness.core.atomic import atomic_write_json
from harness.core.classifier import Classifier
from harness.core.threat import ThreatModel

STATUSES = ("pass", "warn", "fail", "skip")
REPORT_VERSION = 1
MAX_IDS = 20  # sample ids listed per piece of evidence


@dataclass
class HealthConfig:
    """Budgets and thresholds of the health report (a suite's `health:` mapping overrides them)."""

    n_samples: int = 100  # first N evaluation samples
    passes: int = 5  # determinism: forward passes compared
    steps: int = 20  # probe PGD iterations (convergence doubles them)
    eps_factors: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)  # eps sweep, times the threat's eps
    noise_draws: int = 20  # random-noise search draws per sample
    square_budget: int = 500  # queries per sample for the black-box probe (Square)
    surrogate_model: str = "small_cnn"  # architecture of the undefended transfer surrogate
    surrogate_epochs: int = 2
    decision_draws: int = 5  # randomised models: majority decision over this many draws
    eot: int = 4  # randomised models: gradient draws averaged per probe step
    fail_fraction: float = 0.05  # extra successes above this fraction of attacked samples fail
    fail_min: int = 2  # ... and above this count
    zero_grad_fail_fraction: float = 0.05
    plateau_warn: float = 0.05  # probe loss still rising by > 5% of its total rise in the last 10 steps

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "HealthConfig":
        from harness.core.errors import UserError

        d = dict(d or {})
        valid = set(cls.__dataclass_fields__)
        for k in d:
            if k not in valid:
                raise UserError(f"health.{k} is not a health setting; valid: {', '.join(sorted(valid))}")
        if "eps_factors" in d:
            d["eps_factors"] = tuple(float(e) for e in d["eps_factors"])
        return cls(**d)


@dataclass
class Check:
    """One check's verdict and the evidence behind it."""

    id: int  # number in anchors.md §4.3
    name: str
    status: str
    summary: str
    evidence: dict[str, Any] = field(default_factory=dict)
    masking: bool = True  # a fail here makes the defense `masking_suspected`

    def __post_init__(self) -> None:
        assert self.status in STATUSES, self.status


@dataclass
class HealthReport:
    """All checks for one threat model plus the curves the plots draw."""

    threat: str
    n_samples: int
    sample_ids: list[int]
    checks: list[Check] = field(default_factory=list)
    curves: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def masking_suspected(self) -> bool:
        return any(c.status == "fail" and c.masking for c in self.checks)

    def status_counts(self) -> dict[str, int]:
        return {s: sum(c.status == s for c in self.checks) for s in STATUSES}

    def get(self, name: str) -> Check | None:
        return next((c for c in self.checks if c.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": REPORT_VERSION, "threat": self.threat, "n_samples": self.n_samples,
            "sample_ids": self.sample_ids, "masking_suspected": self.masking_suspected,
            "counts": self.status_counts(), "checks": [asdict(c) for c in self.checks],
            "curves": self.curves, "config": self.config, "wall_s": round(self.wall_s, 2),
        }


# ------------------------------------------------------------------------------------ helpers


def _ids(mask: torch.Tensor, ids: torch.Tensor) -> list[int]:
    return [int(i) for i in ids[mask.cpu()][:MAX_IDS].tolist()]


def extra_success_status(k: int, attacked: int, cfg: HealthConfig) -> str:
    """pass if no extra successes, fail if more than max(fail_min, fail_fraction * attacked), else warn."""
    if k == 0:
        return "pass"
    return "fail" if k > max(cfg.fail_min, cfg.fail_fraction * attacked) else "warn"


def worst_status(*statuses: str) -> str:
    order = {"skip": 0, "pass": 1, "warn": 2, "fail": 3}
    real = [s for s in statuses if s != "skip"]
    return max(real, key=order.__getitem__) if real else "skip"


class Decider:
    """The harness's decision on a batch: one draw, or the majority over draws for randomised models."""

    def __init__(self, clf: Classifier, draws: int) -> None:
        self.clf = clf
        self.draws = draws if clf.randomized else 1

    @torch.no_grad()
    def fooled(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        wrong = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        for _ in range(self.draws):
            wrong += (self.clf.module(x).argmax(1) != y).long()
        return wrong * 2 > self.draws


def _logits(model: nn.Module, x: torch.Tensor, draws: int) -> torch.Tensor:
    out = model(x)
    for _ in range(draws - 1):
        out = out + model(x)
    return out / draws


def _l2_normalize(g: torch.Tensor) -> torch.Tensor:
    return g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (g.dim() - 1)))


@dataclass
class Probe:
    """Outcome of one probe attack: per-sample success, robust accuracy and mean loss per step."""

    fooled: torch.Tensor
    x_adv: torch.Tensor
    acc_curve: list[float] = field(default_factory=list)
    loss_curve: list[float] = field(default_factory=list)


def probe_pgd(model: nn.Module, decider: Decider, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, steps: int,
              gen: torch.Generator, *, start: bool = True, eot: int = 1, single_step: bool = False) -> Probe:
    """Margin-loss PGD (or FGSM with `single_step`: one CE step of size eps from x); any fooling iterate counts.

    `loss_curve` is the mean loss per step over the samples the probe did not break.
    """
    alpha = threat.eps if single_step else 2.5 * threat.eps / steps
    x_adv = random_start(x, threat, gen) if (start and not single_step) else x.clone()
    best = x.clone()
    found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    acc: list[float] = []
    losses: list[torch.Tensor] = []
    for _ in range(1 if single_step else steps):
        x_adv.requires_grad_(True)
        logits = _logits(model, x_adv, eot)
        loss = F.cross_entropy(logits, y, reduction="none") if single_step else margin(logits, y)
        grad = torch.autograd.grad(loss.sum(), x_adv)[0]
        x_adv = x_adv.detach()
        with torch.no_grad():
            now = logits.detach().argmax(1) != y
            best = torch.where((now & ~found).view(-1, 1, 1, 1), x_adv, best)
            found |= now
            acc.append(float(1.0 - found.float().mean()))
            losses.append(loss.detach())
            grad = torch.nan_to_num(grad)
            step = grad.sign() if threat.norm == "Linf" else _l2_normalize(grad)
            x_adv = threat.project(x_adv + alpha * step, x)
    with torch.no_grad():
        last = _logits(model, x_adv, eot).argmax(1) != y
        best = torch.where((last & ~found).view(-1, 1, 1, 1), x_adv, best)
        candidate = torch.where((found | last).view(-1, 1, 1, 1), best, x_adv)
        fooled = decider.fooled(candidate, y)  # the harness's own verdict on the returned example
    acc.append(float(1.0 - fooled.float().mean()))
    # the loss curve that matters for convergence is the survivors' (broken samples keep climbing)
    keep = ~fooled if bool((~fooled).any()) else torch.ones_like(fooled)
    curve = [float(step[keep].mean()) for step in losses]
    return Probe(fooled, candidate, acc, curve)


@torch.no_grad()
def probe_noise(decider: Decider, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, draws: int,
                gen: torch.Generator) -> torch.Tensor:
    """Uniform noise in the ball (Linf: uniform per pixel; L2: random direction at radius eps)."""
    fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for _ in range(draws):
        if threat.norm == "Linf":
            noise = (torch.rand(x.shape, generator=gen, device=x.device) * 2 - 1) * threat.eps
        else:
            noise = _l2_normalize(torch.randn(x.shape, generator=gen, device=x.device)) * threat.eps
        fooled |= decider.fooled((x + noise).clamp(0, 1), y)
    return fooled


def probe_square(clf: Classifier, decider: Decider, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
                 budget: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Square Attack through the counted score oracle: (fooled, queries per sample)."""
    from attacks.square import Square
    from harness.core.oracle import make_oracle

    attack = Square(budget=int(budget))
    oracle = make_oracle(clf, attack, x.shape[0], x.device)
    out = attack.run(oracle, x, y, threat, gen)
    x_adv = threat.project(out.x_adv.detach().float(), x)
    return decider.fooled(x_adv, y), oracle.queries[: x.shape[0]].clone()


# ------------------------------------------------------------------------------- model checks


@torch.no_grad()
def check_determinism(clf: Classifier, x: torch.Tensor, ids: torch.Tensor, passes: int) -> Check:
    outs = torch.stack([clf.module(x).float() for _ in range(passes)])
    normed = outs / outs.flatten(2).norm(dim=2, keepdim=True).clamp_min(1e-12)
    diff = (normed - normed[0]).abs().amax(dim=(0, 2))
    preds = outs.argmax(2)
    flips = (preds != preds[0]).any(0)
    ev = {"passes": passes, "max_normalized_logit_diff": float(diff.max()), "samples_with_prediction_change": int(flips.sum()),
          "changed_ids": _ids(flips, ids), "declared_randomized": clf.randomized}
    varies = bool((diff > 1e-4).any())
    if clf.randomized:
        status = "pass" if varies else "warn"
        text = (f"declared randomised; outputs vary across {passes} passes ({int(flips.sum())} prediction changes)"
                if varies else f"declared randomised but {passes} passes gave identical outputs")
    else:
        status = "fail" if varies else "pass"
        text = (f"declared deterministic but outputs change across {passes} passes (max normalised diff {float(diff.max()):.2g})"
                if varies else f"{passes} forward passes agree (max normalised logit diff {float(diff.max()):.1e})")
    return Check(1, "determinism", status, text, ev, masking=False)


@torch.no_grad()
def check_probability_outputs(clf: Classifier, x: torch.Tensor) -> Check:
    out = clf.module(x).float()
    probs = bool((out >= 0).all() and (out <= 1).all() and torch.allclose(out.sum(1), torch.ones_like(out[:, 0]), atol=1e-4))
    log_probs = bool((out <= 1e-6).all() and torch.allclose(out.logsumexp(1), torch.zeros_like(out[:, 0]), atol=1e-4))
    saturated = int((F.softmax(out, 1).amax(1) == 1.0).sum())  # float32 softmax exactly one-hot: CE gradients vanish
    ev = {"rows_in_unit_interval_summing_to_one": probs, "log_probabilities": log_probs,
          "softmax_saturated_samples": saturated, "n": int(out.shape[0]), "logit_range": [float(out.min()), float(out.max())]}
    if probs:
        return Check(2, "probability_outputs", "fail", "outputs are probabilities (rows in [0,1] summing to 1), not logits", ev)
    note = " (log-probabilities: fine for margins)" if log_probs else ""
    return Check(2, "probability_outputs", "pass", f"outputs are logits{note}; {saturated}/{out.shape[0]} softmax-saturated", ev)


class _AutogradTracer:
    """Counts autograd engine runs and optimiser steps inside a block (AutoAttack's `check_dynamic`).

    Two nets: a profile hook on the autograd engine entry point and on optimiser `step` (catches
    every route, including names imported before the check), installed only when no other
    profiler is active; and wrappers around `torch.autograd.grad` / `backward` and
    `Tensor.backward`, which are always in place during the block.
    """

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def _count(self, label: str) -> None:
        self.calls[label] = self.calls.get(label, 0) + 1

    def _profile(self, frame: Any, event: str, arg: Any) -> None:
        if event != "call":
            return
        name = frame.f_code.co_name
        if name == "_engine_run_backward" or name == "step":
            path = frame.f_code.co_filename.replace("\\", "/")
            if name == "_engine_run_backward" and "/torch/autograd/" in path:
                self._count("autograd engine")
            elif name == "step" and "/torch/optim/" in path:
                self._count("optimizer.step")

    def _wrap(self, fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self._count(label)
            return fn(*args, **kwargs)
        return wrapped

    def __enter__(self) -> "_AutogradTracer":
        self._saved = (torch.autograd.grad, torch.autograd.backward, torch.Tensor.backward)
        torch.autograd.grad = self._wrap(self._saved[0], "torch.autograd.grad")  # type: ignore[assignment]
        torch.autograd.backward = self._wrap(self._saved[1], "torch.autograd.backward")  # type: ignore[assignment]
        torch.Tensor.backward = self._wrap(self._saved[2], "Tensor.backward")  # type: ignore[method-assign]
        self._profiling = sys.getprofile() is None
        if self._profiling:
            sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._profiling:
            sys.setprofile(None)
        torch.autograd.grad, torch.autograd.backward, torch.Tensor.backward = self._saved  # type: ignore[assignment]


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], module: nn.Module) -> list[str]:
    after = module.state_dict()
    return sorted(k for k, v in before.items() if k not in after or not torch.equal(v, after[k].detach()))


def check_inference_optimisation(clf: Classifier, x: torch.Tensor) -> Check:
    """Trace backward passes and optimiser steps during plain forward passes (no_grad and grad mode)."""
    before = _state(clf.module)
    with _AutogradTracer() as tracer:
        with torch.no_grad():
            clf.module(x)
        clf.module(x.clone().requires_grad_(True))
    changed = _changed(before, clf.module)
    ev = {"autograd_calls_in_forward": tracer.calls, "state_changed_by_forward": changed[:MAX_IDS]}
    if tracer.calls or changed:
        what = ", ".join(f"{k} x{v}" for k, v in tracer.calls.items()) or "no autograd calls"
        return Check(3, "inference_time_optimisation", "fail",
                     f"the forward pass runs optimisation ({what}; {len(changed)} state tensors changed): a dynamic defense, "
                     f"attack it adaptively (BPDA/EOT)", ev)
    return Check(3, "inference_time_optimisation", "pass", "no backward pass, optimiser step or state change inside forward", ev)


def check_gradients(clf: Classifier, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, cfg: HealthConfig) -> Check:
    """Margin-loss input gradients: graph intact, non-zero per sample, finite."""
    xg = x.clone().requires_grad_(True)
    logits = _logits(clf.differentiable, xg, cfg.eot if clf.randomized else 1)
    if not logits.requires_grad:
        return Check(4, "gradients", "fail", "the output does not depend differentiably on the input (graph interrupted: "
                     "no_grad, detach or numpy inside the model)", {"n": int(x.shape[0])})
    loss = margin(logits, y).sum()
    grad = torch.autograd.grad(loss, xg, allow_unused=True)[0]
    if grad is None:
        grad = torch.zeros_like(x)
    flat = grad.detach().flatten(1)
    nonfinite = ~torch.isfinite(flat).all(1)
    zero = (torch.nan_to_num(flat).abs().sum(1) == 0) & ~nonfinite
    n = int(x.shape[0])
    ev = {"n": n, "zero_gradient": int(zero.sum()), "zero_ids": _ids(zero, ids), "nonfinite_gradient": int(nonfinite.sum()),
          "nonfinite_ids": _ids(nonfinite, ids), "mean_l1": float(torch.nan_to_num(flat).abs().sum(1).mean())}
    if int(nonfinite.sum()) > 0 or int(zero.sum()) > max(1, cfg.zero_grad_fail_fraction * n):
        status = "fail"
    else:
        status = "warn" if int(zero.sum()) else "pass"
    text = f"{int(zero.sum())}/{n} samples with zero input gradient, {int(nonfinite.sum())} with NaN/Inf"
    return Check(4, "gradients", status, text, ev)


def check_model_mode(clf: Classifier, before: dict[str, torch.Tensor]) -> Check:
    """Every module in eval mode, and parameters/buffers (BN statistics) unchanged by the probes."""
    training = [name or "(root)" for name, m in clf.module.named_modules() if m.training]
    changed = _changed(before, clf.module)
    ev = {"modules_in_training_mode": training[:MAX_IDS], "state_changed_by_probes": changed[:MAX_IDS]}
    if training or changed:
        return Check(19, "model_mode", "fail", f"{len(training)} modules in training mode, {len(changed)} state tensors "
                     f"changed during the probes (BN statistics or weights adapt at test time)", ev)
    return Check(19, "model_mode", "pass", "eval mode throughout; parameters and buffers unchanged by the probes", ev)


def model_checks(clf: Classifier, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, cfg: HealthConfig) -> list[Check]:
    """Threat-independent checks (1, 2, 3, 4); `model_mode` (19) is added after the probes."""
    return [
        check_determinism(clf, x, ids, cfg.passes),
        check_probability_outputs(clf, x),
        check_inference_optimisation(clf, x),
        check_gradients(clf, x, y, ids, cfg),
    ]


# ------------------------------------------------------------------------------ probe checks


def unbounded_threat(threat: ThreatModel, shape: tuple[int, ...]) -> ThreatModel:
    """The whole input box: eps 1 (Linf) or the box diagonal (L2)."""
    return ThreatModel("Linf", 1.0) if threat.norm == "Linf" else ThreatModel("L2", math.sqrt(math.prod(shape)))


def attack_checks(clf: Classifier, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, threat: ThreatModel,
                  cfg: HealthConfig, gen: torch.Generator, surrogate: Classifier | None = None,
                  surrogate_reason: str = "") -> tuple[list[Check], dict[str, Any]]:
    """Checks 6-12 with the probe attacks, on the clean-correct samples of (x, y)."""
    decider = Decider(clf, cfg.decision_draws)
    correct = ~decider.fooled(x, y)
    xs, ys, sid = x[correct], y[correct], ids[correct.cpu()]
    m = int(xs.shape[0])
    n = int(x.shape[0])
    model = clf.differentiable
    eot = cfg.eot if clf.randomized else 1
    curves: dict[str, Any] = {"attacked": m, "n": n}
    if m == 0:
        skip = "no clean-correct sample in the health subset"
        return [Check(i, name, "skip", skip) for i, name in ((6, "iterative_vs_single_step"), (7, "monotone_eps"),
                (8, "large_eps"), (9, "whitebox_vs_blackbox"), (10, "transfer"), (11, "random_noise"), (12, "convergence"))], curves

    def pgd(t: ThreatModel, steps: int, start: bool = True, single: bool = False, target: nn.Module | None = None) -> Probe:
        return probe_pgd(target if target is not None else model, decider, xs, ys, t, steps, gen, start=start,
                         eot=1 if target is not None else eot, single_step=single)

    checks: list[Check] = []
    # eps sweep (7), the main white-box probe is the factor-1 run
    factors = sorted(set(cfg.eps_factors) | {1.0})
    sweep: dict[float, Probe] = {}
    for f in factors:
        eps = threat.eps * f
        if threat.norm == "Linf":
            eps = min(eps, 1.0)
        sweep[f] = pgd(ThreatModel(threat.norm, eps), cfg.steps)
    main = sweep[1.0]
    long = pgd(threat, 2 * cfg.steps)
    fgsm = pgd(threat, 1, single=True)
    whitebox = main.fooled | long.fooled | fgsm.fooled
    # A randomised model's verdict is itself random: re-deciding the same examples flips some.
    # Comparisons of success sets count only what exceeds that observed noise floor.
    floor = int((decider.fooled(main.x_adv, ys) != main.fooled).sum()) if clf.randomized else 0
    curves["decision_noise_floor"] = floor

    def status(k: int) -> str:
        return extra_success_status(max(0, k - floor), m, cfg)

    curves["eps_sweep"] = {"eps": [threat.eps * f if threat.norm != "Linf" else min(threat.eps * f, 1.0) for f in factors],
                           "robust_acc": [float((correct.sum() - sweep[f].fooled.sum()) / n) for f in factors]}
    share = m / n  # probe curves are over the clean-correct samples; stored as robust accuracy over the subset
    curves["pgd"] = {"steps": cfg.steps, "acc": [a * share for a in main.acc_curve], "loss": main.loss_curve}
    curves["pgd_2x"] = {"steps": 2 * cfg.steps, "acc": [a * share for a in long.acc_curve], "loss": long.loss_curve}

    # (6) iterative >= single step
    extra = fgsm.fooled & ~(main.fooled | long.fooled)
    k = int(extra.sum())
    checks.append(Check(6, "iterative_vs_single_step", status(k),
                        f"FGSM broke {int(fgsm.fooled.sum())}, PGD-{cfg.steps} {int(main.fooled.sum())} of {m}; "
                        f"{k} broken by FGSM only", {"attacked": m, "fgsm": int(fgsm.fooled.sum()), "pgd": int(main.fooled.sum()),
                                                      "fgsm_only": k, "fgsm_only_ids": _ids(extra, sid)}))

    # (7) monotone in eps: a sample broken at a smaller eps must stay broken at every larger eps
    violations = torch.zeros(m, dtype=torch.bool, device=xs.device)
    pairs = []
    for a, b in zip(factors, factors[1:]):
        lost = sweep[a].fooled & ~sweep[b].fooled
        violations |= lost
        pairs.append({"eps_from": threat.eps * a, "eps_to": threat.eps * b, "lost": int(lost.sum())})
    k = int(violations.sum())
    accs = curves["eps_sweep"]["robust_acc"]
    nonmono = [i for i in range(1, len(accs)) if accs[i] > accs[i - 1] + 1e-9]
    verdict = status(k)
    if nonmono:
        verdict = worst_status(verdict, "warn")
    checks.append(Check(7, "monotone_eps", verdict,
                        f"{k} samples broken at a smaller eps but not at a larger one; robust accuracy along eps "
                        + ", ".join(f"{a:.3g}" for a in accs), {"pairs": pairs, "violating_ids": _ids(violations, sid),
                                                                 "robust_acc": accs, "eps": curves["eps_sweep"]["eps"]}))

    # (8) large eps: the whole box must bring accuracy down to chance (gradient attack from x, no random start)
    big = unbounded_threat(threat, tuple(x.shape[1:]))
    unb = pgd(big, cfg.steps, start=False)
    acc_big = float((correct.sum() - unb.fooled.sum()) / n)
    chance = 1.0 / clf.num_classes
    survivors = ~unb.fooled
    verdict = "pass" if acc_big <= chance + 1e-9 else ("warn" if acc_big <= 2 * chance else "fail")
    checks.append(Check(8, "large_eps", verdict, f"PGD with {big.norm} eps={big.eps:.3g} (the whole box) leaves accuracy "
                        f"{100 * acc_big:.1f}% (chance {100 * chance:.1f}%)",
                        {"eps": big.eps, "accuracy": acc_big, "chance": chance, "survivors": int(survivors.sum()),
                         "survivor_ids": _ids(survivors, sid)}))
    curves["unbounded"] = {"eps": big.eps, "acc": [a * share for a in unb.acc_curve]}

    # (9) white-box >= black-box, per sample (Square through the counted oracle)
    sq, queries = probe_square(clf, decider, xs, ys, threat, cfg.square_budget, gen)
    extra = sq & ~whitebox
    k = int(extra.sum())
    curves["square_queries"] = [int(q) for q in queries[sq].tolist()]
    checks.append(Check(9, "whitebox_vs_blackbox", status(k),
                        f"Square ({cfg.square_budget} queries) broke {int(sq.sum())} of {m}; {k} of them resisted the white-box probes",
                        {"probe": {"attacked": m, "square": int(sq.sum()), "whitebox": int(whitebox.sum()), "square_only": k,
                                   "square_only_ids": _ids(extra, sid), "budget": cfg.square_budget}}))

    # (10) transfer from an undefended surrogate
    if surrogate is None:
        checks.append(Check(10, "transfer", "skip", surrogate_reason or "no surrogate available"))
    else:
        tr = pgd(threat, cfg.steps, target=surrogate.differentiable)
        extra = tr.fooled & ~whitebox
        k = int(extra.sum())
        checks.append(Check(10, "transfer", status(k),
                            f"adversarials from an undefended {cfg.surrogate_model} broke {int(tr.fooled.sum())} of {m}; "
                            f"{k} of them resisted the white-box probes",
                            {"attacked": m, "transfer": int(tr.fooled.sum()), "transfer_only": k,
                             "transfer_only_ids": _ids(extra, sid), "surrogate": surrogate.info.get("surrogate", {})}))

    # (11) random noise
    noise = probe_noise(decider, xs, ys, threat, cfg.noise_draws, gen)
    extra = noise & ~whitebox
    k = int(extra.sum())
    checks.append(Check(11, "random_noise", status(k),
                        f"uniform noise ({cfg.noise_draws} draws) broke {int(noise.sum())} of {m}; {k} of them resisted the white-box probes",
                        {"attacked": m, "noise": int(noise.sum()), "noise_only": k, "noise_only_ids": _ids(extra, sid),
                         "draws": cfg.noise_draws}))

    # (12) convergence: doubling the iterations must not add many successes; the loss should plateau
    extra = long.fooled & ~main.fooled
    k = int(extra.sum())
    verdict = status(k)
    lc = long.loss_curve
    rise = lc[-1] - lc[0] if lc else 0.0
    tail = lc[-1] - lc[-11] if len(lc) > 10 else 0.0
    still_rising = rise > 0 and tail > cfg.plateau_warn * rise
    if still_rising:
        verdict = worst_status(verdict, "warn")
    checks.append(Check(12, "convergence", verdict,
                        f"PGD-{cfg.steps} broke {int(main.fooled.sum())}, PGD-{2 * cfg.steps} {int(long.fooled.sum())} of {m} "
                        f"({k} more); loss rise in the last 10 steps {100 * tail / rise if rise > 0 else 0:.1f}% of the total",
                        {"attacked": m, "pgd": int(main.fooled.sum()), "pgd_2x": int(long.fooled.sum()), "added": k,
                         "added_ids": _ids(extra, sid), "loss_tail_fraction": (tail / rise) if rise > 0 else 0.0}))
    return checks, curves


# ------------------------------------------------------------------------------ suite checks


def suite_checks(samples: pd.DataFrame, threat: ThreatModel, blackbox: list[str], cfg: HealthConfig) -> list[Check]:
    """Checks from the run's records: norm/box validity (18) and the suite's black-box stages (9)."""
    ran = samples[(samples["attack"] != "clean") & samples["ran"]]
    tol = threat.eps * (1 + 1e-6) + 1e-6
    size = ran["linf"] if threat.norm == "Linf" else ran["l2"]
    nan = size.isna()
    over = size > tol
    bad = ran["violation"].astype(bool) | nan | over
    per_attack = {str(a): int(v) for a, v in bad.groupby(ran["attack"]).sum().items() if v}
    ev = {"examples_checked": int(len(ran)), "violations": int(bad.sum()), "returned_outside_ball_or_box": int(ran["violation"].sum()),
          "nan_norms": int(nan.sum()), "recorded_norm_over_eps": int(over.sum()), "per_attack": per_attack,
          "violating_ids": [int(i) for i in ran.loc[bad, "sample_id"].unique()[:MAX_IDS]]}
    status = "fail" if int(bad.sum()) else "pass"
    checks = [Check(18, "norm_box_validity", status,
                    f"{int(bad.sum())} of {len(ran)} returned examples outside the {threat.norm} ball of {threat.eps:.4g} or "
                    f"the [0,1] box, or not finite (the harness did not count them)", ev, masking=False)]
    if blackbox:
        clean_ok = samples[(samples["attack"] == "clean") & (samples["correct_draws"] > 0)]
        m = int(len(clean_ok))
        wb = set(ran.loc[ran["success"] & ~ran["attack"].isin(blackbox), "sample_id"])
        bb = ran.loc[ran["success"] & ran["attack"].isin(blackbox), "sample_id"]
        extra = sorted(set(int(i) for i in bb) - wb)
        k = len(extra)
        checks.append(Check(9, "whitebox_vs_blackbox", extra_success_status(k, m, cfg),
                            f"in the suite, black-box stages ({', '.join(blackbox)}) broke {k} of {m} samples the white-box stages left",
                            {"suite": {"attacked": m, "blackbox_only": k, "blackbox_only_ids": extra[:MAX_IDS],
                                       "blackbox_attacks": blackbox}}))
    return checks


def merge_suite_checks(report: HealthReport, checks: list[Check]) -> None:
    """Add suite checks; a check already present (9) keeps both evidence parts and the worse status."""
    for c in checks:
        old = report.get(c.name)
        if old is None:
            report.checks.append(c)
            continue
        old.status = worst_status(old.status, c.status)
        old.summary = f"{old.summary}; {c.summary}"
        old.evidence = {**old.evidence, **c.evidence}
    report.checks.sort(key=lambda c: c.id)


# ------------------------------------------------------------------------------- the report


def build_surrogate(data: Any, cfg: HealthConfig, device: torch.device, seed: int, cache_dir: Path,
                    progress: bool = False) -> tuple[Classifier | None, str]:
    """An undefended model of `cfg.surrogate_model` trained on the dataset's training split (cached)."""
    if data.train_x is None:
        return None, f"dataset {data.name!r} has no training split to train an undefended surrogate on"
    from harness.core.defense import BuildContext
    from defenses.standard import Standard

    train = {"epochs": cfg.surrogate_epochs, "batch_size": 128, "optimizer": "adam", "lr": 0.002, "schedule": "cosine"}
    ctx = BuildContext(data=data, model_cfg={"name": cfg.surrogate_model}, device=device, seed=seed,
                       cache_dir=Path(cache_dir), progress=progress)
    clf = Standard(train=train).build(ctx).to(device)
    clf.info["surrogate"] = {"model": cfg.surrogate_model, "epochs": cfg.surrogate_epochs,
                             "cache_hit": clf.info.get("cache_hit")}
    return clf, ""


def run_health(clf: Classifier, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, threats: list[ThreatModel],
               cfg: HealthConfig, seed: int, surrogate: Classifier | None = None, surrogate_reason: str = "",
               log: Callable[[str], None] = lambda s: None) -> dict[str, HealthReport]:
    """One report per threat model: model checks (shared), probe checks, then model mode.

    `x` are [0, 1] float inputs on the classifier's device (the health subset), `ids` their sample ids.
    """
    n = min(cfg.n_samples, int(x.shape[0]))
    x, y, ids = x[:n], y[:n], ids[:n].cpu()
    start = time.perf_counter()
    torch.manual_seed(seed)
    before = _state(clf.module)
    shared = model_checks(clf, x, y, ids, cfg)
    reports: dict[str, HealthReport] = {}
    for threat in threats:
        t0 = time.perf_counter()
        gen = torch.Generator(device=x.device).manual_seed(seed)
        checks, curves = attack_checks(clf, x, y, ids, threat, cfg, gen, surrogate, surrogate_reason)
        reports[threat.name] = HealthReport(threat.name, n, [int(i) for i in ids.tolist()], [*shared, *checks], curves,
                                            config=asdict(cfg), wall_s=time.perf_counter() - t0)
        log(f"health {threat.name}: " + ", ".join(f"{k}={v}" for k, v in reports[threat.name].status_counts().items() if v))
    mode = check_model_mode(clf, before)
    for r in reports.values():
        r.checks.append(mode)
        r.checks.sort(key=lambda c: c.id)
        r.wall_s += (time.perf_counter() - start) / max(len(reports), 1)
    return reports


def write_report(run_dir: Path, report: HealthReport) -> Path:
    """Store the report as `health.json` in the run directory (atomic)."""
    path = Path(run_dir) / "health.json"
    atomic_write_json(path, report.to_dict())
    return path


def mark_summary(run_dir: Path, report: HealthReport) -> None:
    """Set `masking_suspected` and the health counts in the run's `summary.json` (atomic rewrite)."""
    import json

    path = Path(run_dir) / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {}
    summary["masking_suspected"] = report.masking_suspected
    summary["health"] = {"counts": report.status_counts(), "failed": [c.name for c in report.checks if c.status == "fail"],
                         "warned": [c.name for c in report.checks if c.status == "warn"], "file": "health.json"}
    atomic_write_json(path, summary)


def format_report(report: HealthReport) -> str:
    """Plain-text table of the checks (for the terminal)."""
    mark = {"pass": "PASS", "warn": "WARN", "fail": "FAIL", "skip": "skip"}
    lines = [f"health report {report.threat} (n={report.n_samples}): "
             + ("MASKING SUSPECTED" if report.masking_suspected else "no masking suspected")]
    for c in report.checks:
        lines.append(f"  [{mark[c.status]}] {c.id:>2} {c.name:<26} {c.summary}")
    return "\n".join(lines)
