"""A generic latent-feature tap: (feature map at a named layer, final logits) in one forward pass.

LAFEAT attacks a classifier through one of its intermediate feature maps, so the harness must be
able to read any layer of any `nn.Module` (built-in architectures and user files alike) without
the model's cooperation. Two mechanisms, chosen by the layer name:

- a submodule name (`layer4.0`, `conv2`, ...; see `list_layers`): a forward hook on that module;
- otherwise a node of the model's torch.fx graph (`relu_1`, `max_pool2d_1`, ...; see
  `list_layers(functional=True)`), via `torchvision.models.feature_extraction`, for values that
  no module returns (functional ReLUs, pooling).

Both clone the tapped value at the moment it is produced, so a later in-place op
(`ReLU(inplace=True)`, `out += identity`) cannot overwrite it or break autograd. A module that is
called several times in one forward (a shared `self.relu`) is tapped at its *last* call.

Default layer rule (`default_layer`), documented in docs/lafeat.md:
1. Residual networks: the *second-to-last block of the last stage*, where a stage is a
   `Sequential`/`ModuleList` whose children are all residual blocks (a class name containing
   Block/Bottleneck/Unit/Residual, or a child named shortcut/downsample/skip). This is where the
   reference taps WRN-34-10 (`block3`, unit 4 of 5). A one-block stage gives that block.
2. Otherwise the last convolution module (plain CNNs such as LeNet).
3. Otherwise (MLPs) the second-to-last `Linear` module: the last hidden layer.
"""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from harness.core.access import CountingModule, FeatureAccess, PassCounter
from harness.core.errors import UserError

_BLOCK_CLASS = re.compile(r"block|bottleneck|unit|residual", re.IGNORECASE)
_SKIP_CHILDREN = {"shortcut", "downsample", "skip"}
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def list_layers(module: nn.Module, functional: bool = False) -> list[str]:
    """Candidate layer names, in definition order.

    By default: every named submodule (hookable, works on any module). With `functional=True`:
    the node names of the model's fx graph (includes functional ops), or [] if it cannot be traced.
    """
    if functional:
        return _graph_nodes(module)
    return [name for name, _ in module.named_modules() if name]


def _graph_nodes(module: nn.Module) -> list[str]:
    """fx node names in eval mode ([] for models torch.fx cannot trace)."""
    from torchvision.models.feature_extraction import get_graph_node_names

    was_training = module.training
    try:
        _, nodes = get_graph_node_names(module)
    except Exception:  # untraceable control flow: only hook-based module taps are available
        return []
    finally:
        module.train(was_training)
    return [n for n in nodes if n != "x" and not n.startswith("input")]


def _is_block(m: nn.Module) -> bool:
    if _BLOCK_CLASS.search(type(m).__name__):
        return True
    return bool({n for n, _ in m.named_children()} & _SKIP_CHILDREN)


def default_layer(module: nn.Module) -> str:
    """The layer tapped when `attack.layer` is not given (rule in the module docstring)."""
    stages = [
        (name, m) for name, m in module.named_modules()
        if isinstance(m, (nn.Sequential, nn.ModuleList)) and len(m) > 0 and all(_is_block(c) for c in m)
    ]
    if stages:
        name, stage = stages[-1]
        idx = len(stage) - 2 if len(stage) >= 2 else 0
        return f"{name}.{idx}" if name else str(idx)
    convs = [name for name, m in module.named_modules() if name and isinstance(m, _CONV)]
    if convs:
        return convs[-1]
    linears = [name for name, m in module.named_modules() if name and isinstance(m, nn.Linear)]
    if len(linears) >= 2:
        return linears[-2]
    raise UserError(
        f"no default feature layer for {type(module).__name__} (no residual stage, convolution or hidden Linear); "
        f"set attack.layer=NAME, listed by `arena layers`"
    )


def resolve_layer(module: nn.Module, layer: str | None) -> str:
    """`layer` if it names a submodule or an fx node of `module`, the default if None; else UserError."""
    if layer is None or layer == "" or layer == "auto":
        return default_layer(module)
    modules = list_layers(module)
    if layer in modules:
        return layer
    if layer in _graph_nodes(module):
        return layer
    raise UserError(
        f"attack.layer={layer!r} is not a layer of {type(module).__name__}; valid names: {', '.join(modules)} "
        f"(functional nodes: `arena layers ... --functional`)"
    )


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, torch.Tensor):
                return o
    return None


class FeatureTap(nn.Module):
    """`tap(x) -> (feature_map, logits)`: one forward pass of `module`, the map at `layer` cloned.

    `module` is shared, not copied: the tap sees the same weights the harness verifies with.
    """

    def __init__(self, module: nn.Module, layer: str | None = None) -> None:
        super().__init__()
        self.model = module
        self.layer = resolve_layer(module, layer)
        self._is_module = self.layer in dict(module.named_modules())
        self._graph: nn.Module | None = None if self._is_module else self._build_graph()

    def _build_graph(self) -> nn.Module:
        """fx extractor returning {'feat': node value (cloned), 'logits': model output}."""
        from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

        _, nodes = get_graph_node_names(self.model)
        gm = create_feature_extractor(self.model, return_nodes={self.layer: "feat", nodes[-1]: "logits"})
        graph = gm.graph
        out = next(n for n in graph.nodes if n.op == "output")
        returned = dict(out.args[0])
        with graph.inserting_after(returned["feat"]):
            cloned = graph.call_method("clone", (returned["feat"],))
        returned["feat"] = cloned
        out.args = (returned,)
        gm.recompile()
        return gm.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._graph is not None:
            self._graph.train(self.model.training)
            out = self._graph(x)
            return out["feat"], out["logits"]
        captured: list[torch.Tensor] = []

        def hook(_m: nn.Module, _inp: Any, output: Any) -> None:
            t = _first_tensor(output)
            if t is not None:
                captured.append(t.clone())  # before any in-place op downstream can touch it

        handle = self.model.get_submodule(self.layer).register_forward_hook(hook)
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        if not captured:
            raise UserError(
                f"layer {self.layer!r} produced no tensor in the forward pass of {type(self.model).__name__} "
                f"(unused module?); pick another with `arena layers`"
            )
        return captured[-1], logits


def make_feature_access(classifier: Any, layer: str | None, counter: PassCounter, eot: int = 1) -> FeatureAccess:
    """White-box access plus a counted feature tap on `classifier.differentiable` at `layer`.

    Every `features(x)` call counts one forward image-pass per input (and one backward if a
    gradient reaches x), on the same counter as `logits(x)`.
    """
    module = classifier.differentiable
    tap = FeatureTap(module, layer)
    return FeatureAccess(
        model=CountingModule(module, counter), num_classes=classifier.num_classes, counter=counter,
        randomized=bool(classifier.randomized), eot=eot, tap=tap, layer=tap.layer,
    )


@torch.no_grad()
def layer_shapes(module: nn.Module, example: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Output shape (without the batch dimension) of every submodule called in one forward."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, m in module.named_modules():
        if not name:
            continue

        def hook(_m: nn.Module, _i: Any, out: Any, name: str = name) -> None:
            t = _first_tensor(out)
            if t is not None:
                shapes[name] = tuple(t.shape[1:])

        handles.append(m.register_forward_hook(hook))
    was_training = module.training
    module.eval()
    try:
        module(example)
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    return shapes
