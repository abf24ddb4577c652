"""The judge is out of the attacks' reach: one hostile attack per bypass, each caught by name.

Every hostile attack below would inflate or corrupt a result if the evaluator trusted it: writing
into the inputs it was handed, resetting the query tally, changing the model, calling the model
around the counting wrapper. Each must void its stage with one line naming the attack, record
nothing of the batch, and never count a sample as broken.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from harness.api import run_eval
from harness.cli.dispatch import main
from harness.core.access import Capability
from harness.core.attack import Attack, AttackResult, register
from harness.core.errors import AttackVoided

BASE = ["dataset=digits", "n_samples=20", "batch_size=20", "defense.train.epochs=2", "threat.eps=0.2"]


def _hostile(name: str, requires: Capability = Capability.GRADIENTS, budget: int | None = None):
    """Register `fn(access, x, y, threat)` as the attack `name` (a dataclass plugin, as every attack)."""
    def wrap(fn):
        attrs = {"requires": requires, "run": lambda self, access, x, y, threat, gen: fn(access, x, y, threat)}
        if budget is not None:
            attrs["__annotations__"] = {"budget": int}
            attrs["budget"] = budget
        register(name)(dataclass(type(name, (Attack,), attrs)))
        return fn
    return wrap


@_hostile("hostile_writes_x")
def _writes_x(access, x, y, threat):
    x.add_(threat.eps).clamp_(0, 1)  # the perturbation is now "zero" relative to the tampered x
    return AttackResult(x)


@_hostile("hostile_writes_y")
def _writes_y(access, x, y, threat):
    y.copy_((y + 1) % access.num_classes)  # every clean prediction now "misclassifies"
    return AttackResult(x.clone())


@_hostile("hostile_resets_tally", requires=Capability.SCORES, budget=5)
def _resets_tally(access, x, y, threat):
    idx = torch.arange(x.shape[0])
    for _ in range(5):
        access(x, idx)
    access._queries.zero_()  # the budget is spent; pretend it is not
    for _ in range(5):
        access(x, idx)
    return AttackResult(x.clone())


@_hostile("hostile_changes_weight")
def _changes_weight(access, x, y, threat):
    with torch.no_grad():
        next(access.model.parameters()).mul_(-1.0)
    return AttackResult(x.clone())


@_hostile("hostile_changes_buffer")
def _changes_buffer(access, x, y, threat):
    next(access.model.buffers()).add_(0.5)
    return AttackResult(x.clone())


@_hostile("hostile_train_mode")
def _train_mode(access, x, y, threat):
    access.model.train()
    return AttackResult(x.clone())


@_hostile("hostile_registers_hook")
def _registers_hook(access, x, y, threat):
    access.model.module.register_forward_hook(lambda _m, _i, out: out * 0)
    return AttackResult(x.clone())


@_hostile("hostile_unwrapped_call")
def _unwrapped_call(access, x, y, threat):
    for _ in range(50):  # free, uncounted passes
        access.model.module(x)
    return AttackResult(x.clone())


@_hostile("hostile_rewrites_counter")
def _rewrites_counter(access, x, y, threat):
    for _ in range(5):
        access.model(x)
    access.counter.reset()  # claim the passes never happened
    return AttackResult(x.clone())


@_hostile("hostile_bypasses_oracle", requires=Capability.SCORES, budget=5)
def _bypasses_oracle(access, x, y, threat):
    score = object.__getattribute__(access, "_score")
    for _ in range(20):  # the scorer behind the budget check: the ledger still sees every row
        score(x, torch.arange(x.shape[0]))
    return AttackResult(x.clone())


@_hostile("hostile_widens_eps")
def _widens_eps(access, x, y, threat):
    object.__setattr__(threat, "eps", 1.0)
    return AttackResult((x + 0.9).clamp(0, 1))


CASES = {
    "hostile_writes_x": "wrote into its input images x",
    "hostile_writes_y": "wrote into its labels y",
    "hostile_resets_tally": "query tally no longer matches",
    "hostile_changes_weight": "values of the parameter 'model.conv1.weight'",
    "hostile_changes_buffer": "values of the buffer 'model.mean'",
    "hostile_train_mode": "train/eval mode of 'model'",
    "hostile_registers_hook": "the hooks of 'model'",
    "hostile_unwrapped_call": "bypassed the wrapper",
    "hostile_rewrites_counter": "counter was rewritten",
    "hostile_bypasses_oracle": "the oracle was bypassed",
    "hostile_widens_eps": "changed the threat model",
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_bypass_voids_the_stage_by_name(session_work, name):
    with pytest.raises(AttackVoided) as info:
        run_eval(BASE + [f"+attack.name={name}"], session_work)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"attack {name!r} voided on batch 0: "), msg
    assert CASES[name] in msg, msg
    runs = session_work / "runs"
    written = [p.parent for p in runs.glob("*/manifest.json") if name in p.read_text()] if runs.exists() else []
    assert not written, f"the void run wrote {written}"


def test_a_void_run_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    code = main(["eval", *BASE, "+attack.name=hostile_unwrapped_call", f"work_dir={tmp_path}", "progress=false",
                 "leaderboard.update=false"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert len(err) == 1 and "attack 'hostile_unwrapped_call' voided on batch 0" in err[0], err
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(p for d in runs.iterdir() for p in d.iterdir()), "a void run wrote files"


def test_honest_attacks_pass_the_judge_with_counts_from_the_model(session_work):
    """The quick suite (white-box) and Square (black-box) run clean; recorded passes are the model's."""
    import pandas as pd

    s = run_eval(BASE, session_work)
    df = pd.read_parquet(f"{s['run_dir']}/samples.parquet")
    ran = df[(df.attack == "pgd-ce") & df.ran]
    assert (ran.n_forward == 21).all() and (ran.n_backward == 20).all()  # 20 steps + the final check
    assert not df.nonfinite_grad.any()
    s = run_eval(BASE + ["attack=square", "attack.budget=50"], session_work)
    df = pd.read_parquet(f"{s['run_dir']}/samples.parquet")
    sq = df[(df.attack != "clean") & df.ran]
    assert len(sq) and (sq.n_queries <= 50).all() and (sq.n_queries > 0).all()


@register("hostile_prepare")
@dataclass
class _HostilePrepare(Attack):
    """Rewrites the model in prepare(), before any batch: caught before anything is evaluated."""

    requires = Capability.GRADIENTS

    def prepare(self, ctx):
        with torch.no_grad():
            ctx.classifier.module.fc2.bias.add_(5.0)
        ctx.eval_x.zero_()  # a copy: the evaluated images are not touched
        return {}

    def run(self, access, x, y, threat, generator):
        return AttackResult(x.clone())


def test_prepare_that_changes_the_model_is_void(session_work):
    with pytest.raises(AttackVoided, match=r"^attack 'hostile_prepare' voided in prepare\(\): it changed the values of "
                                           r"the parameter 'model.fc2.bias'"):
        run_eval(BASE + ["+attack.name=hostile_prepare"], session_work)
