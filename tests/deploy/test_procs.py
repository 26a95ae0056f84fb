"""deploy/procs.free_port: a port handed out is one nothing else will take before its process binds it."""

from __future__ import annotations

import socket

import pytest

from deploy import procs


def _ephemeral_low() -> int:
    with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as fh:
        return int(fh.read().split()[0])


def test_free_ports_are_never_handed_out_twice_and_lie_below_the_ephemeral_range() -> None:
    ports = [procs.free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    low, high = procs._port_range()
    assert all(low <= p < high for p in ports)
    assert high <= _ephemeral_low()  # where a bind to port 0 or an outgoing connection never lands


def test_a_listener_asking_for_any_port_never_gets_one_handed_out() -> None:
    """The flake this prevents: a test picked moto's port, then a proxy bound port 0 and got that same port."""
    handed = {procs.free_port() for _ in range(50)}
    taken = []
    try:
        for _ in range(200):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            taken.append(s)
        assert not handed & {s.getsockname()[1] for s in taken}
    finally:
        for s in taken:
            s.close()


@pytest.mark.parametrize(("one", "other"), [("gw0", "gw1"), ("gw1", "gw2")])
def test_two_xdist_workers_pick_from_slices_that_do_not_overlap(monkeypatch: pytest.MonkeyPatch, one: str,
                                                               other: str) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER", one)
    a_low, a_high = procs._port_range()
    monkeypatch.setenv("PYTEST_XDIST_WORKER", other)
    b_low, b_high = procs._port_range()
    assert a_high <= b_low or b_high <= a_low
