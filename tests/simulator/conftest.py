"""Fixtures for the simulator's own tests: one shared fast simulator, a callback listener, images.

The shared simulator runs with a short schedule; every test starts from a reset (tasks, counters and
knobs back to the startup values). Nothing here imports project code: tests talk HTTP like any
Kling client would.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.images import image_b64
from tests.support.procs import free_port
from tests.support.sim import SimHandle, start_simulator
from tests.support.waiting import wait_until

FAST = ("--submitted-seconds", "0.1", "--processing-seconds", "0.1", "--callback-retry-backoff", "0.05")
CREATE_PATH = "/v1/videos/multi-image2video"


@pytest.fixture(scope="session")
def sim_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimHandle]:
    handle = start_simulator(tmp_path_factory.mktemp("sim-logs"), *FAST, name="simulator-shared")
    yield handle
    handle.stop()


@pytest.fixture()
def sim(sim_session: SimHandle) -> SimHandle:
    sim_session.reset()
    return sim_session


@pytest.fixture()
def http() -> Iterator[requests.Session]:
    session = requests.Session()
    session.trust_env = False
    yield session
    session.close()


def png_base64(width: int = 400, height: int = 320, color: tuple[int, int, int] = (200, 30, 30),
               fmt: str = "PNG") -> str:
    """Raw base64 (no data: prefix) of a solid image with a stripe, as Kling wants it."""
    return image_b64(width, height, color, fmt=fmt, band=True)


def create_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model_name": "kling-v1-6",
        "image_list": [{"image": png_base64()}, {"image": png_base64(color=(30, 30, 200))}],
        "prompt": "a slow pan across two pictures",
        "mode": "std", "duration": "5", "aspect_ratio": "16:9",
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


def create(sim: SimHandle, http: requests.Session, **overrides: Any) -> requests.Response:
    return http.post(sim.base_url + CREATE_PATH, json=create_body(**overrides), headers=sim.auth_header(),
                     timeout=10)


def wait_task(sim: SimHandle, task_id: str, statuses: tuple[str, ...] = ("succeed", "failed"),
              timeout: float = 30.0) -> dict[str, Any]:
    """Poll the query endpoint until the task is in one of `statuses`."""

    def reached() -> dict[str, Any] | None:
        task = sim.task(task_id)
        return task if task["task_status"] in statuses else None

    return wait_until(reached, timeout=timeout, what=f"task {task_id} in {statuses}",
                      diagnostics=lambda: f"task now: {sim.task(task_id)}")


@dataclass
class Received:
    at: float
    path: str
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)  # names in lower case
    raw: bytes = b""


@dataclass
class CallbackListener:
    """A tiny HTTP server on a free port recording every POST; answers `statuses` in turn, then 200."""

    port: int
    received: list[Received] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    changed: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/callback"

    def statuses_received(self) -> list[str]:
        with self.lock:
            return [r.body["task_status"] for r in self.received]

    def wait_count(self, n: int, timeout: float = 30.0) -> list[Received]:
        with self.changed:
            if not self.changed.wait_for(lambda: len(self.received) >= n, timeout):
                raise TimeoutError(f"got {len(self.received)} callbacks, wanted {n}")
            return list(self.received)


@pytest.fixture()
def listener() -> Iterator[CallbackListener]:
    state = CallbackListener(port=free_port())

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with state.changed:
                status = state.statuses.pop(0) if state.statuses else 200
                if status == 200:
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    state.received.append(Received(time.time(), self.path, json.loads(body), headers, body))
                    state.changed.notify_all()
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", state.port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture()
def sim_logs(tmp_path: Path) -> Path:
    d = tmp_path / "sim-logs"
    d.mkdir()
    return d
