"""The availability-poison contract, its registry, budget checks and the cached poisoning step.

A poison maps a clean training split (uint8 NCHW images and labels) to a perturbation `delta` in
[0, 1] pixel units. This module, not the poison, turns it into poisoned uint8 images:

1. quantise `x/255 + delta` to uint8 (round to nearest; any sample the rounding pushes over its
   budget is re-quantised by truncating `delta` toward zero, which can only shrink every |delta_i|),
2. check the poison's declared `Budget` (L2, L-inf or L0) on every written sample, and refuse to
   return a poisoned set that breaks it (a bug in the poison, so a `PoisonBudgetError`, not a
   user error),
3. apply it to a deterministic, seeded subset of `ratio * N` training samples (the rest stay
   clean), and
4. cache the result under `<cache_dir>/poisons/<hash>.pt`, keyed by the poison's name and
   parameters, the ratio, the seed and the clean training data's fingerprint.

The test split is never touched: poisons only ever receive and return the training split.
"""
from __future__ import annotations

import inspect
import json
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from filelock import FileLock

from harness.core.atomic import atomic_write, atomic_write_json
from harness.core.errors import UserError, choices_error
from harness.core.hashing import stable_hash

REGISTRY: dict[str, type["Poison"]] = {}
NORMS = ("Linf", "L2", "L0")
# Float slack of a budget check on uint8 results (the deltas are multiples of 1/255).
BUDGET_RTOL = 1e-6


class PoisonBudgetError(RuntimeError):
    """A poison wrote a sample outside its declared budget (a bug in the poison)."""


@dataclass(frozen=True)
class Budget:
    """A per-sample perturbation budget.

    norm: "Linf" or "L2" (on the whole image, all channels, in [0, 1] pixel units) or "L0"
        (the number of pixel positions (h, w) where any channel changed).
    eps: the radius; for L0 a whole number of pixel positions.
    """

    norm: str
    eps: float

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"budget norm {self.norm!r} not in {NORMS}")

    def norms(self, delta: torch.Tensor) -> torch.Tensor:
        """Per-sample size of `delta` (N, C, H, W) in this budget's norm (float64)."""
        d = delta.double()
        if self.norm == "Linf":
            return d.flatten(1).abs().amax(dim=1) if d[0].numel() else torch.zeros(len(d), dtype=torch.float64)
        if self.norm == "L2":
            return d.flatten(1).norm(p=2, dim=1)
        return (d != 0).any(dim=1).flatten(1).sum(dim=1).double()

    def allows(self, delta: torch.Tensor) -> torch.Tensor:
        """Per-sample bool: within the budget (with float slack for L2/L-inf)."""
        size = self.norms(delta)
        if self.norm == "L0":
            return size <= self.eps
        return size <= self.eps * (1 + BUDGET_RTOL) + 1e-9

    def describe(self) -> str:
        return f"{self.norm}<={self.eps:.6g}"


@dataclass
class PoisonContext:
    """What a poison may use. `x` is the clean uint8 training split on the CPU."""

    x: torch.Tensor  # uint8 (N, C, H, W)
    y: torch.Tensor  # int64 (N,)
    num_classes: int
    seed: int
    device: torch.device
    progress: bool = False
    facts: dict[str, Any] = field(default_factory=dict)  # a poison may record what it did here

    def x01(self, device: torch.device | None = None) -> torch.Tensor:
        return self.x.to(device or self.device).float().div_(255.0)


class Poison(ABC):
    """Base class: constructor kwargs are the config values; `perturb` returns the float delta.

    Subclasses set `name` (via `@register_poison`), declare their `budget` for a given input shape,
    and set `needs_model = True` when generation trains or queries a network (then the result may
    depend on the device type, which joins the cache key).
    """

    name: ClassVar[str] = ""
    needs_model: ClassVar[bool] = False
    ratio: float = 1.0  # set by `build_poison` from the config's `ratio`

    @abstractmethod
    def budget(self, input_shape: tuple[int, int, int]) -> Budget:
        """The per-sample budget of this poison on images of shape (C, H, W)."""

    @abstractmethod
    def perturb(self, ctx: PoisonContext) -> torch.Tensor:
        """Float delta (N, C, H, W) in [0, 1] units for every training sample (CPU or device)."""

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and k != "ratio"}


def register_poison(name: str):
    """Class decorator: make a poison available to configs under `name`."""

    def wrap(cls: type[Poison]) -> type[Poison]:
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return wrap


def build_poison(spec: dict[str, Any]) -> Poison:
    """Instantiate a poison from its config mapping (`name`, optional `ratio` and `label`, parameters).

    `label` only names a variant on the leaderboard (e.g. a non-default budget); it changes nothing.
    """
    spec = dict(spec or {})
    name = spec.pop("name", None)
    spec.pop("label", None)
    if name not in REGISTRY:
        raise choices_error("poison", name, list(REGISTRY))
    ratio = spec.pop("ratio", 1.0)
    try:
        ratio = float(ratio)
    except (TypeError, ValueError):
        raise UserError(f"poison.ratio={ratio!r} is not a number; use a fraction in (0, 1], e.g. poison.ratio=0.5") from None
    if not 0.0 <= ratio <= 1.0:
        raise UserError(f"poison.ratio={ratio} is outside [0, 1]; use the poisoned fraction, e.g. poison.ratio=0.5")
    cls = REGISTRY[name]
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    for key in spec:
        if key not in params:
            raise UserError(f"poison {name!r} has no parameter {key!r}; valid parameters: {', '.join(['ratio', 'label', *params])}")
    poison = cls(**spec)
    poison.ratio = ratio
    return poison


# ----------------------------------------------------------------------------------------------
# quantisation and budget checks


def quantize_within_budget(x_u8: torch.Tensor, delta: torch.Tensor, budget: Budget) -> torch.Tensor:
    """Poisoned uint8 images `x + delta`, clipped to [0, 255], never outside `budget`.

    Round-to-nearest first (keeps small perturbations alive). Where rounding pushes a sample over
    its budget (L2 can grow by up to 0.5/255 per pixel; L-inf when eps is not a multiple of 1/255),
    the fewest entries needed are truncated toward zero instead, those rounded up the most first.
    Clipping to the box and truncation only shrink |delta_i|, so a float delta within the budget
    always yields a uint8 result within it.
    """
    x = x_u8.to(delta.device).to(torch.float32)
    d255 = delta.to(torch.float32) * 255.0
    rounded = (x + torch.round(d255)).clamp_(0, 255) - x
    over = ~budget.allows(rounded / 255.0)
    if bool(over.any()):
        xo, do, ro = x[over], d255[over], rounded[over]
        to = (xo + torch.trunc(do)).clamp_(0, 255) - xo
        if budget.norm == "Linf":
            fixed = torch.where(ro.abs() > budget.eps * 255.0, to, ro)
        else:  # L2: truncate the entries with the largest rounding excess until the norm fits
            m = len(ro)
            r, t = ro.reshape(m, -1).double(), to.reshape(m, -1).double()
            exact = ((xo + do).clamp(0, 255) - xo).reshape(m, -1).double()
            need = r.pow(2).sum(dim=1) - (budget.eps * 255.0) ** 2 * (1 - 1e-9)
            order = torch.argsort(r.abs() - exact.abs(), dim=1, descending=True, stable=True)
            gain = torch.gather(r.pow(2) - t.pow(2), 1, order).cumsum(dim=1)
            count = (gain < need.view(-1, 1)).sum(dim=1) + 1
            switch = torch.zeros_like(r, dtype=torch.bool)
            switch.scatter_(1, order, torch.arange(r.shape[1], device=r.device).view(1, -1) < count.view(-1, 1))
            fixed = torch.where(switch, t, r).float().view_as(ro)
        still = ~budget.allows(fixed / 255.0)
        fixed[still] = to[still]  # cannot happen for an in-budget delta; truncation is the floor
        rounded[over] = fixed
    return (x + rounded).round_().clamp_(0, 255).to(torch.uint8).cpu()


def check_budget(x_clean: torch.Tensor, x_poisoned: torch.Tensor, budget: Budget, name: str) -> torch.Tensor:
    """Check every written sample; return the per-sample norms, raise `PoisonBudgetError` on any breach."""
    delta = (x_poisoned.to(torch.float64) - x_clean.to(torch.float64)) / 255.0
    ok = budget.allows(delta)
    norms = budget.norms(delta)
    if not bool(ok.all()):
        bad = torch.nonzero(~ok).flatten()
        raise PoisonBudgetError(
            f"poison {name!r} wrote {len(bad)} sample(s) outside its budget {budget.describe()}: "
            f"e.g. sample {int(bad[0])} has {budget.norm} = {float(norms[bad[0]]):.6g}"
        )
    return norms


def poison_mask(n: int, ratio: float, seed: int) -> torch.Tensor:
    """Bool mask of the `round(ratio * n)` poisoned samples, a seeded random subset."""
    k = int(round(ratio * n))
    mask = torch.zeros(n, dtype=torch.bool)
    if k >= n:
        mask[:] = True
    elif k > 0:
        gen = torch.Generator().manual_seed(int(seed) + 7919)  # independent of the poison's own draws
        mask[torch.randperm(n, generator=gen)[:k]] = True
    return mask


# ----------------------------------------------------------------------------------------------
# the cached poisoning step


@dataclass
class PoisonedSplit:
    """The result of poisoning a training split."""

    x: torch.Tensor  # uint8, poisoned where `mask`
    mask: torch.Tensor  # bool (N,)
    facts: dict[str, Any]


def poison_key(poison: Poison, fingerprint: str, seed: int, device: torch.device) -> str:
    """Cache key: everything that determines the poisoned images."""
    return stable_hash({
        "poison": poison.name, "params": poison.describe(), "ratio": poison.ratio, "data": fingerprint,
        "seed": int(seed), "device_type": device.type if poison.needs_model else "any",
    })


def generate(poison: Poison, x: torch.Tensor, y: torch.Tensor, *, num_classes: int, seed: int,
             device: torch.device, progress: bool = False) -> PoisonedSplit:
    """Run the poison on (x, y), quantise, apply to the ratio subset and check the budget (no cache)."""
    if x.dtype != torch.uint8:
        raise UserError(f"poisons need uint8 training images, got {x.dtype}")
    budget = poison.budget(tuple(x.shape[1:]))  # type: ignore[arg-type]
    ctx = PoisonContext(x=x.cpu(), y=y.cpu(), num_classes=int(num_classes), seed=int(seed), device=device, progress=progress)
    mask = poison_mask(len(x), poison.ratio, seed)
    start = time.perf_counter()
    if bool(mask.any()):
        delta = poison.perturb(ctx)
        if tuple(delta.shape) != tuple(x.shape):
            raise PoisonBudgetError(f"poison {poison.name!r} returned delta of shape {tuple(delta.shape)} for images {tuple(x.shape)}")
        if not bool(torch.isfinite(delta).all()):
            raise PoisonBudgetError(f"poison {poison.name!r} returned non-finite perturbations")
        written = quantize_within_budget(x[mask], delta[mask.to(delta.device)], budget)
    else:
        written = x[mask].clone()
    wall = time.perf_counter() - start
    norms = check_budget(x[mask], written, budget, poison.name)  # every written sample
    out = x.clone()
    out[mask] = written
    facts = {
        "poison": poison.name, "params": poison.describe(), "ratio": poison.ratio,
        "budget": {"norm": budget.norm, "eps": budget.eps},
        "n_train": int(len(x)), "n_poisoned": int(mask.sum()),
        "norm_max": float(norms.max()) if len(norms) else 0.0,
        "norm_mean": float(norms.mean()) if len(norms) else 0.0,
        "changed_fraction": float((out != x).flatten(1).any(dim=1).float().mean()) if len(x) else 0.0,
        "wall_s": round(wall, 3), **ctx.facts,
    }
    return PoisonedSplit(out, mask, facts)


def apply_poison(poison: Poison, data: Any, *, seed: int, device: torch.device, cache_dir: Path | None,
                 progress: bool = False) -> tuple[Any, torch.Tensor, dict[str, Any]]:
    """Poison `data.train_x` (a `DatasetSplits`), cached; return (poisoned splits, mask, facts).

    The returned splits share the clean test split; only `train_x` differs, so its fingerprint
    (and with it every trained defense's checkpoint key) changes with the poison.
    """
    if data.train_x is None:
        raise UserError(f"dataset {data.name!r} has no training split to poison; use mnist5k, fashion_mnist, cifar10, ...")
    key = poison_key(poison, data.fingerprint(), seed, device)
    if cache_dir is None:
        split = generate(poison, data.train_x, data.train_y, num_classes=data.num_classes, seed=seed,
                         device=device, progress=progress)
        facts = {**split.facts, "cache_key": key, "cache_hit": False}
    else:
        folder = Path(cache_dir) / "poisons"
        folder.mkdir(parents=True, exist_ok=True)
        blob, meta = folder / f"{key}.pt", folder / f"{key}.json"
        with FileLock(str(folder / f"{key}.lock")):
            hit = blob.is_file() and meta.is_file()
            if hit:
                stored = torch.load(blob, map_location="cpu", weights_only=True)
                split = PoisonedSplit(stored["x"], stored["mask"], json.loads(meta.read_text()))
                # a cache file is data like any other: re-check the budget before trusting it
                budget = poison.budget(tuple(data.train_x.shape[1:]))
                check_budget(data.train_x[split.mask], split.x[split.mask], budget, poison.name)
            else:
                split = generate(poison, data.train_x, data.train_y, num_classes=data.num_classes, seed=seed,
                                 device=device, progress=progress)
                atomic_write(blob, lambda p: torch.save({"x": split.x, "mask": split.mask}, p))
                atomic_write_json(meta, split.facts)
        facts = {**split.facts, "cache_key": key, "cache_hit": hit}
    poisoned = data.with_train(split.x, data.train_y, poison=poison.name, poison_ratio=poison.ratio, poison_key=key)
    return poisoned, split.mask, facts


def l2_for_linf_equivalent(pixel_eps: float, input_shape: tuple[int, ...]) -> float:
    """The L2 norm of a uniform `pixel_eps` perturbation on every entry: sqrt(d) * pixel_eps."""
    return math.sqrt(math.prod(input_shape)) * pixel_eps
