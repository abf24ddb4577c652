"""`arena layers`: list the layers a LAFEAT feature tap can read, and mark the default.

    arena layers model=small_cnn [dataset=mnist5k] [model.width=16 ...]
    arena layers --model-file my_model.py [dataset=cifar10 | shape=3,32,32] [--functional]

Each line: layer name, module type, output shape (from one probe forward on zeros; "-" when the
module is not used by the forward pass) and `*` on the default layer (the rule is in
`harness.core.features`). `--functional` lists torch.fx graph nodes instead (functional ReLUs and
pooling that no module returns). Any name printed is a valid `attack.layer=NAME`.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.core.errors import UserError
from harness.core.features import default_layer, layer_shapes, list_layers

# Input shape and class count of the named datasets, so listing needs no data loading.
DATASET_SHAPES: dict[str, tuple[tuple[int, int, int], int]] = {
    "mnist5k": ((1, 28, 28), 10), "mnist": ((1, 28, 28), 10), "fashion_mnist": ((1, 28, 28), 10),
    "digits": ((1, 8, 8), 10), "cifar10": ((3, 32, 32), 10), "cifar100": ((3, 32, 32), 100),
    "svhn": ((3, 32, 32), 10),
}

USAGE = "usage: arena layers model=NAME [dataset=NAME] [model.KEY=VALUE ...] | --model-file FILE.py [shape=C,H,W] [--functional]"


def _parse(argv: list[str]) -> tuple[dict[str, Any], Path | None, bool]:
    opts: dict[str, Any] = {}
    model_file: Path | None = None
    functional = False
    it = iter(argv)
    for arg in it:
        if arg in ("-h", "--help"):
            raise SystemExit(print(__doc__) or 0)
        if arg == "--functional":
            functional = True
        elif arg == "--model-file":
            path = next(it, None)
            if path is None:
                raise UserError("--model-file needs a path to a .py file that defines create()")
            model_file = Path(path).expanduser()
        elif arg.startswith("--model-file="):
            model_file = Path(arg.split("=", 1)[1]).expanduser()
        elif "=" in arg:
            key, value = arg.split("=", 1)
            opts[key.lstrip("+")] = value
        else:
            raise UserError(f"unexpected argument {arg!r}; {USAGE}")
    return opts, model_file, functional


def _shape(opts: dict[str, Any]) -> tuple[tuple[int, int, int] | None, int]:
    if "shape" in opts:
        try:
            dims = tuple(int(v) for v in str(opts["shape"]).split(","))
        except ValueError:
            dims = ()
        if len(dims) != 3:
            raise UserError(f"shape={opts['shape']!r} must be C,H,W, e.g. shape=3,32,32")
        return dims, int(opts.get("num_classes", 10))  # type: ignore[return-value]
    name = opts.get("dataset")
    if name is None:
        return None, int(opts.get("num_classes", 10))
    if name in DATASET_SHAPES:
        return DATASET_SHAPES[name]
    from harness.data.datasets import load_dataset

    data = load_dataset({"name": name, **{k.split(".", 1)[1]: v for k, v in opts.items() if k.startswith("dataset.")}})
    return data.input_shape, data.num_classes


def build(opts: dict[str, Any], model_file: Path | None) -> tuple[nn.Module, tuple[int, int, int] | None]:
    """The module to list and the input shape for the probe forward (None = no probe)."""
    shape, num_classes = _shape(opts)
    if model_file is not None:
        from defenses.checkpoint import import_model_file

        module = import_model_file(model_file).create()
        if not isinstance(module, nn.Module):
            raise UserError(f"create() in {model_file} returned {type(module).__name__}, not a torch.nn.Module")
        return module.eval(), shape
    if "model" not in opts:
        raise UserError(f"say which model: {USAGE}")
    from harness.data.models import build_model

    shape = shape or DATASET_SHAPES["mnist5k"][0]  # the embedded default dataset
    cfg: dict[str, Any] = {"name": opts["model"]}
    for key, value in opts.items():
        if key.startswith("model."):
            cfg[key.split(".", 1)[1]] = _literal(value)
    return build_model(cfg, num_classes, shape).eval(), shape


def _literal(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def main(argv: list[str]) -> int:
    """Print the candidate layers; returns the exit status (UserError propagates to the CLI)."""
    opts, model_file, functional = _parse(list(argv))
    module, shape = build(opts, model_file)
    try:
        default = default_layer(module)
    except UserError:
        default = ""
    shapes: dict[str, tuple[int, ...]] = {}
    note = ""
    candidates = [shape] if shape is not None else [(1, 28, 28), (3, 32, 32), (1, 8, 8)]
    for probe in candidates:
        try:
            shapes = layer_shapes(module, torch.zeros(2, *probe))
            note = f"(shapes for input {'x'.join(map(str, probe))})"
            break
        except Exception as exc:  # a wrong shape for this model: list names without shapes
            note = f"(no shapes: probe forward with input {probe} failed: {type(exc).__name__}; give shape=C,H,W)"
    else:
        if shape is None:
            note = "(no shapes: give dataset=NAME or shape=C,H,W)"
    if functional:
        names = list_layers(module, functional=True)
        if not names:
            print("torch.fx cannot trace this model; only module layers (without --functional) can be tapped")
            return 0
        print(f"{type(module).__name__}: {len(names)} fx nodes (attack.layer=NAME)")
        for name in names:
            print(f"  {name}")
        return 0
    modules = dict(module.named_modules())
    names = list_layers(module)
    width = max((len(n) for n in names), default=10)
    print(f"{type(module).__name__}: {len(names)} layers; * = default (attack.layer=NAME overrides) {note}".rstrip())
    for name in names:
        mark = "*" if name == default else " "
        dims = "x".join(str(d) for d in shapes[name]) if name in shapes else "-"
        print(f"{mark} {name:<{width}}  {type(modules[name]).__name__:<18} {dims}")
    if not default:
        print("no default layer for this model: set attack.layer=NAME")
    return 0


if __name__ == "__main__":  # pragma: no cover
    try:
        raise SystemExit(main(sys.argv[1:]))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2)
