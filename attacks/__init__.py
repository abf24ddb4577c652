"""Evasion attacks, one module per family, and availability poisons (`attacks.poisons`).

Each module registers its attacks in `harness.core.attack.ATTACKS` when imported; the registry
imports every module here on first use, so a new attack is one file (plus its YAML in
conf/attack/) and nothing else. See docs/extending.md.
"""
from harness.core.attack import ATTACKS, REGISTRY, Attack, AttackResult, build_attack, register  # noqa: F401
