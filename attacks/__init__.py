"""Evasion attacks (one module per family) and availability poisons (`attacks.poisons`).

Importing this package registers every attack in `harness.core.attack.REGISTRY`.
"""
from harness.core.attack import REGISTRY, Attack, AttackResult, build_attack, register  # noqa: F401
from attacks import pgd, autoattack  # noqa: F401  (registration side effect)

for _optional in ("lafeat", "mora", "zo_ngd", "zo_baselines", "square", "exact"):
    try:  # modules land issue by issue; a missing one must not break the others
        __import__(f"attacks.{_optional}")
    except ModuleNotFoundError as exc:  # pragma: no cover - only while a module is absent
        if exc.name != f"attacks.{_optional}":
            raise
