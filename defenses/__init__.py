"""Defenses: one module per defense; each builds a `harness.core.classifier.Classifier`.

Importing this package registers every defense in `harness.core.defense.REGISTRY`.
"""
from harness.core.defense import REGISTRY, BuildContext, Defense, build_defense, register  # noqa: F401
from defenses import standard, checkpoint  # noqa: F401  (registration side effect)

for _optional in ("gradreg", "pgd_at", "advms", "ensembles", "ueraser", "iss", "augment_baselines"):
    try:  # modules land issue by issue; a missing one must not break the others
        __import__(f"defenses.{_optional}")
    except ModuleNotFoundError as exc:  # pragma: no cover
        if exc.name != f"defenses.{_optional}":
            raise
