"""Where submitted code runs: a bubblewrap sandbox, or a plainly labelled reduced fallback.

`arena submit` never imports a bundle's `model.py` into the harness process. Each model worker
(`harness.submit.worker`) is a separate process started here:

- **full** isolation (`bwrap`, Debian package `bubblewrap`): new user, PID, network, IPC and UTS
  namespaces (no network at all, not even loopback to the host), no capabilities, a new session
  (no terminal injection), a clean environment, and a file system that holds only the Python
  installation (read-only), the harness package (read-only), the bundle (read-only at /bundle),
  a private scratch tmpfs (/scratch, /tmp) and minimal /dev and /proc. Nothing of the host's home,
  work directory, data or other submissions is visible. Every process the worker forks lives in
  its PID namespace and dies with it.
- **reduced** isolation (no usable bubblewrap): the worker runs as the harness's user, in a new
  session, with a scrubbed environment and its working directory in a private scratch folder,
  inside `unshare --net --pid --fork --kill-child` where the kernel permits that (no network,
  forks die with it), else with the network reachable. It CAN read and write whatever the
  harness's user can. Runs scored this way carry `isolation=reduced` in the manifest and on the
  board, and the log says so.

Both get the same resource limits (`SandboxLimits`): address space (CPU runs; CUDA reserves huge
virtual ranges, so the limit is not applied on a GPU), CPU seconds, largest file, open files, no
core dumps, plus wall-clock deadlines the harness enforces per request and per worker.
"""
from __future__ import annotations

import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from harness.core.errors import UserError

MODES = ("auto", "full", "reduced")
BUNDLE_MOUNT = "/bundle"
ARENA_MOUNT = "/arena"


@dataclass
class SandboxLimits:
    """Resource limits of one worker process (the operator may tighten or loosen them)."""

    memory_mb: int = 16384  # RLIMIT_AS on CPU workers (virtual memory: torch alone maps ~3 GB)
    cpu_s: int = 12 * 3600  # RLIMIT_CPU: CPU seconds over the worker's life (all its threads)
    load_s: float = 300.0  # wall seconds to import model.py, call create() and load the weights
    request_s: float = 600.0  # wall seconds one forward or vector-Jacobian product may take
    wall_s: float = 24 * 3600.0  # wall seconds a worker may live
    file_mb: int = 64  # RLIMIT_FSIZE: largest file the worker may write (scratch files, its log)
    scratch_mb: int = 512  # size of each of the sandbox's tmpfs folders (/scratch, /tmp), which live in RAM
    open_files: int = 256  # RLIMIT_NOFILE
    threads: int = 0  # torch threads in the worker (0: as many as the harness uses)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "SandboxLimits":
        d = dict(d or {})
        valid = {f.name for f in fields(cls)}
        for k, v in d.items():
            if k not in valid:
                raise UserError(f"sandbox.{k} is not a sandbox limit; valid: {', '.join(sorted(valid))}")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise UserError(f"sandbox.{k}={v!r} must be a finite number >= 0")
        return cls(**d)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Isolation:
    """How workers are isolated on this machine: `level` full or reduced, and why."""

    level: str  # "full" | "reduced"
    mechanism: str  # "bwrap" | "unshare-net-pid+rlimits" | "rlimits"
    network: bool  # True when the worker has no network
    filesystem: bool  # True when the worker sees only the bundle (read-only), Python and scratch
    reason: str = ""  # why not full

    def as_dict(self) -> dict[str, Any]:
        return {"level": self.level, "mechanism": self.mechanism, "network_isolated": self.network,
                "filesystem_isolated": self.filesystem, "reason": self.reason}

    def describe(self) -> str:
        if self.level == "full":
            return "full (bubblewrap: no network, read-only bundle, private scratch, scrubbed environment, rlimits)"
        net = "no network (unshare)" if self.network else "NETWORK REACHABLE"
        return (f"REDUCED ({self.reason}): the model runs as the harness's user with rlimits and a scrubbed "
                f"environment, {net}, and it CAN read and write the harness user's files; rows say isolation=reduced")


# ------------------------------------------------------------------------------ the probe


def python_roots() -> list[Path]:
    """Directories the worker's interpreter needs (prefix, base prefix: stdlib and site-packages)."""
    roots = {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve(), Path(sys.executable).resolve().parent.parent}
    return sorted(r for r in roots if r.is_dir())


def harness_root() -> Path:
    """The directory holding the `harness` package this process runs."""
    return Path(__file__).resolve().parents[2]


def _system_binds() -> list[str]:
    """Read-only system directories (libraries the interpreter and torch load); merged-/usr aware."""
    args: list[str] = []
    for d in ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin"):
        p = Path(d)
        if p.is_symlink():
            args += ["--symlink", os.readlink(p), d]
        elif p.is_dir():
            args += ["--ro-bind", d, d]
    for f in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/localtime"):
        if Path(f).exists():
            args += ["--ro-bind", f, f]
    return args


def bwrap_args(bundle: Path | None, device: str, scratch_mb: int = 512) -> list[str]:
    """The bubblewrap command line (before the worker's own argv)."""
    exe = shutil.which("bwrap") or "bwrap"
    args = [exe, "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--clearenv",
            "--uid", "65534", "--gid", "65534", "--hostname", "arena-worker"]
    args += _system_binds()
    for root in python_roots():
        args += ["--ro-bind", str(root), str(root)]
    args += ["--ro-bind", str(harness_root() / "harness"), f"{ARENA_MOUNT}/harness"]
    if bundle is not None:
        args += ["--ro-bind", str(bundle), BUNDLE_MOUNT]
    size = str(int(scratch_mb) * 1024 * 1024)  # tmpfs lives in RAM: bounded, or a worker could fill it
    args += ["--proc", "/proc", "--dev", "/dev", "--size", size, "--tmpfs", "/tmp", "--size", size, "--tmpfs", "/scratch"]
    if device.startswith("cuda"):
        for dev in sorted(Path("/dev").glob("nvidia*")):
            args += ["--dev-bind", str(dev), str(dev)]
        for extra in ("/proc/driver/nvidia", "/sys"):
            if Path(extra).exists():
                args += ["--ro-bind", extra, extra]
    args += ["--remount-ro", "/", "--chdir", "/scratch"]
    return args


@lru_cache(maxsize=4)
def _bwrap_probe() -> str:
    """'' when bubblewrap can start a sandbox here, else the reason it cannot."""
    if shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed; apt-get install bubblewrap"
    try:
        res = subprocess.run([*bwrap_args(None, "cpu"), sys.executable, "-I", "-S", "-c", "pass"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"bwrap failed to start ({type(exc).__name__})"
    if res.returncode != 0:
        line = (res.stderr.strip().splitlines() or ["no message"])[-1][:160]
        return f"bwrap cannot create a sandbox here ({line})"
    return ""


@lru_cache(maxsize=4)
def _unshare_probe() -> list[str]:
    """The `unshare` prefix that works here ([] when none does)."""
    exe = shutil.which("unshare")
    if exe is None:
        return []
    for prefix in ([exe, "--net", "--pid", "--fork", "--kill-child"],
                   [exe, "--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child"]):
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=30).returncode == 0:
                return prefix
        except (OSError, subprocess.SubprocessError):
            continue
    return []


def detect_isolation(mode: str = "auto") -> Isolation:
    """Full isolation when bubblewrap works (or `mode=full` insists), else the labelled fallback."""
    if mode not in MODES:
        raise UserError(f"--isolation {mode!r} unknown; choose one of: {', '.join(MODES)}")
    why = "the operator chose --isolation reduced" if mode == "reduced" else _bwrap_probe()
    if not why:
        return Isolation("full", "bwrap", network=True, filesystem=True)
    if mode == "full":
        raise UserError(f"--isolation full needs bubblewrap, but {why}; install bubblewrap or accept --isolation reduced")
    prefix = _unshare_probe()
    if prefix:
        return Isolation("reduced", "unshare-net-pid+rlimits", network=True, filesystem=False, reason=why)
    return Isolation("reduced", "rlimits", network=False, filesystem=False, reason=why)


# --------------------------------------------------------------------------- starting one


def _rlimits(limits: SandboxLimits, device: str) -> list[tuple[str, int, int]]:
    """(prlimit option, soft, hard) of every limit that applies."""
    out = [("--core", 0, 0)]
    if limits.memory_mb and not device.startswith("cuda"):  # CUDA reserves huge virtual ranges
        out.append(("--as", int(limits.memory_mb) * 1024 * 1024, int(limits.memory_mb) * 1024 * 1024))
    if limits.cpu_s:
        out.append(("--cpu", int(limits.cpu_s), int(limits.cpu_s) + 5))
    if limits.file_mb:
        out.append(("--fsize", int(limits.file_mb) * 1024 * 1024, int(limits.file_mb) * 1024 * 1024))
    if limits.open_files:
        out.append(("--nofile", int(limits.open_files), int(limits.open_files)))
    return out


def limit_prefix(limits: SandboxLimits, device: str, die_with_harness: bool) -> list[str]:
    """`prlimit ... --` (and `setpriv --pdeathsig KILL --`) before the worker's command.

    External tools from util-linux, not a `preexec_fn`: the harness starts judges from several
    threads, and Python code between fork and exec is unsafe there.
    """
    prlimit, setpriv = shutil.which("prlimit"), shutil.which("setpriv")
    if prlimit is None:
        return []
    prefix = [prlimit, *(f"{opt}={soft}:{hard}" for opt, soft, hard in _rlimits(limits, device)), "--"]
    if die_with_harness and setpriv is not None:
        prefix += [setpriv, "--pdeathsig", "KILL", "--"]
    return prefix


def _limit_setter(limits: SandboxLimits, device: str) -> Callable[[], None] | None:
    """The rlimits as a preexec function: only where util-linux's prlimit is missing."""
    if shutil.which("prlimit") is not None:
        return None
    names = {"--core": resource.RLIMIT_CORE, "--as": resource.RLIMIT_AS, "--cpu": resource.RLIMIT_CPU,
             "--fsize": resource.RLIMIT_FSIZE, "--nofile": resource.RLIMIT_NOFILE}
    values = [(names[opt], soft, hard) for opt, soft, hard in _rlimits(limits, device)]

    def apply() -> None:  # pragma: no cover  (only without util-linux)
        for res, soft, hard in values:
            resource.setrlimit(res, (soft, hard))

    return apply


@dataclass
class LaunchSpec:
    """What `subprocess.Popen` needs to start one worker."""

    argv: list[str]
    env: dict[str, str]
    cwd: str
    preexec: Callable[[], None] | None
    scratch: Path | None = None  # host scratch dir of a reduced worker (removed on close)
    extra: dict[str, Any] = field(default_factory=dict)


def worker_env(threads: int, scratch: str) -> dict[str, str]:
    """The whole environment a worker sees (nothing of the harness's is passed on)."""
    return {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1", "PYTHONHASHSEED": "0",
            "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TORCH_HOME": f"{scratch}/torch",
            "XDG_CACHE_HOME": f"{scratch}/cache", "CUDA_CACHE_DISABLE": "1"}


def launch_spec(isolation: Isolation, bundle: Path, worker_args: list[str], limits: SandboxLimits,
                device: str) -> LaunchSpec:
    """The command line that starts a worker for `bundle` under `isolation`."""
    threads = int(limits.threads) or max(1, _torch_threads())
    site = [p for p in sys.path if p and Path(p).is_dir() and any(str(Path(p).resolve()).startswith(str(r)) for r in python_roots())]
    preexec = _limit_setter(limits, device)
    if isolation.level == "full":
        paths = [ARENA_MOUNT, *site]
        boot = [sys.executable, "-I", "-S", "-B", "-c", BOOT, os.pathsep.join(paths), BUNDLE_MOUNT, *worker_args]
        env = worker_env(threads, "/scratch")
        argv = [*limit_prefix(limits, device, die_with_harness=False), *bwrap_args(bundle, device, int(limits.scratch_mb) or 512)]
        for k, v in env.items():
            argv += ["--setenv", k, v]
        return LaunchSpec([*argv, *boot], {}, "/", preexec)
    scratch = Path(tempfile.mkdtemp(prefix="arena-worker-"))
    paths = [str(_harness_only_root(scratch)), *site]
    boot = [sys.executable, "-I", "-S", "-B", "-c", BOOT, os.pathsep.join(paths), str(bundle), *worker_args]
    prefix = _unshare_probe() if isolation.network else []
    return LaunchSpec([*limit_prefix(limits, device, die_with_harness=True), *prefix, *boot],
                      worker_env(threads, str(scratch)), str(scratch), preexec, scratch)


def _harness_only_root(scratch: Path) -> Path:
    """A folder that holds only a link to the harness package (not the repository's other folders)."""
    root = scratch / "arena"
    root.mkdir(exist_ok=True)
    link = root / "harness"
    if not link.exists():
        link.symlink_to(harness_root() / "harness", target_is_directory=True)
    return root


def _torch_threads() -> int:
    try:
        import torch

        return int(torch.get_num_threads())
    except Exception:  # pragma: no cover
        return 1


# The interpreter is started with -I -S (no site hooks, no PYTHON* variables, no user site) and
# this bootstrap puts exactly the harness package and the Python installation's own paths on
# sys.path, then hands over to the worker.
BOOT = ("import sys; sys.path[:] = [p for p in sys.argv[1].split(':') if p] + [p for p in sys.path if p]; "
        "from harness.submit.worker import main; sys.exit(main(sys.argv[2:]))")
