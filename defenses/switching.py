"""Random model switching (HRS / AdvMS): blocks of parallel channels, one channel per block per draw.

A base architecture is cut into B contiguous blocks (`split_model`). A switching network holds,
for block b, S_b "channels": copies of that block with their own weights. Each forward draws one
channel per block, so every draw runs an ordinary base-architecture network (an "active path");
there are prod_b S_b paths.

Granularity (`mode`):
- `batch` (the HRS reference): one path per forward call, shared by the whole batch. The draw
  comes from the global torch CPU generator (the path choice is host-side, so no device sync).
- `sample`: an independent path per sample, drawn from the global generator of the input's
  device. Implemented without host sync by running every channel of a block on the whole batch
  and gathering each sample's channel (S_b times the compute of routing; identical outputs).

Both draw from the global torch RNG, so `torch.manual_seed(s)` before a call reproduces it; the
evaluator seeds it per batch before each attack and each decision.

Views for attacks (`Classifier.views`):
- `FixedPaths`: the same switching network with its randomness frozen by a seed (every call
  re-seeds private generators): a deterministic model, the "fixed randomness" control.
- `ExpectedModel`: the exact expectation over all paths, log(mean_p softmax(z_p)) returned as
  logits (softmax of it is the mean probability), for small path counts.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.errors import UserError

MODES = ("batch", "sample")

StageFn = Callable[["Piece", torch.Tensor], torch.Tensor]


class Piece(nn.Module):
    """A contiguous slice of a base model's forward: some of its submodules plus stage functions.

    The submodules are shared with the model the piece was cut from (no copy); the first piece
    carries the model's normalisation constants as its own non-persistent buffers.
    """

    def __init__(self, parts: dict[str, nn.Module], stages: Sequence[StageFn], model: nn.Module | None = None,
                 normalize: bool = False) -> None:
        super().__init__()
        self.parts = nn.ModuleDict(parts)
        self._stages = list(stages)
        self.normalize = normalize
        if normalize:
            assert model is not None
            self.register_buffer("mean", model.mean.detach().clone(), persistent=False)
            self.register_buffer("std", model.std.detach().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            x = (x - self.mean) / self.std
        for stage in self._stages:
            x = stage(self, x)
        return x


def _maybe_pool(h: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(h, 2) if h.shape[-1] >= 16 else h


# Stage lists replicate each architecture's forward in `harness.data.models` exactly (a test checks the
# composition against the model). Each stage: (submodule names, function).
def _small_cnn_stages() -> list[tuple[list[str], StageFn]]:
    def conv1(p: Piece, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu(p.parts["conv1"](x)), 2) if x.shape[-1] >= 16 else F.relu(p.parts["conv1"](x))

    def conv2(p: Piece, h: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(p.parts["conv2"](h)), 2) if h.shape[-1] >= 16 else F.relu(p.parts["conv2"](h))
        return torch.flatten(p.parts["pool"](h), 1)

    def head(p: Piece, h: torch.Tensor) -> torch.Tensor:
        return p.parts["fc2"](F.relu(p.parts["fc1"](h)))

    return [(["conv1"], conv1), (["conv2", "pool"], conv2), (["fc1", "fc2"], head)]


def _layer(name: str) -> tuple[list[str], StageFn]:
    return [name], lambda p, h: p.parts[name](h)


def _resnet_stages(model: nn.Module) -> list[tuple[list[str], StageFn]]:
    preact = bool(getattr(model, "preact", False))

    def stem(p: Piece, x: torch.Tensor) -> torch.Tensor:
        out = p.parts["conv1"](x)
        return out if preact else F.relu(p.parts["bn1"](out))

    def head(p: Piece, h: torch.Tensor) -> torch.Tensor:
        if preact:
            h = F.relu(p.parts["bn"](h))
        return p.parts["linear"](F.adaptive_avg_pool2d(h, 1).flatten(1))

    return [(["conv1"] if preact else ["conv1", "bn1"], stem), *[_layer(f"layer{i}") for i in range(1, 5)],
            (["bn", "linear"] if preact else ["linear"], head)]


def _resnet20_stages() -> list[tuple[list[str], StageFn]]:
    def stem(p: Piece, x: torch.Tensor) -> torch.Tensor:
        return F.relu(p.parts["bn1"](p.parts["conv1"](x)))

    def head(p: Piece, h: torch.Tensor) -> torch.Tensor:
        return p.parts["linear"](F.adaptive_avg_pool2d(h, 1).flatten(1))

    return [(["conv1", "bn1"], stem), *[_layer(f"layer{i}") for i in range(1, 4)], (["linear"], head)]


def _wrn_stages() -> list[tuple[list[str], StageFn]]:
    def head(p: Piece, h: torch.Tensor) -> torch.Tensor:
        return p.parts["fc"](F.adaptive_avg_pool2d(F.relu(p.parts["bn1"](h)), 1).flatten(1))

    return [_layer("conv1"), *[_layer(f"block{i}") for i in range(1, 4)], (["bn1", "fc"], head)]


# architecture -> (stage list builder, {B: sizes of the B contiguous groups of stages})
SPLITS: dict[str, tuple[Callable[[nn.Module], list[tuple[list[str], StageFn]]], dict[int, list[int]]]] = {
    "small_cnn": (lambda m: _small_cnn_stages(), {2: [2, 1], 3: [1, 1, 1]}),  # HRS-like: conv features | dense head
    "resnet18": (_resnet_stages, {2: [3, 3], 3: [2, 2, 2]}),
    "preact_resnet18": (_resnet_stages, {2: [3, 3], 3: [2, 2, 2]}),
    "resnet20": (lambda m: _resnet20_stages(), {2: [3, 2], 3: [2, 1, 2]}),
    "wrn": (lambda m: _wrn_stages(), {2: [3, 2], 3: [2, 1, 2]}),
}


def split_model(model: nn.Module, arch: str, blocks: int) -> list[nn.Module]:
    """Cut `model` (built by `harness.data.models.build_model` for architecture `arch`) into `blocks` pieces.

    `blocks == 1` works for any model (the model itself is the single block). The pieces share
    the model's submodules; composing them in order reproduces `model(x)` exactly.
    """
    if blocks == 1:
        return [model]
    if arch not in SPLITS or blocks not in SPLITS[arch][1]:
        known = ", ".join(f"{a} (B in {sorted([1, *SPLITS[a][1]])})" for a in SPLITS)
        raise UserError(f"advms cannot split model {arch!r} into blocks={blocks}; supported: {known}; or use blocks=1 (any model)")
    build, groups = SPLITS[arch]
    stages = build(model)
    pieces: list[nn.Module] = []
    start = 0
    for g in groups[blocks]:
        chunk = stages[start : start + g]
        parts = {name: getattr(model, name) for names, _ in chunk for name in names}
        pieces.append(Piece(parts, [fn for _, fn in chunk], model=model, normalize=start == 0))
        start += g
    return pieces


class Chain(nn.Module):
    """Apply modules in order (a path through switching blocks, or lower blocks + a trained tail)."""

    def __init__(self, *modules: nn.Module) -> None:
        super().__init__()
        self.steps = nn.ModuleList(modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.steps:
            x = m(x)
        return x


class RandomSwitching(nn.Module):
    """B switching blocks; block b holds S_b channels; each forward draws one channel per block.

    Args:
        blocks: blocks[b] is the list of the S_b channels (modules) of block b.
        mode: "batch" (one path per call) or "sample" (one path per sample); see module docstring.
    """

    def __init__(self, blocks: Sequence[Sequence[nn.Module]], mode: str = "batch") -> None:
        super().__init__()
        if mode not in MODES:
            raise UserError(f"switching mode {mode!r} unknown; use one of: {', '.join(MODES)}")
        if not blocks or any(len(ch) == 0 for ch in blocks):
            raise UserError("a switching network needs at least one block with at least one channel")
        self.blocks = nn.ModuleList(nn.ModuleList(ch) for ch in blocks)
        self.mode = mode

    @property
    def channels(self) -> list[int]:
        return [len(ch) for ch in self.blocks]

    @property
    def num_paths(self) -> int:
        return math.prod(self.channels)

    def paths(self) -> Iterator[tuple[int, ...]]:
        """Every path, as a tuple of channel indices, block 0 varying slowest."""
        return itertools.product(*(range(s) for s in self.channels))

    def forward_path(self, x: torch.Tensor, path: Sequence[int]) -> torch.Tensor:
        """The deterministic network of one path."""
        for chans, c in zip(self.blocks, path):
            x = chans[int(c)](x)
        return x

    def path_module(self, path: Sequence[int]) -> nn.Module:
        """One path as a module (shares the weights)."""
        return Chain(*(chans[int(c)] for chans, c in zip(self.blocks, path)))

    def run(self, x: torch.Tensor, cpu_gen: torch.Generator | None = None,
            dev_gen: torch.Generator | None = None) -> torch.Tensor:
        """Forward with paths drawn from the given generators (None: the global torch RNG)."""
        h = x
        for chans in self.blocks:
            s = len(chans)
            if s == 1:
                h = chans[0](h)
            elif self.mode == "batch":
                c = int(torch.randint(s, (1,), generator=cpu_gen))  # CPU draw: no device sync
                h = chans[c](h)
            else:
                n = h.shape[0]
                idx = torch.randint(s, (n,), generator=dev_gen, device=h.device)
                outs = torch.stack([ch(h) for ch in chans])  # (S, N, ...)
                h = outs[idx, torch.arange(n, device=h.device)]
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)


class FixedPaths(nn.Module):
    """The switching network with randomness frozen by `seed`: every call draws the same paths.

    Per-batch mode: one fixed path. Per-sample mode: the path of sample i depends only on its
    position i in the batch (private generators re-seeded each call), so within one attack run on
    one batch every sample keeps its path. A deterministic model: the control run.
    """

    def __init__(self, switching: RandomSwitching, seed: int) -> None:
        super().__init__()
        self.switching = switching
        self.seed = int(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cpu_gen = torch.Generator().manual_seed(self.seed)
        dev_gen = cpu_gen if x.device.type == "cpu" else torch.Generator(device=x.device).manual_seed(self.seed)
        return self.switching.run(x, cpu_gen, dev_gen)


class ExpectedModel(nn.Module):
    """Exact expectation over all paths: returns log(mean_p softmax(z_p(x))) as logits.

    Shares prefixes: block b runs once per path prefix, so the cost is sum_b prod_{k<=b} S_k
    block evaluations instead of B * prod_b S_b.
    """

    def __init__(self, switching: RandomSwitching) -> None:
        super().__init__()
        self.switching = switching

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hs = [x]
        for chans in self.switching.blocks:
            hs = [ch(h) for h in hs for ch in chans]  # product order: block 0 varies slowest
        logp = torch.stack([F.log_softmax(z, dim=1) for z in hs])  # (P, N, C)
        return torch.logsumexp(logp, dim=0) - math.log(len(hs))
