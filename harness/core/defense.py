"""The defense contract and registry.

A defense turns (model config, dataset, training recipe) into a `Classifier`. Trained defenses go
through `harness.data.training.train` with their own loss hook and are cached by the hash of everything
that determines the weights, so a sweep trains each defense once.
"""
from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from harness.core.classifier import Classifier
from harness.core.errors import UserError, choices_error

REGISTRY: dict[str, type["Defense"]] = {}


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


class Defense(ABC):
    """Base class: constructor kwargs are the config values; `build` returns the classifier."""

    name: ClassVar[str] = ""

    @abstractmethod
    def build(self, ctx: BuildContext) -> Classifier:
        """Return the defended classifier (trained or loaded), in eval mode, on ctx.device."""

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


def register(name: str):
    """Class decorator: make a defense available to configs under `name`."""

    def wrap(cls: type[Defense]) -> type[Defense]:
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return wrap


def build_defense(spec: dict[str, Any]) -> Defense:
    """Instantiate a defense from its config mapping (`name` plus parameters)."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in REGISTRY:
        raise choices_error("defense", name, list(REGISTRY))
    cls = REGISTRY[name]
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    for key in spec:
        if key not in params:
            raise UserError(f"defense {name!r} has no parameter {key!r}; valid parameters: {', '.join(params)}")
    return cls(**spec)
