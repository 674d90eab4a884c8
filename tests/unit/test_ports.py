"""splitserve.ports: ports handed to servers started later stay out of the range `connect()` draws from."""

from __future__ import annotations

import socket

from splitserve.ports import LOWEST, ephemeral_range, free_port


def test_free_ports_are_bindable_and_below_the_ephemeral_range():
    lo, hi = ephemeral_range()
    assert 1024 <= lo <= hi <= 65535
    ports = {free_port() for _ in range(20)}
    assert len(ports) > 1 and all(LOWEST <= p < lo for p in ports)     # clear of Ray's worker ports too
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_port_in_use_is_skipped(monkeypatch):
    import splitserve.ports as ports

    with socket.socket() as held:
        held.bind(("127.0.0.1", free_port()))
        held.listen()
        taken = held.getsockname()[1]
        spare = free_port()
        monkeypatch.setattr(ports._rng, "sample", lambda population, k: [taken, spare])
        assert free_port() == spare
