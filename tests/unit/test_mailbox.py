"""The per-step mailbox (deployments.mailbox) and ChunkStream reading from it, in one process over real sockets."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from cluster.request import ChoiceDelta, GenerationParams
from deployments import mailbox as mb
from deployments.mailbox import END, Mailbox, MailboxLost, Mailed, Outbox, Outboxes
from deployments.remote_stream import ChunkStream

pytestmark = pytest.mark.skipif(not mb.sys.platform.startswith("linux"), reason="abstract Unix sockets: Linux")


def delta(index: int, text: str, finish: str | None = None) -> list[ChoiceDelta]:
    """One choice's chunk of one token."""
    return [ChoiceDelta(index, text, [len(text)], finish)]


async def inboxes(box: Mailbox, n: int) -> list[mb.Inbox]:
    """`n` registered requests of `box`."""
    out = [await box.inbox() for _ in range(n)]
    assert all(i is not None for i in out)
    return [i for i in out if i is not None]


async def drain_queue(queue: asyncio.Queue[Any]) -> list[Any]:
    """Items until END or a failure (included)."""
    items = []
    while True:
        item = await asyncio.wait_for(queue.get(), 5)
        items.append(item)
        if item is END or isinstance(item, BaseException):
            return items


def test_one_frame_per_loop_turn_carries_every_request() -> None:
    """Chunks of two requests put in one turn leave as one frame; each request reads its own, in order, to END."""
    async def main() -> None:
        box, outboxes = Mailbox("node-a"), Outboxes("node-a")
        a, b = await inboxes(box, 2)
        out = await outboxes.get(a)
        assert out is not None and await outboxes.get(b) is out  # one connection per ingress
        assert outboxes.connected() == 1
        frames: list[bytes] = []
        write = out.writer.write

        def counted(data: bytes) -> None:
            frames.append(data)
            write(data)
        out.writer.write = counted  # type: ignore[method-assign,assignment]
        for step in range(3):
            out.put(a.key, delta(0, f"a{step}"))
            out.put(b.key, delta(0, f"b{step}"))
            await out.drain()
        out.put(a.key, END)
        out.put(b.key, END)
        await out.drain()
        assert len(frames) == 4
        got_a, got_b = await drain_queue(box.queue(a)), await drain_queue(box.queue(b))
        assert [c[0].text for c in got_a[:-1]] == ["a0", "a1", "a2"] and got_a[-1] is END
        assert [c[0].text for c in got_b[:-1]] == ["b0", "b1", "b2"] and got_b[-1] is END
        box.close()
    asyncio.run(main())


def test_a_closed_connection_fails_only_the_requests_it_still_owed() -> None:
    """The replica hangs up: a request it had started and not ended gets MailboxLost; an ended one nothing more."""
    async def main() -> None:
        box, outboxes = Mailbox("n"), Outboxes("n")
        done, cut = await inboxes(box, 2)
        out = await outboxes.get(done)
        assert out is not None
        out.put(done.key, delta(0, "x", "length"))
        out.put(done.key, END)
        out.put(cut.key, delta(0, "y"))
        await out.drain()
        out.writer.close()
        assert outboxes.connected() == 0
        got_cut = await drain_queue(box.queue(cut))
        assert got_cut[0][0].text == "y" and isinstance(got_cut[1], MailboxLost)
        got_done = await drain_queue(box.queue(done))
        assert got_done[-1] is END
        await asyncio.sleep(0.05)
        assert box.queue(done).empty()
        with pytest.raises(MailboxLost):
            out.put(cut.key, delta(0, "z"))
        box.close()
    asyncio.run(main())


def test_a_connection_without_the_secret_delivers_nothing() -> None:
    """Only a replica given the inbox's secret can write to it."""
    async def main() -> None:
        box = Mailbox("n")
        inbox, = await inboxes(box, 1)
        forged = mb.Inbox(inbox.node_id, inbox.address, b"x" * len(inbox.token), inbox.key)
        out = await Outbox.connect(forged)
        out.put(inbox.key, delta(0, "forged"))
        await out.drain()
        await asyncio.sleep(0.1)
        assert box.queue(inbox).empty()
        box.close()
    asyncio.run(main())


def test_other_hosts_and_unreachable_mailboxes_stream_over_the_call(caplog: pytest.LogCaptureFixture) -> None:
    """No outbox for another node's ingress, nor for one that cannot be reached (tried once, said once)."""
    async def main() -> None:
        box = Mailbox("node-a")
        inbox, = await inboxes(box, 1)
        assert await Outboxes("node-b").get(inbox) is None
        assert await Outboxes("node-a").get(None) is None
        gone = mb.Inbox("node-a", "\0gridserve-mailbox-nobody", inbox.token, "k")
        outboxes = Outboxes("node-a")
        assert await outboxes.get(gone) is None and await outboxes.get(gone) is None
        box.close()
    asyncio.run(main())
    assert sum("unreachable" in r.message for r in caplog.records) == 1


class FakeCall:
    """A Serve call as the ingress sees it: the acceptance, then (mailed) nothing until it ends or fails."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.fail, self.release = fail, asyncio.Event()
        self.cancelled = False

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        if not hasattr(self, "accepted"):
            self.accepted = True
            return Mailed()
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled = True
        self.release.set()


def test_chunk_stream_reads_the_mailbox_and_a_lost_replica_ends_open_choices() -> None:
    """Mailed chunks reach the reader; the connection closing mid-way ends the open choice with an error."""
    async def main() -> None:
        box, outboxes = Mailbox("n"), Outboxes("n")
        ok, cut = await inboxes(box, 2)
        out = await outboxes.get(ok)
        assert out is not None
        params = GenerationParams(max_tokens=2)
        call_ok, call_cut = FakeCall(), FakeCall()
        stream_ok = await ChunkStream(call_ok, params, mailbox=(box, ok)).start()
        stream_cut = await ChunkStream(call_cut, params, mailbox=(box, cut)).start()
        out.put(ok.key, delta(0, "he"))
        out.put(ok.key, delta(0, "llo", "length"))
        out.put(ok.key, END)
        out.put(cut.key, delta(0, "par"))
        await out.drain()
        out.writer.close()
        got = [c async for c in stream_ok]
        assert "".join(d.text for c in got for d in c) == "hello" and stream_ok.ended
        got = [c async for c in stream_cut]
        assert got[0][0].text == "par" and got[-1][0].finish_reason == "error"
        assert "MailboxLost" in (got[-1][0].error or "")
        assert ok.key not in box.queues and cut.key not in box.queues  # both unregistered
        call_ok.release.set()
        box.close()
    asyncio.run(main())


def test_chunk_stream_raises_what_the_call_raised() -> None:
    """An error the replica's code raised (not a lost replica) reaches the reader through the watcher."""
    async def main() -> None:
        box = Mailbox("n")
        inbox, = await inboxes(box, 1)
        call = FakeCall(fail=ValueError("a bug in the replica"))
        stream = await ChunkStream(call, GenerationParams(max_tokens=2), mailbox=(box, inbox)).start()
        call.release.set()
        with pytest.raises(ValueError, match="a bug"):
            async for _ in stream:
                pass
        assert inbox.key not in box.queues
        box.close()
    asyncio.run(main())
