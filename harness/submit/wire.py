"""The wire format between the harness and a sandboxed model worker: framed JSON plus raw float32.

One message is

    b"RAW1" | u32 header length | u64 payload length | header (UTF-8 JSON object) | payload

with both lengths big-endian. The payload is always a C-contiguous float32 array whose shape the
header states. Nothing is ever unpickled: the worker runs submitted code and is hostile, so the
harness reads at most `MAX_HEADER` bytes of JSON and exactly the payload size it expects for the
request it sent, and `expect_array` refuses any other dtype, shape or length.

The harness side reads and writes with a deadline (`poll` on non-blocking pipes), so a worker that
stops answering, floods the pipe or never reads is cut off instead of hanging the scoring. The
worker side (inside the sandbox) uses plain blocking I/O. This module imports only the standard
library and numpy, so the worker can load it before anything else.
"""
from __future__ import annotations

import json
import math
import os
import select
import struct
import time
from typing import Any

import numpy as np

MAGIC = b"RAW1"
PREFIX = struct.Struct(">4sIQ")
MAX_HEADER = 64 * 1024  # bytes of JSON a message may carry
DTYPE = "float32"


class WireError(Exception):
    """The peer broke the protocol, closed the pipe or missed the deadline."""


# ------------------------------------------------------------------------------------ encoding


def frame(header: dict[str, Any], payload: np.ndarray | None = None) -> list[bytes | memoryview]:
    """The pieces of one message (header JSON, optional float32 payload) ready for writing."""
    body = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    if len(body) > MAX_HEADER:
        raise WireError(f"header of {len(body)} bytes exceeds {MAX_HEADER}")
    data = memoryview(b"")
    if payload is not None:
        arr = np.ascontiguousarray(payload, dtype=np.float32)
        data = memoryview(arr).cast("B")
    return [PREFIX.pack(MAGIC, len(body), len(data)), body, data]


def expect_array(header: dict[str, Any], payload: memoryview, shape: tuple[int, ...]) -> np.ndarray:
    """The payload as a float32 array of exactly `shape`; anything else is a `WireError`."""
    got = header.get("shape")
    if not isinstance(got, list) or [int(s) if isinstance(s, int) and not isinstance(s, bool) else None for s in got] != list(shape):
        raise WireError(f"reply shape {_short(got)} where {list(shape)} was expected")
    if header.get("dtype") != DTYPE:
        raise WireError(f"reply dtype {_short(header.get('dtype'))} where {DTYPE} was expected")
    if len(payload) != 4 * math.prod(shape):
        raise WireError(f"reply payload of {len(payload)} bytes where {4 * math.prod(shape)} were expected")
    return np.frombuffer(payload, dtype=np.float32).reshape(shape)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ------------------------------------------------------------------- harness side (deadlines)


def _wait(fd: int, events: int, deadline: float) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise WireError("deadline passed")
    poller = select.poll()
    poller.register(fd, events | select.POLLERR | select.POLLHUP)
    ready = poller.poll(max(1, int(left * 1000)))
    if not ready:
        raise WireError("deadline passed")
    mask = ready[0][1]
    if mask & (select.POLLERR | select.POLLNVAL) or (mask & select.POLLHUP and not mask & events):
        raise WireError("the worker closed its pipe")


def _pending(pieces: list[memoryview]) -> list[memoryview]:
    return [p for p in pieces if len(p)]


def _advance(pieces: list[memoryview], n: int) -> list[memoryview]:
    """Drop the first n bytes of the pieces (after a partial writev)."""
    out = []
    for p in pieces:
        if n >= len(p):
            n -= len(p)
            continue
        out.append(p[n:])
        n = 0
    return out


def send(fd: int, header: dict[str, Any], payload: np.ndarray | None, deadline: float) -> None:
    """Write one message to a non-blocking fd before `deadline` (time.monotonic), in as few syscalls as fit."""
    pieces = _pending([memoryview(p).cast("B") if not isinstance(p, memoryview) else p for p in frame(header, payload)])
    while pieces:
        try:
            n = os.writev(fd, pieces)
        except BlockingIOError:
            _wait(fd, select.POLLOUT, deadline)
            continue
        except (BrokenPipeError, OSError) as exc:
            raise WireError(f"the worker closed its pipe ({type(exc).__name__})") from None
        pieces = _advance(pieces, n)


def _read_exact(fd: int, buf: memoryview, deadline: float) -> None:
    got = 0
    while got < len(buf):
        try:
            n = os.readv(fd, [buf[got:]])
        except BlockingIOError:
            _wait(fd, select.POLLIN, deadline)
            continue
        except OSError as exc:
            raise WireError(f"reading from the worker failed ({type(exc).__name__})") from None
        if n == 0:
            raise WireError("the worker closed its pipe")
        got += n


def recv(fd: int, deadline: float, max_payload: int) -> tuple[dict[str, Any], memoryview]:
    """Read one message from a non-blocking fd; the payload may hold at most `max_payload` bytes."""
    prefix = bytearray(PREFIX.size)
    _read_exact(fd, memoryview(prefix), deadline)
    magic, n_header, n_payload = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise WireError("a message without the protocol's magic bytes")
    if n_header > MAX_HEADER:
        raise WireError(f"a header of {n_header} bytes (at most {MAX_HEADER})")
    if n_payload > max_payload:
        raise WireError(f"a payload of {n_payload} bytes where at most {max_payload} were expected")
    body = bytearray(n_header)
    _read_exact(fd, memoryview(body), deadline)
    try:
        header = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
        raise WireError("a header that is not UTF-8 JSON") from None
    if not isinstance(header, dict):
        raise WireError("a header that is not a JSON object")
    payload = bytearray(n_payload)
    _read_exact(fd, memoryview(payload), deadline)
    return header, memoryview(payload)


# ----------------------------------------------------------------- worker side (blocking I/O)


def write_blocking(fd: int, header: dict[str, Any], payload: np.ndarray | None = None) -> None:
    pieces = _pending([memoryview(p).cast("B") if not isinstance(p, memoryview) else p for p in frame(header, payload)])
    while pieces:
        pieces = _advance(pieces, os.writev(fd, pieces))


def _read_blocking(fd: int, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = os.readv(fd, [view[got:]])
        if k == 0:
            raise EOFError("the harness closed the pipe")
        got += k
    return buf


def read_blocking(fd: int) -> tuple[dict[str, Any], bytearray]:
    magic, n_header, n_payload = PREFIX.unpack(_read_blocking(fd, PREFIX.size))
    if magic != MAGIC or n_header > MAX_HEADER:
        raise EOFError("not a protocol message")
    header = json.loads(_read_blocking(fd, n_header).decode("utf-8"))
    return header, _read_blocking(fd, n_payload)


def set_nonblocking(fd: int) -> None:
    os.set_blocking(fd, False)


def grow_pipe(fd: int, size: int = 1 << 20) -> None:
    """Raise a pipe's buffer (Linux F_SETPIPE_SZ) so large tensors cross in fewer wake-ups."""
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), size)
    except (OSError, ImportError):
        pass
