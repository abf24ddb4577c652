"""The defense contract and its registry (`DEFENSES`).

A defense turns (model config, dataset, training recipe) into a `Classifier`. It is a `@dataclass`
whose fields are its parameters. Trained defenses go through `harness.data.training.train` with
their own loss hook and are cached by the hash of everything that determines the weights, so a
sweep trains each defense once.

A defense that trains against a threat (PGD-AT, AdvMS) declares its radius and norm with
`follows("threat.eps")` / `follows("threat.norm")`: unset, they take the evaluation's threat
(`BuildContext.threat`, or the run's context when built by `DEFENSES.build(spec, context)`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from harness.core.classifier import Classifier
from harness.core.errors import UserError
from harness.core.registry import FOLLOWS, Plugin, Registry
from harness.core.threat import ThreatModel


@dataclass
class BuildContext:
    """Everything a defense may use to build its classifier."""

    data: Any  # harness.data.datasets.DatasetSplits
    model_cfg: dict[str, Any]  # the `model` config group (name + architecture params)
    device: torch.device
    seed: int
    cache_dir: Path  # <work_dir>/cache
    progress: bool = True
    # Passed on to `harness.data.training.train(on_epoch_end=...)` by trained defenses, so the
    # poisoning track can record clean test accuracy after every epoch.
    on_epoch_end: Callable[[int, torch.nn.Module], dict[str, float]] | None = None
    threat: ThreatModel | None = None  # the evaluation's threat model (None: the track has none)
    log: Callable[[str], None] = print  # one-line notes (e.g. remapped checkpoint keys)


class Defense(Plugin, ABC):
    """Base class: a `@dataclass` whose fields are the config values; `build` returns the classifier."""

    kind: ClassVar[str] = "defense"

    @abstractmethod
    def build(self, ctx: BuildContext) -> Classifier:
        """Return the defended classifier (trained or loaded), in eval mode, on ctx.device."""

    def follow_threat(self, ctx: BuildContext) -> None:
        """Fill fields declared `follows("threat.*")` and left unset from `ctx.threat`.

        Called first in `build` by defenses that train against a threat, so their cache key
        (`describe()`) holds the radius they actually train at.
        """
        for f in fields(self):  # type: ignore[arg-type]
            path = f.metadata.get(FOLLOWS, "")
            if not path.startswith("threat.") or getattr(self, f.name) is not None:
                continue
            if ctx.threat is None:
                raise UserError(f"defense {self.name!r} trains against a threat but this run has none; "
                                f"set defense.{f.name} (or the track's threat.{path[7:]})")
            setattr(self, f.name, getattr(ctx.threat, path[7:]))
        self.validate()

    def notes(self, data_name: str) -> list[str]:
        """Warnings about this configuration known from experience (e.g. a radius that does not train)."""
        return []


DEFENSES: Registry[Defense] = Registry("defense", Defense, packages=("defenses",))
REGISTRY = DEFENSES  # the older name
register = DEFENSES.register


def threat_context(threat: ThreatModel | None) -> dict[str, Any]:
    """The `context` for `DEFENSES.build` from a threat model: what `follows` fields take."""
    return {} if threat is None else {"threat.eps": threat.eps, "threat.norm": threat.norm}


def build_defense(spec: dict[str, Any], threat: ThreatModel | None = None) -> Defense:
    """Instantiate a defense from its config mapping (`name` plus parameters); see `DEFENSES.build`."""
    return DEFENSES.build(spec, context=threat_context(threat))
