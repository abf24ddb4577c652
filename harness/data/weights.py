"""Safe checkpoint loading and the trained-model cache.

Weights are always read with `torch.load(..., weights_only=True)`: a pickle carrying arbitrary
objects is refused, and so are missing, truncated or HTML files (a classic of Google-Drive
downloads), each with a one-line error that says what to do.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from filelock import FileLock
from torch import nn

from harness.core.atomic import atomic_write, atomic_write_json
from harness.core.errors import UserError


def load_weights(path: Path | str) -> Any:
    """Load a weights file safely (tensors, dicts and lists of tensors only)."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist; check the path (relative paths are from the working directory)")
    with open(path, "rb") as fh:
        head = fh.read(512)
    if not head:
        raise UserError(f"checkpoint {str(path)!r} is empty; download or save it again")
    if head.lstrip()[:1] == b"<" or b"<html" in head.lower() or b"<!doctype" in head.lower():
        raise UserError(f"checkpoint {str(path)!r} is an HTML page, not weights (a failed download?); fetch the real file")
    if head[:2] == b"PK":
        try:
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()
        except zipfile.BadZipFile:
            raise UserError(f"checkpoint {str(path)!r} is truncated or corrupt (bad zip archive); download or save it again") from None
        if bad is not None:
            raise UserError(f"checkpoint {str(path)!r} is corrupt (member {bad!r} fails its CRC); download or save it again")
    elif head[:1] != b"\x80":  # neither torch.save's zip archive nor its legacy pickle (protocol byte 0x80)
        raise UserError(f"checkpoint {str(path)!r} is not a PyTorch weights file (neither a zip archive nor a pickle); "
                        f"save the weights with torch.save(model.state_dict(), path)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for arbitrary objects, EOF for truncation
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc) or "GLOBAL" in str(exc):
            raise UserError(
                f"checkpoint {str(path)!r} carries arbitrary Python objects and is refused (weights_only=True); "
                f"re-save it as a plain state dict with torch.save(model.state_dict(), path)"
            ) from None
        raise UserError(f"checkpoint {str(path)!r} cannot be read ({type(exc).__name__}: {msg[:120]}); download or save it again") from None


def extract_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """Accept a state dict or a dict wrapping one (`state_dict`, `model`, `net`); strip `module.`."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model", "net"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise UserError("checkpoint does not hold a state dict (a mapping of parameter names to tensors); save model.state_dict()")
    return {k[7:] if k.startswith("module.") else k: v for k, v in obj.items()}


def load_into(module: nn.Module, path: Path | str) -> nn.Module:
    """Load a weights file into `module` strictly, naming missing/unexpected keys on mismatch."""
    state = extract_state_dict(load_weights(path))
    own = module.state_dict()
    wrong = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:  # load_state_dict raises a multi-line RuntimeError for these, even with strict=False
        k = wrong[0]
        raise UserError(
            f"checkpoint {str(path)!r} does not fit the model: {len(wrong)} tensors differ in shape, e.g. {k} is "
            f"{tuple(state[k].shape)} in the file but {tuple(own[k].shape)} in the model; check model= / defense.model_file"
        )
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise UserError(
            f"checkpoint {str(path)!r} does not fit the model: missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}; check model= / defense.model_file"
        )
    return module


def cached_training(
    cache_dir: Path,
    key: str,
    module: nn.Module,
    train_fn: Callable[[nn.Module], dict[str, Any]],
) -> tuple[nn.Module, dict[str, Any], bool]:
    """Train `module` with `train_fn` unless weights for `key` are cached; return (module, facts, hit).

    The cache entry is `<cache_dir>/<key>.pt` plus `<key>.json` (training facts), written
    atomically under a file lock, so concurrent sweeps train each configuration once.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    weights, facts_path = cache_dir / f"{key}.pt", cache_dir / f"{key}.json"
    with FileLock(str(cache_dir / f"{key}.lock")):
        if weights.is_file() and facts_path.is_file():
            module.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
            return module.eval(), json.loads(facts_path.read_text()), True
        facts = train_fn(module)
        state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
        atomic_write(weights, lambda p: torch.save(state, p))
        atomic_write_json(facts_path, facts)
        return module.eval(), facts, False
