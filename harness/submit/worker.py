"""The model worker: runs inside the sandbox, loads the submission, serves forward passes and VJPs.

Started by `harness.submit.remote.Worker` (never imported by the harness for its own use). It
imports the bundle's model file, calls `create()`, loads the weights with
`torch.load(weights_only=True)` strictly, puts the model in eval mode and then answers requests
on two pipes (`harness.submit.wire`):

- `forward`: logits of the model (or of ensemble member `target`) on the float32 batch sent,
  under no_grad or, with `grad`, keeping the graph under a handle for a later `vjp`;
- `vjp`: the vector-Jacobian product (input gradient) for a kept graph and an output gradient;
- `trace`: one no_grad and one grad-mode forward under `harness.health.tracing.AutogradTracer`
  (the health report's check 3, here self-reported);
- `state`: modules in training mode and state tensors changed since loading (check 19);
- `bye`: exit.

Every request of a randomised model carries a seed; torch's, numpy's and Python's global
generators are seeded with it before the model runs, so its draws are a function of (seed, input)
and the harness can replay any request exactly in a fresh worker. A deterministic model gets no
seed (its answers must not depend on one; the contract check saw that). Nothing here is trusted by the harness:
the submitted code runs in this process and may have replaced any of it.
"""
from __future__ import annotations

import argparse
import importlib.util
import random
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

MAX_GRAPHS = 256  # kept forward graphs; the harness releases them as its autograd nodes die


def _message(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())[:300]


def _seed_all(seed: Any, device: Any = None) -> None:
    """Seed the global generators a model may draw from; `None` (deterministic models) leaves them alone."""
    if seed is None:
        return
    import numpy as np
    import torch

    seed = int(seed)
    torch.default_generator.manual_seed(seed)  # not torch.manual_seed: that walks every backend (0.1 ms a call)
    if device is not None and device.type == "cuda":
        torch.cuda.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))


def load(bundle: Path, model_file: str, weights: str, device: str) -> Any:
    """Import the model file, create() the module, load the weights strictly, eval mode."""
    import torch
    from torch import nn

    from harness.data.weights import load_into

    path = bundle / model_file
    sys.path.insert(0, str(path.parent))  # sibling modules of model.py import as usual
    spec = importlib.util.spec_from_file_location("arena_submission_model", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"{model_file} is not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise RuntimeError(f"{model_file} fails to import ({_message(exc)})") from None
    if not callable(getattr(module, "create", None)):
        raise RuntimeError(f"{model_file} defines no create() returning the model")
    model = module.create()
    if not isinstance(model, nn.Module):
        raise RuntimeError(f"create() in {model_file} returned {type(model).__name__}, not a torch.nn.Module")
    load_into(model, bundle / weights)
    model.eval()
    return model.to(torch.device(device))


def facts_of(model: Any) -> dict[str, Any]:
    """What the harness needs to know to wrap the model (all of it re-checked over there)."""
    from harness.core.ensemble import Ensemble
    from harness.health.tracing import training_modules

    facts: dict[str, Any] = {
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "has_members": hasattr(model, "members"),
        "ensemble": None,
        "training_modules": training_modules(model)[:20],
    }
    if isinstance(model, Ensemble):
        facts["ensemble"] = {"members": len(model.members), "mode": model.mode, "tie_break": model.tie_break,
                             "vote_sharpness": float(model.vote_sharpness)}
    return facts


class Server:
    """The request loop; one instance per worker process."""

    def __init__(self, model: Any, fd_in: int, fd_out: int, device: str) -> None:
        import torch

        from harness.health.tracing import state_digest

        self.torch = torch
        self.model = model
        self.members = list(getattr(model, "members", []) or [])
        self.fd_in, self.fd_out = fd_in, fd_out
        self.device = torch.device(device)
        self.graphs: OrderedDict[int, tuple[Any, Any]] = OrderedDict()
        self.next_handle = 1
        self.loaded_state = state_digest(model)

    def reply(self, header: dict[str, Any], payload: Any = None) -> None:
        from harness.submit.wire import write_blocking

        write_blocking(self.fd_out, {"ok": True, **header}, payload)

    def fail(self, rid: Any, kind: str, message: str) -> None:
        from harness.submit.wire import write_blocking

        write_blocking(self.fd_out, {"ok": False, "id": rid, "error": kind, "message": message})

    def tensor(self, header: dict[str, Any], payload: bytearray) -> Any:
        torch = self.torch
        shape = [int(s) for s in header["shape"]]
        x = torch.frombuffer(payload, dtype=torch.float32) if len(payload) else torch.zeros(0)
        return x.reshape(shape).to(self.device)

    def target(self, index: int) -> Any:
        if index < 0:
            return self.model
        return self.members[index]

    def forward(self, header: dict[str, Any], payload: bytearray) -> None:
        torch = self.torch
        x = self.tensor(header, payload)
        _seed_all(header.get("seed"), self.device)
        module = self.target(int(header.get("target", -1)))
        grad = bool(header.get("grad"))
        if grad:
            x = x.requires_grad_(True)
            with torch.enable_grad():
                out = module(x)
        else:
            with torch.no_grad():
                out = module(x)
        if not torch.is_tensor(out):
            raise TypeError(f"the model returns a {type(out).__name__}, not a logits tensor of shape (N, C); return only the logits")
        if not out.dtype.is_floating_point:
            raise TypeError(f"the model returns {out.dtype}, not floating-point logits; return the logits tensor")
        if out.dim() != 2 or out.shape[0] != x.shape[0]:
            raise TypeError(f"the model's output has shape {tuple(out.shape)} for {x.shape[0]} inputs; it must be logits of shape (N, C)")
        handle = None
        if grad and out.requires_grad:
            handle = self.next_handle
            self.next_handle += 1
            self.graphs[handle] = (x, out)
            while len(self.graphs) > MAX_GRAPHS:
                self.graphs.popitem(last=False)
        data = out.detach().float().cpu().contiguous().numpy()
        self.reply({"id": header.get("id"), "shape": list(data.shape), "dtype": "float32", "handle": handle,
                    "differentiable": bool(out.requires_grad), "out_dtype": str(out.dtype).replace("torch.", "")}, data)

    def vjp(self, header: dict[str, Any], payload: bytearray) -> None:
        torch = self.torch
        handle = int(header["handle"])
        if handle not in self.graphs:
            raise KeyError(f"no kept graph {handle} (released or evicted)")
        x, out = self.graphs[handle]
        g = self.tensor(header, payload).to(out.dtype)
        (grad,) = torch.autograd.grad(out, x, grad_outputs=g, retain_graph=True, allow_unused=True)
        if grad is None:
            grad = torch.zeros_like(x)
        data = grad.detach().float().cpu().contiguous().numpy()
        self.reply({"id": header.get("id"), "shape": list(data.shape), "dtype": "float32"}, data)

    def trace(self, header: dict[str, Any], payload: bytearray) -> None:
        torch = self.torch
        from harness.health.tracing import AutogradTracer, changed_since, state_digest

        x = self.tensor(header, payload)
        _seed_all(header.get("seed"), self.device)
        before = state_digest(self.model)
        with AutogradTracer() as tracer:
            with torch.no_grad():
                self.model(x)
            self.model(x.clone().requires_grad_(True))
        self.reply({"id": header.get("id"), "calls": dict(tracer.calls), "changed": changed_since(before, self.model)[:20]})

    def state(self, header: dict[str, Any]) -> None:
        from harness.health.tracing import changed_since, training_modules

        self.reply({"id": header.get("id"), "training": training_modules(self.model)[:20],
                    "changed": changed_since(self.loaded_state, self.model)[:20]})

    def serve(self) -> int:
        from harness.submit.wire import read_blocking

        handlers = {"forward": self.forward, "vjp": self.vjp, "trace": self.trace}
        while True:
            try:
                header, payload = read_blocking(self.fd_in)
            except EOFError:
                return 0
            for h in header.get("release") or []:
                self.graphs.pop(h, None)
            op = header.get("op")
            if op == "bye":
                return 0
            try:
                if op == "state":
                    self.state(header)
                elif op in handlers:
                    handlers[op](header, payload)
                else:
                    self.fail(header.get("id"), "protocol", f"unknown request {op!r}")
            except Exception as exc:  # the model failed on this input: report, keep serving
                self.fail(header.get("id"), "model", _message(exc))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="arena-worker")
    p.add_argument("bundle")
    p.add_argument("--model-file", required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fd-in", type=int, required=True)
    p.add_argument("--fd-out", type=int, required=True)
    args = p.parse_args(argv)
    from harness.submit.wire import write_blocking

    import torch

    import harness.core.ensemble  # noqa: F401  (the harness modules the worker itself needs, before any model code)
    import harness.data.weights  # noqa: F401
    import harness.health.tracing  # noqa: F401

    torch.set_num_threads(max(1, args.threads))
    write_blocking(args.fd_out, {"ok": True, "op": "hello"})  # interpreter up: the load time limit starts now
    try:
        model = load(Path(args.bundle), args.model_file, args.weights, args.device)
        facts = facts_of(model)
    except BaseException as exc:  # SystemExit and KeyboardInterrupt from model code too
        write_blocking(args.fd_out, {"ok": False, "op": "ready", "error": "loading", "message": _message(exc)})
        return 3
    write_blocking(args.fd_out, {"ok": True, "op": "ready", "facts": facts})
    return Server(model, args.fd_in, args.fd_out, args.device).serve()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
