"""Count the operations that make the host wait for a CUDA device (host synchronisations).

A GPU runs ahead of the Python loop that feeds it only while Python never asks for a value that
lives on the device. `.item()`, `bool(t)`, `int(t)`, `float(t)`, `if mask.any():`, boolean-mask
indexing (`x[mask]`), `nonzero()`, `unique()`, `masked_select`, `torch.equal`, `.tolist()`,
`.cpu()` and `.numpy()` all do: the host stops until every queued kernel has finished. One such
call per attack iteration turns a pipelined GPU loop into a stop-and-go one. The harness's rule
(docs/gpu.md): at most one synchronisation per `exit_every` iterations inside an attack loop.

`SyncCounter` is a `TorchDispatchMode` that sees every ATen operation and counts those that
synchronise on CUDA, so the rule can be tested on a CPU-only machine:

- `aten._local_scalar_dense` (what `.item()`, `bool()`, `int()`, `float()` and `t.__index__` call),
  `aten.nonzero`, `aten.masked_select`, `aten._unique`, `aten._unique2`, `aten.unique_dim`,
  `aten.unique_consecutive`, `aten.unique_dim_consecutive`, `aten.equal`, `aten.bincount`,
  `aten.repeat_interleave.Tensor` without `output_size`, and `aten.index` / `aten.index_put`
  with a boolean index (they run `nonzero` inside);
- `Tensor.tolist()`, `.cpu()` and `.numpy()`, by wrapping those methods while the counter is
  active: on a CPU tensor they dispatch nothing, so on CPU every call is counted (each stands in
  for a device tensor's transfer), on CUDA only calls on device tensors;
- on CUDA only: device-to-host copies (`aten._to_copy` / `aten.copy_` from a device tensor to a
  CPU one, e.g. `t.to("cpu")`).

What a CPU run cannot see: `t.to("cpu")` / `t.to(other.device)` (a no-op between CPU tensors,
indistinguishable from moving data to the working device), implicit transfers inside kernels
that are CPU-only, and `torch.cuda.synchronize()` itself. The CUDA run of the test
(`tests/unit/test_no_host_sync.py`, marker `cuda`) sees the copies.

Each counted event is attributed to the innermost Python frame outside torch: `third_party`
package names (e.g. `pyautoattack`, reference code the project does not own) go to a separate
tally, so a test can hold the project's own code to the rule and report the rest.
"""
from __future__ import annotations

import collections
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

SYNC_PACKETS = {
    aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten._unique, aten._unique2, aten.unique_dim,
    aten.unique_consecutive, aten.unique_dim_consecutive, aten.equal, aten.bincount,
}
TRANSFER_METHODS = ("tolist", "cpu", "numpy")
_TORCH_DIR = os.path.dirname(torch.__file__)
_THIS_FILE = os.path.abspath(__file__)


def _package_dir(name: str) -> str | None:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return None
    return os.path.dirname(os.path.abspath(spec.origin))


def _bool_index(indices: Iterable[Any]) -> bool:
    return any(torch.is_tensor(t) and t.dtype in (torch.bool, torch.uint8) for t in indices or ())


def _is_sync(func: Any, args: tuple, kwargs: dict) -> str | None:
    """The op's name when it synchronises on CUDA (see the module docstring), else None."""
    packet = func.overloadpacket
    if packet in SYNC_PACKETS:
        return str(packet.__name__)
    if packet in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_) and len(args) > 1 \
            and _bool_index(args[1]):
        return f"{packet.__name__} (boolean mask)"
    if packet is aten.repeat_interleave and func._overloadname.startswith("Tensor") \
            and kwargs.get("output_size") is None:
        return "repeat_interleave (tensor repeats)"
    if packet in (aten._to_copy, aten.copy_):
        src = args[1] if packet is aten.copy_ else args[0]
        dst = args[0].device if packet is aten.copy_ else kwargs.get("device")
        if torch.is_tensor(src) and src.device.type != "cpu" and dst is not None and torch.device(dst).type == "cpu":
            return "device-to-host copy"
    return None


@dataclass
class SyncCounts:
    """Tallies: project code (`own`), third-party code (`third_party`), and where each happened."""

    own: int = 0
    third_party: int = 0
    sites: collections.Counter = field(default_factory=collections.Counter)

    def top(self, k: int = 8) -> str:
        return "; ".join(f"{n}x {site}" for site, n in self.sites.most_common(k))


class SyncCounter(TorchDispatchMode):
    """`with SyncCounter() as c:` counts host synchronisations (see the module docstring).

    `stand_in=True` (the default on a machine without CUDA) counts `tolist()` / `cpu()` /
    `numpy()` on CPU tensors too, as stand-ins for device tensors. `third_party`: package names
    whose own code is tallied apart (the reference AutoAttack, say). A counter may be entered
    several times; the counts accumulate.
    """

    def __init__(self, *, stand_in: bool | None = None, third_party: Iterable[str] = ()) -> None:
        super().__init__()
        self.stand_in = (not torch.cuda.is_available()) if stand_in is None else bool(stand_in)
        self.third_party_dirs = tuple(d for d in (_package_dir(n) for n in third_party) if d)
        self.counts = SyncCounts()
        self._in_method = 0
        self._saved: dict[str, Any] = {}

    # ---- attribution -----------------------------------------------------------------------
    def _site(self) -> tuple[str, bool]:
        """(file:line of the innermost frame outside torch and this module, is it third-party)."""
        frame = sys._getframe(2)
        while frame is not None:
            path = os.path.abspath(frame.f_code.co_filename)
            if not path.startswith(_TORCH_DIR) and path != _THIS_FILE:
                third = any(path.startswith(d) for d in self.third_party_dirs)
                return f"{os.path.relpath(path) if not third else os.path.basename(path)}:{frame.f_lineno}", third
            frame = frame.f_back
        return "<unknown>", False

    def _note(self, what: str) -> None:
        site, third = self._site()
        if third:
            self.counts.third_party += 1
        else:
            self.counts.own += 1
        self.counts.sites[f"{what} at {site}"] += 1

    # ---- the dispatch mode -----------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._in_method:
            what = _is_sync(func, args, kwargs)
            if what is not None:
                self._note(what)
        return func(*args, **kwargs)

    # ---- transfer methods ------------------------------------------------------------------
    def _wrap(self, name: str, original: Any) -> Any:
        counter = self

        def method(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if counter._in_method:
                return original(tensor, *args, **kwargs)
            if counter.stand_in or tensor.device.type != "cpu":
                counter._note(f"Tensor.{name}()")
            counter._in_method += 1  # the copy it dispatches (on CUDA) is this same event
            try:
                return original(tensor, *args, **kwargs)
            finally:
                counter._in_method -= 1

        return method

    def __enter__(self) -> "SyncCounter":
        for name in TRANSFER_METHODS:
            self._saved[name] = torch.Tensor.__dict__.get(name)
            setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            for name, saved in self._saved.items():
                if saved is None:
                    delattr(torch.Tensor, name)
                else:
                    setattr(torch.Tensor, name, saved)
            self._saved.clear()
