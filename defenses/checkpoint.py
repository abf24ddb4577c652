"""`checkpoint`: a given model, from a Python file with `create()` (optionally `load(weights_path)`)
plus a weights file, or a built-in architecture (`model=` group) plus a weights file.

Weights are always read by the harness with `torch.load(weights_only=True)`; a file's own `load()`
is not trusted with the weights (it may unpickle anything), only `create()` is called.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

from torch import nn

from harness.core.defense import BuildContext, Defense, register
from harness.data.weights import load_into
from harness.core.classifier import Classifier
from harness.core.errors import UserError
from harness.core.hashing import file_sha256
from harness.data.models import build_model


def import_model_file(path: Path) -> Any:
    """Import a user's model file as a module (it must define `create()`)."""
    if not path.is_file():
        raise UserError(f"defense.model_file={str(path)!r} does not exist; give a .py file that defines create()")
    name = f"arena_user_model_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"defense.model_file={str(path)!r} is not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise UserError(f"defense.model_file={str(path)!r} fails to import ({type(exc).__name__}: {exc})") from None
    if not callable(getattr(module, "create", None)):
        raise UserError(f"defense.model_file={str(path)!r} defines no create() returning the model")
    return module


@register("checkpoint")
class Checkpoint(Defense):
    """A pretrained model evaluated as is."""

    def __init__(self, model_file: str | None = None, weights: str | None = None, randomized: bool = False,
                 label: str | None = None) -> None:
        self.model_file = model_file
        self.weights = weights
        self.randomized = randomized
        self.label = label

    def build(self, ctx: BuildContext) -> Classifier:
        if self.model_file:
            module: nn.Module = import_model_file(Path(self.model_file).expanduser()).create()
            if not isinstance(module, nn.Module):
                raise UserError(f"create() in {self.model_file} returned {type(module).__name__}, not a torch.nn.Module")
        else:
            module = build_model(ctx.model_cfg, ctx.data.num_classes, ctx.data.input_shape)
        info: dict[str, Any] = {"model_file": self.model_file}
        if self.weights:
            load_into(module, self.weights)
            info["weights_sha256"] = file_sha256(Path(self.weights).expanduser())
        elif not self.model_file:
            raise UserError("defense=checkpoint needs defense.weights=FILE (and optionally defense.model_file=FILE.py)")
        info["parameters"] = sum(p.numel() for p in module.parameters())
        from harness.core.ensemble import Ensemble, make_classifier

        if isinstance(module, Ensemble):  # voting ensembles need their differentiable proxy
            return make_classifier(module, module.mode, ctx.data.num_classes, ctx.data.input_shape,
                                   tie_break=module.tie_break, randomized=self.randomized, info=info).to(ctx.device)
        return Classifier(module.to(ctx.device).eval(), ctx.data.num_classes, ctx.data.input_shape,
                          randomized=self.randomized, info=info)

