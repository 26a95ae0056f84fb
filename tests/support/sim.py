"""Start the Kling simulator as a real subprocess for a test, and talk to its /_sim routes.

    with running_simulator(log_dir, "--submitted-seconds", "0.1") as sim:
        client = KlingClient(base_url=sim.base_url, access_key=sim.access_key, secret_key=sim.secret_key)
        sim.control(callback_drop_every_n=2)
        ...
        assert sim.stats()["tasks_created"] == 1

The default credentials are a test AK/SK whose secret is 40 bytes long, so HS256 libraries that warn
about short keys (PyJWT does, and pytest turns warnings into errors) stay quiet. Pass
`api_key="..."` for reseller-style static-key mode. `make_jwt` builds a Kling token by hand.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.procs import Process, free_port, wait_for_port
from tests.support.waiting import wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
TEST_ACCESS_KEY = "test-access-key"
TEST_SECRET_KEY = "test-secret-key-0123456789abcdef-0123456"  # noqa: S105 - a test credential
HTTP_TIMEOUT = 10.0


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def make_jwt(access_key: str, secret_key: str, *, now: float | None = None, exp_in: float = 1800,
             nbf_offset: float = -5, claims: dict[str, Any] | None = None) -> str:
    """An HS256 JWT the way Kling's docs build it: iss = AK, exp = now + 1800, nbf = now - 5."""
    now = time.time() if now is None else now
    payload: dict[str, Any] = {"iss": access_key, "exp": int(now + exp_in), "nbf": int(now + nbf_offset)}
    payload.update(claims or {})
    signing_input = (_b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "."
                     + _b64url(json.dumps(payload).encode()))
    signature = hmac.new(secret_key.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64url(signature)}"


class SimHandle:
    """A running simulator process; also a context manager that stops it."""

    def __init__(self, process: Process, port: int, prefix: str, *, access_key: str | None,
                 secret_key: str | None, api_key: str | None) -> None:
        self.process = process
        self.port = port
        self.prefix = prefix
        self.access_key = access_key
        self.secret_key = secret_key
        self.api_key = api_key
        self.root_url = f"http://127.0.0.1:{port}"
        self.base_url = self.root_url + prefix  # what a client uses as KLING_BASE_URL
        self._http = requests.Session()
        self._http.trust_env = False  # never route 127.0.0.1 through an environment proxy

    def __repr__(self) -> str:
        return f"SimHandle(base_url={self.base_url!r}, pid={self.process.pid})"

    def __enter__(self) -> SimHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- Kling side ------------------------------------------------------------------------------
    def auth_header(self) -> dict[str, str]:
        """A valid Authorization header for this simulator's auth mode."""
        if self.api_key is not None:
            return {"Authorization": f"Bearer {self.api_key}"}
        assert self.access_key is not None and self.secret_key is not None
        return {"Authorization": f"Bearer {make_jwt(self.access_key, self.secret_key)}"}

    def task(self, task_or_external_id: str) -> dict[str, Any]:
        """The task object from Kling's query endpoint (raises if the envelope is not code 0)."""
        r = self._http.get(f"{self.base_url}/v1/videos/multi-image2video/{task_or_external_id}",
                           headers=self.auth_header(), timeout=HTTP_TIMEOUT)
        body = r.json()
        if body.get("code") != 0:
            raise LookupError(f"task {task_or_external_id}: HTTP {r.status_code} {body}")
        data: dict[str, Any] = body["data"]
        return data

    # -- /_sim side ------------------------------------------------------------------------------
    def control(self, **knobs: Any) -> dict[str, Any]:
        """Set knobs at runtime; returns the knobs now in force (ValueError on a bad knob)."""
        r = self._http.post(f"{self.root_url}/_sim/control", json=knobs, timeout=HTTP_TIMEOUT)
        if r.status_code != 200:
            raise ValueError(r.json().get("error", r.text))
        result: dict[str, Any] = r.json()
        return result

    def stats(self) -> dict[str, Any]:
        r = self._http.get(f"{self.root_url}/_sim/stats", timeout=60)
        r.raise_for_status()
        result: dict[str, Any] = r.json()
        return result

    def reset(self, *, keep_knobs: bool = False) -> None:
        """Forget tasks and counters; restores the startup knobs unless keep_knobs."""
        r = self._http.post(f"{self.root_url}/_sim/reset", json={"knobs": not keep_knobs}, timeout=HTTP_TIMEOUT)
        r.raise_for_status()

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], *, timeout: float = 30.0) -> dict[str, Any]:
        """Poll stats until predicate(stats) is true; returns those stats (the test fails otherwise)."""

        def matching() -> dict[str, Any] | None:
            stats = self.stats()
            return stats if predicate(stats) else None

        return wait_until(matching, timeout=timeout, what="simulator stats to match",
                          diagnostics=lambda: f"last stats: {self.stats()}")

    def stop(self) -> None:
        self._http.close()
        self.process.stop()


def start_simulator(log_dir: Path, *args: str, prefix: str = "", api_key: str | None = None,
                    access_key: str = TEST_ACCESS_KEY, secret_key: str = TEST_SECRET_KEY,
                    name: str | None = None) -> SimHandle:
    """Launch `python -m simulator` on a free port and wait until it accepts connections."""
    prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
    port = free_port()
    argv = [sys.executable, "-m", "simulator", "--host", "127.0.0.1", "--port", str(port),
            "--prefix", prefix]
    if api_key is not None:
        argv += ["--api-key", api_key]
        keys: tuple[str | None, str | None] = (None, None)
    else:
        argv += ["--access-key", access_key, "--secret-key", secret_key]
        keys = (access_key, secret_key)
    argv += list(args)
    process = Process(name or f"simulator-{port}", argv, log_dir=log_dir, cwd=REPO_ROOT)
    try:
        wait_for_port(port, proc=process.proc)
    except BaseException:
        process.stop()
        raise
    return SimHandle(process, port, prefix, access_key=keys[0], secret_key=keys[1],
                     api_key=api_key)


@contextmanager
def running_simulator(log_dir: Path, *args: str, **kwargs: Any) -> Iterator[SimHandle]:
    """start_simulator as a context manager: the process is stopped on exit."""
    sim = start_simulator(log_dir, *args, **kwargs)
    try:
        yield sim
    finally:
        sim.stop()


#: Simulator arguments for plain-function tests: tasks finish in ~0.1 s and a failed callback is not sent again.
UNIT_SIM_ARGS = ("--submitted-seconds", "0.05", "--processing-seconds", "0.05", "--callback-retries", "0")


def sim_fixture(*args: str, **kwargs: Any) -> Any:
    """A module-scoped pytest fixture named `sim`: one simulator started with `args`/`kwargs` (as
    `running_simulator` takes them) for all the module's tests. Use as `sim = sim_fixture(...)` at module level."""

    @pytest.fixture(scope="module", name="sim")
    def _sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimHandle]:
        with running_simulator(tmp_path_factory.mktemp("sim-logs"), *args, **kwargs) as handle:
            yield handle

    return _sim
