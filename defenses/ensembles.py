"""Ensemble defenses: M members trained together, aggregated by softmax, logit or vote.

Registered names (config `defense=<name>`):

- ``ensemble``: independent members, each trained with its own cross-entropy (the baseline).
- ``adp`` (Pang et al. 2019): sum of CE - alpha * H(mean softmax) - beta * log det(G), G the Gram
  matrix of the members' L2-normalised non-true-class probability vectors (+1e-6 I).
- ``gal`` (Kariyappa & Qureshi 2019): sum of CE + lam * log sum_{i<j} exp(cos(grad_i, grad_j)) of the
  members' input gradients (double backprop), with Gaussian-noise augmentation.
- ``dverge`` (Yang et al. 2020): every member is trained with CE on the *other* members' distilled
  inputs: x_s perturbed (Linf PGD) so that member k's features at a tapped layer match those of
  another image x_t, labelled y_s. Optional plain-CE warm-up epochs stand in for the reference's
  pretrained start.
- ``trs`` (Yang et al. 2021): sum of CE + L_sim * mean_{i<j} |cos(grad_i, grad_j)| +
  L_smooth * mean_i 2 ||grad_i||^2, the smoothness term optionally on a half-clean /
  half-PGD-perturbed batch (`plus_adv`).
- ``ensemble_checkpoint``: members assembled from given model files and weights.

Every trainer goes through `harness.data.training.train` with its loss hook on one `Ensemble`
container (one optimiser over all members; optimisers such as SGD and Adam act per parameter, so
this equals the references' per-member optimisers), and is cached by
`defenses.standard.train_defended` under the hash of the weight-determining parameters (the
aggregation mode is not one of them: the three modes share one training). The member architecture
is the `model=` group; members differ by their initialisation seed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.defense import BuildContext, Defense, register
from harness.core.access import CountingModule, count_input
from harness.core.classifier import Classifier
from harness.core.ensemble import MODES, TIE_BREAKS, Ensemble, make_classifier
from harness.core.errors import UserError
from harness.core.hashing import stable_hash
from harness.data.models import build_model
from harness.data.training import TrainConfig

# Fields that only choose how the trained members are aggregated: not part of the weights' key.
AGGREGATION_FIELDS = ("mode", "tie_break", "vote_sharpness")


# ---------------------------------------------------------------------------------------------
# building blocks shared by the loss hooks and the tests (diversity measurements)
# ---------------------------------------------------------------------------------------------


def unwrap(model: nn.Module) -> tuple[Ensemble, Any]:
    """(the Ensemble container, the training loop's pass counter or None)."""
    if isinstance(model, CountingModule):
        return model.module, model.counter  # type: ignore[return-value]
    return model, None  # type: ignore[return-value]


def member_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Stacked member logits (M, N, C), counted as one ensemble pass by the training loop."""
    ens, counter = unwrap(model)
    return ens.forward_members(count_input(x, counter) if counter is not None else x)


def member_ce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over members of each member's mean cross-entropy (the references' loss_std)."""
    return F.cross_entropy(z.flatten(0, 1), y.repeat(z.shape[0]), reduction="sum") / y.shape[0]


def input_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, create_graph: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(member CE losses (M,), flattened input gradients of each member's CE (M, N, D)).

    With `create_graph` the gradients stay differentiable w.r.t. the weights (double backprop).
    """
    x = x.detach().requires_grad_(True)
    z = member_logits(model, x)
    losses = torch.stack([F.cross_entropy(z[j], y) for j in range(z.shape[0])])
    m = z.shape[0]
    grads = [torch.autograd.grad(losses[j], x, create_graph=create_graph, retain_graph=create_graph or j < m - 1)[0].flatten(1)
             for j in range(m)]
    return losses, torch.stack(grads)


def pairwise_cosines(grads: torch.Tensor) -> torch.Tensor:
    """(P, N) cosine similarity of every member pair i < j, per sample."""
    m = grads.shape[0]
    pairs = [(i, j) for i in range(m) for j in range(i + 1, m)]
    if not pairs:
        return grads.new_zeros(0, grads.shape[1])
    return torch.stack([F.cosine_similarity(grads[i], grads[j], dim=-1, eps=1e-12) for i, j in pairs])


def adp_terms(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ensemble entropy H(mean softmax), mean log det of the non-true-class Gram matrix)."""
    probs = F.softmax(z, dim=-1)  # (M, N, C)
    mean = probs.mean(dim=0)
    entropy = -(mean * torch.log(mean + 1e-20)).sum(dim=-1).mean()
    keep = torch.ones_like(probs[0], dtype=torch.bool).scatter(1, y.view(-1, 1), False)  # (N, C)
    non_y = probs.permute(1, 0, 2)[keep.unsqueeze(1).expand(-1, z.shape[0], -1)].view(z.shape[1], z.shape[0], -1)
    non_y = non_y / non_y.norm(dim=-1, keepdim=True).clamp_min(1e-20)
    gram = non_y @ non_y.transpose(1, 2) + 1e-6 * torch.eye(z.shape[0], device=z.device, dtype=z.dtype)
    return entropy, torch.logdet(gram).mean()


def feature_taps(member: nn.Module) -> list[nn.Module]:
    """DVERGE's candidate layers: every Conv2d and Linear except the last (the logits layer).

    Their outputs are taken before any activation (the reference's `before_relu=True`).
    """
    layers = [m for m in member.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return layers[:-1] if len(layers) > 1 else layers


def tapped_features(member: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Output of `layer` inside `member` for input x (one forward pass, via a hook)."""
    store: dict[str, torch.Tensor] = {}

    def hook(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
        store["f"] = out

    handle = layer.register_forward_hook(hook)
    try:
        member(x)
    finally:
        handle.remove()
    return store["f"]


def distill(member: nn.Module, layer: nn.Module, x_s: torch.Tensor, x_t: torch.Tensor, eps: float, alpha: float,
            steps: int, momentum: bool = True, counter: Any = None) -> torch.Tensor:
    """DVERGE feature distillation: x near x_s (Linf eps) whose tapped features match x_t's.

    Sign steps on the L1-normalised, momentum-accumulated (mu = 1) gradient of the MSE between
    features, no random start (the reference's defaults).
    """
    with torch.no_grad():
        target = tapped_features(member, layer, x_t).detach()
    x_adv = x_s.detach().clone()
    g = torch.zeros_like(x_adv)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        xin = count_input(x_adv, counter) if counter is not None else x_adv
        loss = F.mse_loss(tapped_features(member, layer, xin), target)
        grad = torch.autograd.grad(loss, x_adv)[0]
        with torch.no_grad():
            if momentum:
                grad = grad / grad.flatten(1).abs().sum(1).clamp_min(1e-12).view(-1, *([1] * (grad.dim() - 1)))
                g = g + grad
                grad = g
            x_adv = x_adv.detach() - alpha * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x_s - eps), x_s + eps).clamp(0.0, 1.0)
    return x_adv.detach()


# ---------------------------------------------------------------------------------------------
# the defenses
# ---------------------------------------------------------------------------------------------


class EnsembleDefense(Defense):
    """Shared part: member construction, cached training through `loss`, the classifier."""

    def __init__(self, members: int = 3, mode: str = "softmax", tie_break: str = "lowest",
                 vote_sharpness: float = 10.0, train: dict[str, Any] | None = None) -> None:
        if not isinstance(members, int) or members < 1:
            raise UserError(f"defense.members={members!r} must be an integer >= 1 (the number of ensemble members)")
        if mode not in MODES:
            raise UserError(f"defense.mode={mode!r} unknown; use one of: {', '.join(MODES)}")
        if tie_break not in TIE_BREAKS:
            raise UserError(f"defense.tie_break={tie_break!r} unknown; use one of: {', '.join(TIE_BREAKS)}")
        self.members = members
        self.mode = mode
        self.tie_break = tie_break
        self.vote_sharpness = float(vote_sharpness)
        self.train = dict(train or {})
        TrainConfig.from_dict(self.train)  # fail early on a bad recipe

    def describe(self) -> dict[str, Any]:
        """The weight-determining parameters (the training cache key): aggregation fields excluded."""
        return {k: v for k, v in super().describe().items() if k not in AGGREGATION_FIELDS}

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int) -> torch.Tensor:
        """The training loss (a `harness.data.training.LossFn`); `model` wraps the Ensemble container."""
        return member_ce(member_logits(model, x), y)

    def build_members(self, ctx: BuildContext) -> list[nn.Module]:
        """M fresh members of the configured architecture, each from its own initialisation seed."""
        out = []
        for i in range(self.members):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(stable_hash({"seed": ctx.seed, "member": i}, 8), 16))
                out.append(build_model(ctx.model_cfg, ctx.data.num_classes, ctx.data.input_shape))
        return out

    def build(self, ctx: BuildContext) -> Classifier:
        from defenses.standard import train_defended

        container = Ensemble(self.build_members(ctx), "softmax")
        module, facts = train_defended(ctx, self, loss_fn=self.loss, train_cfg=TrainConfig.from_dict(self.train),
                                       module=container)
        return make_classifier(module, self.mode, ctx.data.num_classes, ctx.data.input_shape,
                               tie_break=self.tie_break, vote_sharpness=self.vote_sharpness,
                               info={**facts, "ensemble_defense": self.name})


@register("ensemble")
class IndependentEnsemble(EnsembleDefense):
    """Independent members: the sum of the members' cross-entropies (no diversity term)."""


@register("adp")
class ADP(EnsembleDefense):
    """Adaptive Diversity Promoting: CE - alpha * ensemble entropy - beta * log-det diversity."""

    def __init__(self, members: int = 3, mode: str = "softmax", tie_break: str = "lowest",
                 vote_sharpness: float = 10.0, train: dict[str, Any] | None = None,
                 alpha: float = 2.0, beta: float = 0.5) -> None:
        super().__init__(members, mode, tie_break, vote_sharpness, train)
        self.alpha = float(alpha)
        self.beta = float(beta)

    def loss(self, model, x, y, epoch):
        z = member_logits(model, x)
        entropy, log_det = adp_terms(z, y)
        return member_ce(z, y) - self.alpha * entropy - self.beta * log_det


@register("gal")
class GAL(EnsembleDefense):
    """Gradient Alignment Loss: CE + lam * log sum_{i<j} exp(cos(grad_i, grad_j))."""

    def __init__(self, members: int = 3, mode: str = "softmax", tie_break: str = "lowest",
                 vote_sharpness: float = 10.0, train: dict[str, Any] | None = None,
                 lam: float = 0.5, noise_std: float = 0.045, noise_p: float = 0.5) -> None:
        super().__init__(members, mode, tie_break, vote_sharpness, train)
        self.lam = float(lam)
        self.noise_std = float(noise_std)
        self.noise_p = float(noise_p)

    def loss(self, model, x, y, epoch):
        if self.noise_std > 0 and self.noise_p > 0:  # Gaussian-noise augmentation (global RNG, seeded by train())
            pick = (torch.rand(x.shape[0], device=x.device) < self.noise_p).view(-1, *([1] * (x.dim() - 1)))
            x = torch.where(pick, (x + self.noise_std * torch.randn_like(x)).clamp(0, 1), x)
        losses, grads = input_gradients(model, x, y)
        cos = pairwise_cosines(grads)
        gal = torch.log(cos.exp().sum(dim=0) + 1e-20).mean() if cos.numel() else losses.new_zeros(())
        return losses.sum() + self.lam * gal


@register("trs")
class TRS(EnsembleDefense):
    """Transferability Reduced Smooth: CE + L_sim * mean |cos| + L_smooth * mean 2||grad||^2."""

    def __init__(self, members: int = 3, mode: str = "softmax", tie_break: str = "lowest",
                 vote_sharpness: float = 10.0, train: dict[str, Any] | None = None,
                 l_sim: float = 10.0, l_smooth: float = 10.0, plus_adv: bool = False, init_eps: float = 0.1,
                 adv_eps: float = 0.2, pgd_steps: int = 6) -> None:
        super().__init__(members, mode, tie_break, vote_sharpness, train)
        self.l_sim = float(l_sim)
        self.l_smooth = float(l_smooth)
        self.plus_adv = bool(plus_adv)
        self.init_eps = float(init_eps)
        self.adv_eps = float(adv_eps)
        self.pgd_steps = int(pgd_steps)

    def _gradient_pgd(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
        """PGD that maximises the members' mean squared input-gradient norm (step eps/3, random start)."""
        adv = (x + (torch.rand_like(x) * 2 - 1) * eps).clamp(0, 1).detach()
        for _ in range(self.pgd_steps):
            adv.requires_grad_(True)
            _, grads = input_gradients(model, adv, y)
            mag = 2 * grads.pow(2).sum(-1).mean(-1).mean()
            g = torch.autograd.grad(mag, adv)[0]
            with torch.no_grad():
                adv = adv + eps / 3 * g.sign()
                adv = torch.min(torch.max(adv, x - eps), x + eps).clamp(0, 1)
        return adv.detach()

    def loss(self, model, x, y, epoch):
        losses, grads = input_gradients(model, x, y)
        cos = pairwise_cosines(grads).abs().mean() if grads.shape[0] > 1 else losses.new_zeros(())
        if self.plus_adv:  # eps annealed linearly from init_eps to adv_eps over training
            epochs = max(int(self.train.get("epochs", 1)), 1)
            eps = (self.adv_eps - self.init_eps) * epoch / epochs + self.init_eps
            half = x.shape[0] // 2
            mixed = torch.cat([x[:half], self._gradient_pgd(model, x[half:], y[half:], eps)])
            _, grads_s = input_gradients(model, mixed, y)
        else:
            grads_s = grads
        smooth = 2 * grads_s.pow(2).sum(-1).mean(-1).mean()
        return losses.sum() + self.l_sim * cos + self.l_smooth * smooth


@register("dverge")
class DVERGE(EnsembleDefense):
    """Diversifying vulnerabilities: each member learns the others' distilled non-robust features.

    Per batch, the target images x_t are the batch itself in a random order (the reference draws
    a second, independently shuffled batch). `layer` is the 1-based index into
    `feature_taps(member)`; None draws one per epoch (seeded), as the reference does without
    `--distill-fixed-layer`.
    """

    def __init__(self, members: int = 3, mode: str = "softmax", tie_break: str = "lowest",
                 vote_sharpness: float = 10.0, train: dict[str, Any] | None = None,
                 eps: float = 0.07, alpha: float = 0.007, steps: int = 10, layer: int | None = None,
                 warmup_epochs: int = 0) -> None:
        super().__init__(members, mode, tie_break, vote_sharpness, train)
        if self.members < 2:
            raise UserError("defense=dverge needs defense.members >= 2 (members learn from each other)")
        self.eps = float(eps)
        self.alpha = float(alpha)
        self.steps = int(steps)
        self.layer = layer
        self.warmup_epochs = int(warmup_epochs)

    def tap_index(self, member: nn.Module, epoch: int) -> int:
        taps = feature_taps(member)
        if self.layer is not None:
            if not 1 <= int(self.layer) <= len(taps):
                raise UserError(f"defense.layer={self.layer} out of range; this architecture has layers 1..{len(taps)}")
            return int(self.layer) - 1
        gen = torch.Generator().manual_seed(int(stable_hash({"dverge_layer_epoch": epoch}, 8), 16))
        return int(torch.randint(0, len(taps), (1,), generator=gen))

    def distilled(self, model: nn.Module, x: torch.Tensor, epoch: int) -> list[torch.Tensor]:
        """One distilled batch per member (members in their current mode)."""
        ens, counter = unwrap(model)
        perm = torch.randperm(x.shape[0], device=x.device)
        x_t = x[perm]
        out = []
        for member in ens.members:
            layer = feature_taps(member)[self.tap_index(member, epoch)]
            out.append(distill(member, layer, x, x_t, self.eps, self.alpha, self.steps, counter=counter))
        return out

    def loss(self, model, x, y, epoch):
        if epoch < self.warmup_epochs:
            return super().loss(model, x, y, epoch)
        ens, counter = unwrap(model)
        data = self.distilled(model, x, epoch)
        total = x.new_zeros(())
        for j, member in enumerate(ens.members):
            for k, xk in enumerate(data):
                if j != k:
                    xin = count_input(xk, counter) if counter is not None else xk
                    total = total + F.cross_entropy(member(xin), y)
        return total


@register("ensemble_checkpoint")
class EnsembleCheckpoint(Defense):
    """Members assembled from given files: each entry `{model_file: FILE.py, weights: FILE}`.

    `model_file` (a Python file defining `create()`) is optional: without it the member is the
    `model=` architecture. Weights are read by the harness with `weights_only=True`. Members may
    differ in architecture and normalisation.
    """

    def __init__(self, members: list[dict[str, Any]] | None = None, mode: str = "softmax", tie_break: str = "lowest",
                 vote_sharpness: float = 10.0, label: str | None = None) -> None:
        members = [dict(m) for m in (members or [])]
        if mode not in MODES:
            raise UserError(f"defense.mode={mode!r} unknown; use one of: {', '.join(MODES)}")
        if tie_break not in TIE_BREAKS:
            raise UserError(f"defense.tie_break={tie_break!r} unknown; use one of: {', '.join(TIE_BREAKS)}")
        self.members = members
        self.mode = mode
        self.tie_break = tie_break
        self.vote_sharpness = float(vote_sharpness)
        self.label = label

    def build(self, ctx: BuildContext) -> Classifier:
        from defenses.checkpoint import import_model_file
        from harness.data.weights import load_into
        from harness.core.hashing import file_sha256

        if not self.members:
            raise UserError(
                "defense=ensemble_checkpoint needs defense.members=[{model_file: a.py, weights: a.pt}, ...] "
                "(one entry per member; model_file optional)"
            )
        for spec in self.members:
            bad = set(spec) - {"model_file", "weights"}
            if bad:
                raise UserError(f"defense.members entry has unknown keys {sorted(bad)}; use model_file and weights")
            if not spec.get("weights") and not spec.get("model_file"):
                raise UserError("each defense.members entry needs weights=FILE (and optionally model_file=FILE.py)")
        modules: list[nn.Module] = []
        facts: list[dict[str, Any]] = []
        for spec in self.members:
            if spec.get("model_file"):
                module = import_model_file(Path(str(spec["model_file"])).expanduser()).create()
                if not isinstance(module, nn.Module):
                    raise UserError(f"create() in {spec['model_file']} returned {type(module).__name__}, not a torch.nn.Module")
            else:
                module = build_model(ctx.model_cfg, ctx.data.num_classes, ctx.data.input_shape)
            fact: dict[str, Any] = {"model_file": spec.get("model_file")}
            if spec.get("weights"):
                load_into(module, spec["weights"])
                fact["weights_sha256"] = file_sha256(Path(str(spec["weights"])).expanduser())
            modules.append(module.to(ctx.device).eval())
            facts.append(fact)
        return make_classifier(modules, self.mode, ctx.data.num_classes, ctx.data.input_shape,
                               tie_break=self.tie_break, vote_sharpness=self.vote_sharpness,
                               info={"member_files": facts, "ensemble_defense": self.name, "label": self.label})


def diversity_summary(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Diagnostics on held-out data: pairwise gradient |cos|, gradient norm, ADP log-det."""
    ens, _ = unwrap(model)
    ens.eval()
    _, grads = input_gradients(ens, x, y, create_graph=False)
    grads = grads * x.shape[0]  # per-sample gradient of each sample's own CE (the loss is a batch mean)
    with torch.no_grad():
        z = ens.forward_members(x)
        entropy, log_det = adp_terms(z, y)
    cos = pairwise_cosines(grads)
    return {
        "grad_cos": float(cos.mean()) if cos.numel() else float("nan"),
        "grad_abs_cos": float(cos.abs().mean()) if cos.numel() else float("nan"),
        "grad_sq_norm": float(grads.pow(2).sum(-1).mean()),
        "log_det": float(log_det),
        "entropy": float(entropy),
        "member_acc": float((z.argmax(-1) == y).float().mean()),
    }


def cross_distilled_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, layer: int = 1, eps: float = 0.07,
                             alpha: float = 0.007, steps: int = 10, seed: int = 0) -> float:
    """DVERGE's diversity diagnostic: how often member j still predicts y_s on member k's distilled inputs (j != k).

    Inputs are distilled (as in training) from x towards the features of a shuffled copy of x at
    tap `layer` (1-based). Higher = the members share fewer non-robust features.
    """
    ens, _ = unwrap(model)
    ens.eval()
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed)).to(x.device)
    data = [distill(m, feature_taps(m)[layer - 1], x, x[perm], eps, alpha, steps) for m in ens.members]
    hits = []
    with torch.no_grad():
        for j, member in enumerate(ens.members):
            for k, xk in enumerate(data):
                if j != k:
                    hits.append((member(xk).argmax(1) == y).float().mean())
    return float(torch.stack(hits).mean())
