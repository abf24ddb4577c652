"""LAFEAT (Yu, Gao, Xu, CVPR 2021): a white-box attack through a latent feature map.

A small head trained on one intermediate feature map of the frozen model (on the model's own
predictions, not ground truth) gives a second, often more fragile view of the decision. Each
gradient step ascends the cross-entropy of a mix of the margin-normalised head logits and the
margin-normalised final logits:

    s_beta(x) = beta*m*h(x)/Delta(h) + (1 - beta*m)*z(x)/Delta(z),   m = 1[argmax h = y]

with Delta(u) = top1(u) - top2(u) (detached). Runs follow the reference (lafeat/lafeat @13017ae):
a beta schedule (0.4, 0.5, 0.3, 0.6, 0.2, 0.7, 0.1, 0.8, 0.0, 0.9), an untargeted stage and a
multi-targeted stage (targets = the 2nd..10th most likely clean classes, loss -CE(s, t)), each run
from the clean image with a fresh random start, cosine step size 2*eps -> 0 with momentum 0.75,
a per-sample move mask (fooled samples stop) and still-robust samples processed in order of clean
margin. Differences from the reference (all documented in docs/lafeat.md): one extra check after
the last step (the reference never checks its final iterate), a distinct seed per run instead of
re-seeding every run to 0, and configurable per-stage budgets so the attack can be run at a cost
comparable to AutoAttack's.

Head data: by default the train split, else a holdout tail of the evaluation's own split that
must not overlap the evaluated images; `head_data: evaluated` (transductive) is explicit and
labelled. One head per evaluation (never per shard).

Cost accounting: every forward/backward image-pass through the model while attacking is counted
on the evaluator's counter; the head's training passes are returned by `prepare` as
`prepare_forward` / `prepare_backward`, which the evaluator charges to the attack's cost.

Bookkeeping: every iterate is scored by the harness's verdict (the true decision; the fraction of
fooled draws on a randomised model) and the most fooled iterate is kept, never the first one that
the differentiated logits call fooled.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.attack import Attack, AttackResult, PrepareContext, register
from harness.core.access import Capability, FeatureAccess, PassCounter, count_input
from harness.core.errors import UserError
from harness.core.features import FeatureTap, resolve_layer
from harness.core.hashing import stable_hash, tensor_hash
from harness.core.losses import margin
from harness.core.threat import ThreatModel
from harness.core.verdict import BestIterate, confirm, fully_fooled, is_fooled
from harness.data.training import augment_batch, to_unit

HEADS = ("conv", "linear")
HEAD_DATA = ("auto", "train", "holdout", "evaluated")
AUGMENTS = ("auto", "reference", "crop_flip", "crop", "none")
HEAD_CACHE_VERSION = 2  # 2: training set disjoint from the evaluated images by default, new facts
EPS_MARGIN = 1.9e-8  # the reference's float-safety margin inside the ball


def beta_schedule(start: float = 0.0, stop: float = 1.0, step: float = 0.1) -> list[float]:
    """The reference's order: `arange(start, stop, step)` interleaved outwards from the middle."""
    n = int(math.floor((stop - start) / step + 1e-9))
    values = [round(start + i * step, 10) for i in range(n)]
    mid = len(values) // 2
    lower, upper = list(reversed(values[:mid])), values[mid:]
    out: list[float] = []
    for i in range(max(len(lower), len(upper))):
        if i < len(lower):
            out.append(lower[i])
        if i < len(upper):
            out.append(upper[i])
    return out


REFERENCE_BETAS = beta_schedule()  # [0.4, 0.5, 0.3, 0.6, 0.2, 0.7, 0.1, 0.8, 0.0, 0.9]


# ---------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------
class ConvHead(nn.Module):
    """The reference head, generalised to any C x H x W map.

    Reference (WRN 640x8x8): Conv 2x2/2 (C->64, no bias) -> ReLU -> Conv 2x2/2 (64->64, no bias)
    -> ReLU -> flatten (256) -> Linear 256->256 -> ReLU -> Linear 256->K. Here an adaptive average
    pool to 2x2 follows the convs (identity for 8x8 maps), so any map size gives 256 features; a
    side already below 2 gets a 1x1 conv. A flat (N, D) feature gets the MLP part only.
    """

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, width: int = 64, hidden: int = 256) -> None:
        super().__init__()
        self.in_shape = tuple(in_shape)
        if len(in_shape) == 3:
            c, h, w = in_shape
            layers: list[nn.Module] = []
            for _ in range(2):
                k = 2 if min(h, w) >= 2 else 1
                layers += [nn.Conv2d(c, width, k, stride=k, bias=False), nn.ReLU()]
                c, h, w = width, h // k, w // k
            layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten()]
            self.features = nn.Sequential(*layers)
            flat = width * 4
        elif len(in_shape) == 1:
            self.features = nn.Identity()
            flat = in_shape[0]
        else:
            raise UserError(f"lafeat head: feature map of shape {tuple(in_shape)} unsupported; tap a layer with a (C,H,W) or (D,) output")
        self.mlp = nn.Sequential(nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(f))


class LinearHead(nn.Module):
    """Linear probe: global-average-pooled map (or the flat feature) -> Linear C->K."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.in_shape = tuple(in_shape)
        if len(in_shape) not in (1, 3):
            raise UserError(f"lafeat head: feature map of shape {tuple(in_shape)} unsupported; tap a layer with a (C,H,W) or (D,) output")
        self.fc = nn.Linear(in_shape[0], num_classes)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(f.mean(dim=(2, 3)) if f.dim() == 4 else f)


def build_head(kind: str, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return ConvHead(in_shape, num_classes) if kind == "conv" else LinearHead(in_shape, num_classes)


def _autoaugment_u8(x_u8: torch.Tensor) -> torch.Tensor:
    """AutoAugment (CIFAR-10 policy) per image on uint8 CPU tensors, as the reference's data loader
    does; draws from the global torch RNG, which `train_head` seeds inside `fork_rng`."""
    from torchvision.transforms.v2 import AutoAugment, AutoAugmentPolicy

    aa = AutoAugment(AutoAugmentPolicy.CIFAR10)
    return torch.stack([aa(img) for img in x_u8])


def resolve_augment(augment: str, channels: int) -> str:
    """`auto` = the reference's (crop pad 4 + flip + AutoAugment) for colour images, crop only for
    grey ones (digits: flips and colour policies change what the image shows)."""
    if augment == "auto":
        return "reference" if channels == 3 else "crop"
    return augment


def train_head(
    tap: FeatureTap, head: nn.Module, data_u8: torch.Tensor, *, epochs: int, batch_size: int, lr: float,
    weight_decay: float, augment: str, device: torch.device, seed: int, counter: PassCounter,
) -> list[float]:
    """Fit `head` to the frozen model's own predictions on augmented batches (reference recipe).

    Adam(lr, weight_decay), cosine annealing per epoch to 1e-5, the model kept in eval mode and
    never differentiated. Returns the mean loss per epoch. Forward passes go to `counter`.
    """
    tap.model.eval()
    head.to(device).train()
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1), eta_min=1e-5)
    n = data_u8.shape[0]
    crop = {"reference": "crop_flip", "crop_flip": "crop_flip", "crop": "crop", "none": "none"}[augment]
    losses: list[float] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cpu_gen = torch.Generator().manual_seed(seed)
        dev_gen = torch.Generator(device=device).manual_seed(seed)
        for _ in range(epochs):
            order = torch.randperm(n, generator=cpu_gen)
            total = torch.zeros((), device=device)
            for start in range(0, n, batch_size):
                xb_u8 = data_u8[order[start:start + batch_size]]
                if augment == "reference":
                    xb_u8 = _autoaugment_u8(xb_u8)
                xb = augment_batch(to_unit(xb_u8, device), crop, dev_gen)
                with torch.no_grad():
                    feat, logits = tap(count_input(xb, counter))
                loss = F.cross_entropy(head(feat), logits.argmax(1))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.detach() * xb.shape[0]
            sched.step()
            losses.append(float(total) / n)
    head.eval()
    return losses


@torch.no_grad()
def head_agreement(tap: FeatureTap, head: nn.Module, x_u8: torch.Tensor, device: torch.device,
                   counter: PassCounter, batch_size: int = 500) -> float:
    """Fraction of inputs on which the head's argmax equals the model's prediction."""
    agree = torch.zeros((), dtype=torch.long, device=device)
    for i in range(0, x_u8.shape[0], batch_size):
        feat, logits = tap(count_input(to_unit(x_u8[i:i + batch_size], device), counter))
        agree += (head(feat).argmax(1) == logits.argmax(1)).sum()
    return float(agree) / max(x_u8.shape[0], 1)


# ---------------------------------------------------------------------------------------------
# The attack
# ---------------------------------------------------------------------------------------------
def _margin(u: torch.Tensor) -> torch.Tensor:
    """Delta(u) = top1 - top2 (+ a floor against ties), detached, shaped (N, 1)."""
    top = u.detach().topk(2, dim=1).values
    tiny = 1e-8 if u.dtype in (torch.float32, torch.float64) else 1e-3
    return (top[:, 0] - top[:, 1]).clamp_min(0).add(tiny).unsqueeze(1)


def merge_stage_curves(curves: list[list[dict[str, Any]]], n_total: int | None = None) -> list[dict[str, Any]]:
    """Sum per-batch stage curves (`AttackResult.extras["stages"]`) into one curve for the summary.

    Each entry holds the samples still robust after that stage and the cumulative forward and
    backward image-passes. A batch that stopped early (nothing left to attack) contributes its
    last entry to the later stages. With `n_total` (all evaluated samples), adds robust accuracy.
    """
    labels: list[str] = []
    for curve in curves:
        for entry in curve:
            if entry["stage"] not in labels:
                labels.append(entry["stage"])
    merged = []
    for label in labels:
        total = {"stage": label, "robust": 0, "forward": 0, "backward": 0}
        for curve in curves:
            entry = next((e for e in curve if e["stage"] == label), curve[-1] if curve else None)
            if entry is not None:
                for key in ("robust", "forward", "backward"):
                    total[key] += int(entry[key])
        if n_total:
            total["robust_accuracy"] = total["robust"] / n_total
        merged.append(total)
    return merged


@register("lafeat")
@dataclass
class Lafeat(Attack):
    """LAFEAT with a trained feature head (see module docstring).

    Args:
        layer: feature layer to tap (a name from `arena layers`); None = the documented default.
        head: "conv" (the reference head) or "linear" (a linear probe on pooled features).
        head_epochs, head_batch_size, head_lr, head_weight_decay: head training (reference: 50 in
            the CLI, 100 in the README; 128; Adam 1e-3; 0).
        head_augment: auto | reference (crop+flip+AutoAugment) | crop_flip | crop | none.
        head_data: what the head is trained on. auto = the train split when the dataset has one,
            else `holdout`; train; holdout = a fixed tail of the evaluation's own split (the
            `head_holdout` last images), which must not overlap the evaluated images; evaluated =
            the evaluated images themselves (transductive, today's reference practice; labelled
            as such in the manifest and the run's facts).
        head_holdout: size of that tail: a fraction of the split (0 < f < 1) or a count (>= 1).
        iterations: gradient steps per run (reference CLI default 1, README 1000; default 20).
        betas: untargeted beta schedule (None = the reference's 10 values).
        targets: target classes in the multi-targeted stage (reference 9; 0 = no targeted stage).
        targeted_betas: betas of the targeted stage (None = `betas`, as the reference; default [0.4]).
        targeted_iterations: steps per targeted run (None = `iterations`).
        restarts: random restarts per (beta, target) run (reference 1).
        batch_size: samples per run, taken in order of clean margin (reference CLI 500).
        order_by_margin: process samples in ascending clean-margin order, as the reference does.
        eot: gradient draws averaged per step on randomised models.
    """

    requires = Capability.FEATURES
    amp_safe = True  # sign / normalised steps of input gradients: autocast-safe (evaluator.amp)

    layer: str | None = None
    head: str = "conv"
    head_epochs: int = 50
    head_batch_size: int = 128
    head_lr: float = 1e-3
    head_weight_decay: float = 0.0
    head_augment: str = "auto"
    head_data: str = "auto"
    head_holdout: float = 0.5
    iterations: int = 20
    betas: list[float] | None = None
    targets: int = 9
    targeted_betas: list[float] | None = field(default_factory=lambda: [0.4])
    targeted_iterations: int | None = None
    restarts: int = 1
    batch_size: int = 500
    order_by_margin: bool = True
    eot: int = 1

    def validate(self) -> None:
        head, head_augment, targets = self.head, self.head_augment, self.targets
        if head not in HEADS:
            raise UserError(f"lafeat head={head!r} unknown; use one of: {', '.join(HEADS)}")
        if head_augment not in AUGMENTS:
            raise UserError(f"lafeat head_augment={head_augment!r} unknown; use one of: {', '.join(AUGMENTS)}")
        head_data, head_holdout = self.head_data, self.head_holdout
        if head_data not in HEAD_DATA:
            raise UserError(f"lafeat head_data={head_data!r} unknown; use one of: {', '.join(HEAD_DATA)}")
        if not (0 < float(head_holdout) < 1 or (float(head_holdout) >= 1 and float(head_holdout).is_integer())):
            raise UserError(f"lafeat head_holdout={head_holdout!r} must be a fraction in (0, 1) or a whole count >= 1")
        self.head_holdout = float(head_holdout) if float(head_holdout) < 1 else int(head_holdout)
        for key in ("iterations", "restarts", "batch_size", "head_batch_size", "eot"):
            value = getattr(self, key)
            if int(value) < 1:
                raise UserError(f"lafeat {key}={value} must be >= 1")
        if self.head_epochs < 0 or targets < 0 or (self.targeted_iterations is not None and self.targeted_iterations < 1):
            raise UserError("lafeat head_epochs and targets must be >= 0 and targeted_iterations >= 1")
        betas = REFERENCE_BETAS if self.betas is None else [float(b) for b in self.betas]
        targeted_betas = betas if self.targeted_betas is None else [float(b) for b in self.targeted_betas]
        for b in betas + targeted_betas:
            if not 0.0 <= b <= 1.0:
                raise UserError(f"lafeat beta {b} is outside [0, 1]; betas mix head and final logits")
        self._layer_request = self.layer  # resolved to a concrete name by prepare()
        self.betas = betas
        self.targeted_betas = targeted_betas
        self._head: nn.Module | None = None

    # ---- head ----------------------------------------------------------------------------------
    def head_config(self, channels: int) -> dict[str, Any]:
        """Everything that determines the trained head's weights (part of its cache key)."""
        return {"kind": self.head, "epochs": self.head_epochs, "batch_size": self.head_batch_size,
                "lr": self.head_lr, "weight_decay": self.head_weight_decay,
                "augment": resolve_augment(self.head_augment, channels), "version": HEAD_CACHE_VERSION}

    def head_training_set(self, ctx: PrepareContext) -> tuple[torch.Tensor, dict[str, Any]]:
        """The head's training images and what they are, for the manifest. Never depends on the shard.

        Disjoint from the evaluated images unless `head_data=evaluated` (transductive).
        """
        mode = self.head_data
        has_train = ctx.train_x is not None and ctx.train_x.shape[0] > 0
        if mode == "auto":
            mode = "train" if has_train else "holdout"
        if mode == "train":
            if not has_train:
                raise UserError("lafeat head_data=train: this dataset has no train split; use attack.head_data=holdout "
                                "(a tail of the test file outside the evaluated range) or head_data=evaluated")
            return ctx.train_x, {"head_data": "train split", "head_data_mode": "train", "head_transductive": False}
        if mode == "evaluated":
            return ctx.eval_x, {"head_data": f"the {ctx.eval_x.shape[0]} evaluated images (transductive)",
                                "head_data_mode": "evaluated", "head_transductive": True}
        pool = ctx.test_x if ctx.test_x is not None else ctx.eval_x
        lo, hi = ctx.eval_range if ctx.eval_range is not None else (0, pool.shape[0])
        total = int(pool.shape[0])
        n_hold = int(self.head_holdout * total) if isinstance(self.head_holdout, float) else int(self.head_holdout)
        start = total - n_hold
        if n_hold < 1 or n_hold > total or hi > start:
            fits = max(start - lo, 0)
            raise UserError(
                f"lafeat head_data=holdout trains the head on the last {n_hold} of the {total} test images "
                f"({start}..{total - 1}), which overlaps the evaluated images {lo}..{hi - 1}; evaluate "
                f"n_samples<={fits} from offset {lo}, set attack.head_holdout smaller, or set "
                f"attack.head_data=evaluated (transductive: the head learns the evaluated images)")
        return pool[start:], {"head_data": f"holdout: test images {start}..{total - 1} (the last {n_hold}; "
                                           f"evaluated {lo}..{hi - 1})",
                              "head_data_mode": "holdout", "head_transductive": False,
                              "head_holdout_range": [start, total]}

    def prepare(self, ctx: PrepareContext) -> dict[str, Any]:
        """Resolve the layer, then train (or load the cached) head; returns manifest facts.

        One head per evaluation: its training set (`head_training_set`) and cache key depend on the
        dataset and the whole evaluated range, never on the shard. Its training passes are
        reported as `prepare_forward` / `prepare_backward` (also on a cache hit: the passes that
        produced the cached head), which the evaluator charges to the attack's cost.
        """
        from filelock import FileLock

        module = ctx.classifier.differentiable
        self.layer = resolve_layer(module, self._layer_request)
        tap = FeatureTap(module, self.layer)
        device = torch.device(ctx.device)
        data, source = self.head_training_set(ctx)
        with torch.no_grad():
            feat, logits = tap(to_unit(data[:2], device))
        in_shape, num_classes = tuple(feat.shape[1:]), int(logits.shape[1])
        cfg = self.head_config(int(data.shape[1]))
        key = stable_hash({"model": ctx.model_key, "layer": self.layer, "head": cfg, "seed": int(ctx.seed),
                           "data": tensor_hash(data), "source": source["head_data_mode"]})
        path = Path(ctx.cache_dir) / "lafeat_heads" / f"{key}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(ctx.seed))  # deterministic head initialisation
            head = build_head(self.head, in_shape, num_classes)
        with FileLock(str(path) + ".lock"):
            if path.is_file():
                saved = torch.load(path, map_location="cpu", weights_only=True)
                head.load_state_dict(saved["state_dict"])
                facts = dict(saved["facts"])
                cached = True
            else:
                facts = self._train(tap, head, data, cfg, device, int(ctx.seed), source)
                from harness.core.atomic import atomic_write

                state = {"state_dict": {k: v.cpu() for k, v in head.state_dict().items()}, "facts": facts}
                atomic_write(path, lambda p: torch.save(state, p))
                cached = False
        head.to(device).eval().requires_grad_(False)
        eval_counter = PassCounter()
        facts.update({
            **source,
            "head_cached": cached, "head_key": key,
            "head_agreement": head_agreement(tap, head, ctx.eval_x, device, eval_counter),
            "head_agreement_forward": eval_counter.forward,  # a diagnostic, not the attack's cost
            "prepare_forward": int(facts["head_train_forward"]), "prepare_backward": int(facts["head_train_backward"]),
        })
        self._head = head
        return facts

    def _train(self, tap: FeatureTap, head: nn.Module, data: torch.Tensor, cfg: dict[str, Any],
               device: torch.device, seed: int, source: dict[str, Any]) -> dict[str, Any]:
        counter = PassCounter()
        start = time.perf_counter()
        losses = train_head(tap, head, data, epochs=cfg["epochs"], batch_size=cfg["batch_size"], lr=cfg["lr"],
                            weight_decay=cfg["weight_decay"], augment=cfg["augment"], device=device, seed=seed,
                            counter=counter)
        train_counter = PassCounter()
        agree_train = head_agreement(tap, head, data, device, train_counter)
        return {
            "lafeat_layer": self.layer, **source,
            "head_kind": cfg["kind"], "head_data_n": int(data.shape[0]), "head_augment": cfg["augment"],
            "head_epochs": cfg["epochs"], "head_agreement_train": agree_train,
            "head_final_loss": losses[-1] if losses else None,
            # epochs x images through the frozen model (no gradient reaches it); the agreement pass
            # after training is a diagnostic, listed apart
            "head_train_forward": counter.forward, "head_train_backward": 0,
            "head_agreement_train_forward": train_counter.forward,
            "head_train_wall_s": time.perf_counter() - start,
        }

    # ---- attack --------------------------------------------------------------------------------
    def stages(self, num_classes: int) -> list[tuple[str, float, int]]:
        """(label, beta, k) per run: k = 0 untargeted, else the k-th most likely clean class."""
        out = [(f"untargeted beta={b:g}", b, 0) for b in self.betas]
        n_targets = min(self.targets, num_classes - 1)
        for b in self.targeted_betas if n_targets > 0 else []:
            out += [(f"targeted beta={b:g} t={k}", b, k) for k in range(2, n_targets + 2)]
        return out

    def run(self, access: FeatureAccess, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
            generator: torch.Generator) -> AttackResult:
        if self._head is None:
            raise RuntimeError("lafeat: prepare() must run before run() (it trains the feature head)")
        if access.layer and access.layer != self.layer:
            raise RuntimeError(f"lafeat: access taps {access.layer!r} but the head was trained on {self.layer!r}")
        head = self._head.to(x.device)
        counter = access.counter
        fwd0, bwd0 = counter.forward, counter.backward
        n = x.shape[0]
        base_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device).cpu())
        with torch.no_grad():
            z0 = access.logits(x)
        best = BestIterate(x)  # per sample, the most fooled iterate of all runs (the harness's verdict)
        best.offer(x, access.verdict(x, y, logits=z0), margin(z0, y))
        robust = ~fully_fooled(best.score)  # still worth attacking: some decision draw is right
        ranked = z0.argsort(dim=1, descending=True)  # targets: k-th most likely clean class
        top = z0.topk(2, dim=1).values
        order = (top[:, 0] - top[:, 1]).argsort(stable=True) if self.order_by_margin else torch.arange(n, device=x.device)
        stage = [""] * n
        curve = [{"stage": "clean", "robust": int(robust.sum()), "forward": counter.forward - fwd0,
                  "backward": counter.backward - bwd0}]
        run_id = 0
        for label, beta, k in self.stages(access.num_classes):
            iters = self.iterations if k == 0 or self.targeted_iterations is None else self.targeted_iterations
            for _ in range(self.restarts):
                gen = torch.Generator(device=x.device).manual_seed(base_seed + 7919 * run_id)
                run_id += 1
                todo = order[robust[order]]
                for chunk in todo.split(self.batch_size):
                    target = ranked[chunk, k - 1] if k > 0 else None
                    found = self._single_run(access, head, x[chunk], y[chunk], target, beta, iters, threat, gen)
                    replaced = best.offer(found.x, found.score, found.loss, idx=chunk)
                    for i in chunk[replaced & is_fooled(found.score)].tolist():
                        stage[i] = label
                    robust[chunk] = ~fully_fooled(best.score[chunk])
            curve.append({"stage": label, "robust": int(robust.sum()), "forward": counter.forward - fwd0,
                          "backward": counter.backward - bwd0})
            if not bool(robust.any()):
                break
        x_adv = threat.project(best.x, x)
        extras = {"layer": self.layer, "n": n, "stages": curve,
                  "forward": counter.forward - fwd0, "backward": counter.backward - bwd0}
        return AttackResult(x_adv, stage=stage, extras=extras)

    def _single_run(self, access: FeatureAccess, head: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    target: torch.Tensor | None, beta: float, iters: int, threat: ThreatModel,
                    gen: torch.Generator) -> BestIterate:
        """One LAFEAT run (reference `attack_single_run`) from a random start: its most fooled iterate.

        Every iterate, the last included, is scored by the harness's verdict (the fraction of
        decision draws it fools; the attack's own EOT draws on a randomised model, confirmed with
        the harness's draws at the end); ties go to the higher margin loss of the final logits. A
        sample stops moving once every draw is fooled (the reference's move mask, judged at the
        pre-step point).
        """
        ball = threat.shrunk(EPS_MARGIN)  # the reference's eps - 1.9e-8
        eps = ball.eps
        shape = (-1, *([1] * (x.dim() - 1)))
        x_cur = ball.random_start(x, gen, sphere=True)
        best = BestIterate(x)
        x_prev = x_cur.clone()
        draws = self.eot if access.randomized else 1
        loss = torch.zeros(x.shape[0], device=x.device)
        for i in range(iters + 1):
            last = i == iters  # the reference never checks its final iterate; we do (forward only)
            x_cur = x_cur.detach().requires_grad_(not last)
            grad = torch.zeros_like(x)
            zs: list[torch.Tensor] = []
            loss = torch.zeros(x.shape[0], device=x.device)
            for _ in range(draws):
                with torch.set_grad_enabled(not last):
                    if last:
                        z = access.logits(x_cur)
                    else:
                        feat, z = access.features(x_cur)
                        h = head(feat)
                        m = beta * (h.detach().argmax(1) == y).to(z.dtype).unsqueeze(1)
                        s = m * h / _margin(h) + (1.0 - m) * z / _margin(z)
                        if target is None:
                            objective = F.cross_entropy(s, y, reduction="sum")
                        else:
                            objective = -F.cross_entropy(s, target, reduction="sum")
                        grad = grad + torch.autograd.grad(objective, x_cur)[0]
                zs.append(z.detach())
                loss = loss + margin(z.detach(), y) / draws
            with torch.no_grad():
                x_cur = x_cur.detach()
                score = access.step_verdict(x_cur, y, zs)
                best.offer(x_cur, score, loss)
                if last:
                    break
                step = 2.0 * eps * (1.0 + math.cos(math.pi * i / iters)) / 2.0
                a = 1.0 if i == 0 else 0.75
                move = (~fully_fooled(score)).to(x.dtype).view(shape)  # judged at the pre-step point
                u = ball.project(x_cur + move * step * ball.ascent_direction(grad), x)
                x_next = ball.project(x_cur + move * (a * (u - x_cur) + (1 - a) * (x_cur - x_prev)), x)
                x_prev, x_cur = x_cur, x_next
        confirm(best, access, x_cur, y, loss)
        return best

