"""The harness's side of a sandboxed submission: the worker process and the nn.Module proxy.

`Worker` starts `harness.submit.worker` under the isolation `harness.submit.sandbox` chose, waits
for it to load the bundle, and exchanges framed float32 messages with it (`harness.submit.wire`)
under deadlines. Every reply is parsed as a plain array of exactly the shape the request implies;
a wrong shape, a malformed or oversized message, a dead worker or a missed deadline ends the
worker and raises `WorkerError` (a `UserError`: the submission is rejected, nothing is counted).

`RemoteModule` is what attacks see: an `nn.Module` whose forward sends the batch to the worker and
whose backward (a `torch.autograd.Function`) asks the worker for the vector-Jacobian product, so
every existing attack, the oracle, the counters and the health probes work unchanged. Attacks,
counting, verification, the store and the board stay in the harness process.

`remote_classifier` wraps a worker as a harness `Classifier`: one `RemoteModule`, or for a declared
ensemble one per member inside the harness's own `Ensemble` (the harness aggregates the members'
logits with the declared rule, so MORA sees the members and the decision is the harness's).
"""
from __future__ import annotations

import math
import os
import signal
import subprocess
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from harness.core.classifier import Classifier
from harness.core.errors import UserError
from harness.submit.sandbox import Isolation, SandboxLimits, launch_spec
from harness.submit.wire import WireError, expect_array, grow_pipe, recv, send, set_nonblocking

STARTUP_S = 300.0  # wall seconds for the interpreter and torch to start (before any submitted code runs)
MAX_MEMBERS = 64
MESSAGE_CHARS = 300


class WorkerError(UserError):
    """The worker broke the protocol, died, or missed a deadline; `check` names what was running."""


class RemoteError(UserError):
    """The submitted model raised on a request (its message, sanitised, is in the text)."""


def clean_text(value: Any, limit: int = MESSAGE_CHARS) -> str:
    """A worker-supplied string made safe to print: printable ASCII, one line, bounded."""
    text = "".join(c if 32 <= ord(c) < 127 else " " for c in str(value))
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _exit_reason(code: int | None) -> str:
    """Why a worker ended; bubblewrap (like a shell) reports a child killed by signal S as 128 + S."""
    if code is None:
        return "still running"
    if code < 0 or 128 < code < 128 + 65:
        sig = -code if code < 0 else code - 128
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        if sig == signal.SIGXCPU:
            return f"killed by {name}: it exceeded its CPU-time limit"
        if sig == signal.SIGXFSZ:
            return f"killed by {name}: it wrote a file over its size limit"
        return f"killed by {name}"
    return f"exited with status {code}"


# ----------------------------------------------------------------------------- the process


@dataclass
class WorkerStats:
    requests: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    wait_s: float = 0.0  # wall time spent waiting for replies (the worker's compute plus transport)
    cpu_s: float = 0.0  # CPU seconds of the worker's whole process tree, read from /proc just before it ends


def tree_cpu_seconds(root: int) -> float:
    """CPU time (user + system, plus reaped children) of a process and all its descendants, from /proc.

    Measured by the harness, not reported by the worker. (`getrusage(RUSAGE_CHILDREN)` misses the
    sandbox's processes: bubblewrap's PID-namespace init does not pass their usage up.)
    """
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for d in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parent[int(d.name)] = int(fields[1])
        cpu[int(d.name)] = sum(int(v) for v in fields[11:15]) / tick  # utime stime cutime cstime
    total, todo, seen = 0.0, [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += cpu.get(pid, 0.0)
        todo += [c for c, pp in parent.items() if pp == pid]
    return total


class Worker:
    """One sandboxed worker process serving one bundle."""

    def __init__(self, bundle: Path, model_file: str, weights: str, isolation: Isolation, limits: SandboxLimits,
                 device: str = "cpu", role: str = "worker", log_dir: Path | None = None) -> None:
        self.bundle, self.model_file, self.weights = Path(bundle), model_file, weights
        self.isolation, self.limits, self.device, self.role = isolation, limits, device, role
        self.log_dir = log_dir
        self.proc: subprocess.Popen | None = None
        self.facts: dict[str, Any] = {}
        self.stats = WorkerStats()
        self._next_id = 0
        self._started = 0.0
        self._scratch: Path | None = None
        self._log = None

    # --------------------------------------------------------------------------- lifecycle

    def start(self) -> dict[str, Any]:
        """Start the process and wait (at most `limits.load_s`) for its ready message; returns the facts."""
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        for fd in (req_w, rep_w):
            grow_pipe(fd)
        args = ["--model-file", self.model_file, "--weights", self.weights, "--device", self.device,
                "--threads", str(int(self.limits.threads) or max(1, torch.get_num_threads())),
                "--fd-in", str(req_r), "--fd-out", str(rep_w)]
        spec = launch_spec(self.isolation, self.bundle, args, self.limits, self.device)
        self._scratch = spec.scratch
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_dir / f"{self.role}.log", "ab")
        out = self._log if self._log is not None else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(spec.argv, env=spec.env, cwd=spec.cwd, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=out, pass_fds=(req_r, rep_w), preexec_fn=spec.preexec,
                                         start_new_session=True, close_fds=True)
        except OSError as exc:
            for fd in (req_r, req_w, rep_r, rep_w):
                os.close(fd)
            raise WorkerError(f"the model worker could not be started ({type(exc).__name__}: {exc})") from None
        os.close(req_r)
        os.close(rep_w)
        self._w, self._r = req_w, rep_r
        set_nonblocking(self._w)
        set_nonblocking(self._r)
        self._started = time.monotonic()
        try:  # the interpreter and torch come up first (not the submission's time), then the load limit runs
            hello, _ = recv(self._r, self._started + STARTUP_S, 0)
        except WireError as exc:
            why = self._exit()
            self.close()
            raise WorkerError(f"the model worker did not start ({why}; {clean_text(exc)})") from None
        if hello.get("op") != "hello":
            self.close()
            raise WorkerError("the model worker sent something other than its start message")
        deadline = time.monotonic() + float(self.limits.load_s)
        try:
            header, _ = recv(self._r, deadline, 0)
        except WireError as exc:
            if "deadline" in str(exc):
                self.close()
                raise WorkerError(f"the model did not finish loading within {self.limits.load_s:g} s (import of "
                                  f"{self.model_file}, create() and the weights); loading must not block or sleep") from None
            why = self._exit()
            self.close()
            raise WorkerError(f"the model worker ended while loading ({why}; {clean_text(exc)})") from None
        if header.get("op") != "ready":
            self.close()
            raise WorkerError("the model worker sent something other than its ready message while loading")
        if not header.get("ok"):
            self.close()
            raise RemoteError(clean_text(header.get("message", "loading failed")))
        self.facts = validate_facts(header.get("facts"))
        return self.facts

    def _exit(self) -> str:
        if self.proc is None:
            return "not started"
        try:
            code = self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            code = None
        return _exit_reason(code)

    def close(self) -> None:
        """Ask the worker to exit, then kill its whole process group; remove its scratch folder."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.stats.cpu_s = tree_cpu_seconds(self.proc.pid)
            except (OSError, ValueError):  # pragma: no cover
                pass
            try:
                send(self._w, {"op": "bye"}, None, time.monotonic() + 1.0)
                self.proc.wait(timeout=2)
            except (WireError, subprocess.TimeoutExpired, AttributeError):
                pass
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover
                pass
        for name in ("_w", "_r"):
            fd = getattr(self, name, None)
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
                setattr(self, name, None)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._scratch is not None:
            import shutil

            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def __del__(self) -> None:  # a worker dropped without close() must not outlive its handle
        try:
            self.close()
        except Exception:  # noqa: BLE001  (interpreter shutdown)
            pass

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------------------- requests

    def call(self, header: dict[str, Any], payload: np.ndarray | None = None, *, max_payload: int = 0,
             what: str = "request") -> tuple[dict[str, Any], memoryview]:
        """Send one request and return the reply (header, raw payload); failures end the worker."""
        if self.proc is None or self._w is None:
            raise WorkerError(f"the model worker ({self.role}) is not running")
        self._next_id += 1
        rid = self._next_id
        now = time.monotonic()
        deadline = min(now + float(self.limits.request_s), self._started + float(self.limits.wall_s))
        try:
            send(self._w, {**header, "id": rid}, payload, deadline)
            reply, data = recv(self._r, deadline, max_payload)
        except WireError as exc:
            if "deadline" in str(exc):
                self.close()
                limit = self.limits.request_s if deadline < self._started + float(self.limits.wall_s) else self.limits.wall_s
                raise WorkerError(f"the model did not answer a {what} within {limit:g} s; a forward pass or gradient "
                                  f"must finish within the sandbox's time limit") from None
            if "closed" in str(exc):
                why = self._exit()
                self.close()
                raise WorkerError(f"the model worker ended during a {what} ({why})") from None
            self.close()
            raise WorkerError(f"the model worker broke the protocol during a {what} ({clean_text(exc)}); it was killed") from None
        self.stats.requests += 1
        self.stats.wait_s += time.monotonic() - now
        self.stats.bytes_out += 0 if payload is None else int(payload.nbytes)
        self.stats.bytes_in += len(data)
        if reply.get("id") != rid:
            self.close()
            raise WorkerError(f"the model worker answered request {clean_text(reply.get('id'), 20)} where {rid} was asked")
        if not reply.get("ok"):
            kind = reply.get("error")
            if kind != "model":
                self.close()
                raise WorkerError(f"the model worker refused a {what}: {clean_text(reply.get('message'))}")
            raise RemoteError(f"the model raised on a {what}: {clean_text(reply.get('message'))}")
        return reply, data


def _int(value: Any, lo: int, hi: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise WorkerError(f"the model worker reported {what}={clean_text(value, 40)} (expected an integer in {lo}..{hi})")
    return value


def _names(value: Any) -> list[str]:
    if not isinstance(value, list):
        return []
    return [clean_text(v, 80) for v in value[:20]]


def validate_facts(facts: Any) -> dict[str, Any]:
    """The worker's description of the model, checked field by field (it is untrusted input)."""
    from harness.core.ensemble import MODES, TIE_BREAKS

    if not isinstance(facts, dict):
        raise WorkerError("the model worker's ready message carries no facts")
    out: dict[str, Any] = {"parameters": _int(facts.get("parameters", 0), 0, 10**13, "parameters"),
                           "has_members": bool(facts.get("has_members") is True),
                           "training_modules": _names(facts.get("training_modules")), "ensemble": None}
    ens = facts.get("ensemble")
    if ens is not None:
        if not isinstance(ens, dict):
            raise WorkerError("the model worker reported a malformed ensemble description")
        sharp = ens.get("vote_sharpness")
        if isinstance(sharp, bool) or not isinstance(sharp, (int, float)) or not math.isfinite(sharp) or sharp <= 0:
            raise WorkerError("the model worker reported a malformed ensemble vote_sharpness")
        if ens.get("mode") not in MODES or ens.get("tie_break") not in TIE_BREAKS:
            raise WorkerError("the model worker reported an unknown ensemble mode or tie break")
        out["ensemble"] = {"members": _int(ens.get("members"), 1, MAX_MEMBERS, "ensemble.members"),
                           "mode": ens["mode"], "tie_break": ens["tie_break"], "vote_sharpness": float(sharp)}
    return out


# ------------------------------------------------------------------------------ the model


@dataclass
class Exchange:
    """One forward request (and its VJP, if any) as sent and answered: what an audit replays."""

    target: int
    seed: int | None
    grad: bool
    x: np.ndarray
    out: np.ndarray
    grad_out: np.ndarray | None = None
    grad_in: np.ndarray | None = None


class RemoteModel:
    """Forward passes and VJPs of one worker's model, on harness tensors, with per-request seeds.

    Seeds: a declared-randomised model gets a seed drawn from torch's global generator for every
    request (so the cascade's per-batch seeding fixes its noise, as in process); a deterministic
    one gets none, which leaves the harness's random streams exactly as they are in process.
    `tap`, when set, is offered every exchange (`tap.wants()` before anything is copied, then
    `tap.keep(exchange)`): the audit's reservoir.
    """

    def __init__(self, worker: Worker, num_classes: int, input_shape: tuple[int, ...], randomized: bool) -> None:
        self.worker = worker
        self.num_classes = int(num_classes)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.randomized = bool(randomized)
        self.tap: Any = None
        self.generator: torch.Generator | None = None
        self._released: list[int] = []
        self._exchanges: dict[int, Exchange] = {}

    def _seed(self) -> int | None:
        if self.randomized:
            # a private generator when the caller set one (judges running in threads), else the global one
            return int(torch.randint(0, 2**62, (1,), generator=self.generator).item())
        return None

    def release(self, handle: int) -> None:
        self._released.append(int(handle))
        self._exchanges.pop(int(handle), None)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 1 + len(self.input_shape) or tuple(x.shape[1:]) != self.input_shape or x.shape[0] < 1:
            raise UserError(f"the harness sent a batch of shape {tuple(x.shape)} to the model worker; it takes "
                            f"(N, {', '.join(map(str, self.input_shape))}) with N >= 1")

    def forward(self, x: torch.Tensor, target: int = -1, grad: bool = False,
                seed: int | None | str = "draw") -> tuple[torch.Tensor, int | None, bool]:
        """(logits on x's device, graph handle or None, whether the model's output was differentiable)."""
        self._check_input(x)
        n = int(x.shape[0])
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        seed = self._seed() if seed == "draw" else seed  # a replay passes the recorded seed (None included)
        release, self._released = self._released, []
        header = {"op": "forward", "target": int(target), "grad": bool(grad), "seed": seed, "shape": list(arr.shape),
                  "release": release}
        reply, data = self.worker.call(header, arr, max_payload=4 * n * self.num_classes, what=f"forward pass of {n} inputs")
        shape = reply.get("shape")
        if isinstance(shape, list) and len(shape) == 2 and shape[0] == n and shape[1] != self.num_classes:
            raise UserError(f"the model returns {clean_text(shape[1], 12)} classes but the dataset has {self.num_classes}; "
                            f"return logits of shape (N, {self.num_classes})")
        try:
            out = expect_array(reply, data, (n, self.num_classes))
        except WireError as exc:
            self.worker.close()
            raise WorkerError(f"the model worker broke the protocol during a forward pass ({exc})") from None
        handle = reply.get("handle")
        handle = handle if isinstance(handle, int) and not isinstance(handle, bool) and handle > 0 and grad else None
        differentiable = bool(reply.get("differentiable") is True) and handle is not None
        if self.tap is not None and self.tap.wants():
            ex = Exchange(int(target), seed, bool(grad), arr.copy(), out.copy())
            self.tap.keep(ex)
            if handle is not None:
                self._exchanges[handle] = ex
        return torch.from_numpy(out).to(x.device), handle, differentiable

    def vjp(self, handle: int, grad_out: torch.Tensor, x_shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The input gradient for a kept graph and an output gradient of shape (N, C)."""
        g = grad_out.detach().to("cpu", torch.float32).contiguous().numpy()
        n = int(x_shape[0])
        if g.shape != (n, self.num_classes):
            raise UserError(f"an output gradient of shape {g.shape} for logits of shape {(n, self.num_classes)}")
        release, self._released = self._released, []
        size = 4 * math.prod(x_shape)
        reply, data = self.worker.call({"op": "vjp", "handle": int(handle), "shape": list(g.shape), "release": release}, g,
                                       max_payload=size, what=f"gradient of {n} inputs")
        try:
            grad = expect_array(reply, data, tuple(int(s) for s in x_shape))
        except WireError as exc:
            self.worker.close()
            raise WorkerError(f"the model worker broke the protocol during a gradient ({exc})") from None
        ex = self._exchanges.get(int(handle))
        if ex is not None and ex.grad_out is None:
            ex.grad_out, ex.grad_in = g.copy(), grad.copy()
        return torch.from_numpy(grad).to(device)

    def trace(self, x: torch.Tensor) -> dict[str, Any]:
        """Autograd/optimiser calls and state changes inside two forward passes (self-reported)."""
        self._check_input(x)
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        reply, _ = self.worker.call({"op": "trace", "seed": self._seed(), "shape": list(arr.shape)}, arr, what="trace")
        calls = reply.get("calls") if isinstance(reply.get("calls"), dict) else {}
        return {"calls": {clean_text(k, 40): _int(v, 0, 10**9, "calls") for k, v in list(calls.items())[:20]},
                "changed": _names(reply.get("changed"))}

    def state(self) -> dict[str, Any]:
        """Modules in training mode and state tensors changed since loading (self-reported)."""
        reply, _ = self.worker.call({"op": "state"}, what="state query")
        return {"training": _names(reply.get("training")), "changed": _names(reply.get("changed"))}


class _RemoteGrad(torch.autograd.Function):
    """Attaches the worker's logits to the autograd graph; backward asks the worker for the VJP."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out: torch.Tensor, ref: "_GraphRef") -> torch.Tensor:  # type: ignore[override]
        ctx.ref = ref
        ctx.x_shape = tuple(x.shape)
        ctx.device = x.device
        weakref.finalize(ctx, ref.model.release, ref.handle)
        return out.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        grad = ctx.ref.model.vjp(ctx.ref.handle, grad_out, ctx.x_shape, ctx.device)
        return grad.to(grad_out.dtype), None, None


@dataclass(frozen=True)
class _GraphRef:
    model: RemoteModel
    handle: int


class RemoteModule(nn.Module):
    """An nn.Module whose computation happens in the worker (`target` -1: the model, i: member i).

    The buffer `bundle_sha256` makes `module_hash` (run manifests, attack caches) identify the
    bundle; the proxy has no parameters of its own.
    """

    def __init__(self, model: RemoteModel, target: int, digest: bytes) -> None:
        super().__init__()
        self.remote = model
        self.target = int(target)
        self.register_buffer("bundle_sha256", torch.tensor(list(digest[:32]), dtype=torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grad = torch.is_grad_enabled() and x.requires_grad
        out, handle, differentiable = self.remote.forward(x, self.target, grad=grad)
        if not grad or not differentiable or handle is None:
            if handle is not None:
                self.remote.release(handle)
            return out.to(x.dtype) if x.dtype.is_floating_point else out
        return _RemoteGrad.apply(x, out.to(x.dtype), _GraphRef(self.remote, handle))

    def __deepcopy__(self, memo: dict[int, Any]) -> "RemoteModule":
        # A private copy of a remote model is another handle on the same worker (the worker, not
        # this proxy, holds the model); copying the process or its pipes would make no sense.
        return RemoteModule(self.remote, self.target, bytes(self.bundle_sha256.tolist()))

    def extra_repr(self) -> str:
        return f"target={self.target}, worker={self.remote.worker.role}"


def remote_classifier(model: RemoteModel, facts: dict[str, Any], digest: bytes, info: dict[str, Any] | None = None) -> Classifier:
    """The worker's model as a harness `Classifier` (the harness's Ensemble over remote members if one)."""
    from harness.core.ensemble import make_classifier

    info = {**(info or {}), "parameters": facts.get("parameters", 0)}
    ens = facts.get("ensemble")
    if ens:
        members = [RemoteModule(model, i, digest) for i in range(int(ens["members"]))]
        return make_classifier(members, ens["mode"], model.num_classes, model.input_shape, tie_break=ens["tie_break"],
                               vote_sharpness=ens["vote_sharpness"], randomized=model.randomized, info=info)
    return Classifier(RemoteModule(model, -1, digest), model.num_classes, model.input_shape,
                      randomized=model.randomized, info=info)


@dataclass
class Session:
    """A started worker with its model and classifier; close() ends the worker."""

    worker: Worker
    model: RemoteModel
    classifier: Classifier
    facts: dict[str, Any] = field(default_factory=dict)

    def close(self) -> None:
        self.worker.close()


def open_session(bundle: Path, model_file: str, weights: str, *, isolation: Isolation, limits: SandboxLimits,
                 device: str, num_classes: int, input_shape: tuple[int, ...], randomized: bool, digest: bytes,
                 role: str, log_dir: Path | None = None, info: dict[str, Any] | None = None) -> Session:
    """Start a worker for the bundle and wrap it as a classifier."""
    worker = Worker(bundle, model_file, weights, isolation, limits, device=device, role=role, log_dir=log_dir)
    facts = worker.start()
    model = RemoteModel(worker, num_classes, input_shape, randomized)
    try:
        clf = remote_classifier(model, facts, digest, info)
    except UserError:
        worker.close()
        raise
    return Session(worker, model, clf, facts)
