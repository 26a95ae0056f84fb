"""Render the result video: a real H.264 MP4 slideshow of the request's images.

Each image is letterboxed (Pillow) into the frame size of the requested aspect ratio, then the
ffmpeg binary shipped with imageio-ffmpeg encodes them with libx264, yuv420p, `+faststart`, at a low
frame rate, for exactly `duration * fps` frames. Running ffmpeg processes are tracked so shutdown can
kill them.
"""

from __future__ import annotations

import hashlib
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

FRAME_SIZES = {"16:9": (640, 360), "9:16": (360, 640), "1:1": (480, 480)}
FFMPEG_TIMEOUT = 120.0


class RenderError(Exception):
    """ffmpeg failed or timed out; str() is safe for task_status_msg."""


@dataclass(frozen=True)
class Rendered:
    path: Path
    size: int
    sha256: str
    duration: float


class FfmpegRunner:
    """Runs ffmpeg with a timeout and remembers live processes so `kill_all` can stop them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: set[subprocess.Popen[bytes]] = set()
        self._closed = False

    def run(self, argv: list[str], timeout: float) -> None:
        with self._lock:
            if self._closed:
                raise RenderError("the simulator is stopping")
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
            self._live.add(proc)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise RenderError("video rendering timed out") from None
        finally:
            with self._lock:
                self._live.discard(proc)
        if proc.returncode != 0:
            tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise RenderError(f"video rendering failed: {tail[0][:200]}")

    def kill_all(self) -> None:
        with self._lock:
            self._closed = True
            for proc in self._live:
                proc.kill()


def _frame_counts(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def sha256_file(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _ffmpeg_exe() -> str:
    """The ffmpeg binary of imageio-ffmpeg (the `simulator` extra: `pip install 'kling-relay[simulator]'`)."""
    try:
        import imageio_ffmpeg
    except ImportError as exc:
        raise RenderError("real MP4 output needs imageio-ffmpeg: pip install 'kling-relay[simulator]' "
                          "(or run the simulator with synthetic videos)") from exc
    exe: str = imageio_ffmpeg.get_ffmpeg_exe()
    return exe


def render_slideshow(images: list[Image.Image], *, aspect_ratio: str, duration: int, fps: int,
                     out_path: Path, runner: FfmpegRunner) -> Rendered:
    """Write the slideshow MP4 to out_path and return its size, sha256 and duration in seconds."""
    size = FRAME_SIZES[aspect_ratio]
    total_frames = duration * fps
    counts = _frame_counts(total_frames, len(images))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        argv = [_ffmpeg_exe(), "-hide_banner", "-nostdin", "-y", "-loglevel", "error"]
        inputs: list[str] = []
        for i, (img, frames) in enumerate(zip(images, counts, strict=True)):
            if frames == 0:
                continue
            frame_path = Path(tmp) / f"{i}.png"
            ImageOps.pad(img, size, color=(0, 0, 0)).save(frame_path, compress_level=1)
            argv += ["-loop", "1", "-framerate", str(fps), "-t", f"{frames / fps:.6f}", "-i", str(frame_path)]
            inputs.append(f"[{len(inputs)}:v]")
        graph = f"{''.join(inputs)}concat=n={len(inputs)}:v=1:a=0,format=yuv420p[v]"
        argv += ["-filter_complex", graph, "-map", "[v]", "-c:v", "libx264", "-preset", "ultrafast",
                 "-tune", "stillimage", "-pix_fmt", "yuv420p", "-r", str(fps),
                 "-frames:v", str(total_frames), "-movflags", "+faststart", "-f", "mp4", str(out_path)]
        runner.run(argv, FFMPEG_TIMEOUT)
    byte_size, digest = sha256_file(out_path)
    return Rendered(path=out_path, size=byte_size, sha256=digest, duration=total_frames / fps)
