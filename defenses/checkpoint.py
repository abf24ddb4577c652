"""`checkpoint`: a given model, from a Python file with `create()` (optionally `load(weights_path)`)
plus a weights file, or a built-in architecture (`model=` group) plus a weights file.

Weights are always read by the harness with `torch.load(weights_only=True)`; a file's own `load()`
is not trusted with the weights (it may unpickle anything), only `create()` is called.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from harness.core.defense import BuildContext, Defense, register
from harness.data.weights import load_into
from harness.core.classifier import Classifier
from harness.core.errors import UserError
from harness.core.hashing import file_sha256
from harness.data.models import build_model, import_model_file  # noqa: F401  (import_model_file: older home)


@register("checkpoint")
@dataclass
class Checkpoint(Defense):
    """A pretrained model evaluated as is (`label`, like every defense's, names it on the board)."""

    model_file: str | None = None
    weights: str | None = None
    randomized: bool = False

    def build(self, ctx: BuildContext) -> Classifier:
        if self.model_file:
            module: nn.Module = import_model_file(Path(self.model_file).expanduser()).create()
            if not isinstance(module, nn.Module):
                raise UserError(f"create() in {self.model_file} returned {type(module).__name__}, not a torch.nn.Module")
        else:
            module = build_model(ctx.model_cfg, ctx.data.num_classes, ctx.data.input_shape)
        info: dict[str, Any] = {"model_file": self.model_file}
        if self.weights:
            remapped: list[str] = []
            load_into(module, self.weights, log=lambda line: (remapped.append(line), ctx.log(line)))
            if remapped:
                info["weights_remap"] = remapped[0]
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

