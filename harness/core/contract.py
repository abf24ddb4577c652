"""Checks of the model contract, run before any attack and before anything is written.

A model must map [0, 1] NCHW images to finite logits of shape (N, C), in eval mode, and be as
deterministic as it declares. Probabilities passed off as logits flatten gradients (softmax
saturates), so they are refused too.
"""
from __future__ import annotations

import torch

from harness.core.classifier import Classifier
from harness.core.errors import UserError


def input_error(exc: Exception, shape: tuple[int, ...], dataset: str) -> UserError:
    """The one-line error for a model that cannot take the dataset's images."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
    c, h, w = shape[-3:]
    return UserError(f"the model cannot take {c}x{h}x{w} images from dataset {dataset!r} ({type(exc).__name__}: {first}); "
                     f"choose a model= (or defense.model_file) built for {c}x{h}x{w} inputs, or another dataset=")


@torch.no_grad()
def probe_input(module: torch.nn.Module, shape: tuple[int, ...], dataset: str) -> None:
    """One forward pass on blank images of the dataset's shape, before any training or attack:
    an architecture that cannot take them fails here with one line, not deep inside a training
    step. The random number generators are left as they were (training stays reproducible)."""
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = module.training
    module.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            module(torch.zeros(2, *shape[-3:], device=device))
    except torch.cuda.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise input_error(exc, shape, dataset) from None
    finally:
        module.train(was_training)


@torch.no_grad()
def check_classifier(clf: Classifier, x: torch.Tensor, dataset: str = "the dataset", max_label: int | None = None) -> None:
    """Raise `UserError` naming the first contract violation found on the probe batch `x`.

    `dataset` and `max_label` (the largest label in its test split) only word the messages.
    """
    module = clf.module
    if module.training:
        raise UserError("the model is in training mode; the harness evaluates models in eval() mode (call model.eval())")
    try:
        out = module(x)
    except torch.cuda.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise input_error(exc, tuple(x.shape), dataset) from None
    if isinstance(out, (tuple, list, dict)):
        raise UserError(f"the model returns a {type(out).__name__}, not a logits tensor of shape (N, C); return only the logits")
    if not torch.is_tensor(out) or out.dim() != 2 or out.shape[0] != x.shape[0]:
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise UserError(f"the model's output has shape {shape} for {x.shape[0]} inputs; it must be logits of shape (N, C)")
    if out.shape[1] != clf.num_classes:
        if max_label is not None and max_label >= out.shape[1]:
            raise UserError(f"dataset {dataset!r} has label {max_label} but the model returns {out.shape[1]} classes "
                            f"(labels 0..{out.shape[1] - 1}); fix the labels, or use a model with {max_label + 1} outputs")
        raise UserError(f"the model returns {out.shape[1]} classes but dataset {dataset!r} has {clf.num_classes}; "
                        f"check model= / dataset= (or set dataset.num_classes={out.shape[1]})")
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


def output_problem(out: object, n: int, num_classes: int) -> str | None:
    """What is wrong with one model output the judge is about to use, or None.

    The contract probe above sees 8 inputs once; a model can still break it on other batches
    (NaN only on large batches, probabilities, a wrong shape), so the evaluator checks every
    output it decides with: a float tensor of shape (n, num_classes), finite, and not rows that all
    lie in [0, 1] and sum to 1 over the whole batch (probabilities). One host sync.
    """
    if not torch.is_tensor(out):
        return f"the model returned a {type(out).__name__}, not a logits tensor of shape ({n}, {num_classes})"
    if out.dim() != 2 or tuple(out.shape) != (n, num_classes):
        return f"the model's output has shape {tuple(out.shape)} for {n} inputs; it must be logits of shape ({n}, {num_classes})"
    if not out.is_floating_point():
        return f"the model's output has dtype {out.dtype}; it must be float logits"
    if n == 0:
        return None
    o = out.detach()
    finite = torch.isfinite(o).all(dim=1)
    probs = (o >= 0).all() & (o <= 1).all() & ((o.sum(dim=1) - 1).abs() <= 1e-4).all()
    bad_rows, is_probs = torch.stack([(~finite).sum(), probs.long()]).tolist()  # the one host sync
    if bad_rows:
        return f"the model's output contains NaN or Inf in {bad_rows} of {n} rows"
    if is_probs:
        return "the model returns probabilities (every row in [0,1] summing to 1), not logits"
    return None
