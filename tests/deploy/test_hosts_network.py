"""The pieces of the multi-host stack (deploy/hosts.py, deploy/tcp_lb.py) on their own: the load balancer's round
robin and its bad input, namespaces that are made, reached and removed (stale ones of dead runs too), and a process
started inside a namespace that keeps its own pid (so killing its group kills it)."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deploy import hosts
from deploy.hosts import Network, remove_stale, unavailable_reason
from deploy.procs import Process, free_port, wait_for_port
from deploy.tcp_lb import Balancer, host_port, serve
from tests.support.waiting import wait_until

needs_netns = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))


@pytest.mark.parametrize("bad", ["8000", ":8000", "host:", "host:port", "10.0.0.1:80x"])
def test_lb_addresses_must_be_host_and_port(bad: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        host_port(bad)
    assert host_port("10.77.3.9:8000") == ("10.77.3.9", 8000)


def test_lb_takes_turns_and_skips_a_backend_that_refuses() -> None:
    async def scenario() -> list[bytes]:
        async def named(name: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(name + await reader.read(10))
            await writer.drain()
            writer.close()

        a = await asyncio.start_server(lambda r, w: named(b"a", r, w), "127.0.0.1", 0)
        b = await asyncio.start_server(lambda r, w: named(b"b", r, w), "127.0.0.1", 0)
        dead = free_port()  # nothing listens: skipped
        backends = [("127.0.0.1", a.sockets[0].getsockname()[1]), ("127.0.0.1", dead),
                    ("127.0.0.1", b.sockets[0].getsockname()[1])]
        lb = await asyncio.start_server(Balancer(backends).handle, "127.0.0.1", 0)
        port = lb.sockets[0].getsockname()[1]
        answers = []
        for _ in range(4):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"!")
            await writer.drain()
            answers.append(await asyncio.wait_for(reader.read(), 5))
            writer.close()
        for server in (lb, a, b):
            server.close()
        return answers

    assert asyncio.run(scenario()) == [b"a!", b"b!", b"a!", b"b!"]


def test_lb_closes_a_connection_no_backend_takes() -> None:
    async def scenario() -> bytes:
        lb_port = free_port()
        task = asyncio.create_task(serve(("127.0.0.1", lb_port), [("127.0.0.1", free_port())]))
        for _ in range(100):
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", lb_port)
                break
            except OSError:
                await asyncio.sleep(0.02)
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        task.cancel()
        return answer

    assert asyncio.run(scenario()) == b""


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=15, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.split()}


@needs_netns
def test_namespaces_are_made_reached_and_removed(tmp_path: Path) -> None:
    with Network.create(["one", "two"]) as net:
        made = {h.netns for h in net.hosts.values()}
        assert made <= _netns_names()
        one, two = net.hosts["one"], net.hosts["two"]
        assert one.address != two.address and not one.address.startswith("127.")
        port = free_port()
        script = (f"import os, socket\ns = socket.socket(); s.bind(({one.address!r}, {port})); s.listen()\n"
                  "while True:\n    c, _ = s.accept(); c.send(str(os.getpid()).encode()); c.close()")
        proc = Process("listener", [sys.executable, "-c", script], log_dir=tmp_path, netns=one.netns)
        try:
            wait_for_port(port, host=one.address, proc=proc.proc)
            # from the other host: its own address, across the bridge
            reach = (f"import socket; c = socket.create_connection(({one.address!r}, {port}), timeout=3); "
                     "print(c.recv(20).decode())")
            out = subprocess.run(["ip", "netns", "exec", two.netns, sys.executable, "-c", reach],
                                 capture_output=True, text=True, timeout=30, check=True).stdout
            assert int(out) == proc.pid  # `ip netns exec` execs: the pid (and group) Process kills is the program's
            net.cut("two")  # down: the second host reaches nothing any more
            cut = subprocess.run(["ip", "netns", "exec", two.netns, sys.executable, "-c", reach],
                                 capture_output=True, text=True, timeout=30, check=False)
            assert cut.returncode != 0
        finally:
            proc.stop()
    assert not made & _netns_names()


@needs_netns
def test_a_second_network_of_the_same_process_can_reuse_the_names(tmp_path: Path) -> None:
    """A namespace outlives its deletion while something still holds it (here a process inside; in a test run, the
    kernel releasing it late): its links must not, or the next Network of this process collides with them."""
    first = Network.create(["one"])
    holder = Process("holder", [sys.executable, "-c", "import time; time.sleep(60)"], log_dir=tmp_path,
                     netns=first.hosts["one"].netns)
    try:
        first.delete()
        with Network.create(["one"]) as second:
            assert second.hosts["one"].link == first_link(second)
    finally:
        holder.stop()


def first_link(net: Network) -> str:
    out = subprocess.run(["ip", "-o", "link", "show", net.hosts["one"].link], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    return out.split(":")[1].strip().split("@")[0]


@needs_netns
def test_stale_namespaces_of_dead_runs_are_removed() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = f"{hosts.PREFIX}{dead.pid}-gone"
    mine = f"{hosts.PREFIX}{os.getpid()}-alive"
    subprocess.run(["ip", "netns", "add", stale], check=True, timeout=15)
    subprocess.run(["ip", "netns", "add", mine], check=True, timeout=15)
    orphan = subprocess.Popen(["ip", "netns", "exec", stale, sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        wait_until(lambda: str(orphan.pid) in subprocess.run(["ip", "netns", "pids", stale], capture_output=True,
                                                             text=True, timeout=15).stdout.split(),
                   timeout=30, what="the orphan inside the stale namespace")
        removed = remove_stale()
        assert stale in removed and mine not in removed
        assert stale not in _netns_names() and mine in _netns_names()
        assert orphan.wait(10) == -9  # a crashed run's process left inside: killed with its namespace
    finally:
        orphan.kill()
        orphan.wait(10)
        subprocess.run(["ip", "netns", "delete", mine], check=False, timeout=15)
        subprocess.run(["ip", "netns", "delete", stale], check=False, timeout=15)
