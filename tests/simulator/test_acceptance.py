"""Acceptance: use the simulator exactly as Kling's docs tell a client to, with no project code.

JWT built by hand from AK/SK, a create with two base64 images and a callback_url on a local listener,
callbacks submitted -> processing -> succeed, lookup by external_task_id, download of the result URL,
and ffmpeg's own reading of the file: H.264 in MP4, the requested aspect ratio, the requested duration.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import struct
import subprocess
import time
import uuid
from pathlib import Path

import imageio_ffmpeg
import pytest
import requests

from tests.simulator.conftest import CallbackListener, png_base64
from tests.support.sim import SimHandle


def kling_jwt(access_key: str, secret_key: str) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    now = int(time.time())
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64(json.dumps({"iss": access_key, "exp": now + 1800, "nbf": now - 5}).encode())
    sig = hmac.new(secret_key.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(sig)}"


def probe(path: Path) -> dict[str, object]:
    """What ffmpeg says about the file when it decodes every frame."""
    out = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path),
                          "-f", "null", "-"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    err = out.stderr
    h, m, s = re.search(r"Duration: (\d+):(\d+):([\d.]+)", err).groups()  # type: ignore[union-attr]
    video = re.search(r"Stream #0:0.*?: Video: (\w+).*?, (\w+)\(.*?, (\d+)x(\d+)", err)
    assert video is not None, err
    return {"container": "mp4" if "Input #0, mov,mp4" in err else err[:200],
            "duration": int(h) * 3600 + int(m) * 60 + float(s), "codec": video.group(1),
            "pix_fmt": video.group(2), "size": (int(video.group(3)), int(video.group(4)))}


def top_level_boxes(path: Path) -> list[str]:
    data = path.read_bytes()
    boxes, pos = [], 0
    while pos + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if size == 1:
            size = struct.unpack(">Q", data[pos + 8:pos + 16])[0]
        boxes.append(kind.decode("latin-1"))
        if size < 8:
            break
        pos += size
    return boxes


@pytest.mark.parametrize(("aspect_ratio", "duration", "frame"), [
    ("16:9", "5", (640, 360)),
    ("9:16", "10", (360, 640)),
])
def test_kling_flow_end_to_end(sim: SimHandle, listener: CallbackListener, tmp_path: Path,
                               aspect_ratio: str, duration: str, frame: tuple[int, int]) -> None:
    assert sim.access_key is not None and sim.secret_key is not None
    http = requests.Session()
    http.trust_env = False
    headers = {"Authorization": f"Bearer {kling_jwt(sim.access_key, sim.secret_key)}",
               "Content-Type": "application/json"}
    external_id = f"job-{uuid.uuid4()}"
    body = {
        "model_name": "kling-v1-6",
        "image_list": [{"image": png_base64(640, 480, (220, 40, 40))},
                       {"image": png_base64(320, 400, (40, 40, 220), fmt="JPEG")}],
        "prompt": "two pictures, gently animated",
        "negative_prompt": "blur",
        "mode": "std",
        "duration": duration,
        "aspect_ratio": aspect_ratio,
        "callback_url": listener.url,
        "external_task_id": external_id,
    }
    created = http.post(f"{sim.base_url}/v1/videos/multi-image2video", data=json.dumps(body),
                        headers=headers, timeout=10)
    assert created.status_code == 200
    envelope = created.json()
    assert set(envelope) == {"code", "message", "request_id", "data"}
    assert envelope["code"] == 0
    task = envelope["data"]
    assert task["task_status"] == "submitted"
    assert task["task_info"] == {"external_task_id": external_id}
    task_id = task["task_id"]

    callbacks = listener.wait_count(3)
    assert [c.body["task_status"] for c in callbacks] == ["submitted", "processing", "succeed"]
    assert all(c.body["task_id"] == task_id for c in callbacks)
    final = callbacks[-1].body
    assert final["task_info"]["external_task_id"] == external_id
    assert final["updated_at"] >= final["created_at"]

    queried = http.get(f"{sim.base_url}/v1/videos/multi-image2video/{external_id}", headers=headers,
                       timeout=10).json()
    assert queried["code"] == 0 and queried["request_id"] != envelope["request_id"]
    result = queried["data"]
    assert result["task_id"] == task_id and result["task_status"] == "succeed"
    [video] = result["task_result"]["videos"]
    assert float(video["duration"]) == pytest.approx(float(duration), abs=0.5)

    download = http.get(video["url"], timeout=30, stream=True)
    assert download.status_code == 200
    assert download.headers["Content-Type"] == "video/mp4"
    path = tmp_path / "result.mp4"
    with path.open("wb") as f:
        for chunk in download.iter_content(65536):
            f.write(chunk)
    assert path.stat().st_size == int(download.headers["Content-Length"])

    info = probe(path)
    assert info["container"] == "mp4"
    assert info["codec"] == "h264"
    assert info["pix_fmt"] == "yuv420p"
    assert info["size"] == frame
    assert info["duration"] == pytest.approx(float(duration), abs=0.5)
    boxes = top_level_boxes(path)
    assert boxes.index("moov") < boxes.index("mdat"), boxes  # +faststart

    stats = sim.stats()
    [served] = stats["videos"][task_id]
    assert served["size"] == path.stat().st_size
    assert served["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert stats["tasks_by_external_id"] == {external_id: [task_id]}
    assert [c["status"] for c in stats["callbacks"][task_id]] == ["submitted", "processing", "succeed"]
