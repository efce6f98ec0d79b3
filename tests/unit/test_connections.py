"""The connections a server holds: at most its limit, and at most half of them of one host."""

from __future__ import annotations

from dataclasses import dataclass

from structlog.testing import capture_logs

from financing.entrypoints.connections import (
    CROWDED_LINES_MOST,
    SAID_AGAIN_AFTER,
    Connections,
)


@dataclass(eq=False)
class Connection:
    host: object
    idle: bool = True
    closed: bool = False

    def make_room(self) -> None:
        self.closed = True


def admitted(connections: Connections[Connection], *new: Connection) -> list[bool]:
    return [connections.admit(connection) for connection in new]


def test_a_host_beyond_its_share_closes_its_own_idle_connection_not_anothers() -> None:
    connections: Connections[Connection] = Connections("gRPC", limit=8)
    other = Connection("10.0.0.2")
    greedy = [Connection("10.0.0.1") for _ in range(4)]
    assert admitted(connections, other, *greedy) == [True] * 5

    one_more = Connection("10.0.0.1")
    assert connections.admit(one_more)
    assert [connection.closed for connection in greedy] == [True, False, False, False]
    assert not other.closed


def test_a_host_whose_every_connection_has_a_call_open_is_refused_and_others_are_served() -> None:
    """Regression (a probe): one host holding every connection with a call open (a health
    `Watch` on each) had every other client refused, an orchestrator's health probe among
    them, for as long as it stayed."""
    connections: Connections[Connection] = Connections("gRPC", limit=8)
    watching = [Connection("10.0.0.1", idle=False) for _ in range(4)]
    with capture_logs() as logs:
        assert admitted(connections, *watching) == [True] * 4
        assert (
            admitted(connections, *(Connection("10.0.0.1", idle=False) for _ in range(3)))
            == [False] * 3
        )
        assert (
            admitted(connections, *(Connection(f"10.0.0.{n}") for n in (2, 3, 4, 5))) == [True] * 4
        )
    said = [line for line in logs if "of one host at its share" in str(line["event"])]
    assert len(said) == 1 and said[0]["host"] == "10.0.0.1" and said[0]["share"] == 4


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_host_is_said_again_only_once_it_held_three_quarters_of_its_share_or_less() -> None:
    clock = Clock()
    connections: Connections[Connection] = Connections("gRPC", limit=8, clock=clock)
    held = [Connection("10.0.0.1", idle=False) for _ in range(4)]
    with capture_logs() as logs:
        admitted(connections, *held, Connection("10.0.0.1", idle=False))
        connections.left(held[0])
        admitted(connections, Connection("10.0.0.1", idle=False))  # at its share again
        clock.now += SAID_AGAIN_AFTER
        connections.left(held[1])
        connections.left(held[2])  # 2 of 4 left: said again when it comes back
        admitted(connections, *(Connection("10.0.0.1", idle=False) for _ in range(3)))
    said = [line for line in logs if "of one host at its share" in str(line["event"])]
    assert len(said) == 2


def test_connections_coming_and_going_at_a_small_limit_are_said_once_an_interval() -> None:
    """Regression (a probe): at a limit of 1 (a process of 64 descriptors, its metrics
    endpoint), a flood of connections coming and going wrote "at their limit" and "below
    their limit again" 938 times each in 45 s, and a host's share line as often."""
    clock = Clock()
    connections: Connections[Connection] = Connections("metrics endpoint", limit=1, clock=clock)
    with capture_logs() as logs:
        for second in range(30):
            clock.now += 0.5
            for _ in range(10):  # two come, the first goes: full, then room again
                first, second_one = Connection(f"10.0.1.{second}"), Connection("10.0.2.1")
                admitted(connections, first, second_one)
                connections.left(first)
                connections.left(second_one)
    events = [str(line["event"]) for line in logs]
    # 15 s of churn: said at its start, room again and full again 10 s later, at most.
    assert (
        events.count(
            "metrics endpoint connections at their limit: a new one closes the"
            " one idle longest, or is closed when none is idle"
        )
        <= 2
    ), events
    assert events.count("metrics endpoint connections below their limit again") <= 2, events


def test_connections_closed_to_make_room_and_not_yet_gone_bound_a_hosts_new_ones() -> None:
    """A host's connections closed for its new ones count until they are gone: a flood of
    connections holds no more descriptors than its share and a quarter (one, for a small
    share) however fast they come."""
    connections: Connections[Connection] = Connections("gRPC", limit=4)  # a share of 2
    flood = [Connection("10.0.0.1") for _ in range(6)]
    assert admitted(connections, *flood) == [True, True, True, False, False, False]
    assert [connection.closed for connection in flood[:3]] == [True, False, False]
    connections.left(flood[0])  # gone: room for one more
    assert connections.admit(Connection("10.0.0.1"))


def test_connections_without_a_host_share_only_the_limit() -> None:
    connections: Connections[Connection] = Connections("metrics endpoint", limit=4)
    assert admitted(connections, *(Connection(None, idle=False) for _ in range(5))) == [
        True,
        True,
        True,
        True,
        False,
    ]


def test_hosts_reaching_their_share_are_said_once_an_interval_however_many() -> None:
    """Regression (a probe): a flood from 5,000 addresses, each opening two connections at a
    share of one, wrote a line for each: 4,520 lines in 30 s. A few hosts are each said."""
    clock = Clock()
    connections: Connections[Connection] = Connections("metrics endpoint", limit=2, clock=clock)
    with capture_logs() as logs:
        for number in range(1000):
            clock.now += 0.015  # 1,000 hosts in 15 s
            host = f"10.1.{number // 250}.{number % 250}"
            pair = [Connection(host), Connection(host)]
            admitted(connections, *pair)
            for connection in pair:
                connections.left(connection)
    said = [line for line in logs if "of one host at its share" in str(line["event"])]
    # Five hosts in the first 10 s, five in the next: the sixth line counts the others.
    assert len(said) == 2 * CROWDED_LINES_MOST, len(said)
    assert said[CROWDED_LINES_MOST]["more_hosts_since_the_last_line"] > 600, said
