"""The Python API: a model in memory, evaluated by the same code path as `arena eval`.

    import harness
    res = harness.evaluate(model, x, y, norm="Linf", eps=8/255, suite="quick")
    res.clean_acc, res.robust_acc      # floats in [0, 1]; robust = per-sample worst case over the suite
    res.samples                         # the samples.parquet records (one row per sample and attack)
    res.summary                         # summary.json
    res.adversarial                     # the verified adversarial example of each broken sample
    out = harness.attack(model, x, y, "pgd", norm="Linf", eps=8/255, steps=50)
    out.x_adv, out.success, out.costs   # every sample's verified candidate, the harness's verdict, passes

`model` is an `nn.Module` mapping [0, 1] NCHW images to logits (normalisation inside), as for
AutoAttack and RobustBench; `x` a float tensor in [0, 1] (N, C, H, W) or a uint8 array (N, H, W, C)
as in an .npz; `y` integer labels. The config is composed from conf/ exactly as `arena eval` composes
it (same defaults, same suites), the model contract is checked, every adversarial example is
re-verified by the harness. Nothing is written unless `work_dir` is given; then the run is stored
and resumed exactly as the CLI does (`<work_dir>/runs/<hash>/`, keyed by the data and the model's
weights, plus `adversarial.npz`). Bad arguments raise `harness.UserError`, a `ValueError`, with a
one-line message.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from harness.cli.hydra_app import CONF_DIR, to_plain, validate_overrides
from harness.core.attack import ATTACKS
from harness.core.classifier import Classifier
from harness.core.errors import UserError
from harness.core.hashing import module_hash
from harness.core.numbers import as_number
from harness.core.threat import ThreatModel
from harness.data.datasets import DatasetSplits

AttackSpec = str | Mapping[str, Any]


# ----------------------------------------------------------------------------------------------
# results


@dataclass
class Adversarial:
    """The verified adversarial examples of the broken samples.

    ids: sample ids (positions in the given `x`); x_adv: float32 (n, C, H, W) in [0, 1], exactly
    the inputs the harness judged; attack: the label of the first attack in suite order that broke
    each sample.
    """

    ids: np.ndarray
    x_adv: torch.Tensor
    attack: list[str]

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@dataclass
class EvalResult:
    """What `harness.evaluate` returns."""

    summary: dict[str, Any]
    samples: pd.DataFrame
    adversarial: Adversarial
    run_dir: Path | None = None  # set when `work_dir` was given

    @property
    def clean_acc(self) -> float:
        return float(self.summary["clean_acc"])

    @property
    def robust_acc(self) -> float:
        return float(self.summary["robust_acc"])

    def __repr__(self) -> str:
        return (f"EvalResult(clean_acc={self.clean_acc:.4f}, robust_acc={self.robust_acc:.4f}, "
                f"n_samples={self.summary.get('n_samples')}, suite={self.summary.get('suite')!r}, "
                f"threat={self.summary.get('threat')!r}, broken={len(self.adversarial)})")


@dataclass
class AttackOutput:
    """What `harness.attack` returns (per sample, in the order of `x`).

    x_adv: float32 (N, C, H, W): the attack's verified candidate where it ran, `x` itself for the
        samples the model already gets wrong (attacks run on clean-correct samples only).
    success: bool (N,): the harness's verdict that `x_adv` is misclassified inside the threat model
        (True for samples misclassified clean, as in Foolbox).
    clean_correct: bool (N,).
    costs: forward / backward image-passes, queries and seconds: totals and per attacked sample.
    """

    x_adv: torch.Tensor
    success: torch.Tensor
    clean_correct: torch.Tensor
    costs: dict[str, float]
    samples: pd.DataFrame
    summary: dict[str, Any] = field(repr=False, default_factory=dict)


# ----------------------------------------------------------------------------------------------
# arguments


def _as_images(x: Any) -> torch.Tensor:
    """x as a CPU tensor, NCHW: uint8 (0..255) or float32 in [0, 1]."""
    if isinstance(x, np.ndarray):
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4:
            raise UserError(f"x has shape {x.shape}; a numpy array must be (N, H, W, C) or (N, H, W)")
        t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    elif torch.is_tensor(x):
        t = x.detach().cpu()
        if t.dim() == 3:
            t = t.unsqueeze(1)
        if t.dim() != 4:
            raise UserError(f"x has shape {tuple(t.shape)}; a tensor must be (N, C, H, W)")
    else:
        raise UserError(f"x is a {type(x).__name__}; give a float tensor in [0, 1] (N, C, H, W) or a uint8 array (N, H, W, C)")
    if t.shape[0] == 0:
        raise UserError("x holds no images; give at least one")
    if t.dtype == torch.uint8:
        return t.contiguous()
    if not t.is_floating_point():
        raise UserError(f"x has dtype {t.dtype}; give floats in [0, 1] or uint8 in 0..255")
    t = t.float().contiguous()
    if not torch.isfinite(t).all():
        raise UserError("x contains NaN or Inf; give images in [0, 1]")
    lo, hi = float(t.min()), float(t.max())
    if lo < 0.0 or hi > 1.0:
        raise UserError(f"x spans {lo:.4g}..{hi:.4g}, outside [0, 1]; give unnormalised images in [0, 1] "
                        f"(normalisation belongs inside the model)")
    return t


def _as_labels(y: Any, n: int) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(y) if not torch.is_tensor(y) else y.detach().cpu())
    if t.dim() != 1 or t.shape[0] != n or t.is_floating_point() or t.dtype == torch.bool:
        raise UserError(f"y has shape {tuple(t.shape)} and dtype {t.dtype}; give {n} integer labels")
    return t.long().contiguous()


def _device_of(model: nn.Module, device: str | torch.device | None) -> str:
    if device is not None:
        return str(device)
    first = next(iter(model.parameters()), None)
    if first is None:
        first = next(iter(model.buffers()), None)
    return str(first.device) if first is not None else "cpu"


def _num_classes(model: nn.Module, x: torch.Tensor, device: str, y: torch.Tensor) -> int:
    """C from one forward pass (the contract check then tests the outputs properly)."""
    from harness.data.training import to_unit

    try:
        with torch.no_grad():
            out = model(to_unit(x[:1], torch.device(device)))
        if torch.is_tensor(out) and out.dim() == 2:
            return int(out.shape[1])
    except Exception as exc:
        raise UserError(f"the model fails on an input of shape {tuple(x[:1].shape)} ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); it must take [0, 1] NCHW images") from None
    return int(y.max()) + 1


def _compose(overrides: list[str]) -> dict[str, Any]:
    validate_overrides("eval", overrides, multirun=False)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_plain(compose(config_name="eval", overrides=overrides))


def _attack_spec(spec: AttackSpec) -> dict[str, Any]:
    """A registry name, a conf/attack preset name (e.g. apgd_ce), or a mapping with `name`."""
    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = spec.get("name")
    preset = CONF_DIR / "attack" / f"{name}.yaml"
    if name not in ATTACKS and isinstance(name, str) and preset.is_file():
        from omegaconf import OmegaConf

        base = OmegaConf.to_container(OmegaConf.load(preset), resolve=True)
        spec = {**base, "label": base.get("label") or name, **{k: v for k, v in spec.items() if k != "name"}}
    ATTACKS.build({k: v for k, v in spec.items() if k != "view"})  # one-line errors now, not mid-run
    return spec


def _threat_overrides(norm: str, eps: float | str) -> list[str]:
    value = as_number(eps)  # 8/255 in Python, or the string "8/255" as on the command line
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"eps={eps!r} must be a number (e.g. eps=8/255)")
    ThreatModel(norm=norm, eps=float(value))  # checks norm and range with the CLI's messages
    return [f"threat.norm={norm}", f"threat.eps={float(value)!r}"]


def _prepare(model: nn.Module, x: Any, y: Any, *, norm: str, eps: float, seed: int, batch_size: int | str,
             device: str | torch.device | None, draws: int, cascade: bool, amp: bool | str, randomized: bool,
             num_classes: int | None, work_dir: str | Path | None, name: str | None, progress: bool,
             suite_overrides: list[str]) -> tuple[dict[str, Any], DatasetSplits, Classifier]:
    """The composed config, the in-memory dataset and the classifier of one API call."""
    if not isinstance(model, nn.Module):
        raise UserError(f"model is a {type(model).__name__}; give a torch.nn.Module that maps [0, 1] NCHW images to logits")
    images = _as_images(x)
    labels = _as_labels(y, images.shape[0])
    dev = _device_of(model, device)
    cfg = _compose([*_threat_overrides(norm, eps), *suite_overrides])
    model_name = f"{type(model).__module__}.{type(model).__qualname__}"
    if device is not None:
        model.to(torch.device(dev))
    k = int(num_classes) if num_classes is not None else _num_classes(model, images, dev, labels)
    data = DatasetSplits(name=name or "arrays", test_x=images, test_y=labels, num_classes=k,
                         test_ids=torch.arange(images.shape[0]), meta={"source": "harness.evaluate (in memory)"})
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= k:
        raise UserError(f"y spans {lo}..{hi} but the model returns {k} classes; labels must be in 0..{k - 1}")
    clf = Classifier(model, k, tuple(images.shape[1:]), randomized=bool(randomized),
                     info={"model": model_name, "parameters": sum(p.numel() for p in model.parameters())})
    cfg.update(seed=int(seed), batch_size=batch_size, device=dev, n_samples=None, offset=0,  # the plan checks batch_size
               work_dir=None if work_dir is None else str(work_dir), progress=bool(progress), save_adv=True)
    cfg["evaluator"] = {"draws": int(draws), "cascade": bool(cascade), "amp": amp}
    cfg["dataset"] = {"name": "arrays", "label": name, "num_classes": k}
    cfg["model"] = {"name": model_name}
    # the model's identity in the run hash: its class and weights (a resumed run must be the same model)
    cfg["defense"] = {"name": "python", "label": name, "model": model_name, "weights": f"sha256:{module_hash(model)}",
                      "randomized": bool(randomized)}
    return cfg, data, clf


def _run(cfg: dict[str, Any], data: DatasetSplits, clf: Classifier, verbose: bool):
    from harness.evasion.run import execute

    return execute(cfg, log=print if verbose else (lambda *_: None), data=data, classifier=clf, keep_adversarial=True)


@contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """The model in eval() mode for the call (warned about if it was training), its mode restored after."""
    was_training = bool(getattr(model, "training", False))
    if was_training:
        warnings.warn("the model is in training mode; it is evaluated in eval() mode (and put back afterwards)",
                      stacklevel=4)
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train(True)


# ----------------------------------------------------------------------------------------------
# the CLI in-process (tests, notebooks with config overrides)


def compose_config(overrides: list[str], config_name: str = "eval") -> dict[str, Any]:
    """The resolved config `arena <config_name> overrides...` would run with."""
    composed = validate_overrides(config_name, overrides)
    if len(composed) == 1:  # nothing swept: the checked composition is the config
        return to_plain(composed[0])
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_plain(compose(config_name=config_name, overrides=overrides))


def run_eval(overrides: list[str], work_dir: Path | str, update_board: bool = False) -> dict[str, Any]:
    """Run `arena eval` in-process with `work_dir=...` and return the summary (+ `run_dir`)."""
    from harness.evasion import board as leaderboard
    from harness.evasion.run import run_evaluation

    overrides = [*overrides, f"work_dir={work_dir}", "progress=false"]
    cfg = compose_config(overrides)
    summary = run_evaluation(cfg, overrides=[o for o in overrides if not o.startswith(("work_dir=", "progress="))],
                             log=lambda *_: None)
    if update_board:
        leaderboard.build([Path(work_dir)], Path(cfg["leaderboard"]["path"]))
    return summary


# ----------------------------------------------------------------------------------------------
# the two entry points


def evaluate(model: nn.Module, x: Any, y: Any, *, norm: str = "Linf", eps: float,
             suite: str | Sequence[AttackSpec] = "quick", seed: int = 0, batch_size: int | str = 250,
             device: str | torch.device | None = None, draws: int = 10, cascade: bool = True,
             amp: bool | str = False, randomized: bool = False, num_classes: int | None = None, work_dir: str | Path | None = None,
             name: str | None = None, progress: bool = False, verbose: bool = False) -> EvalResult:
    """Robust accuracy of `model` on (x, y) under a suite of attacks, per-sample worst case.

    Args:
        model: `nn.Module`, [0, 1] NCHW images -> logits (N, C); put in eval mode for the run.
        x, y: float tensor in [0, 1] (N, C, H, W) or uint8 array (N, H, W, C); integer labels (N,).
        norm, eps: the threat model (`Linf` or `L2` ball of radius eps in [0, 1] pixel units).
        suite: a suite name (conf/suite: quick, standard = AutoAttack, ...) or a list of attack specs
            (a name such as "pgd" or "apgd_ce", or a mapping {"name": "pgd", "steps": 50, ...}).
        seed, batch_size, draws, cascade, amp: as `arena eval`'s seed, batch_size (a number or "auto"),
            evaluator.draws / cascade / amp (False, "bfloat16" or "float16": the attacks' passes under
            autocast where safe; the verdict stays float32; docs/gpu.md).
        device: where to run; default the model's device (a given device moves the model there).
        randomized: the model is random (EOT for gradient attacks, decisions over `draws` draws).
        num_classes: default: the width of the model's output.
        work_dir: store (and resume) the run as `arena eval work_dir=...` does; None writes nothing.
        name: the model's name in the run (and on a leaderboard built from `work_dir`).
        progress, verbose: progress bar; the run's log lines (notes, resume, skip).
    """
    if isinstance(suite, str):
        suite_overrides = [f"suite={suite}"]
    elif isinstance(suite, Sequence) and suite:
        suite_overrides = []
    else:
        raise UserError(f"suite={suite!r}: give a suite name (e.g. 'quick', 'standard') or a non-empty list of attacks")
    with _eval_mode(model):
        cfg, data, clf = _prepare(model, x, y, norm=norm, eps=eps, seed=seed, batch_size=batch_size, device=device,
                                  draws=draws, cascade=cascade, amp=amp, randomized=randomized, num_classes=num_classes,
                                  work_dir=work_dir, name=name, progress=progress, suite_overrides=suite_overrides)
        if not isinstance(suite, str):
            cfg["suite"] = {"name": "custom", "version": 1, "attacks": [_attack_spec(s) for s in suite]}
        out = _run(cfg, data, clf, verbose)
    found = out.adversarial or adv_empty(data)
    adversarial = Adversarial(found["ids"], torch.from_numpy(found["x_adv"]), [str(a) for a in found["attack"]])
    return EvalResult(out.summary, out.samples(), adversarial, out.run.path)


def adv_empty(data: DatasetSplits) -> dict[str, np.ndarray]:
    return {"ids": np.zeros(0, np.int64), "x_adv": np.zeros((0, *data.input_shape), np.float32), "attack": np.zeros(0, str)}


def attack(model: nn.Module, x: Any, y: Any, attack: AttackSpec, *, norm: str = "Linf", eps: float,
           seed: int = 0, batch_size: int | str = 250, device: str | torch.device | None = None, draws: int = 10,
           amp: bool | str = False, randomized: bool = False, num_classes: int | None = None, work_dir: str | Path | None = None,
           progress: bool = False, verbose: bool = False, **params: Any) -> AttackOutput:
    """Run one attack (a registry name such as "pgd", a conf/attack preset, or a spec mapping) with
    `params` (e.g. steps=50) on every clean-correct sample; the harness verifies each result."""
    spec = _attack_spec({**({"name": attack} if isinstance(attack, str) else dict(attack)), **params})
    with _eval_mode(model):
        cfg, data, clf = _prepare(model, x, y, norm=norm, eps=eps, seed=seed, batch_size=batch_size, device=device,
                                  draws=draws, cascade=True, amp=amp, randomized=randomized, num_classes=num_classes,
                                  work_dir=work_dir, name=None, progress=progress, suite_overrides=[])
        cfg["attack"] = spec
        out = _run(cfg, data, clf, verbose)
    samples = out.samples()
    n = data.test_x.shape[0]
    from harness.data.training import to_unit

    x_adv = to_unit(data.test_x, torch.device("cpu")).clone()
    for cand in out.candidates or []:
        for ids, xs in zip(cand.ids, cand.x_adv):
            x_adv[torch.from_numpy(ids)] = torch.from_numpy(xs)
    clean = samples[samples["attack"] == "clean"].set_index("sample_id").reindex(range(n))
    rows = samples[samples["attack"] != "clean"].set_index("sample_id").reindex(range(n))
    clean_correct = torch.from_numpy((clean["correct_draws"].to_numpy() * 2 > clean["draws"].to_numpy())
                                     if clf.randomized else (clean["correct_draws"].to_numpy() > 0))
    attacked = rows["ran"].fillna(False).to_numpy(dtype=bool)
    success = torch.from_numpy(np.where(attacked, rows["success"].fillna(False).to_numpy(dtype=bool),
                                        ~clean_correct.numpy()))
    ran = rows[attacked]
    m = max(int(attacked.sum()), 1)
    costs = {"n_forward": float(ran["n_forward"].sum()), "n_backward": float(ran["n_backward"].sum()),
             "n_queries": float(ran["n_queries"].sum()), "time_s": float(ran["time_s"].sum()),
             "attacked": float(attacked.sum())}
    costs.update({f"{k}_per_sample": v / m for k, v in list(costs.items()) if k != "attacked"})
    return AttackOutput(x_adv, success, clean_correct, costs, samples, out.summary)
