"""Result URLs: signatures and expiry, ranges, synthetic videos, slow and truncated downloads."""

from __future__ import annotations

import hashlib
import time
from http.client import HTTPConnection, IncompleteRead
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from tests.simulator.conftest import create, wait_task
from tests.support.sim import SimHandle, running_simulator


def video_url(sim: SimHandle, http: requests.Session, **knobs: object) -> tuple[str, str]:
    if knobs:
        sim.control(**knobs)
    task_id = create(sim, http).json()["data"]["task_id"]
    task = wait_task(sim, task_id)
    assert task["task_status"] == "succeed", task
    return task_id, task["task_result"]["videos"][0]["url"]


def test_synthetic_video_size_and_sha256_in_stats(sim: SimHandle, http: requests.Session) -> None:
    task_id, url = video_url(sim, http, video_bytes=3_000_017)
    r = http.get(url, timeout=30)
    assert r.status_code == 200
    assert len(r.content) == int(r.headers["Content-Length"]) == 3_000_017
    assert r.content[4:8] == b"ftyp"
    stats = sim.stats()
    [video] = stats["videos"][task_id]
    assert video == {"video_id": video["video_id"], "size": 3_000_017, "synthetic": True,
                     "sha256": hashlib.sha256(r.content).hexdigest()}
    assert stats["downloads"][task_id] == {"started": 1, "completed": 1, "bytes_sent": 3_000_017}
    again = http.get(url, timeout=30)
    assert again.content == r.content  # deterministic


def test_range_requests(sim: SimHandle, http: requests.Session) -> None:
    _, url = video_url(sim, http, video_bytes=200_000)
    full = http.get(url, timeout=30).content
    part = http.get(url, headers={"Range": "bytes=70000-139999"}, timeout=30)
    assert part.status_code == 206
    assert part.headers["Content-Range"] == "bytes 70000-139999/200000"
    assert part.content == full[70000:140000]
    tail = http.get(url, headers={"Range": "bytes=-10"}, timeout=30)
    assert tail.status_code == 206 and tail.content == full[-10:]
    bad = http.get(url, headers={"Range": "bytes=300000-"}, timeout=30)
    assert bad.status_code == 416 and bad.headers["Content-Range"] == "bytes */200000"


def test_expired_url_is_refused(sim: SimHandle, http: requests.Session) -> None:
    _, url = video_url(sim, http, url_ttl=0, video_bytes=1000)
    r = http.get(url, timeout=10)
    assert r.status_code == 403
    assert "expired" in r.text


def test_url_cannot_be_extended_by_editing_it(sim: SimHandle, http: requests.Session) -> None:
    _, url = video_url(sim, http, video_bytes=1000)
    assert http.get(url, timeout=10).status_code == 200
    parts = urlsplit(url)
    expires = int(dict(p.split("=") for p in parts.query.split("&"))["expires"])
    assert expires > time.time() + 3000  # the default TTL is an hour
    forged = url.replace(f"expires={expires}", f"expires={expires + 86400}")
    assert http.get(forged, timeout=10).status_code == 403
    unsigned = url.split("?")[0]
    assert http.get(unsigned, timeout=10).status_code == 403


def test_reset_removes_videos(sim: SimHandle, http: requests.Session) -> None:
    _, url = video_url(sim, http)
    assert http.get(url, timeout=10).status_code == 200
    sim.reset()
    assert http.get(url, timeout=10).status_code == 404


def test_truncated_download_announces_the_full_length(sim: SimHandle, http: requests.Session) -> None:
    task_id, url = video_url(sim, http, video_bytes=500_000, download_truncate_bytes=123_456)
    parts = urlsplit(url)
    conn = HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
    conn.request("GET", f"{parts.path}?{parts.query}")
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Length") == "500000"
    with pytest.raises(IncompleteRead) as caught:
        response.read()
    conn.close()
    assert len(caught.value.partial) == 123_456
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        http.get(url, timeout=10)
    stats = sim.wait_for(lambda s: s["downloads"].get(task_id, {}).get("started") == 2)
    assert stats["downloads"][task_id]["completed"] == 0


def test_slow_download(sim: SimHandle, http: requests.Session) -> None:
    _, url = video_url(sim, http, video_bytes=100_000, download_rate=200_000)
    started = time.monotonic()
    body = http.get(url, timeout=30).content
    assert len(body) == 100_000
    assert time.monotonic() - started >= 0.45  # a lower bound only: 100 kB at 200 kB/s


def test_concurrent_downloads_and_api_calls(sim: SimHandle, http: requests.Session) -> None:
    _, url = video_url(sim, http, video_bytes=300_000, download_rate=300_000)
    slow = requests.Session()
    slow.trust_env = False
    with slow.get(url, timeout=30, stream=True) as r:
        first = next(r.iter_content(1000))
        # while that download is still running, the API answers
        assert http.get(f"{sim.root_url}/_sim/health", timeout=5).json() == {"ok": True}
        rest = b"".join(r.iter_content(65536))
    slow.close()
    assert len(first) + len(rest) == 300_000


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_half_gigabyte_synthetic_video_streams_in_constant_memory(sim_logs: Path) -> None:
    size = 512 * 1024 * 1024
    with running_simulator(sim_logs, "--submitted-seconds", "0", "--processing-seconds", "0",
                           "--video-bytes", str(size)) as sim:
        http = requests.Session()
        http.trust_env = False
        _, url = video_url(sim, http)
        digest = hashlib.sha256()
        received = 0
        with http.get(url, stream=True, timeout=60) as r:
            assert int(r.headers["Content-Length"]) == size
            for chunk in r.iter_content(1 << 20):
                digest.update(chunk)
                received += len(chunk)
        assert received == size
        stats = sim.stats()  # hashes the same stream again, server side
        [video] = next(iter(stats["videos"].values()))
        assert video["sha256"] == digest.hexdigest() and video["size"] == size
        assert vm_hwm_kib(sim.process.pid) < 200 * 1024
        http.close()
