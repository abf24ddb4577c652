"""The harness, not the attack, decides success: invalid adversarial examples never count."""
from __future__ import annotations

import pandas as pd
import torch

from harness.core.attack import REGISTRY, Attack, AttackResult, register
from harness.core.access import Capability
from harness.api import run_eval


@register("test_out_of_ball")
class OutOfBall(Attack):
    """Broken on purpose: returns x + 3*eps (far outside the ball), which fools any model."""

    requires = Capability.GRADIENTS

    def run(self, access, x, y, threat, generator):
        return AttackResult((x + 3 * threat.eps).clamp(0, 1))


@register("test_out_of_box")
class OutOfBox(Attack):
    """Broken on purpose: inside the ball but pushed below 0 (outside the image box)."""

    requires = Capability.GRADIENTS

    def run(self, access, x, y, threat, generator):
        return AttackResult(x - threat.eps)


@register("test_nan")
class NaNAttack(Attack):
    requires = Capability.GRADIENTS

    def run(self, access, x, y, threat, generator):
        return AttackResult(torch.full_like(x, float("nan")))


BASE = ["dataset=digits", "n_samples=60", "batch_size=30", "defense.train.epochs=3", "threat.eps=0.2"]


def test_broken_attacks_are_rejected(session_work):
    for name in ("test_out_of_ball", "test_out_of_box", "test_nan"):
        s = run_eval(BASE + [f"+attack.name={name}"], session_work)
        df = pd.read_parquet(f"{s['run_dir']}/samples.parquet")
        rows = df[df.attack == name]
        attacked = rows[rows.ran]
        assert len(attacked) > 0
        assert attacked.violation.all(), name
        assert not attacked.success.any(), name
        assert s["robust_acc"] == s["clean_acc"], name
        assert s["violations"] == len(attacked)


def test_valid_attack_has_no_violations(session_work):
    s = run_eval(BASE, session_work)
    assert s["violations"] == 0
    df = pd.read_parquet(f"{s['run_dir']}/samples.parquet")
    ran = df[(df.attack != "clean") & df.ran]
    assert (ran.linf <= 0.2 + 1e-6).all()
