"""The command line: ready line, demo credentials, flags as knobs, clean stop on SIGTERM/SIGINT."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import requests

from tests.support.procs import free_port, wait_for_port
from tests.support.sim import REPO_ROOT, make_jwt

CREATE_URL = "http://127.0.0.1:{port}{prefix}/v1/videos/multi-image2video"


def launch(*args: str) -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "simulator", "--port", str(port), *args],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        wait_for_port(port, proc=proc)  # type: ignore[arg-type]
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, port


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_ready_line_and_clean_stop(sig: signal.Signals) -> None:
    proc, port = launch("--prefix", "kling/")
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        assert (ready["msg"], ready["url"]) == ("listening", f"http://127.0.0.1:{port}/kling")
        proc.send_signal(sig)
        assert proc.wait(timeout=15) == 0
        assert proc.stdout.read() == ""  # exactly one line
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_demo_credentials_and_knob_flags() -> None:
    proc, port = launch("--max-in-flight", "1", "--submitted-seconds", "60", "--callback-reorder")
    try:
        http = requests.Session()
        http.trust_env = False
        knobs = http.get(f"http://127.0.0.1:{port}/_sim/control", timeout=10).json()
        assert knobs["max_in_flight"] == 1 and knobs["callback_reorder"] is True
        token = make_jwt("demo-access-key", "demo-secret-key")
        body = {"image_list": [{"image": "aGVsbG8="}], "prompt": "p"}
        url = CREATE_URL.format(port=port, prefix="")
        first = http.post(url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert first.json()["code"] == 0
        second = http.post(url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert (second.status_code, second.json()["code"]) == (429, 1303)
        http.close()
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.parametrize("args", [
    ["--api-key", "k", "--access-key", "a", "--secret-key", "s"],
    ["--access-key", "a"],
    ["--rate-limit-probability", "3"],
    ["--server-error-code", "5003"],
])
def test_bad_flags_exit_with_usage(args: list[str]) -> None:
    out = subprocess.run([sys.executable, "-m", "simulator", "--port", "0", *args], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "usage:" in out.stderr


def test_help_documents_the_demo_keys() -> None:
    out = subprocess.run([sys.executable, "-m", "simulator", "--help"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    assert "demo-access-key" in out.stdout and "demo-secret-key" in out.stdout
    assert "--callback-drop-every-n" in out.stdout


def test_a_webhook_secret_that_is_not_base64_is_refused_at_start() -> None:
    out = subprocess.run([sys.executable, "-m", "simulator", "--port", "0", "--webhook-secret", "whsec_not*base64"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "whsec_" in out.stderr
