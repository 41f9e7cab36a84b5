"""The test-port helper: distinct, bindable ports outside the range the kernel hands out on its own."""
from __future__ import annotations

import random
import socket

from tests.loopback import LOOPBACK, _ephemeral_floor, free_port


def test_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    """Twenty calls give twenty ports, each bindable, none where bind(0) or a Ray daemon could take it first."""
    state = random.getstate()
    ports = [free_port() for _ in range(20)]
    assert random.getstate() == state  # seeded tests elsewhere keep their sequence
    assert len(set(ports)) == 20
    floor = _ephemeral_floor()
    if floor - 20000 >= 1000:
        assert all(20000 <= p < floor for p in ports), (ports, floor)
    for p in ports:
        with socket.socket() as s:
            s.bind((LOOPBACK, p))
