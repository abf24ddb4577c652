"""Stable content hashes for configs, tensors and files (run directories and caches are keyed by them)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch


def _default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    raise TypeError(f"cannot hash {type(obj).__name__}")


def stable_hash(obj: Any, length: int = 16) -> str:
    """sha256 of the canonical JSON of `obj` (sorted keys), truncated to `length` hex digits."""
    text = json.dumps(obj, sort_keys=True, default=_default, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def tensor_hash(t: torch.Tensor, length: int = 16) -> str:
    """Hash of a tensor's dtype, shape and bytes (CPU copy)."""
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:length]


def module_hash(module: torch.nn.Module, length: int = 16) -> str:
    """Hash of a module's state dict (names, shapes, values): identifies trained weights."""
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor_hash(value, 64).encode())
    return h.hexdigest()[:length]


def file_sha256(path: Path) -> str:
    """Full sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
