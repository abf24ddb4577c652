"""The judge's guards: what an attack is handed cannot bend the verdict, the count or the model.

The evaluator (`harness.evasion.cascade`) decides every verdict itself, and these guards keep the
inputs of that decision out of the attack's reach, or at least make any reach visible:

- **Private inputs.** An attack receives clones of its images and labels (and of the threat
  model); the evaluator verifies against its own tensors, and a stage whose attack wrote into what
  it was handed is void (`inputs_changed`).
- **The model is unchanged** (`ModelSnapshot`): an exact on-device copy of every parameter and
  buffer of every module the attack can reach (decision module, differentiable stand-in, views,
  ensemble members), plus their structure: module types, training flags, hook counts (global
  hooks too), parameter identities, dtypes, devices, shapes, plain attributes. Compared before and
  after every attack stage and after every `prepare()`, with one host sync per comparison (never
  inside attack iterations). A model whose own forward changes that state is refused up front
  (`model_self_changes`, at the contract check), so a difference is always the attack's doing.
- **Passes counted twice** (`PassTally`): while a stage runs, hooks on the model's root modules
  count every image-pass at the model itself (outermost calls only, so a module calling another
  root is one pass), forward and backward. The attack's own counting wrapper must agree; a pass
  that bypasses the wrapper (`access.model.module(x)`) or a wrapper counter rewritten by the
  attack makes the totals differ and voids the stage.
- **Non-finite gradients** (`PassTally.nonfinite_mask`): the backward identity at the model's input
  sees exactly the gradient the attack receives and adds each row's sum into an on-device running
  sum (NaN and Inf are sticky under addition: one cheap reduction per backward, no host sync); the
  mask is read once per stage and becomes the per-sample record column `nonfinite_grad`. A call
  over all of the stage's samples marks rows exactly; a call over a subset (cascades inside an
  attack) cannot be attributed to samples, so it marks every sample of the stage.

What this does not guarantee: Python cannot make in-process objects unreachable. An attack that
walks the garbage collector, frames or closures can still find the evaluator's tensors, the query
ledger or the model; it can also act after the check (threads). Calls of a submodule on their own
(`access.model.module.fc(h)`) and parameter gradients are not counted: the tally counts calls of the
root modules. The guards catch accidents and
every ordinary route, and make a deliberate bypass a visible act; submissions of untrusted code
run out of process (`harness/submit/`).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from torch.nn.modules import module as _module_globals

from harness.core.errors import AttackVoided, UserError

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks", "_global_buffer_registration_hooks",
                 "_global_module_registration_hooks", "_global_parameter_registration_hooks")
_PLAIN = (int, float, str, bool, type(None))


def reachable_modules(clf: Any) -> dict[str, nn.Module]:
    """The roots an attack may reach through its access: decision, stand-in, views (named)."""
    roots: dict[str, nn.Module] = {"model": clf.module}
    if clf.differentiable is not None and clf.differentiable is not clf.module:
        roots["differentiable"] = clf.differentiable
    for name, view in sorted(clf.views.items()):
        roots[f"view {name}"] = view
    return roots


def _unique_modules(roots: dict[str, nn.Module]) -> list[tuple[str, nn.Module]]:
    seen: set[int] = set()
    out = []
    for root_name, root in roots.items():
        for name, mod in root.named_modules(remove_duplicate=False):
            if id(mod) in seen:
                continue
            seen.add(id(mod))
            out.append((f"{root_name}.{name}" if name else root_name, mod))
    return out


def _plain(value: Any) -> bool:
    return isinstance(value, _PLAIN) or (isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value))


class ModelSnapshot:
    """An exact private copy of the reachable model state, and the comparison against it.

    Memory: one copy of the parameters and buffers, on their device. `changes()` names the first
    difference or returns None; it costs one host synchronisation.
    """

    def __init__(self, roots: dict[str, nn.Module]) -> None:
        self._roots = dict(roots)
        self._modules = _unique_modules(self._roots)
        self._tensors: list[tuple[str, nn.Module, str, str, torch.Tensor, torch.Tensor]] = []
        for name, mod in self._modules:
            plain_tensors = {k: v for k, v in vars(mod).items() if not k.startswith("_") and torch.is_tensor(v)}
            for kind, table in (("parameter", mod._parameters), ("buffer", mod._buffers), ("tensor attribute", plain_tensors)):
                for key, t in table.items():
                    if t is not None:
                        self._tensors.append((f"{name}.{key}", mod, kind, key, t, t.detach().clone()))
        self._structure = self._describe()

    def _describe(self) -> list[tuple[str, Any]]:
        """Everything but tensor values, as (what, value) pairs compared in Python."""
        out: list[tuple[str, Any]] = [("the set of reachable modules", tuple(id(m) for _, m in _unique_modules(self._roots)))]
        for name, mod in self._modules:
            out.append((f"the type of {name!r}", (type(mod), getattr(type(mod), "forward", None))))
            out.append((f"the train/eval mode of {name!r}", mod.training))
            out.append((f"the hooks of {name!r}", tuple(len(getattr(mod, h, {}) or {}) for h in _HOOK_DICTS)))
            out.append((f"the attributes of {name!r}", tuple(sorted(k for k in vars(mod) if not k.startswith("_")))))
            out.append((f"a plain attribute of {name!r}",
                        tuple(sorted((k, v) for k, v in vars(mod).items() if not k.startswith("_") and k != "training" and _plain(v)))))
            out.append((f"the parameters/buffers/submodules of {name!r}",
                        (tuple(mod._parameters), tuple(mod._buffers), tuple(mod._modules))))
        for label, mod, kind, key, ref, _ in self._tensors:
            table = {"parameter": mod._parameters, "buffer": mod._buffers}.get(kind, vars(mod))
            current = table.get(key)
            meta = None if current is None else (id(current), current.dtype, current.device, tuple(current.shape))
            out.append((f"the {kind} {label!r} (replaced, or its dtype/device/shape)", meta))
        out.append(("the global module hooks", tuple(len(getattr(_module_globals, h, {}) or {}) for h in _GLOBAL_HOOKS)))
        return out

    def changes(self, extra: Iterable[tuple[str, torch.Tensor]] = ()) -> str | None:
        """The first difference from the snapshot ("parameter 'model.fc.weight' changed"), or None.

        `extra`: more (description, on-device bool scalar) checks to fold into the same single
        host sync (e.g. "the input images changed").
        """
        now = self._describe()
        for (what, before), (_, after) in zip(self._structure, now):
            if before != after:
                return f"it changed {what}"
        labels, flags = [], []
        for what, flag in extra:
            labels.append(what)
            flags.append(flag.reshape(()))
        for label, _mod, kind, _key, ref, snap in self._tensors:
            labels.append(f"it changed the values of the {kind} {label!r}")
            flags.append(_differs(ref.detach(), snap))
        if not flags:
            return None
        hit = torch.stack([f.to(flags[0].device) for f in flags]).cpu()  # the one host sync
        if bool(hit.any()):
            return labels[int(hit.nonzero()[0, 0])]
        return None


def _differs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """On-device bool scalar: do two same-shape tensors differ in any element (NaN equals NaN)?"""
    ne = a != b
    if a.is_floating_point() or a.is_complex():
        ne = ne & ~(torch.isnan(a) & torch.isnan(b))
    return ne.any()


class _TallyBackward(torch.autograd.Function):
    """Identity at the model's input whose backward counts passes and marks non-finite rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, tally: "PassTally", weight: int) -> torch.Tensor:  # type: ignore[override]
        ctx.tally, ctx.weight = tally, weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        ctx.tally.note_backward(grad, ctx.weight)
        return grad, None, None


class PassTally:
    """Independent count of image-passes at the model's root modules while one stage runs.

    `roots`: (module, weight) pairs; one outermost call of a root on B images counts weight*B
    (weight > 1 expresses an ensemble-level call in member passes). Use as a context manager: the
    hooks exist only inside it, so the evaluator's own passes are never counted.
    """

    def __init__(self, roots: list[tuple[nn.Module, int]], n: int, device: torch.device) -> None:
        self.roots = roots
        self.n = n
        self.forward = 0
        self.backward = 0
        # Running per-row sums of every input gradient: NaN and Inf are sticky under addition, so one
        # cheap reduction per backward (no isfinite pass, no host sync) and one check per stage suffice.
        self._sums = torch.zeros(n, dtype=torch.float64, device=device)  # rows attributable to samples
        self._spill = torch.zeros((), dtype=torch.float64, device=device)  # rows that were not
        self._depth = 0
        self._handles: list[Any] = []

    def note_backward(self, grad: torch.Tensor, weight: int) -> None:
        self.backward += weight * grad.shape[0]
        low = grad.dtype in (torch.float16, torch.bfloat16)
        rows = grad.detach().reshape(grad.shape[0], -1).sum(dim=1, dtype=torch.float32 if low else None)
        rows = rows.to(self._sums.device)
        if grad.shape[0] == self.n:
            self._sums.add_(rows)
        else:
            self._spill.add_(rows.sum())

    def _pre(self, weight: int):
        def hook(_module: nn.Module, args: tuple):
            self._depth += 1
            if self._depth > 1:
                return None
            x = args[0] if args else None
            if not torch.is_tensor(x) or x.dim() == 0:
                return None  # no positional image batch: counts nothing, so the totals will disagree
            self.forward += weight * x.shape[0]
            if x.requires_grad:
                return (_TallyBackward.apply(x, self, weight), *args[1:])
            return None
        return hook

    def _post(self, _module: nn.Module, _args: tuple, _out: Any) -> None:
        self._depth -= 1

    def __enter__(self) -> "PassTally":
        for module, weight in self.roots:
            self._handles.append(module.register_forward_pre_hook(self._pre(weight)))
            self._handles.append(module.register_forward_hook(self._post, always_call=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def nonfinite_mask(self) -> torch.Tensor:
        """On-device (n,) bool: samples whose attack saw a non-finite input gradient (a gradient
        whose row sum overflows float32, above ~1e38, counts as non-finite too)."""
        return ~torch.isfinite(self._sums) | ~torch.isfinite(self._spill)


def tally_roots(clf: Any, access: Any) -> tuple[list[tuple[nn.Module, int]], int]:
    """The modules to count at for one stage, and the unit weight M (ensemble members, else 1).

    For ensembles the tally counts member passes: members count 1 per image, any ensemble-level
    root M per image (its member calls are nested, so not counted twice).
    """
    from harness.core.ensemble import Ensemble

    ens = clf.module if isinstance(clf.module, Ensemble) else None
    m = len(ens.members) if ens is not None else 1
    roots = [(mod, m) for mod in reachable_modules(clf).values()]
    from harness.core.access import FeatureAccess

    tap = access.tap if isinstance(access, FeatureAccess) else None
    graph = getattr(tap, "_graph", None)  # an fx feature tap runs the model's parts, not the model
    if isinstance(graph, nn.Module):
        roots.append((graph, m))
    if ens is not None:
        roots += [(member, 1) for member in ens.members]
    seen: set[int] = set()
    unique = []
    for mod, w in roots:
        if id(mod) not in seen:
            seen.add(id(mod))
            unique.append((mod, w))
    return unique, m


def expected_passes(access: Any, unit: int) -> tuple[int, int]:
    """(forward, backward) the attack's own counting wrapper claims, in the tally's units."""
    from harness.core.access import EnsembleAccess

    if isinstance(access, EnsembleAccess) and access.member_counter is not None:
        return int(access.member_counter.forward), int(access.member_counter.backward)
    return unit * int(access.counter.forward), unit * int(access.counter.backward)


def inputs_changed(given: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """On-device bool scalar: does the copy handed to the attack still equal the judge's own?"""
    if given.shape != own.shape or given.dtype != own.dtype:
        return torch.ones((), dtype=torch.bool, device=own.device)
    return _differs(given, own)


def void(label: str, where: str, problem: str) -> AttackVoided:
    """The one-line error of a void stage (`where`: "on batch 3", "in prepare()")."""
    return AttackVoided(
        f"attack {label!r} voided {where}: {problem}; nothing of this batch is recorded and the run stops "
        f"(an attack may only read its own copies and call the model through the access it is given)"
    )


def model_self_changes(snapshot: ModelSnapshot, where: str) -> UserError | None:
    """Error when the model changed while only the harness called it (a stateful forward)."""
    problem = snapshot.changes()
    if problem is None:
        return None
    problem = problem.replace("it changed", "", 1).strip()
    return UserError(
        f"the model changed {problem} during {where}; the harness needs a forward pass that leaves parameters, "
        f"buffers, modes and hooks unchanged (no BatchNorm in train mode, no state updated in forward)"
    )
