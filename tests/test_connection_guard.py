"""clients/connection_guard.py on its own: the bound, who is evicted for a newcomer (the oldest connection still
in its handshake), who never is (an established one), and the newcomer refused when only those are left. The
transports are doubles (the guard only asks them whether they are closing, and closes them); the real listeners
are flooded in test_web_tls.py."""

from __future__ import annotations

from clients.connection_guard import ConnectionGuard


class FakeTransport:
    """A stand-in for an asyncio transport: nothing but the calls the guard makes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False
        self.ready = False

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, _name: str) -> str:
        return self.name


def admit(guard: ConnectionGuard, transport: FakeTransport, waiting: int = 0) -> bool:
    return guard.admit(transport, lambda: transport.ready, waiting)  # type: ignore[arg-type]


def test_the_oldest_in_handshake_goes_and_established_ones_stay() -> None:
    guard = ConnectionGuard(3, "test")
    viewer, idle1, idle2 = FakeTransport("viewer"), FakeTransport("idle1"), FakeTransport("idle2")
    for transport in (viewer, idle1, idle2):
        assert admit(guard, transport)
    viewer.ready = True
    newcomer = FakeTransport("new")
    assert admit(guard, newcomer)
    assert not viewer.closed and idle1.closed and not idle2.closed and guard.count() == 3
    # Closed connections free their place without anyone being evicted.
    idle2.closed = True
    late = FakeTransport("late")
    assert admit(guard, late) and not newcomer.closed and guard.count() == 3


def test_only_established_connections_left_refuses_the_newcomer() -> None:
    guard = ConnectionGuard(2, "test")
    first, second = FakeTransport("a"), FakeTransport("b")
    assert admit(guard, first) and admit(guard, second)
    first.ready = second.ready = True
    refused = FakeTransport("c")
    assert not admit(guard, refused)
    assert refused.closed and not first.closed and not second.closed and guard.count() == 2
    guard.release(first)
    assert admit(guard, FakeTransport("d"))


def test_connections_held_elsewhere_count_toward_the_limit() -> None:
    guard = ConnectionGuard(3, "test")
    one = FakeTransport("one")
    assert admit(guard, one)
    assert admit(guard, FakeTransport("two"), waiting=1)  # 1 + 1 waiting < 3
    assert admit(guard, FakeTransport("three"), waiting=1)  # at 2 + 1: the oldest in handshake goes
    assert one.closed
