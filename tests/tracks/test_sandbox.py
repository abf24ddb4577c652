"""The sandboxed model worker, attacked from inside: what submitted code can and cannot do.

Each test writes a small bundle whose model.py misbehaves (at import or while serving) and talks to
its worker directly through `harness.submit.remote`: a real worker process under the isolation this
machine offers (bubblewrap here and in CI). What the code tried is reported back through the
logits it returns, and checked from outside too (files, a TCP listener, the process table).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from harness.core.hashing import file_sha256
from harness.data.models import SmallCNN
from harness.submit.remote import RemoteError, Worker, WorkerError, open_session
from harness.submit.sandbox import SandboxLimits, detect_isolation

from helpers import REPO, Listener  # noqa: E402
NET = '''
import torch
from torch import nn
from harness.data.models import SmallCNN


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = SmallCNN(1, 10, width=8, hidden=32)

    def forward(self, x):
        return self.net(x)


def create():
    return Net()
'''


def _bundle(root: Path, prelude: str, tail: str = "") -> Path:
    """A bundle directory with model.py = prelude + the small CNN + tail, and fresh weights."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.py").write_text(prelude + NET + tail)
    torch.manual_seed(0)
    torch.save({f"net.{k}": v for k, v in SmallCNN(1, 10, width=8, hidden=32).state_dict().items()}, root / "weights.pt")
    return root


def _session(bundle: Path, **limits):
    iso = detect_isolation("auto")
    return open_session(bundle, "model.py", "weights.pt", isolation=iso, limits=SandboxLimits(**limits), device="cpu",
                        num_classes=10, input_shape=(1, 28, 28), randomized=False, digest=b"\0" * 32, role="test")


PROBES = ("write_outside", "write_bundle", "network", "environment", "subprocess", "read_host_file", "read_repository",
          "write_harness")


def test_code_in_the_worker_cannot_reach_files_network_environment_or_processes(tmp_path, monkeypatch, full_isolation):
    """At import: writes outside and into its bundle, a connection to a listener on 127.0.0.1, the
    harness's environment, a subprocess, reading a host file and the repository, writing the harness
    source. The model reports which succeeded through its logits; the host side is checked too."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("host secret")
    listener = Listener()
    monkeypatch.setenv("ARENA_TEST_SECRET", "s3cret")
    prelude = f'''
import os, socket, subprocess
OUT = {str(outside)!r}
FLAGS = []
def _try(fn):
    try:
        fn()
        FLAGS.append(1.0)
    except Exception:
        FLAGS.append(0.0)
def _write_outside():
    open(os.path.join(OUT, "pwned.txt"), "w").write("x")
def _write_bundle():
    open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights.pt"), "ab").write(b"x")
def _network():
    s = socket.create_connection(("127.0.0.1", {listener.port}), timeout=2)
    s.sendall(b"hello from the sandbox")
    s.close()
def _environment():
    assert "ARENA_TEST_SECRET" in os.environ
def _subprocess():
    subprocess.run(["touch", os.path.join(OUT, "touched.txt")], check=True, timeout=10)
def _read_host_file():
    open(os.path.join(OUT, "secret.txt")).read()
def _read_repository():
    open({str(REPO / "tests" / "conftest.py")!r}).read()
def _write_harness():
    import harness
    open(os.path.join(os.path.dirname(harness.__file__), "pwned.py"), "w").write("x")
for _fn in (_write_outside, _write_bundle, _network, _environment, _subprocess, _read_host_file, _read_repository,
            _write_harness):
    _try(_fn)
'''
    tail = '''
class Probe(Net):
    def forward(self, x):
        flags = torch.tensor(FLAGS + [0.0] * (10 - len(FLAGS)))
        return self.net(x) * 0 + flags


def create():
    return Probe()
'''
    bundle = _bundle(tmp_path / "bundle", prelude, tail)
    before = {p.name: file_sha256(p) for p in bundle.iterdir()}
    session = _session(bundle)
    try:
        flags = session.classifier.module(torch.rand(2, 1, 28, 28))[0, : len(PROBES)].tolist()
    finally:
        session.close()
        time.sleep(0.5)
        listener.close()
    assert dict(zip(PROBES, flags)) == dict.fromkeys(PROBES, 0.0)
    assert listener.received == []
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
    assert {p.name: file_sha256(p) for p in bundle.iterdir()} == before
    assert not (REPO / "harness" / "pwned.py").exists()


def test_a_model_that_sleeps_at_import_is_stopped_by_the_load_limit(tmp_path):
    bundle = _bundle(tmp_path / "b", "import time\ntime.sleep(3600)\n")
    worker = Worker(bundle, "model.py", "weights.pt", detect_isolation("auto"), SandboxLimits(load_s=2), role="sleepy")
    start = time.monotonic()
    with pytest.raises(WorkerError, match="did not finish loading within 2 s"):
        worker.start()
    assert time.monotonic() - start < 120
    assert worker.proc is not None and worker.proc.poll() is not None  # killed, not left behind


def _host_processes_with(marker: str) -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(d.name))
            except OSError:
                continue
    return found


def test_processes_the_model_forks_die_with_its_worker(tmp_path):
    """A detached grandchild (new session, ignores SIGHUP) must not outlive the worker."""
    iso = detect_isolation("auto")
    if iso.level == "reduced" and iso.mechanism == "rlimits":
        pytest.skip("without bubblewrap or unshare the fallback cannot contain forks (documented)")
    marker = f"{4000 + os.getpid() % 1000}.{time.time_ns() % 10**6}"
    bundle = _bundle(tmp_path / "b", f"import subprocess\nsubprocess.Popen(['sleep', '{marker}'], start_new_session=True)\n")
    session = _session(bundle)
    time.sleep(0.5)
    assert _host_processes_with(f"sleep {marker}"), "the model's child did not start"
    session.close()
    for _ in range(50):
        if not _host_processes_with(f"sleep {marker}"):
            break
        time.sleep(0.1)
    assert not _host_processes_with(f"sleep {marker}")


# How a hostile worker can answer: each replaces the worker's forward (the submitted code runs in
# the worker's process, so it can), and each must end the worker with a one-line WorkerError.
REPLIES = {
    "wrong_shape": '''
    x = self.tensor(header, payload)
    data = torch.zeros(x.shape[0] + 1, 10).numpy()
    self.reply({"id": header.get("id"), "shape": [x.shape[0] + 1, 10], "dtype": "float32", "handle": None}, data)''',
    "shape_lies_about_payload": '''
    x = self.tensor(header, payload)
    data = torch.zeros(x.shape[0], 3).numpy()
    self.reply({"id": header.get("id"), "shape": [x.shape[0], 10], "dtype": "float32", "handle": None}, data)''',
    "wrong_dtype": '''
    x = self.tensor(header, payload)
    data = torch.zeros(x.shape[0], 10).numpy()
    self.reply({"id": header.get("id"), "shape": [x.shape[0], 10], "dtype": "float64", "handle": None}, data)''',
    "huge_payload_claim": '''
    import os, struct
    os.write(self.fd_out, struct.pack(">4sIQ", b"RAW1", 2, 2**40) + b"{}")''',
    "huge_header_claim": '''
    import os, struct
    os.write(self.fd_out, struct.pack(">4sIQ", b"RAW1", 2**31, 0))''',
    "garbage": '''
    import os
    os.write(self.fd_out, os.urandom(4096))''',
    "pickle_instead_of_json": '''
    import os, pickle, struct
    body = pickle.dumps({"id": header.get("id")})
    os.write(self.fd_out, struct.pack(">4sIQ", b"RAW1", len(body), 0) + body)''',
    "deeply_nested_json": '''
    import os, struct
    body = b"[" * 30000 + b"]" * 30000
    os.write(self.fd_out, struct.pack(">4sIQ", b"RAW1", len(body), 0) + body)''',
    "wrong_request_id": '''
    x = self.tensor(header, payload)
    self.reply({"id": (header.get("id") or 0) + 7, "shape": [x.shape[0], 10], "dtype": "float32", "handle": None},
               torch.zeros(x.shape[0], 10).numpy())''',
    "dies": '''
    import os
    os._exit(7)''',
    "hangs": '''
    import time
    time.sleep(3600)''',
}


@pytest.mark.parametrize("how", sorted(REPLIES))
def test_a_worker_that_breaks_the_protocol_is_cut_off(tmp_path, how):
    prelude = f'''
import torch
import harness.submit.worker as _w
def _evil(self, header, payload):
{REPLIES[how]}
_w.Server.forward = _evil
'''
    session = _session(_bundle(tmp_path / "b", prelude), request_s=3)
    start = time.monotonic()
    try:
        with pytest.raises(WorkerError) as exc:
            session.classifier.module(torch.rand(4, 1, 28, 28))
    finally:
        session.close()
    assert "\n" not in str(exc.value) and len(str(exc.value)) < 400
    assert time.monotonic() - start < 60
    assert session.worker.proc.poll() is not None  # the worker is gone


def test_a_worker_that_hangs_in_a_gradient_is_cut_off_inside_backward(tmp_path):
    prelude = "import time\nimport harness.submit.worker as _w\n_w.Server.vjp = lambda self, header, payload: time.sleep(3600)\n"
    session = _session(_bundle(tmp_path / "b", prelude), request_s=3)
    x = torch.rand(4, 1, 28, 28, requires_grad=True)
    try:
        out = session.classifier.module(x)
        with pytest.raises(WorkerError, match="did not answer a gradient of 4 inputs within 3 s"):
            torch.autograd.grad(out.sum(), x)
    finally:
        session.close()
    assert session.worker.proc.poll() is not None


def test_the_cpu_time_limit_ends_a_spinning_model(tmp_path):
    tail = """
class Spin(Net):
    def forward(self, x):
        while True:
            pass


def create():
    return Spin()
"""
    session = _session(_bundle(tmp_path / "b", "", tail), cpu_s=8, request_s=300)
    try:
        with pytest.raises(WorkerError, match="exceeded its CPU-time limit"):
            session.classifier.module(torch.rand(2, 1, 28, 28))
    finally:
        session.close()


def test_the_memory_limit_refuses_a_huge_allocation_and_the_worker_survives(tmp_path):
    tail = """
class Greedy(Net):
    def forward(self, x):
        if x.shape[0] == 3:
            torch.empty(2**31, dtype=torch.float32).fill_(1.0)  # 8 GiB
        return self.net(x)


def create():
    return Greedy()
"""
    session = _session(_bundle(tmp_path / "b", "", tail), memory_mb=4096)
    try:
        with pytest.raises(RemoteError, match="(?i)memory|alloc"):
            session.classifier.module(torch.rand(3, 1, 28, 28))
        assert session.classifier.module(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    finally:
        session.close()


def test_a_model_error_is_reported_in_one_sanitised_line_and_the_worker_keeps_serving(tmp_path):
    tail = '''
class Picky(Net):
    def forward(self, x):
        if x.shape[0] == 3:
            raise ValueError("no batches of three\\n\\x1b[31mred\\x1b[0m" + "!" * 1000)
        return self.net(x)


def create():
    return Picky()
'''
    session = _session(_bundle(tmp_path / "b", "", tail))
    try:
        with pytest.raises(RemoteError) as exc:
            session.classifier.module(torch.rand(3, 1, 28, 28))
        text = str(exc.value)
        assert "no batches of three" in text and "\x1b" not in text and "\n" not in text and len(text) < 400
        assert session.classifier.module(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    finally:
        session.close()


def test_forward_and_gradient_through_the_worker_equal_the_model_in_process(tmp_path):
    """The proxy is exact: same logits, same input gradients (CPU, same threads)."""
    bundle = _bundle(tmp_path / "b", "")
    torch.manual_seed(0)
    local = SmallCNN(1, 10, width=8, hidden=32).eval()
    local.load_state_dict({k[4:]: v for k, v in torch.load(bundle / "weights.pt").items()})
    session = _session(bundle)
    try:
        x = torch.rand(16, 1, 28, 28, requires_grad=True)
        out = session.classifier.module(x)
        (g,) = torch.autograd.grad(out.logsumexp(1).sum(), x)
        ref = local(x)
        (g_ref,) = torch.autograd.grad(ref.logsumexp(1).sum(), x)
        assert torch.allclose(out, ref, atol=1e-6) and torch.allclose(g, g_ref, atol=1e-6)
        assert session.worker.stats.requests == 2
    finally:
        session.close()
