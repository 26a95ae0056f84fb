"""Real local processes for tests and the demo: free ports, waiting for a port, a throwaway redis-server.

Every end-to-end fixture starts what it needs through this module, so tests never depend on a
service the machine happens to run.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

#: Ports this process has handed out (never twice: a port is free until its process binds it, later).
_HANDED_OUT: set[int] = set()
_PORTS_BELOW_EPHEMERAL = 12000


def _port_range() -> tuple[int, int]:
    """Where free_port picks: just below the kernel's ephemeral range, where no `bind(("", 0))` (a proxy or server
    asking for any port) and no outgoing connection's source port can land on a port handed out but not yet
    bound; one slice per pytest-xdist worker, so two workers never pick the same port either."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as fh:
            ephemeral_low = int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    low = max(1024, ephemeral_low - _PORTS_BELOW_EPHEMERAL)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    index, slices = (int(worker), 8) if worker.isdigit() else (0, 8)
    width = (ephemeral_low - low) // slices
    start = low + (index % slices) * width
    return start, start + width


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, and that this process has not handed out before
    (see _port_range for where it comes from)."""
    low, high = _port_range()
    for _ in range(500):
        port = random.randrange(low, high)  # noqa: S311 - spreading, not security
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # the range is full: any port the kernel gives
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, *, host: str = "127.0.0.1", timeout: float = 30.0,
                  proc: subprocess.Popen[bytes] | None = None) -> None:
    """Block until something accepts connections on host:port; fail fast if proc dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listened on {host}:{port} within {timeout}s")


class Process:
    """A child process with its output in a log file, stopped with SIGTERM then SIGKILL.

    `netns`: run it inside that network namespace (`ip netns exec NS argv...`, which execs the command: the pid
    and process group stay the process's own)."""

    def __init__(self, name: str, argv: Sequence[str], *, log_dir: Path,
                 env: dict[str, str] | None = None, cwd: str | Path | None = None, netns: str | None = None) -> None:
        self.name = name
        self.argv = ["ip", "netns", "exec", netns, *argv] if netns else list(argv)
        self.log_path = log_dir / f"{name}.log"
        self._terminated = False
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        self.proc: subprocess.Popen[bytes] = subprocess.Popen(
            self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=cwd,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send sig to the whole process group (celery/gunicorn children included)."""
        if self.alive():
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        """SIGTERM to the group without waiting (stop() then waits, without a second SIGTERM): stopping several
        processes this way takes as long as the slowest, not the sum."""
        self.kill(signal.SIGTERM)
        self._terminated = True

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive():
            if not self._terminated:
                self.kill(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.proc.wait(5)
        # reap any group members left behind (e.g. prefork children)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def redis_server_binary() -> str:
    path = shutil.which("redis-server")
    if not path:
        raise RuntimeError("redis-server is not installed: run `make test` (it installs it) "
                           "or `apt-get install redis-server`")
    return path


class RedisServer:
    """A private redis-server on a free port, data in its own directory; on `host` (default loopback), inside the
    network namespace `netns` if given."""

    def __init__(self, data_dir: Path, *, appendonly: bool = False, port: int | None = None,
                 host: str = "127.0.0.1", netns: str | None = None) -> None:
        self.data_dir = data_dir
        self.host = host
        self.netns = netns
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.process: Process | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, extra: Sequence[str] = ()) -> RedisServer:
        argv = [
            redis_server_binary(), "--port", str(self.port), "--bind", self.host,
            "--dir", str(self.data_dir), "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always",
            # another host's clients (deploy/hosts.py): protected mode would answer them DENIED (no password here)
            *(["--protected-mode", "no"] if self.host != "127.0.0.1" else []), *extra,
        ]
        self.process = Process(f"redis-{self.port}", argv, log_dir=self.data_dir, netns=self.netns)
        wait_for_port(self.port, host=self.host, proc=self.process.proc)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


class SentinelCluster:
    """Redis with Sentinel on loopback: a primary, `replicas` replicas and `sentinels` sentinels (redis-server
    --sentinel), monitoring the service `service`; failover after one second without an answer."""

    def __init__(self, data_dir: Path, *, replicas: int = 1, sentinels: int = 3, service: str = "relay",
                 down_after_ms: int = 1000) -> None:
        self.data_dir = data_dir
        self.service = service
        self.down_after_ms = down_after_ms
        self.servers = [RedisServer(data_dir / f"redis-{n}") for n in range(1 + replicas)]
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.sentinels: list[Process] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.service}/0"

    def start(self) -> SentinelCluster:
        primary = self.servers[0]
        primary.start()
        for replica in self.servers[1:]:
            replica.start(extra=["--replicaof", "127.0.0.1", str(primary.port)])
        for port in self.sentinel_ports:
            conf = self.data_dir / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.data_dir}\n"
                f"sentinel monitor {self.service} 127.0.0.1 {primary.port} 2\n"
                f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.service} 10000\n"
                f"sentinel parallel-syncs {self.service} 1\n")
            proc = Process(f"sentinel-{port}", [redis_server_binary(), str(conf), "--sentinel"],
                           log_dir=self.data_dir)
            self.sentinels.append(proc)
            wait_for_port(port, proc=proc.proc)
        return self

    def primary_port(self) -> int:
        """The primary's port as the first sentinel that answers sees it."""
        import redis

        for port in self.sentinel_ports:
            try:
                client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, decode_responses=True)
                host_port = client.execute_command("SENTINEL", "get-master-addr-by-name", self.service)
                client.close()
                return int(host_port[1])
            except redis.RedisError:
                continue
        raise RuntimeError("no sentinel answered")

    def server_on(self, port: int) -> RedisServer:
        return next(s for s in self.servers if s.port == port)

    def stop(self) -> None:
        for proc in self.sentinels:
            proc.stop()
        self.sentinels.clear()
        for server in self.servers:
            server.stop()
