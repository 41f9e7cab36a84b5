"""The direct step channel in one process: two stages as threads, a driver on asyncio."""
from __future__ import annotations

import asyncio
import socket
from typing import Any

import numpy as np
import pytest

from actors.shard.channel import DRIVER, StepServer, connect, supported
from actors.shard.runner import StepInput, StepOutput
from cluster.channel import ChannelBroken, StepChannel

pytestmark = pytest.mark.skipif(not supported(), reason="abstract Unix sockets are Linux-only")


def step_of(n: int) -> StepInput:
    """A one-token step whose token id tells the stages what to do."""
    return StepInput(np.array([n]), np.array([0]), [1], [1], [[0]], [], [0])


def stage0(step: StepInput, hidden: Any) -> Any:
    """First stage: hands on the token doubled, or fails on token 13."""
    n = int(step.token_ids[0])
    if n == 13:
        raise ValueError("unlucky token 13")
    return 2 * n


def stage1(step: StepInput, hidden: Any) -> StepOutput:
    """Last stage: answers with its input plus the step's own token (so the pairing of step and hidden shows)."""
    return StepOutput([hidden + int(step.token_ids[0])])


def pipeline(timeout_s: float = 10.0) -> tuple[list[StepServer], StepChannel]:
    """stage 0 -> stage 1 over the channel, served from threads of this process."""
    first = StepServer(stage0, "stage 0 rank 0", has_upstream=False, replies=False)
    last = StepServer(stage1, "stage 1 rank 0", has_upstream=True, replies=True)
    for server in (first, last):
        server.start(timeout_s)
    first.connect_downstream(last.address, last.token, timeout_s)
    return [first, last], StepChannel([(first.address, first.token), (last.address, last.token)], 1, timeout_s)


def test_steps_in_flight_come_back_in_order_and_failures_name_the_stage() -> None:
    """Eight steps sent at once pair each step with its own hidden state; a stage's exception reaches the driver
    as a RuntimeError naming the stage, and the channel keeps serving afterwards."""
    servers, channel = pipeline()

    async def main() -> tuple[list[int], str, int]:
        outs = await asyncio.gather(*(channel.step(step_of(n)) for n in range(8)))
        with pytest.raises(RuntimeError) as failed:
            await channel.step(step_of(13))
        after = await channel.step(step_of(5))
        return [o.token_ids[0] for o in outs], str(failed.value), after.token_ids[0]

    try:
        tokens, message, after = asyncio.run(main())
    finally:
        channel.close()
    assert tokens == [3 * n for n in range(8)]
    assert message.startswith("stage 0 rank 0 failed: ValueError: unlucky token 13")
    assert after == 15
    for server in servers:  # hanging up ends each serving thread
        assert server.thread is not None
        server.thread.join(5)
        assert not server.thread.is_alive()


def test_a_stranger_without_the_secret_is_dropped() -> None:
    """A connection with the wrong secret is closed; the real driver still gets in afterwards."""
    server = StepServer(lambda step, hidden: StepOutput([7]), "stage 0 rank 0", has_upstream=False, replies=True)
    server.start(10.0)
    stranger = connect(server.address, DRIVER, b"x" * len(server.token), 5.0)
    stranger.settimeout(5.0)
    assert stranger.recv(1) == b""  # closed on us
    stranger.close()
    channel = StepChannel([(server.address, server.token)], 0, 5.0)
    try:
        assert asyncio.run(channel.step(step_of(1))).token_ids == [7]
    finally:
        channel.close()


def test_a_worker_that_hangs_up_breaks_the_channel() -> None:
    """If the answering worker goes away the step raises ChannelBroken (never hangs), and so does the next one."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0gridserve-test-hangup")
    listener.listen(1)
    channel = StepChannel([("gridserve-test-hangup", b"")], 0, 5.0)
    peer, _ = listener.accept()
    peer.close()  # the worker "dies"
    listener.close()

    async def main() -> None:
        with pytest.raises((ChannelBroken, OSError)):
            await channel.step(step_of(1))
        with pytest.raises(ChannelBroken):
            await channel.step(step_of(1))

    try:
        asyncio.run(main())
    finally:
        channel.close()
