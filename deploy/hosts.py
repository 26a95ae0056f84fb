"""kling-relay on several hosts of one machine: Linux network namespaces joined by a bridge, one process group per
host, each bound to its host's own address. Used by tests/e2e/test_hosts.py (`make scale-test`) and
bench/hosts.py; needs root and iproute2 (`ip netns`, veth, bridge).

    with Network.create(["redis", "s3", "simulator", "web1", "web2", "lb", "w1", "w2", "w3", "beat"]) as net:
        stack = HostsStack(workdir, net, worker_hosts=3).start()
        ...
        stack.cut("worker1")  # its link down, then its processes SIGKILLed

Topology: a bridge `krb<pid>` in this (the root) namespace holds `10.77.<n>.1/24`, so the test process reaches
every host as a client would; each host is a namespace `kr-<pid>-<host>` with a veth pair (`krv<pid>x<i>` on the
bridge, `eth0` inside, `10.77.<n>.<10 + i>`) and its own loopback. `<n>` is a /24 no interface on this machine
uses yet, so two runs never share a subnet; `<pid>` (this process's) names everything of one run, and
`remove_stale()` deletes what runs whose process is gone left behind (a crash, a SIGKILLed pytest).

The relay's processes (deploy/stack.py's LocalStack, `hosts=`): Redis, moto's S3 server and the simulator each on
their host; two web hosts (gunicorn) behind a round-robin TCP load balancer on the `lb` host
(deploy/tcp_lb.py), whose address is PUBLIC_BASE_URL, so the simulator's callbacks go through it; one Celery
worker per worker host and beat on its own host. Nothing crosses hosts on 127.0.0.1. The relay takes plain
http to Kling and to its public URL only for hosts named in PLAIN_HTTP_HOSTS (here the simulator's and the load
balancer's addresses).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.stack import Host, LocalStack

PREFIX = "kr-"
CMD_TIMEOUT = 15.0


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no iproute2, or the kernel refuses)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=CMD_TIMEOUT, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def unavailable_reason() -> str | None:
    """Why network namespaces cannot be used here, or None when they can (root and `ip` present)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "network namespaces need iproute2 (`ip`)"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Delete the namespaces and bridges of earlier runs whose process is gone; their names. Processes still inside
    such a namespace (a crashed run's children: they run in sessions of their own) are SIGKILLed first."""
    removed = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.fullmatch(rf"{PREFIX}(\d+)-[a-z0-9]+", name)
        if match and not _alive(int(match.group(1))):
            for pid in _ip("netns", "pids", name, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "delete", name, check=False)
            removed.append(name)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        match = re.match(r"\d+: (krb(\d+))[:@]", line)
        if match and not _alive(int(match.group(2))):
            _ip("link", "delete", match.group(1), check=False)
            removed.append(match.group(1))
    return removed


def _free_subnet() -> int:
    """A third octet n such that no interface here has an address in 10.77.n.0/24."""
    used = set()
    for line in _ip("-4", "-o", "addr", "show", check=False).stdout.splitlines():
        match = re.search(r"inet (10\.77\.(\d+))\.\d+/", line)
        if match:
            used.add(int(match.group(2)))
    start = os.getpid() % 250
    for k in range(250):
        n = 1 + (start + k) % 250
        if n not in used:
            return n
    raise NetnsUnavailable("no free /24 in 10.77.0.0/16")


@dataclass(frozen=True)
class NetHost:
    name: str
    netns: str
    address: str
    link: str  # the veth end on the bridge (in the root namespace): down cuts the host off


class Network:
    """Namespaces and links of one run; delete() (or leaving the `with`) removes them all."""

    def __init__(self, hosts: dict[str, NetHost], bridge: str, gateway: str) -> None:
        self.hosts = hosts
        self.bridge = bridge
        self.gateway = gateway

    @classmethod
    def create(cls, names: Iterable[str]) -> Network:
        reason = unavailable_reason()
        if reason:
            raise NetnsUnavailable(reason)
        remove_stale()
        pid = os.getpid()
        n = _free_subnet()
        bridge = f"krb{pid}"
        net = cls({}, bridge, f"10.77.{n}.1")
        try:
            result = _ip("link", "add", bridge, "type", "bridge", check=False)
            if result.returncode != 0:
                raise NetnsUnavailable(f"cannot make a bridge: {result.stderr.strip()}")
            _ip("addr", "add", f"{net.gateway}/24", "dev", bridge)
            _ip("link", "set", bridge, "up")
            for i, name in enumerate(names):
                host = NetHost(name, f"{PREFIX}{pid}-{name}", f"10.77.{n}.{10 + i}", f"krv{pid}x{i}")
                result = _ip("netns", "add", host.netns, check=False)
                if result.returncode != 0:
                    raise NetnsUnavailable(f"cannot make a network namespace: {result.stderr.strip()}")
                net.hosts[name] = host
                _ip("link", "add", host.link, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
                _ip("link", "set", host.link, "master", bridge, "up")
                _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
                _ip("-n", host.netns, "link", "set", "eth0", "up")
                _ip("-n", host.netns, "link", "set", "lo", "up")
                _ip("-n", host.netns, "route", "add", "default", "via", net.gateway)
        except BaseException:
            net.delete()
            raise
        return net

    def host(self, name: str) -> Host:
        h = self.hosts[name]
        return Host(h.netns, h.address)

    def cut(self, name: str) -> None:
        """Take the host's link down: nothing reaches it, it reaches nothing."""
        _ip("link", "set", self.hosts[name].link, "down")

    def delete(self) -> None:
        """Remove every veth pair, namespace and the bridge; safe to call twice. The veth is deleted first, by its
        end on the bridge: a namespace's deletion frees its links only once the kernel has released the namespace,
        later, and a next Network of this process would reuse their names."""
        for host in self.hosts.values():
            _ip("link", "delete", host.link, check=False)
            _ip("netns", "delete", host.netns, check=False)
        self.hosts = {}
        _ip("link", "delete", self.bridge, check=False)

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()


def topology(worker_hosts: int) -> list[str]:
    """The hosts of HostsStack with `worker_hosts` worker hosts."""
    return ["redis", "s3", "simulator", "web1", "web2", "lb", *(f"w{i + 1}" for i in range(worker_hosts)), "beat"]


class HostsStack(LocalStack):
    """LocalStack spread over the hosts of `net` (see the module docstring); `start(workers=N, beat=True)` starts one
    worker per worker host (worker1 on w1, ...)."""

    def __init__(self, workdir: Path, net: Network, *, env: Mapping[str, str] | None = None, **options: Any) -> None:
        names = {"redis": "redis", "s3": "s3", "simulator": "simulator", "web1": "web1", "web2": "web2",
                 "web": "lb", "lb": "lb", "beat": "beat"}
        names.update({f"worker{name[1:]}": name for name in net.hosts if re.fullmatch(r"w\d+", name)})
        hosts = {process: net.host(host) for process, host in names.items() if host in net.hosts}
        plain = f"{net.hosts['simulator'].address},{net.hosts['lb'].address}"
        super().__init__(workdir, env={"PLAIN_HTTP_HOSTS": plain, **(env or {})}, hosts=hosts, **options)
        self.net = net

    def start_web(self, name: str = "web", *, wait: bool = True) -> None:
        """Both web hosts, then the load balancer in front of them (on the `lb` host, at `web_url`)."""
        if name != "web":
            super().start_web(name, wait=wait)
            return
        for web in ("web1", "web2"):
            super().start_web(web, wait=wait)
        backends = [f"--backend={self.host(web).address}:{self.web_port}" for web in ("web1", "web2")]
        listen = f"--listen={self.host('lb').address}:{self.web_port}"
        self._spawn("lb", [self.python, "-m", "deploy.tcp_lb", listen, *backends], self.web_port, wait=wait)

    def cut(self, worker: str) -> None:
        """Cut a worker's host off, as a machine that drops off the network: its link down, then its processes
        SIGKILLed (they could not have reached anything anyway)."""
        host = next(name for name, h in self.net.hosts.items() if self.host(worker).netns == h.netns)
        self.net.cut(host)
        self.kill(worker)
