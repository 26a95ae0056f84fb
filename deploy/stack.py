"""A whole kling-relay on this machine: redis-server, moto's S3 server, the Kling simulator, the web process
(gunicorn), Celery workers and (optionally) Celery beat, each a real process on a free port. `make demo` and
the end-to-end tests use it.

The fault tests also use it to break things for real: `kill("worker1")` SIGKILLs a process's whole group
(prefork children included) and `restart("worker1")` starts it again with the same command line;
`restart_redis()` stops redis-server and starts it again on the same port and data directory (with
`redis_appendonly=True` nothing acknowledged is lost); `route_s3_through(url)` makes the relay's processes use
another S3 endpoint (a fault-injecting proxy in front of moto) while the stack's own client still talks to
moto directly; `restart_workers(env)` changes settings and restarts the Celery workers, as an operator would.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import requests

from deploy.procs import Process, RedisServer, free_port, wait_for_port

DEMO_ACCESS_KEY = "demo-access-key"
DEMO_SECRET_KEY = "demo-secret-key"
DEMO_API_TOKEN = "demo-api-token-0123456789abcdef"
DEMO_CALLBACK_SECRET = "demo-callback-secret-0123456789"
DEMO_NOTIFY_SECRET = "demo-notify-secret-0123456789"
BUCKET = "kling-relay-demo"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass(frozen=True)
class Host:
    """Where a process of the stack runs: a network namespace (None: this one) and the address it binds."""

    netns: str | None
    address: str


LOOPBACK = Host(None, "127.0.0.1")


@dataclass(frozen=True)
class _Spec:
    """How a process was started, so that it can be started again after a kill."""

    argv: list[str]
    port: int | None
    env: dict[str, str] | None
    overrides: dict[str, str]  # added to the stack's environment at each start (when `env` is None)


class LocalStack:
    """Start with start(); processes log to `workdir/logs/<name>.log`; stop() ends everything it started.

    `bucket_versioning=True` turns versioning on for the bucket, so a test can prove that no object was ever
    written twice (one version per key). `sim_api_key` runs the simulator like a reseller, with that static Bearer
    key (and the relay with `KLING_API_KEY`) instead of the demo AK/SK.

    `hosts` places processes on other hosts (deploy/hosts.py: network namespaces), by process name: `redis`, `s3`,
    `simulator`, `web` (the address `web_url` names: the web process, or a load balancer in front of several),
    `worker1`..., `beat`; a name not in it runs here on 127.0.0.1.
    """

    def __init__(self, workdir: Path, *, sim_args: Iterable[str] = (), env: Mapping[str, str] | None = None,
                 worker_concurrency: int = 4, web_workers: int = 2, redis_appendonly: bool = False,
                 sim_prefix: str = "", bucket_versioning: bool = False, sim_api_key: str | None = None,
                 hosts: Mapping[str, Host] | None = None) -> None:
        self.workdir = workdir
        self.hosts = dict(hosts or {})
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.sim_args = list(sim_args)
        self.sim_prefix = sim_prefix
        self.sim_api_key = sim_api_key
        self.extra_env = dict(env or {})
        self.worker_concurrency = worker_concurrency
        self.web_workers = web_workers
        self.redis = RedisServer(workdir / "redis", appendonly=redis_appendonly, host=self.host("redis").address,
                                 netns=self.host("redis").netns)
        self.s3_port = free_port()
        self.sim_port = free_port()
        self.web_port = free_port()
        self.processes: dict[str, Process] = {}
        self._specs: dict[str, _Spec] = {}
        self.python = sys.executable
        self.bucket_versioning = bucket_versioning
        self.relay_s3_endpoint: str | None = None  # see route_s3_through
        self.workers: list[str] = []  # names of the Celery workers started (see restart_workers)
        self.worker_metrics_ports: dict[str, int] = {}  # each worker's metrics endpoint (WORKER_METRICS_PORT)
        self.flower_port: int | None = None  # see start_flower

    # --- addresses ------------------------------------------------------------------------------------------
    def host(self, name: str) -> Host:
        """Where the process `name` runs (see `hosts`)."""
        return self.hosts.get(name, LOOPBACK)

    @property
    def s3_endpoint(self) -> str:
        return f"http://{self.host('s3').address}:{self.s3_port}"

    @property
    def sim_root(self) -> str:
        return f"http://{self.host('simulator').address}:{self.sim_port}"

    @property
    def sim_base(self) -> str:
        return self.sim_root + self.sim_prefix

    @property
    def web_url(self) -> str:
        return f"http://{self.host('web').address}:{self.web_port}"

    def worker_metrics_url(self, name: str = "worker1") -> str:
        """The metrics endpoint of a Celery worker of the stack (each has its own WORKER_METRICS_PORT)."""
        return f"http://{self.host(name).address}:{self.worker_metrics_ports[name]}/metrics"

    @property
    def env(self) -> dict[str, str]:
        """The environment of the relay's own processes (the same variables a deployment sets)."""
        return {
            **AWS_ENV,
            "REDIS_URL": self.redis.url,
            "KLING_BASE_URL": self.sim_base,
            **({"KLING_API_KEY": self.sim_api_key} if self.sim_api_key is not None
               else {"KLING_ACCESS_KEY": DEMO_ACCESS_KEY, "KLING_SECRET_KEY": DEMO_SECRET_KEY}),
            "PUBLIC_BASE_URL": self.web_url,
            "CALLBACK_SECRET": DEMO_CALLBACK_SECRET,
            "API_TOKENS": DEMO_API_TOKEN,
            "NOTIFY_SECRET": DEMO_NOTIFY_SECRET,
            "NOTIFY_URL_ALLOWLIST": "http://127.0.0.1",
            "S3_BUCKET": BUCKET,
            "S3_ENDPOINT_URL": self.relay_s3_endpoint or self.s3_endpoint,
            "VIDEO_URL_ALLOWLIST": self.sim_root,
            "PORT": str(self.web_port),
            "RETRY_BASE_SECONDS": "0.5",
            "RETRY_MAX_SECONDS": "5",
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
        }

    # --- processes --------------------------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], port: int | None = None, env: Mapping[str, str] | None = None,
               timeout: float = 60.0, overrides: Mapping[str, str] | None = None, *, wait: bool = True) -> Process:
        """Start `name`; with a port and `wait`, return once it listens (else see _wait_listening)."""
        self._specs[name] = _Spec(list(argv), port, dict(env) if env is not None else None, dict(overrides or {}))
        proc_env = dict(env) if env is not None else {**self.env, **(overrides or {})}
        host = self.host(name)
        proc = Process(name, argv, log_dir=self.logs, env=proc_env, cwd=Path(__file__).parent.parent, netns=host.netns)
        self.processes[name] = proc
        if wait:
            self._wait_listening(name, timeout)
        return proc

    def _wait_listening(self, name: str, timeout: float = 60.0) -> None:
        port, proc = self._specs[name].port, self.processes[name]
        if port is None:
            return
        try:
            wait_for_port(port, host=self.host(name).address, proc=proc.proc, timeout=timeout)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{name} did not start: {exc}\n--- {proc.log_path} ---\n{proc.log_tail()}") from exc

    def start(self, *, workers: int = 1, beat: bool = False) -> LocalStack:
        """Start every process at once (each spends about a second of CPU importing), then wait until S3, the
        simulator and the web process(es) listen; none of them needs another to start."""
        try:
            self.redis.start()
            self.start_s3(wait=False)
            self.start_simulator(wait=False)
            self.start_web(wait=False)
            for i in range(workers):
                self.start_worker(f"worker{i + 1}")
            if beat:
                self.start_beat()
            for name in list(self._specs):  # what serves a port (S3, the simulator, the web process(es))
                self._wait_listening(name)
            self._create_bucket()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def start_s3(self, *, wait: bool = True) -> None:
        self._spawn("s3", [self.python, "-m", "moto.server", "-H", self.host("s3").address, "-p", str(self.s3_port)],
                    self.s3_port, env={**os.environ, **AWS_ENV}, wait=wait)
        if wait:
            self._create_bucket()

    def _create_bucket(self) -> None:
        self.s3().create_bucket(Bucket=BUCKET)
        if self.bucket_versioning:
            self.s3().put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})

    def start_simulator(self, *, wait: bool = True) -> None:
        keys = (["--api-key", self.sim_api_key] if self.sim_api_key is not None
                else ["--access-key", DEMO_ACCESS_KEY, "--secret-key", DEMO_SECRET_KEY])
        argv = [self.python, "-m", "kling_relay.simulator", "--host", self.host("simulator").address,
                "--port", str(self.sim_port),
                *keys, *self.sim_args]
        if self.sim_prefix:
            argv += ["--prefix", self.sim_prefix]
        self._spawn("simulator", argv, self.sim_port, wait=wait)

    def start_web(self, name: str = "web", *, wait: bool = True) -> None:
        """The web process (gunicorn) on web_port of the host of `name` (several, each on its own host, behind a
        load balancer: deploy/hosts.py)."""
        argv = [self.python, "-m", "gunicorn", "--config", "deploy/gunicorn.conf.py", "--bind",
                f"{self.host(name).address}:{self.web_port}", "--workers", str(self.web_workers),
                "kling_relay.webhook.wsgi:app"]
        self._spawn(name, argv, self.web_port, wait=wait)

    def start_worker(self, name: str = "worker1", queues: str = "submit,copy,notify,reconcile") -> Process:
        argv = [self.python, "-m", "celery", "--quiet", "-A", "kling_relay.worker.celery_app", "worker", "--queues",
                queues, "--concurrency", str(self.worker_concurrency), "--prefetch-multiplier", "1", "--hostname",
                f"{name}@%h", "--without-gossip", "--without-mingle", "--loglevel", "INFO"]
        if name not in self.workers:
            self.workers.append(name)
        metrics_port = self.worker_metrics_ports.setdefault(name, free_port())
        return self._spawn(name, argv, overrides={"WORKER_METRICS_PORT": str(metrics_port)})

    def start_beat(self) -> Process:
        argv = [self.python, "-m", "celery", "--quiet", "-A", "kling_relay.worker.celery_app", "beat", "--scheduler",
                "celery.beat:Scheduler", "--loglevel", "INFO"]  # as in the Procfile: no schedule file
        return self._spawn("beat", argv)

    def start_flower(self, *, basic_auth: str) -> Process:
        """Flower (Celery's web monitor) on the stack's Redis, as the Procfile's `flower` process, on
        `flower_url`; `basic_auth` is `user:password`. It sees the task events sent from the time it connects."""
        self.flower_port = free_port()
        argv = [self.python, "-m", "celery", "-A", "kling_relay.worker.celery_app", "flower", "--address=127.0.0.1",
                f"--port={self.flower_port}", f"--basic-auth={basic_auth}"]
        return self._spawn("flower", argv, self.flower_port)

    @property
    def flower_url(self) -> str:
        return f"http://127.0.0.1:{self.flower_port}"

    def route_s3_through(self, endpoint_url: str) -> None:
        """Make the relay's processes started from now on use endpoint_url as S3 (e.g. a faulty proxy)."""
        self.relay_s3_endpoint = endpoint_url

    # --- faults -----------------------------------------------------------------------------------------------
    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send sig (default SIGKILL) to the process group of `name` and wait until its leader is gone."""
        proc = self.processes.pop(name)
        proc.kill(sig)
        proc.proc.wait(30)
        proc.stop()  # reaps group members left behind, closes the log

    def restart(self, name: str, timeout: float = 60.0) -> Process:
        """Start `name` again with the command line, port and environment it was first started with."""
        if name in self.processes:
            self.processes.pop(name).stop()
        spec = self._specs[name]
        return self._spawn(name, spec.argv, spec.port, env=spec.env, timeout=timeout, overrides=spec.overrides)

    def restart_workers(self, env: Mapping[str, str] | None = None, timeout: float = 60.0) -> list[str]:
        """Restart every Celery worker with `env` added to the relay's environment (kept for every process started
        from now on), as an operator who changes a setting and restarts the workers; returns their names."""
        self.extra_env.update(env or {})
        names = [name for name in self.workers if name in self.processes]
        for name in names:
            self.restart(name, timeout=timeout)
        return names

    def revive(self) -> list[str]:
        """Start again every process of the stack that has exited, as a process manager would; returns their names.

        Processes taken out with kill() are not revived (they are no longer in `processes`).
        """
        dead = [name for name, proc in self.processes.items() if not proc.alive()]
        for name in dead:
            self.restart(name)
        return dead

    def restart_redis(self, down_seconds: float = 0.0, *, crash: bool = False) -> None:
        """Stop redis-server and start it again on the same port and data dir, down for down_seconds.

        By default it is stopped with SIGTERM (it syncs its AOF and exits); `crash=True` SIGKILLs it instead,
        so only what was already written to the AOF survives (with `appendfsync always`: every acknowledged write).
        """
        if crash and self.redis.process is not None:
            self.redis.process.kill(signal.SIGKILL)
            self.redis.process.proc.wait(30)
        self.redis.stop()
        if down_seconds > 0:
            time.sleep(down_seconds)
        self.redis.start()

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if requests.get(self.web_url + "/healthz", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError("web process never became healthy:\n" + self.logs_tail())

    def stop(self) -> None:
        """SIGTERM to every process at once, then wait for each (a stop takes as long as the slowest process's
        graceful shutdown, not the sum of them); redis-server last."""
        procs = list(self.processes.values())
        for proc in procs:
            proc.terminate()
        for proc in reversed(procs):
            proc.stop()
        self.processes.clear()
        self.redis.stop()

    def __enter__(self) -> LocalStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- clients ------------------------------------------------------------------------------------------------
    def s3(self) -> Any:
        return boto3.client("s3", endpoint_url=self.s3_endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def api(self, method: str, path: str, *, token: str = DEMO_API_TOKEN, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}", **kwargs.pop("headers", {})}
        return requests.request(method, self.web_url + path, headers=headers, timeout=30, **kwargs)

    def sim_control(self, **knobs: Any) -> dict[str, Any]:
        response = requests.post(self.sim_root + "/_sim/control", json=knobs, timeout=10)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def sim_stats(self) -> dict[str, Any]:
        response = requests.get(self.sim_root + "/_sim/stats", timeout=10)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def sim_reset(self, *, keep_knobs: bool = False) -> None:
        """Forget the simulator's tasks and counters; its knobs go back to the startup values unless kept."""
        response = requests.post(self.sim_root + "/_sim/reset", json={"knobs": not keep_knobs}, timeout=10)
        response.raise_for_status()

    def multipart_uploads(self) -> list[dict[str, Any]]:
        """Multipart uploads still open in the bucket (each `{"Key", "UploadId", ...}`), read from moto directly."""
        uploads: list[dict[str, Any]] = self.s3().list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
        return uploads

    def logs_tail(self, lines: int = 40) -> str:
        return "\n".join(f"--- {name} ---\n{p.log_tail(lines)}" for name, p in self.processes.items())
