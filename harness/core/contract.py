"""Checks of the model contract, run before any attack and before anything is written.

A model must map [0, 1] NCHW images to finite logits of shape (N, C), in eval mode, and be as
deterministic as it declares. Probabilities passed off as logits flatten gradients (softmax
saturates), so they are refused too.
"""
from __future__ import annotations

import torch

from harness.core.classifier import Classifier
from harness.core.errors import UserError


@torch.no_grad()
def check_classifier(clf: Classifier, x: torch.Tensor) -> None:
    """Raise `UserError` naming the first contract violation found on the probe batch `x`."""
    module = clf.module
    if module.training:
        raise UserError("the model is in training mode; the harness evaluates models in eval() mode (call model.eval())")
    out = module(x)
    if isinstance(out, (tuple, list, dict)):
        raise UserError(f"the model returns a {type(out).__name__}, not a logits tensor of shape (N, C); return only the logits")
    if not torch.is_tensor(out) or out.dim() != 2 or out.shape[0] != x.shape[0]:
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise UserError(f"the model's output has shape {shape} for {x.shape[0]} inputs; it must be logits of shape (N, C)")
    if out.shape[1] != clf.num_classes:
        raise UserError(f"the model returns {out.shape[1]} classes but the dataset has {clf.num_classes}; check model= / dataset=")
    if not torch.isfinite(out).all():
        raise UserError("the model's output contains NaN or Inf on clean inputs; fix the model or its weights")
    looks_like_probs = bool((out >= 0).all() and (out <= 1).all() and torch.allclose(out.sum(1), torch.ones_like(out[:, 0]), atol=1e-4))
    if looks_like_probs:
        raise UserError("the model returns probabilities (rows in [0,1] summing to 1), not logits; remove the final softmax")
    if not clf.randomized:
        again = module(x)
        if not torch.allclose(out, again, rtol=1e-4, atol=1e-5):
            raise UserError(
                "the model's output changes between two calls on the same input but it declares no randomness; "
                "put it in eval() mode, or declare randomized=true (defense.randomized=true) to get EOT and repeated decisions"
            )
