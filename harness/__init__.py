"""RobustArena harness: evaluate a model against a suite of attacks, per-sample worst case, every
adversarial example verified; the library behind the `arena` command.

    import harness
    res = harness.evaluate(model, x, y, norm="Linf", eps=8/255, suite="quick")
    out = harness.attack(model, x, y, "pgd", norm="Linf", eps=8/255, steps=50)

Importing `harness` is light: the API (torch, Hydra) loads on first use of an attribute below.
Layers and where everything lives: docs/architecture.md.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["evaluate", "attack", "EvalResult", "AttackOutput", "Adversarial", "UserError", "__version__"]
_API = ("evaluate", "attack", "EvalResult", "AttackOutput", "Adversarial")


def __getattr__(name: str) -> Any:
    if name in _API:
        from harness import api

        return getattr(api, name)
    if name == "UserError":
        from harness.core.errors import UserError

        return UserError
    raise AttributeError(f"module 'harness' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API, "UserError"])
