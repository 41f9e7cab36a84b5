"""Driver end of the direct step channel (see actors/shard/channel.py): steps out, answers back, from asyncio."""
from __future__ import annotations

import asyncio
import pickle
import socket
from typing import Any

from actors.shard.channel import DRIVER, HEADER, StepFailure, connect
from actors.shard.runner import StepInput, StepOutput

READ_CHUNK = 1 << 16


class ChannelBroken(RuntimeError):
    """The channel lost its place (a worker died, a step was cancelled mid-way): the grid must be rebuilt."""


class StepChannel:
    """Sockets to every worker of a grid; the last stage's TP rank 0 answers, in the order steps were sent."""

    def __init__(self, endpoints: list[tuple[str, bytes]], reply_index: int, timeout_s: float) -> None:
        """`endpoints`: (address, secret) of every worker, stage-major; `reply_index`: the one that answers."""
        self.socks: list[socket.socket] = []
        try:
            for address, token in endpoints:
                self.socks.append(connect(address, DRIVER, token, timeout_s))
        except BaseException:
            self.close()
            raise
        for sock in self.socks:
            sock.setblocking(False)  # asyncio's sock_* calls need non-blocking sockets
        self.reply = self.socks[reply_index]
        self.buffer = bytearray()
        self.broken: str | None = None
        # Made per event loop: a lock belongs to the loop that first waits on it, and a grid may outlive a loop.
        self.loop: asyncio.AbstractEventLoop | None = None
        self.send_lock, self.recv_lock = asyncio.Lock(), asyncio.Lock()

    async def step(self, step: StepInput) -> StepOutput:
        """Send one step to every worker, then wait for its answer (answers come back in sending order)."""
        if self.broken:
            raise ChannelBroken(self.broken)
        loop = asyncio.get_running_loop()
        if self.loop is not loop:
            self.loop, self.send_lock, self.recv_lock = loop, asyncio.Lock(), asyncio.Lock()
        data = pickle.dumps(step, protocol=pickle.HIGHEST_PROTOCOL)
        frame = HEADER.pack(len(data)) + data
        try:
            async with self.send_lock:  # whole frames only: two steps' bytes must never interleave
                for sock in self.socks:
                    await loop.sock_sendall(sock, frame)
            async with self.recv_lock:
                answer = await self._read(loop)
        except BaseException as exc:  # cancelled or a dead worker: later answers would no longer match
            self.broken = self.broken or f"step channel lost its place ({type(exc).__name__}: {exc})"
            raise
        if isinstance(answer, StepFailure):
            raise RuntimeError(f"{answer.where} failed: {answer.message}\n{answer.trace}")
        assert isinstance(answer, StepOutput), f"unexpected answer {type(answer).__name__}"
        return answer

    async def _read(self, loop: asyncio.AbstractEventLoop) -> Any:
        """One framed pickle from the answering worker; raises ChannelBroken if it hung up."""
        while len(self.buffer) < HEADER.size or len(self.buffer) < HEADER.size + HEADER.unpack_from(self.buffer)[0]:
            chunk = await loop.sock_recv(self.reply, READ_CHUNK)
            if not chunk:
                raise ChannelBroken("a worker closed its step channel (it died or was killed)")
            self.buffer += chunk
        end = HEADER.size + HEADER.unpack_from(self.buffer)[0]
        answer = pickle.loads(self.buffer[HEADER.size:end])
        del self.buffer[:end]
        return answer

    def close(self) -> None:
        """Hang up: each worker's serving thread ends when it sees the connection close."""
        for sock in self.socks:
            sock.close()
        self.socks = []
        self.broken = self.broken or "step channel closed"
