"""What several test modules share: paths, forked CLI runs, stored records, small trained models.

Importable from any test as `from helpers import ...` (tests/conftest.py puts tests/ on the path).
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
# ../shared beside the checkout (CI); ARENA_SHARED points elsewhere (a worktree one level deeper)
SHARED = Path(os.environ.get("ARENA_SHARED") or REPO.parent / "shared")
BUNDLES = REPO / "tests" / "bundles"
CPU = torch.device("cpu")
# the devices a device-agnostic test runs on: cuda only where a GPU is visible (marker `cuda`,
# skipped otherwise by tests/conftest.py; bench/gpu_check.sh runs `-m cuda`)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def shared_path(*parts: str) -> Path:
    """A file under ../shared, or skip the test with the reason when it is absent (a user's machine)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found: ../shared (real CIFAR-10/MNIST files and models) is only beside CI checkouts")
    return path


# ------------------------------------------------------------------------------------ processes


def warm_imports() -> None:
    """Import every plugin module and the CLI now, so forked children start warm (no re-import)."""
    import harness.cli.eval  # noqa: F401
    import sklearn.datasets  # noqa: F401
    from harness.core.attack import ATTACKS
    from harness.core.defense import DEFENSES
    from harness.core.poison import POISONS

    for registry in (ATTACKS, DEFENSES, POISONS):
        registry.names()


def fork_call(fn: Callable[[], int | None], log: Path, before: Callable[[], None] | None = None) -> int:
    """Fork; the child appends its stdout/stderr to `log` (line-buffered: a kill loses nothing), runs
    one torch thread, calls `before()` then `fn()`, and exits with fn's return code. Returns the pid."""
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 99
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = open(1, "w", buffering=1, closefd=False)
            sys.stderr = open(2, "w", buffering=1, closefd=False)
            torch.set_num_threads(1)
            if before is not None:
                before()
            code = int(fn() or 0)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def _cli(argv: list[str]) -> int:
    """`arena <argv>` in this process, then stop what launchers leave running (os._exit skips atexit)."""
    from harness.cli import dispatch as cli

    code = cli.main(argv)
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    loky = sys.modules.get("joblib.externals.loky.reusable_executor")
    if loky is not None and loky._executor is not None:
        loky._executor.shutdown(wait=True)
    return code


def fork_cli(argv: list[str], log: Path, before: Callable[[], None] | None = None) -> int:
    """Fork and run `arena <argv>` in the child (see `fork_call`); returns the pid."""
    return fork_call(lambda: _cli(argv), log, before)


def wait(pid: int, timeout: float | None = None) -> int:
    """The child's exit code; SIGKILL it and fail when it outlives `timeout` seconds."""
    if timeout is None:
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"process {pid} did not finish in {timeout:.0f} s")


# ------------------------------------------------------------------------------------ records


def records(work: Path, finished_only: bool = False) -> dict[str, pd.DataFrame]:
    """Per-sample records of the runs under `work/runs` (by run key), `time_s` left out (it varies)."""
    out = {}
    for path in sorted((work / "runs").glob("*/samples.parquet")):
        if finished_only and not (path.parent / "DONE").is_file():
            continue
        out[path.parent.name] = pd.read_parquet(path).drop(columns=["time_s"])
    return out


# ------------------------------------------------------------------------------------ models


class FixedLogits(nn.Module):
    """A member whose logits are a fixed vector plus a tiny input-dependent term (so gradients exist)."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.register_buffer("bias", torch.tensor(logits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x.shape[0], -1) + 1e-3 * x.flatten(1).mean(1, keepdim=True)


def trained_small_cnn(data, epochs: int = 3, width: int = 8, hidden: int = 32, lr: float = 0.003, seed: int = 0,
                      batch_size: int = 32) -> nn.Module:
    """`SmallCNN(width, hidden)` trained with Adam on `data`'s training split (seeded: the same model every run)."""
    from harness.data.models import SmallCNN
    from harness.data.training import TrainConfig, train

    torch.manual_seed(seed)  # the initial weights too
    net = SmallCNN(int(data.input_shape[0]), data.num_classes, width=width, hidden=hidden)
    train(net, data.train_x, data.train_y, TrainConfig(epochs=epochs, batch_size=batch_size, optimizer="adam", lr=lr,
                                                       weight_decay=0.0), device=CPU, seed=seed, progress=False)
    return net.eval()


# ------------------------------------------------------------------------------------ plugins


def same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=1e-15)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def plugin_of(raw: dict[str, Any]) -> str:
    """The plugin a config names: `plugin:` when present (then `name` is a parameter), else `name:`."""
    return raw.get("plugin", raw.get("name"))


def mirror_problems(registry, raw: dict[str, Any]) -> list[str]:
    """How a mirror YAML (`raw`, unresolved) differs from its plugin's dataclass; empty when it conforms.

    Every field listed, every value equal to the field's default; a field that follows the
    evaluation's threat written `${threat.eps}`; nested recipes may leave out fields at their default.
    """
    from harness.core.registry import FOLLOWS, field_default, keys_of, plain

    cls = registry.get(plugin_of(raw))
    problems = []
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name, fname in keys_of(cls).items():
        f = fields[fname]
        if name not in raw:
            problems.append(f"{name}: missing (default {plain(field_default(f))!r})")
            continue
        value, default = raw[name], field_default(f)
        path = f.metadata.get(FOLLOWS)
        if path:
            if value != f"${{{path}}}":
                problems.append(f"{name}: {value!r}, but the field follows {path}: write ${{{path}}}")
        elif dataclasses.is_dataclass(default):
            for key, v in (value or {}).items():
                if not hasattr(default, key):
                    problems.append(f"{name}.{key}: not a field of {type(default).__name__}")
                elif not same(v, getattr(default, key)):
                    problems.append(f"{name}.{key}: YAML {v!r} != default {getattr(default, key)!r}")
        elif not same(value, plain(default)):
            problems.append(f"{name}: YAML {value!r} != default {plain(default)!r}")
    return problems


class Listener:
    """A TCP server on 127.0.0.1 that records whatever reaches it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(5)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            conn.settimeout(1)
            try:
                self.received.append(conn.recv(1 << 16) or b"<connected>")
            except OSError:
                self.received.append(b"<connected>")
            conn.close()

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        self.sock.close()
