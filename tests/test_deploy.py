"""What the Procfile ships: the web process runs deploy/gunicorn.conf.py (gevent workers, JSON logs), and Celery
runs quiet (no banner in a JSON log). tests/e2e/test_web_process.py runs the same config against slow clients."""

from __future__ import annotations

import runpy
import shlex
import subprocess
from pathlib import Path

from gunicorn import glogging
from gunicorn.util import load_class

ROOT = Path(__file__).resolve().parents[1]


def procfile() -> dict[str, list[str]]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return {name: shlex.split(command) for name, command in (line.split(":", 1) for line in lines if line.strip())}


def test_web_runs_the_gunicorn_config_with_gevent_workers_and_json_logs() -> None:
    web = procfile()["web"]
    assert web[0] == "gunicorn" and web[web.index("--config") + 1] == "deploy/gunicorn.conf.py"
    conf = runpy.run_path(str(ROOT / "deploy" / "gunicorn.conf.py"))
    assert conf["worker_class"] == "gevent"
    assert 0 < conf["worker_connections"] <= 10_000
    assert "threads" not in conf and "access_log_format" not in conf
    assert issubclass(load_class(conf["logger_class"], section="gunicorn.loggers"), glogging.Logger)


def test_celery_processes_run_quiet() -> None:
    """As deploy/stack.py starts them (where tests/e2e/test_web_process.py checks their logs line by line)."""
    for name in ("worker", "beat"):
        argv = procfile()[name]
        assert argv[:4] == ["celery", "--quiet", "-A", "kling_relay.worker.celery_app"], name


def test_flower_listens_on_localhost_and_never_starts_without_basic_auth() -> None:
    """Issue 10.5: Flower shows every task and can be reached by anyone who reaches its port: the Procfile binds it
    to 127.0.0.1 unless FLOWER_ADDRESS says otherwise, and its shell refuses to start it without FLOWER_BASIC_AUTH."""
    command = (ROOT / "Procfile").read_text().split("\nflower:", 1)[1].splitlines()[0]
    argv = procfile()["flower"]
    assert argv[:4] == ["celery", "-A", "kling_relay.worker.celery_app", "flower"]
    env = {"PATH": "/usr/bin:/bin", "FLOWER_PORT": "5555"}
    unset = subprocess.run(["sh", "-c", f"echo {command}"], env=env, capture_output=True, text=True, timeout=10)
    assert unset.returncode != 0 and "FLOWER_BASIC_AUTH" in unset.stderr
    ok = subprocess.run(["sh", "-c", f"echo {command}"], env={**env, "FLOWER_BASIC_AUTH": "ops:secret"},
                        capture_output=True, text=True, timeout=10)
    assert ok.returncode == 0, ok.stderr
    assert "--address=127.0.0.1" in ok.stdout.split() and "--basic-auth=ops:secret" in ok.stdout.split()


def test_several_of_each_per_host() -> None:
    """Issue 12.4: each worker has its own node name on its host (WORKER_NAME to run several on one host), beat
    keeps no schedule file (the in-memory Scheduler), and gunicorn opens no control socket, which would be one
    path (~/.gunicorn/gunicorn.ctl) shared by every web process of a user on a host."""
    worker = procfile()["worker"]
    assert worker[worker.index("--hostname") + 1] == "${WORKER_NAME:-worker}@%h"
    beat = procfile()["beat"]
    assert beat[beat.index("--scheduler") + 1] == "celery.beat:Scheduler"
    conf = runpy.run_path(str(ROOT / "deploy" / "gunicorn.conf.py"))
    assert conf["control_socket_disable"] is True


def test_web_workers_recycle_rarely_and_not_together() -> None:
    """A recycled web worker imports and builds the app again (about 1.1 s of CPU, no preload_app: see the config's
    docstring): every 1,000 requests that added about 1.1 ms of CPU to each callback (bench/callbacks.py). Recycling
    stays on (a bound on a slow leak), each worker at its own count so that two never restart together."""
    conf = runpy.run_path(str(ROOT / "deploy" / "gunicorn.conf.py"))
    assert conf["max_requests"] >= 10_000
    assert conf["max_requests"] // 20 <= conf["max_requests_jitter"] < conf["max_requests"]
    assert not conf.get("preload_app", False)
