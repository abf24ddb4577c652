"""A feed-forward ReLU network as a chain of dense affine maps, and sound bounds on its neurons.

`attack=exact` needs the network as data: x -> W_1 x + b_1 -> ReLU -> ... -> W_L a + b_L. This
module reads that chain off any module torch.fx can trace whose graph is a single path of affine
operations (Linear, Conv2d, Flatten, BatchNorm in eval mode, a normalisation `(x - mean) / std`, any
reshaping) and ReLUs. Consecutive affine operations are composed into one dense matrix by
evaluating them, in float64, on the standard basis: exact for affine maps, and checked (an
operation that is not affine, such as max-pooling or a sigmoid, is refused with one line saying so).

Bounds, all in float64 over the L-inf ball intersected with the [0, 1] box:
- `interval_bounds`: interval arithmetic, layer by layer (exact for the first layer);
- `crown_bounds`: CROWN (Zhang et al. 2018) backward linear relaxation of every unstable ReLU
  (upper: the chord u/(u-l) (z - l); lower: slope 1 if u > -l else 0), for every hidden layer and
  for the margins z_y - z_j at the output, intersected with the interval bounds.
Both are sound: every reachable pre-activation lies inside its bounds (up to float64 rounding, which
`SAFETY` covers). The MIP uses them as big-M constants, and margins proven positive here settle a
target class without a MIP.

No verifier library is used: auto_LiRPA 0.3 (the PyPI release) pins torch<1.13 and fails to import
with numpy 2 (`numpy.lib.arraysetops`), so the bounds are written here (docs/exact.md).
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from harness.core.errors import UserError

SAFETY = 1e-9  # relative + absolute widening of every bound against float64 rounding
MAX_NEURONS = 50_000  # per layer: dense float64 matrices beyond this are not a "small network"

_RELU_FUNCS = {F.relu, torch.relu, torch.nn.functional.relu}


@dataclass
class ReluNet:
    """x (flattened, d) -> a_1 = relu(W_1 x + b_1) -> ... -> z = W_L a_{L-1} + b_L, in float64."""

    weights: list[torch.Tensor]  # W_k (n_k, n_{k-1})
    biases: list[torch.Tensor]  # b_k (n_k,)
    input_shape: tuple[int, ...]

    @property
    def hidden(self) -> int:
        return len(self.weights) - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of flattened inputs (N, d), float64: the map the MIP encodes."""
        a = x.double().reshape(x.shape[0], -1)
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            a = a @ w.T + b
            if k < self.hidden:
                a = a.clamp_min(0)
        return a


@dataclass
class Bounds:
    """Pre-activation bounds per hidden layer, and bounds on the margins z_y - z_j at the output."""

    lower: list[torch.Tensor]
    upper: list[torch.Tensor]
    margin_lower: torch.Tensor  # (K,): lower bound of z_y - z_j (+inf at j = y)

    def unstable(self) -> int:
        return int(sum(((lo < 0) & (up > 0)).sum() for lo, up in zip(self.lower, self.upper)))


# ------------------------------------------------------------------------------------ extraction
def _not_supported(what: str) -> UserError:
    return UserError(f"attack=exact supports feed-forward ReLU networks (Linear, Conv2d, ReLU, Flatten, normalisation); "
                     f"this model has {what}; use a model such as model=conv_small")


def _ops(module: nn.Module) -> tuple[list[tuple[str, object]], fx.GraphModule]:
    """The chain of ("affine", fn) / ("relu", None) operations of a traced module (float64 copy)."""
    try:
        gm = fx.symbolic_trace(copy.deepcopy(module).double().eval())
    except Exception as exc:  # data-dependent control flow, unsupported Python
        raise _not_supported(f"a forward torch.fx cannot trace ({type(exc).__name__}: {str(exc)[:80]})") from None
    consts: dict[fx.Node, object] = {}
    chain: fx.Node | None = None
    ops: list[tuple[str, object]] = []

    def fetch(target: str) -> object:
        obj: object = gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def call(node: fx.Node, env: dict[fx.Node, object]) -> object:
        args = fx.node.map_arg(node.args, lambda n: env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
        if node.op == "call_module":
            return gm.get_submodule(str(node.target))(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)  # type: ignore[operator]
        return getattr(args[0], str(node.target))(*args[1:], **kwargs)

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if chain is not None:
                raise _not_supported("more than one input")
            chain = node
            continue
        if node.op == "get_attr":
            consts[node] = fetch(str(node.target))
            continue
        if node.op == "output":
            if node.args[0] is not chain:
                raise _not_supported("an output that is not the end of one chain of layers")
            break
        inputs = node.all_input_nodes
        if chain not in inputs:
            consts[node] = call(node, consts)  # a constant expression, e.g. mean.view(1, -1, 1, 1)
            continue
        if any(n is not chain and n not in consts for n in inputs):
            raise _not_supported(f"a branch or skip connection at {node.name!r}")
        mod = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        if isinstance(mod, nn.ReLU) or node.target in _RELU_FUNCS or (node.op == "call_method" and node.target == "relu"):
            ops.append(("relu", None))
        elif isinstance(mod, (nn.MaxPool2d, nn.MaxPool1d, nn.AdaptiveMaxPool2d)) or "max_pool" in str(node.target):
            raise _not_supported("max-pooling (not encoded by this MIP)")
        else:  # an affine candidate; `_affine_segment` checks that it is affine
            prev = chain
            ops.append(("affine", lambda v, node=node, prev=prev: call(node, {**consts, prev: v})))
        chain = node
    return ops, gm


def _affine_segment(fns: list, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """W, b of the composition of affine fns on inputs of `shape` (evaluated on the basis)."""
    d = 1
    for s in shape:
        d *= s
    basis = torch.cat([torch.zeros(1, d, dtype=torch.float64), torch.eye(d, dtype=torch.float64)]).view(d + 1, *shape)
    out = basis
    with torch.no_grad():
        for fn in fns:
            out = fn(out)
    if not isinstance(out, torch.Tensor) or out.shape[0] != d + 1:
        raise _not_supported("an operation that mixes samples of a batch")
    out_shape = tuple(out.shape[1:])
    flat = out.reshape(d + 1, -1)
    if flat.shape[1] > MAX_NEURONS:
        raise _not_supported(f"a layer of {flat.shape[1]} neurons (more than {MAX_NEURONS})")
    b = flat[0].clone()
    w = (flat[1:] - b).T.contiguous()  # (n_out, d)
    # affinity check on random points: an op that is not affine (sigmoid, max-pool, abs) fails it
    gen = torch.Generator().manual_seed(0)
    probe = torch.rand(3, d, generator=gen, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        val = probe.view(3, *shape)
        for fn in fns:
            val = fn(val)
    err = (val.reshape(3, -1) - (probe @ w.T + b)).abs().max()
    if err > 1e-8 * (1 + flat.abs().max()):
        raise _not_supported("an operation that is not affine (e.g. max-pooling, a smooth activation)")
    return w, b, out_shape


def extract(module: nn.Module, input_shape: tuple[int, ...]) -> ReluNet:
    """The network as dense float64 affine maps between ReLUs (see the module docstring)."""
    ops, _ = _ops(module)
    weights, biases = [], []
    shape = tuple(input_shape)
    seg: list = []
    for kind, fn in ops + [("relu", None)]:
        if kind == "affine":
            seg.append(fn)
            continue
        if not seg and weights:
            continue  # relu(relu(.)) = relu(.)
        if not seg:  # a ReLU on the input: the input is in [0, 1], so it is the identity
            continue
        w, b, shape = _affine_segment(seg, shape)
        weights.append(w)
        biases.append(b)
        seg = []
    if not weights:
        raise _not_supported("no affine layer")
    if ops and ops[-1][0] == "relu":
        raise _not_supported("a ReLU on the logits")
    return ReluNet(weights, biases, tuple(input_shape))


# --------------------------------------------------------------------------------------- bounds
def _widen(lo: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pad = SAFETY * (1 + torch.maximum(lo.abs(), up.abs()))
    return lo - pad, up + pad


def input_box(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The L-inf ball around flattened x intersected with [0, 1], float64."""
    x = x.double().reshape(-1)
    return (x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0)


def _affine_interval(w: torch.Tensor, b: torch.Tensor, lo: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c, r = (lo + up) / 2, (up - lo) / 2
    mid = w @ c + b
    rad = w.abs() @ r
    return mid - rad, mid + rad


def interval_bounds(net: ReluNet, lo: torch.Tensor, up: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Pre-activation bounds of every layer (hidden layers and logits) by interval arithmetic."""
    lows, ups = [], []
    a_lo, a_up = lo, up
    for k, (w, b) in enumerate(zip(net.weights, net.biases)):
        z_lo, z_up = _widen(*_affine_interval(w, b, a_lo, a_up))
        lows.append(z_lo)
        ups.append(z_up)
        a_lo, a_up = z_lo.clamp_min(0), z_up.clamp_min(0)
    return lows, ups


def _relaxation(lo: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per neuron: lower slope, upper slope, upper intercept of the ReLU's linear relaxation."""
    active, inactive = lo >= 0, up <= 0
    unstable = ~active & ~inactive
    denom = (up - lo).clamp_min(1e-30)
    up_slope = torch.where(active, torch.ones_like(lo), torch.where(unstable, up / denom, torch.zeros_like(lo)))
    up_icpt = torch.where(unstable, -up * lo / denom, torch.zeros_like(lo))
    lo_slope = torch.where(active, torch.ones_like(lo), torch.where(unstable & (up > -lo), torch.ones_like(lo), torch.zeros_like(lo)))
    return lo_slope, up_slope, up_icpt


def _backward_lower(net: ReluNet, spec: torch.Tensor, offset: torch.Tensor, layer: int, lows: list[torch.Tensor],
                    ups: list[torch.Tensor], x_lo: torch.Tensor, x_up: torch.Tensor) -> torch.Tensor:
    """CROWN lower bound of spec @ z_layer + offset over the box, z_layer = W_layer a + b_layer."""
    lam = spec @ net.weights[layer]  # coefficients on a_{layer-1} (or on x for layer 0)
    const = spec @ net.biases[layer] + offset
    for k in range(layer - 1, -1, -1):
        lo_slope, up_slope, up_icpt = _relaxation(lows[k], ups[k])
        pos, neg = lam.clamp_min(0), lam.clamp_max(0)
        const = const + neg @ up_icpt  # a <= up_slope z + up_icpt where the coefficient is negative
        lam = pos * lo_slope + neg * up_slope  # coefficients on z_k
        const = const + lam @ net.biases[k]
        lam = lam @ net.weights[k]
    c, r = (x_lo + x_up) / 2, (x_up - x_lo) / 2
    return lam @ c - lam.abs() @ r + const


def crown_bounds(net: ReluNet, x: torch.Tensor, eps: float, label: int) -> Bounds:
    """Interval bounds tightened by CROWN for every hidden layer, then the output margins."""
    x_lo, x_up = input_box(x, eps)
    lows, ups = interval_bounds(net, x_lo, x_up)
    for k in range(1, net.hidden):  # layer 0 is exact by intervals
        n = net.weights[k].shape[0]
        eye = torch.eye(n, dtype=torch.float64)
        zero = torch.zeros(n, dtype=torch.float64)
        c_lo = _backward_lower(net, eye, zero, k, lows, ups, x_lo, x_up)
        c_up = -_backward_lower(net, -eye, zero, k, lows, ups, x_lo, x_up)
        c_lo, c_up = _widen(c_lo, c_up)
        lows[k], ups[k] = torch.maximum(lows[k], c_lo), torch.minimum(ups[k], c_up)
    k_out = net.weights[-1].shape[0]
    spec = -torch.eye(k_out, dtype=torch.float64)
    spec[:, label] += 1.0  # row j: z_y - z_j
    m_lo = _backward_lower(net, spec, torch.zeros(k_out, dtype=torch.float64), net.hidden, lows, ups, x_lo, x_up)
    m_lo = m_lo - SAFETY * (1 + m_lo.abs())
    # the interval bound on the margin, in case it is tighter somewhere
    if net.hidden:
        a_lo, a_up = lows[-2].clamp_min(0), ups[-2].clamp_min(0)
    else:
        a_lo, a_up = x_lo, x_up
    i_lo, _ = _affine_interval(spec @ net.weights[-1], spec @ net.biases[-1], a_lo, a_up)
    m_lo = torch.maximum(m_lo, i_lo - SAFETY * (1 + i_lo.abs()))
    m_lo[label] = float("inf")
    return Bounds(lows[:-1], ups[:-1], m_lo)
