"""Availability poisons (unlearnable examples): perturb the training split so that models trained
on it fail on clean test data.

Importing this package registers every poison in `harness.core.poison.REGISTRY`:
`none` (the clean control), `lsp`, `ar`, `ops` (model-free) and `em` (error-minimising, with a
surrogate). See docs/poisoning.md for the specs, budgets and the adaptations to 28 x 28 grey data.
"""
from harness.core.poison import (  # noqa: F401
    REGISTRY, Budget, Poison, PoisonBudgetError, PoisonContext, apply_poison, build_poison, check_budget,
    generate, register_poison,
)
from attacks.poisons import none, lsp, ar, ops, em  # noqa: F401  (registration side effect)
