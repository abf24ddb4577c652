"""Safe checkpoint loading, checkpoints as researchers save them, and the trained-model cache.

Weights are always read with `torch.load(..., weights_only=True)`: a pickle carrying arbitrary
objects is refused, and so are missing, truncated or HTML files (a classic of Google-Drive
downloads), each with a one-line error that says what to do.

Published robust checkpoints rarely are a bare `model.state_dict()`. `load_into` accepts:
- envelopes: `{"state_dict": ...}`, `{"model_state_dict": ...}`, `{"model": ...}`, `{"net": ...}`,
  nested (`{"model": {"state_dict": ...}}`), next to other entries (epoch, optimizer, ...);
- key prefixes: `module.` (DataParallel) and a wrapper's prefix either way, e.g. a normaliser module
  wrapping the network saves `net.conv1.weight` where the architecture has `conv1.weight` (or the
  reverse), found by matching the file's keys against the model's;
and says what it did in one line ("remapped 26 keys: net.* -> *"). Loading is always strict after
remapping: a missing, extra or differently shaped tensor is an error naming it.
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
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


ENVELOPES = ("state_dict", "model_state_dict", "model", "net")


def unwrap_envelopes(obj: Any) -> tuple[Any, list[str]]:
    """The state dict inside known envelopes (possibly nested), and the envelope keys taken."""
    taken: list[str] = []
    for _ in range(4):
        if not isinstance(obj, dict) or (obj and all(torch.is_tensor(v) for v in obj.values())):
            break
        key = next((k for k in ENVELOPES if isinstance(obj.get(k), dict)), None)
        if key is None:
            break
        obj, taken = obj[key], [*taken, key]
    return obj, taken


def extract_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """Accept a state dict or one inside envelopes (`state_dict`, `model`, `net`); strip `module.`."""
    obj, _ = unwrap_envelopes(obj)
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise UserError("checkpoint does not hold a state dict (a mapping of parameter names to tensors); save model.state_dict()")
    return {_strip_module(k): v for k, v in obj.items()}


def _strip_module(key: str) -> str:
    while key.startswith("module."):
        key = key[7:]
    return key


def _prefixes(keys: list[str]) -> list[str]:
    """"" plus every dotted prefix (up to two components) that some key starts with."""
    out = {""}
    for k in keys:
        parts = k.split(".")[:-1]
        for n in (1, 2):
            if len(parts) >= n:
                out.add(".".join(parts[:n]) + ".")
    return sorted(out, key=lambda p: (p != "", p))  # identity first


@dataclass
class KeyMap:
    """How the file's keys map onto the model's: replace prefix `src` by `dst` (on keys that have it)."""

    src: str = ""
    dst: str = ""
    envelope: list[str] = field(default_factory=list)
    module_prefix: bool = False  # DataParallel's `module.` was stripped
    count: int = 0  # keys renamed by src -> dst

    def apply(self, key: str) -> str:
        return self.dst + key[len(self.src):] if key.startswith(self.src) else key

    def describe(self) -> str:
        """One line for the log, empty when the file was a plain state dict with matching keys."""
        parts = []
        if self.envelope:
            parts.append("unwrapped " + "".join(f"[{k!r}]" for k in self.envelope))
        if self.module_prefix:
            parts.append("stripped DataParallel's module.")
        if self.src != self.dst:
            parts.append(f"remapped {self.count} keys: {self.src}* -> {self.dst}*")
        return "; ".join(parts)


def match_keys(file_keys: list[str], model_keys: list[str]) -> tuple[KeyMap, KeyMap]:
    """(the prefix swap that maps the file's keys exactly onto the model's, identity when none does;
    the swap that maps the most keys, for the error message when none is exact)."""
    want = set(model_keys)
    exact, best, best_score = None, KeyMap(), -1
    for src in _prefixes(file_keys):
        for dst in _prefixes(model_keys):
            if src and dst and (src.startswith(dst) or dst.startswith(src)):
                continue  # equivalent to a shorter swap
            m = KeyMap(src, dst)
            mapped = [m.apply(k) for k in file_keys]
            m.count = sum(k.startswith(src) for k in file_keys) if src != dst else 0
            if exact is None and set(mapped) == want and len(set(mapped)) == len(mapped):
                exact = m
            score = sum(k in want for k in set(mapped))
            if score > best_score:
                best, best_score = m, score
    return exact or KeyMap(), best


def remap_state_dict(obj: Any, own: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], KeyMap]:
    """The file's tensors under the model's names (envelopes, `module.`, a wrapper's prefix)."""
    inner, envelope = unwrap_envelopes(obj)
    if not isinstance(inner, dict) or not all(torch.is_tensor(v) for v in inner.values()):
        raise UserError("checkpoint does not hold a state dict (a mapping of parameter names to tensors); save model.state_dict()")
    stripped = {_strip_module(k): v for k, v in inner.items()}
    keymap, _ = match_keys(list(stripped), list(own))
    keymap.envelope = envelope
    keymap.module_prefix = any(k.startswith("module.") for k in inner)
    return {keymap.apply(k): v for k, v in stripped.items()}, keymap


def load_into(module: nn.Module, path: Path | str, log: Callable[[str], None] | None = None) -> nn.Module:
    """Load a weights file into `module` strictly (after remapping), naming missing/unexpected keys.

    `log` receives one line describing any remapping ("remapped 26 keys: net.* -> *").
    """
    own = module.state_dict()
    state, keymap = remap_state_dict(load_weights(path), own)
    how = keymap.describe()
    after = f" (with keys renamed {keymap.src}* -> {keymap.dst}*)" if keymap.src != keymap.dst else ""
    wrong = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:  # load_state_dict raises a multi-line RuntimeError for these, even with strict=False
        k = wrong[0]
        raise UserError(
            f"checkpoint {str(path)!r} does not fit the model{after}: {len(wrong)} tensors differ in shape, e.g. {k} is "
            f"{tuple(state[k].shape)} in the file but {tuple(own[k].shape)} in the model; check model= / defense.model_file"
        )
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    if missing or unexpected:
        _, near = match_keys(list(state), list(own))
        hint = (f" (renaming {near.src}* -> {near.dst}* would match {sum(near.apply(k) in own for k in state)} of "
                f"{len(own)}; the rest differs)" if near.src != near.dst else "")
        raise UserError(
            f"checkpoint {str(path)!r} does not fit the model{after}: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}{hint}; check model= / defense.model_file"
        )
    module.load_state_dict(state, strict=True)
    if how and log is not None:
        log(f"checkpoint {Path(str(path)).name}: {how}")
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
