"""The attack contract and its registry (`ATTACKS`).

An attack is a small `@dataclass` built from a config dict (its fields are its parameters). It
declares the capability it needs (`requires`), may prepare once per evaluation (train a LAFEAT head, say), and then maps a batch of
clean inputs to candidate adversarial inputs. It never decides success: the evaluator projects
nothing, re-checks the norm ball and box and judges with its own forward pass.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from harness.core.access import Capability
from harness.core.registry import Plugin, Registry
from harness.core.threat import ThreatModel


@dataclass
class AttackResult:
    """What an attack returns for one batch.

    x_adv: candidate adversarial inputs, same shape as x (the harness verifies them).
    stage: per sample, the name of the internal stage that first fooled the model by the attack's
        own judgement ("" when none), e.g. "apgd-ce" inside AutoAttack or "beta=0.4" in LAFEAT.
    extras: anything else worth keeping in the run's summary (stage curves, head agreement).
    certified: per sample, True where the attack *proved* that no adversarial example exists in
        the ball (a complete verifier such as `attack=exact`); None for attacks that cannot prove
        robustness. The evaluator stores it in the records' `certified` column.
    """

    x_adv: torch.Tensor
    stage: list[str] | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    certified: torch.Tensor | None = None


@dataclass
class PrepareContext:
    """What `Attack.prepare` may use: the defended classifier, training data, caches, device.

    The evaluation data are the *whole* evaluation's (every shard sees the same), so anything
    prepared from them (a LAFEAT head) is one per evaluation, identical across shards.
    """

    classifier: Any  # harness.core.classifier.Classifier
    train_x: torch.Tensor | None  # uint8 NCHW train split (None when the dataset has none)
    train_y: torch.Tensor | None
    eval_x: torch.Tensor  # uint8 NCHW inputs of the whole evaluation (all shards)
    cache_dir: Any  # pathlib.Path
    device: torch.device
    seed: int
    model_key: str  # hash identifying the defended model's weights
    progress: bool = False
    test_x: torch.Tensor | None = None  # uint8 NCHW: the whole split the evaluation is drawn from
    eval_range: tuple[int, int] | None = None  # [lo, hi): the evaluated images' positions in test_x


class Attack(Plugin, ABC):
    """Base class: subclasses are `@dataclass`es (fields = parameters), set `requires`, implement `run`.

    Register with `@register("name")` above `@dataclass`. `build_attack` checks a config's keys
    against the fields, so a misspelt parameter is a one-line user error, not a silent default;
    range checks go in `validate()`.
    """

    kind: ClassVar[str] = "attack"
    requires: ClassVar[Capability] = Capability.GRADIENTS
    # Safe under mixed precision (`evaluator.amp`): its forward/backward passes may run in
    # bfloat16/float16 autocast without changing what it computes beyond rounding. False keeps it in
    # float32 (score differences, solvers, certificates). The harness's verdict is float32 always.
    amp_safe: ClassVar[bool] = False

    def supports_amp(self) -> bool:
        """Whether this configuration may run under autocast (default: the class's `amp_safe`)."""
        return self.amp_safe

    def prepare(self, ctx: PrepareContext) -> dict[str, Any]:
        """One-off work before the first batch (e.g. train a head). Returns facts to record.

        Model passes spent here belong to the attack's cost: report them as `prepare_forward` and
        `prepare_backward` (image-passes); the evaluator spreads them evenly over the evaluated
        samples and adds them to the forward/backward columns (a cached result reports the passes
        that produced it, so the cost does not depend on the cache).
        """
        return {}

    @abstractmethod
    def run(
        self,
        access: Any,
        x: torch.Tensor,
        y: torch.Tensor,
        threat: ThreatModel,
        generator: torch.Generator,
    ) -> AttackResult:
        """Attack one batch. `access` matches `requires`; random draws use `generator`."""


ATTACKS: Registry[Attack] = Registry("attack", Attack, packages=("attacks",))
REGISTRY = ATTACKS  # the older name
register = ATTACKS.register


def build_attack(spec: dict[str, Any]) -> Attack:
    """Instantiate an attack from a config mapping with a `name` key plus parameters (`label` allowed)."""
    return ATTACKS.build(spec)
