"""Graceful shutdown (issue 12 item 4): SIGTERM, as a container runtime or a process manager sends it to the
process it started (the Celery parent, the gunicorn master), in the middle of work.

- A worker SIGTERMed in the middle of a copy (slow downloads) finishes the copy before it exits (Celery's warm
  shutdown; the task is acknowledged late, so a worker that is killed instead hands it back): every job ends
  stored once, each video downloaded once and written once, no multipart upload left open.
- The web process SIGTERMed while a callback's body is still arriving stops accepting connections but answers
  that callback (gunicorn's graceful_timeout).
- Two web processes of one user on one host do not open a shared control socket (gunicorn 25.1+ would put one at
  ~/.gunicorn/gunicorn.ctl for both; deploy/gunicorn.conf.py turns it off).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy.procs import free_port, wait_for_port
from deploy.stack import LocalStack
from tests.e2e.conftest import job_body, submit, wait_jobs
from tests.e2e.faults_conftest import assert_stored_once, fault_stack, get_jobs, needs_reconciler, wait_until
from tests.e2e.test_pipeline import callback_token_for

pytestmark = [pytest.mark.e2e, needs_reconciler]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with fault_stack(tmp_path_factory.mktemp("faults-shutdown")) as stack:
        yield stack


def open_upload_jobs(stack: LocalStack, ids: list[str]) -> set[str]:
    keys = [u["Key"] for u in stack.multipart_uploads()]
    return {job_id for job_id in ids if any(f"/{job_id}/" in key for key in keys)}


def test_worker_sigterm_mid_copy_finishes_the_copy(stack: LocalStack) -> None:
    stack.sim_reset()
    # 12 MiB served at 1 MB/s: each copy opens its multipart upload once it has read a part (8 MiB, after about
    # eight seconds; a shorter video goes up in one PutObject at the end) and spends four more seconds inside its
    # download with the upload open
    stack.sim_control(video_bytes=12 * 1024 * 1024, download_rate=1_000_000)
    ids = [submit(stack, job_body(6000 + n)) for n in range(3)]

    def all_copying() -> bool:
        jobs = get_jobs(stack, ids)
        return all(j["state"] == "generated" for j in jobs.values()) and open_upload_jobs(stack, ids) == set(ids)

    wait_until(all_copying, timeout=60, what="three copies in flight", stack=stack)
    worker = stack.processes["worker1"]
    os.kill(worker.pid, signal.SIGTERM)  # the parent only, as docker/Kubernetes do (not the process group)
    assert worker.proc.wait(120) == 0  # warm shutdown: it waited for the copies
    jobs = get_jobs(stack, ids)
    assert {j["state"] for j in jobs.values()} == {"stored"}, {k: j["state"] for k, j in jobs.items()}
    downloads = stack.sim_stats()["downloads"]
    assert sorted(d["completed"] for d in downloads.values()) == [1, 1, 1], downloads  # no copy started again
    stack.restart("worker1")
    stack.sim_control(download_rate=0)
    assert_stored_once(stack, jobs)
    # and the restarted worker has nothing of these jobs left to do
    fresh = submit(stack, job_body(6010))
    assert wait_jobs(stack, [fresh], timeout=60)[fresh]["state"] == "stored"
    assert_stored_once(stack, get_jobs(stack, ids))


def test_web_sigterm_answers_the_callback_in_flight(stack: LocalStack) -> None:
    stack.sim_reset()
    job_id = submit(stack, job_body(6100))
    job = wait_jobs(stack, [job_id], timeout=60)[job_id]
    assert job["state"] == "stored"
    task = {"task_id": job["kling_task_id"], "task_status": "succeed", "task_status_msg": "",
            "task_info": {"external_task_id": job_id}, "created_at": 1, "updated_at": 2,
            "task_result": {"videos": [{"id": "v", "url": "http://127.0.0.1:1/v.mp4", "duration": "5"}]}}
    body = json.dumps(task).encode()
    path = f"/callbacks/kling/{job_id}?token={callback_token_for(job_id)}"
    head = (f"POST {path} HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    web = stack.processes["web"]
    with socket.create_connection(("127.0.0.1", stack.web_port), timeout=10) as conn:
        conn.sendall(head + body[:10])
        time.sleep(0.5)  # the worker's greenlet is now in the view, reading the body
        os.kill(web.pid, signal.SIGTERM)

        def refusing() -> bool:
            try:
                socket.create_connection(("127.0.0.1", stack.web_port), timeout=1).close()
            except OSError:
                return True
            return False

        wait_until(refusing, timeout=10, what="web stops accepting connections", stack=stack)
        conn.sendall(body[10:])
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    status_line = answer.split(b"\r\n", 1)[0]
    assert status_line == b"HTTP/1.1 200 OK", answer[:300]
    reply: dict[str, Any] = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert reply["ok"] is True and reply["applied"] is False  # a duplicate: changes nothing
    assert web.proc.wait(30) == 0
    stack.restart("web")
    stack.wait_ready()


def test_two_web_processes_open_no_shared_control_socket(stack: LocalStack, tmp_path: Path) -> None:
    """gunicorn 27 with the default config would create ~/.gunicorn/gunicorn.ctl (or $XDG_RUNTIME_DIR's)."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in stack.env.items()}
    env.update({"HOME": str(home), "XDG_RUNTIME_DIR": str(home)})
    names = []
    for n in range(2):
        port = free_port()
        name = f"web-extra-{n}"
        argv = [stack.python, "-m", "gunicorn", "--config", "deploy/gunicorn.conf.py", "--bind",
                f"127.0.0.1:{port}", "--workers", "1", "kling_relay.webhook.wsgi:app"]
        stack._spawn(name, argv, port, env={**os.environ, **env, "PORT": str(port)})
        wait_for_port(port, proc=stack.processes[name].proc, timeout=60)
        names.append(name)
    try:
        assert [p for p in home.rglob("*") if p.name.endswith(".ctl")] == []
    finally:
        for name in names:
            stack.processes.pop(name).stop()
