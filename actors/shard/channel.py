"""Worker end of the direct step channel: steps arrive over a Unix socket from a driver on the same host.

Ray's actor call costs ~1 ms of driver CPU plus the worker's task machinery per step; on a small model that is a
third of the step. Here the driver writes one framed pickle per step into each worker's socket, every stage
hands its output to the next stage's same TP rank over another socket, and the last stage's TP rank 0 writes the
answer back. The worker thread blocks in `recv` (no busy-wait: an idle worker costs no CPU) and steps are served
in the order they were sent, so a pipeline keeps several micro-batches in flight with no step ids.

Only a process of the same user that was told the channel's secret (handed out over Ray) may connect.
"""
from __future__ import annotations

import hmac
import os
import pickle
import secrets
import socket
import struct
import sys
import threading
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

HEADER = struct.Struct("<Q")  # every frame: payload length, then the pickled payload
DRIVER, UPSTREAM = b"D", b"U"  # the first byte of a connection's hello says who connects
TOKEN_BYTES = 32
COPY_LIMIT = 1 << 20


def supported() -> bool:
    """Abstract Unix sockets (no file to leave behind) exist on Linux only."""
    return sys.platform.startswith("linux")


@dataclass
class StepFailure:
    """A stage's exception, handed down the pipeline and back to the driver instead of an output."""

    message: str
    where: str  # "stage k rank i"
    trace: str


def send_frame(sock: socket.socket, data: bytes) -> None:
    """Write one frame (blocking): its length, then the bytes."""
    if len(data) < COPY_LIMIT:
        sock.sendall(HEADER.pack(len(data)) + data)  # one syscall, one wake-up of the reader
    else:
        sock.sendall(HEADER.pack(len(data)))
        sock.sendall(data)  # a prefill's hidden states are megabytes: not worth a copy to save a syscall


def recv_exact(sock: socket.socket, n: int) -> bytearray | None:
    """Read exactly n bytes (blocking); None if the peer closed the connection first."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            return None
        got += k
    return buf


def recv_obj(sock: socket.socket) -> Any:
    """Read one framed pickle (blocking); raises EOFError when the peer has closed."""
    head = recv_exact(sock, HEADER.size)
    body = recv_exact(sock, HEADER.unpack(head)[0]) if head is not None else None
    if body is None:
        raise EOFError("step channel closed")
    return pickle.loads(body)


def connect(address: str, role: bytes, token: bytes, timeout_s: float) -> socket.socket:
    """Open a blocking connection to a worker's channel and introduce ourselves."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    sock.connect("\0" + address)
    sock.sendall(role + token)
    sock.settimeout(None)
    return sock


class StepServer:
    """One worker's channel: accepts the driver (and the previous stage's same rank), then serves steps."""

    def __init__(self, handler: Callable[[Any, Any], Any], where: str, has_upstream: bool, replies: bool) -> None:
        """`handler(step, hidden)` runs one step; `replies`: this worker answers the driver (last stage, rank 0)."""
        self.handler, self.where = handler, where
        self.has_upstream, self.replies = has_upstream, replies
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self.address = f"gridserve-{uuid.uuid4().hex}"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind("\0" + self.address)
        self.listener.listen(4)
        self.downstream: socket.socket | None = None
        self.thread: threading.Thread | None = None

    def connect_downstream(self, address: str, token: bytes, timeout_s: float) -> None:
        """Hand this stage's outputs to the next stage's worker of the same TP rank."""
        self.downstream = connect(address, UPSTREAM, token, timeout_s)

    def start(self, timeout_s: float) -> None:
        """Serve from a daemon thread of our own (tests, single-process use); a Ray worker calls `serve` from a
        Ray thread instead, where its multi-threaded steps measured faster."""
        self.thread = threading.Thread(target=self.serve, args=(timeout_s,), name="gridserve-steps", daemon=True)
        self.thread.start()

    def _accept(self, timeout_s: float) -> tuple[socket.socket, socket.socket | None]:
        """The driver's and (inner stages) the upstream worker's connections; strangers are dropped."""
        wanted = {DRIVER} | ({UPSTREAM} if self.has_upstream else set())
        peers: dict[bytes, socket.socket] = {}
        self.listener.settimeout(timeout_s)
        try:
            while wanted - peers.keys():
                sock, _ = self.listener.accept()
                sock.settimeout(timeout_s)
                hello = _read_hello(sock)
                if hello is None or hello[0] not in wanted or not hmac.compare_digest(hello[1], self.token):
                    sock.close()
                    continue
                sock.settimeout(None)
                peers[hello[0]] = sock
        finally:
            self.listener.close()  # nobody else may connect once the peers are in
        return peers[DRIVER], peers.get(UPSTREAM)

    def serve(self, timeout_s: float) -> None:
        """Accept the expected peers, then serve steps in order until the driver hangs up (blocks)."""
        try:
            driver, upstream = self._accept(timeout_s)
        except OSError:
            return  # nobody came: the grid gave up on the channel and uses Ray calls
        try:
            while True:
                step = recv_obj(driver)
                hidden = recv_obj(upstream) if upstream is not None else None
                result = hidden if isinstance(hidden, StepFailure) else self._step(step, hidden)
                target = self.downstream if self.downstream is not None else driver if self.replies else None
                if target is not None:
                    self._send(target, result)
        except (EOFError, OSError):
            pass  # the driver closed the channel (grid shut down) or a neighbour died: nothing left to serve
        finally:
            for sock in (driver, upstream, self.downstream):
                if sock is not None:
                    sock.close()

    def _send(self, sock: socket.socket, result: Any) -> None:
        """Hand a result on; one that cannot be pickled goes as a StepFailure, so nobody waits for it forever."""
        try:
            data = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - reported like a failed step
            data = pickle.dumps(StepFailure(f"cannot send the result: {type(exc).__name__}: {exc}", self.where, ""))
        send_frame(sock, data)

    def _step(self, step: Any, hidden: Any) -> Any:
        """Run the handler; an exception travels on as a StepFailure (the driver raises it)."""
        try:
            return self.handler(step, hidden)
        except Exception as exc:  # noqa: BLE001 - reported to the driver, which fails the step
            return StepFailure(f"{type(exc).__name__}: {exc}", self.where, traceback.format_exc())


def _read_hello(sock: socket.socket) -> tuple[bytes, bytes] | None:
    """A connection's role byte and secret, only from a process of this user (SO_PEERCRED)."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        if struct.unpack("3i", creds)[1] != os.getuid():
            return None
        hello = recv_exact(sock, 1 + TOKEN_BYTES)
    except OSError:
        return None
    return (bytes(hello[:1]), bytes(hello[1:])) if hello is not None else None
