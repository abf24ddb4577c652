"""Watching a model while it runs: autograd and optimiser calls inside a forward pass, and state changes.

Used by the health report in the harness (check 3, inference-time optimisation; check 19, model
mode) and by the sandboxed model worker, which runs the same watch on the submitted model and
reports what it saw. It imports only torch, so the worker can load it without the attack plugins.
"""
from __future__ import annotations

import hashlib
import sys
from typing import Any, Callable

import torch
from torch import nn


class AutogradTracer:
    """Counts autograd engine runs and optimiser steps inside a block (AutoAttack's `check_dynamic`).

    Two nets: a profile hook on the autograd engine entry point and on optimiser `step` (catches
    every route, including names imported before the check), installed only when no other
    profiler is active; and wrappers around `torch.autograd.grad` / `backward` and
    `Tensor.backward`, which are always in place during the block.
    """

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def _count(self, label: str) -> None:
        self.calls[label] = self.calls.get(label, 0) + 1

    def _profile(self, frame: Any, event: str, arg: Any) -> None:
        if event != "call":
            return
        name = frame.f_code.co_name
        if name == "_engine_run_backward" or name == "step":
            path = frame.f_code.co_filename.replace("\\", "/")
            if name == "_engine_run_backward" and "/torch/autograd/" in path:
                self._count("autograd engine")
            elif name == "step" and "/torch/optim/" in path:
                self._count("optimizer.step")

    def _wrap(self, fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self._count(label)
            return fn(*args, **kwargs)
        return wrapped

    def __enter__(self) -> "AutogradTracer":
        self._saved = (torch.autograd.grad, torch.autograd.backward, torch.Tensor.backward)
        torch.autograd.grad = self._wrap(self._saved[0], "torch.autograd.grad")  # type: ignore[assignment]
        torch.autograd.backward = self._wrap(self._saved[1], "torch.autograd.backward")  # type: ignore[assignment]
        torch.Tensor.backward = self._wrap(self._saved[2], "Tensor.backward")  # type: ignore[method-assign]
        self._profiling = sys.getprofile() is None
        if self._profiling:
            sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._profiling:
            sys.setprofile(None)
        torch.autograd.grad, torch.autograd.backward, torch.Tensor.backward = self._saved  # type: ignore[assignment]


def state_digest(module: nn.Module) -> dict[str, str]:
    """sha256 per parameter and buffer: a cheap snapshot to tell later whether any changed."""
    out = {}
    for name, value in module.state_dict().items():
        t = value.detach()
        h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        out[name] = h.hexdigest()
    return out


def changed_since(before: dict[str, str], module: nn.Module) -> list[str]:
    """Names of the state tensors that differ from a `state_digest` snapshot (or vanished)."""
    after = state_digest(module)
    return sorted(k for k, v in before.items() if after.get(k) != v)


def training_modules(module: nn.Module) -> list[str]:
    """Submodules left in training mode."""
    return [name or "(root)" for name, m in module.named_modules() if m.training]
