"""Per-step delivery from a model replica to an ingress on its host: every request's deltas of one engine wake-up
go in one frame over a Unix socket, instead of one Serve stream message per request per token per hop.

The Serve call stays the request's control channel: it routes the prompt, carries a refusal or the acceptance,
cancels the generation when the ingress cancels it, and fails when the replica dies. Only the chunks move here.
A replica on another host, or one that cannot connect, streams them over the Serve call as before.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import pickle
import secrets
import socket
import struct
import sys
from dataclasses import dataclass

from cluster.request import ChoiceDelta

log = logging.getLogger(__name__)

HEADER = struct.Struct("<Q")  # every frame: payload length, then a pickled list of (request key, chunk or END)
END = None  # a request's last item: its replica's stream ran out
CONNECT_TIMEOUT_S = 5.0  # a listening local socket accepts at once; this bounds a full backlog

Item = list[ChoiceDelta] | BaseException | None  # what a request's queue holds: a chunk, a failure, or END


def ray_node_id() -> str:
    """The Ray node this process runs on (a mailbox serves replicas of the same node only)."""
    import ray

    return str(ray.get_runtime_context().get_node_id())


class MailboxLost(ConnectionError):
    """The replica's connection closed with the request still open (the replica died or was stopped)."""


@dataclass(frozen=True)
class Inbox:
    """Where a replica delivers one request's chunks: the ingress's socket (on `node_id`), its secret, the key."""

    node_id: str
    address: str  # an abstract Unix socket name: nothing on disk to clean up
    token: bytes
    key: str


@dataclass(frozen=True)
class Mailed:
    """A replica's acceptance when it delivers the chunks through the mailbox (nothing more comes on the call)."""


class Mailbox:
    """The ingress end: one socket server per ingress process; each request reads its own queue."""

    def __init__(self, node_id: str | None = None) -> None:
        """`node_id`: this process's Ray node (asked of Ray when the mailbox opens if not given)."""
        self.queues: dict[str, asyncio.Queue[Item]] = {}
        self.node_id = node_id or ""
        self.address = ""
        self.token = secrets.token_bytes(16)
        self.server: asyncio.AbstractServer | None = None
        self.opening: asyncio.Lock | None = None

    async def inbox(self) -> Inbox | None:
        """A new request's inbox (its queue registered), or None where no mailbox can run (not Linux, no Ray)."""
        if self.server is None and not await self._open():
            return None
        inbox = Inbox(self.node_id, self.address, self.token, secrets.token_hex(8))
        self.queues[inbox.key] = asyncio.Queue()
        return inbox

    def queue(self, inbox: Inbox) -> asyncio.Queue[Item]:
        """The queue of a registered request."""
        return self.queues[inbox.key]

    def drop(self, inbox: Inbox) -> None:
        """Forget a request: chunks still on their way for it are discarded."""
        self.queues.pop(inbox.key, None)

    async def _open(self) -> bool:
        """Start the socket server on this event loop (once)."""
        if not sys.platform.startswith("linux"):
            return False
        self.opening = self.opening or asyncio.Lock()
        async with self.opening:
            if self.server is None:
                self.node_id = self.node_id or ray_node_id()
                self.address = f"\0gridserve-mailbox-{secrets.token_hex(8)}"
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                listener.bind(self.address)  # bound by hand, as Outbox.connect connects by hand
                self.server = await asyncio.start_unix_server(self._serve, sock=listener)
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read one replica's frames; when it hangs up, its requests still open are lost (they may migrate)."""
        open_keys: set[str] = set()
        try:
            if not hmac.compare_digest(await reader.readexactly(len(self.token)), self.token):
                log.warning("mailbox: a connection without the secret was refused")
                return
            while True:
                size = HEADER.unpack(await reader.readexactly(HEADER.size))[0]
                for key, item in pickle.loads(await reader.readexactly(size)):
                    self._put(key, item, open_keys)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            for key in open_keys:
                if (queue := self.queues.get(key)) is not None:
                    queue.put_nowait(MailboxLost("the model replica's connection closed"))

    def _put(self, key: str, item: list[ChoiceDelta] | None, open_keys: set[str]) -> None:
        """Hand one item to its request, tracking which live requests this connection still owes an END."""
        queue = self.queues.get(key)
        if item is END or queue is None:  # ended, or dropped (its client left): nothing more is owed to it
            open_keys.discard(key)
        else:
            open_keys.add(key)
        if queue is not None:
            queue.put_nowait(item)
        if len(open_keys) > 2 * len(self.queues) + 64:  # requests dropped with nothing more sent for them
            open_keys.intersection_update(self.queues)

    def close(self) -> None:
        """Stop accepting connections."""
        if self.server is not None:
            self.server.close()
            self.server = None


class Outbox:
    """The replica end for one ingress: items put during one event-loop turn leave as one frame."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.pending: list[tuple[str, list[ChoiceDelta] | None]] = []
        self.flush_scheduled = False

    @classmethod
    async def connect(cls, inbox: Inbox) -> Outbox:
        """Connect to the ingress's mailbox and present its secret."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT_S)
        try:
            sock.connect(inbox.address)  # by hand: uvloop (Serve's loop) rejects abstract names (EINVAL)
        except OSError:
            sock.close()
            raise
        _, writer = await asyncio.open_unix_connection(sock=sock)
        writer.write(inbox.token)
        return cls(writer)

    @property
    def broken(self) -> bool:
        """Whether the connection is closed (the ingress went away)."""
        return self.writer.is_closing()

    def put(self, key: str, item: list[ChoiceDelta] | None) -> None:
        """Queue one request's chunk (or END) for the frame that leaves at the end of this loop turn."""
        if self.broken:
            raise MailboxLost("the ingress's mailbox connection closed")
        self.pending.append((key, item))
        if not self.flush_scheduled:
            self.flush_scheduled = True
            # The engine wakes every request's stream in one turn: their chunks are all pending by the next.
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Write the pending items as one frame."""
        self.flush_scheduled = False
        if not self.pending or self.broken:
            return
        data = pickle.dumps(self.pending, protocol=pickle.HIGHEST_PROTOCOL)
        self.pending = []
        self.writer.write(HEADER.pack(len(data)) + data)

    async def drain(self) -> None:
        """Write what is pending now and wait until it left (raises MailboxLost if the ingress went away)."""
        self._flush()  # the flush still scheduled for this turn then finds nothing to write
        if self.broken:
            raise MailboxLost("the ingress's mailbox connection closed")
        await self.writer.drain()


class Outboxes:
    """A replica's connections, one per ingress process that sent it requests."""

    def __init__(self, node_id: str | None = None) -> None:
        """`node_id`: this process's Ray node (asked of Ray at the first request if not given)."""
        self.boxes: dict[str, Outbox] = {}
        self.unreachable: set[str] = set()  # tried once and failed: stream over the call, say so once
        self.node_id = node_id
        self.lock = asyncio.Lock()

    def connected(self) -> int:
        """Ingresses this replica mails deltas to now."""
        return sum(not box.broken for box in self.boxes.values())

    async def get(self, inbox: Inbox | None) -> Outbox | None:
        """The outbox for `inbox`'s ingress, or None: chunks go on the Serve call (other host, or no connection)."""
        if inbox is None:
            return None
        self.node_id = self.node_id or ray_node_id()
        if inbox.node_id != self.node_id or inbox.address in self.unreachable:
            return None
        async with self.lock:
            box = self.boxes.get(inbox.address)
            if box is None or box.broken:
                try:
                    box = self.boxes[inbox.address] = await Outbox.connect(inbox)
                except (OSError, asyncio.TimeoutError) as exc:
                    self.unreachable.add(inbox.address)
                    log.warning("mailbox %r unreachable (%s): chunks go on the Serve call", inbox.address, exc)
                    return None
        return box

