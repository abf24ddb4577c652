"""Defenses: one module per defense (ensembles share `defenses/ensembles.py`); each builds a
`harness.core.classifier.Classifier`.

Each module registers its defenses in `harness.core.defense.DEFENSES` when imported; the registry
imports every module here on first use, so a new defense is one file (plus its YAML in
conf/defense/) and nothing else. See docs/extending.md.
"""
from harness.core.defense import DEFENSES, REGISTRY, BuildContext, Defense, build_defense, register  # noqa: F401
