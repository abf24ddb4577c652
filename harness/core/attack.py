"""The attack contract and registry.

An attack is a small object built from a config dict. It declares the capability it needs
(`requires`), may prepare once per evaluation (train a LAFEAT head, say), and then maps a batch of
clean inputs to candidate adversarial inputs. It never decides success: the evaluator projects
nothing, re-checks the norm ball and box and judges with its own forward pass.
"""
from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from harness.core.access import Capability
from harness.core.errors import UserError, choices_error
from harness.core.threat import ThreatModel

REGISTRY: dict[str, type["Attack"]] = {}


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
    """What `Attack.prepare` may use: the defended classifier, training data, caches, device."""

    classifier: Any  # harness.core.classifier.Classifier
    train_x: torch.Tensor | None  # uint8 NCHW train split (None when the dataset has none)
    train_y: torch.Tensor | None
    eval_x: torch.Tensor  # uint8 NCHW evaluation inputs (fallback data for heads)
    cache_dir: Any  # pathlib.Path
    device: torch.device
    seed: int
    model_key: str  # hash identifying the defended model's weights
    progress: bool = False


class Attack(ABC):
    """Base class: subclasses set `name`, `requires` and implement `run`.

    Constructor keyword arguments are the attack's config values; `build_attack` validates them
    against the signature so a misspelt parameter is a one-line user error, not a silent default.
    """

    name: ClassVar[str] = ""
    requires: ClassVar[Capability] = Capability.GRADIENTS

    def prepare(self, ctx: PrepareContext) -> dict[str, Any]:
        """One-off work before the first batch (e.g. train a head). Returns facts to record."""
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

    def describe(self) -> dict[str, Any]:
        """The parameters, for manifests and reprs."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.describe().items())
        return f"{type(self).__name__}({params})"


def register(name: str):
    """Class decorator: make an attack available to configs under `name`."""

    def wrap(cls: type[Attack]) -> type[Attack]:
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return wrap


def build_attack(spec: dict[str, Any]) -> Attack:
    """Instantiate an attack from a config mapping with a `name` key plus parameters."""
    spec = dict(spec)
    name = spec.pop("name", None)
    spec.pop("label", None)
    if name not in REGISTRY:
        raise choices_error("attack", name, list(REGISTRY))
    cls = REGISTRY[name]
    params = inspect.signature(cls.__init__).parameters
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    valid = [p for p in params if p not in ("self", "args", "kwargs")]
    for key in spec:
        if key not in valid and not accepts_any:
            raise UserError(
                f"attack {name!r} has no parameter {key!r}; valid parameters: {', '.join(valid)}"
            )
    try:
        return cls(**spec)
    except UserError:
        raise
    except (TypeError, ValueError) as exc:
        raise UserError(f"attack {name!r}: bad parameters {spec}: {exc}") from None
