"""The suite's local ports: free, outside the kernel's ephemeral range, never a server's."""

from __future__ import annotations

import itertools
import socket

import pytest

from tests.support import service
from tests.support.service import EPHEMERAL_RANGE, SERVER_PORTS, free_port


def test_free_ports_are_distinct_bindable_and_outside_the_ephemeral_range() -> None:
    low, high = map(int, EPHEMERAL_RANGE.read_text().split())

    ports = [free_port() for _ in range(50)]

    assert len(set(ports)) == len(ports)
    for port in ports:
        assert not low <= port <= high
        assert port not in SERVER_PORTS
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_port_another_listener_holds_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    held = free_port()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", held))
        listener.listen()
        monkeypatch.setattr(
            service, "_next_candidate", itertools.count(service._CANDIDATES.index(held))
        )

        assert free_port() != held
