"""The task life cycle: submitted -> processing -> succeed | failed, with callbacks on every change.

A created task waits `submitted_seconds`, turns `processing`, and a small worker pool (so many tasks
never run many ffmpegs at once) fetches and checks its images and renders the video (or prepares a
synthetic one). The task turns final once both the render is done and `processing_seconds` have
passed. A status never goes back. `reset` bumps an epoch so work still running for old tasks is
discarded when it finishes.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kling_relay.simulator.callbacks import CallbackDispatcher
from kling_relay.simulator.errors import ApiError
from kling_relay.simulator.faults import Faults
from kling_relay.simulator.images import ImageError, load_image
from kling_relay.simulator.stats import Stats
from kling_relay.simulator.synthetic import SyntheticVideo
from kling_relay.simulator.tasks import FINAL, Task, TaskStore, Video, now_ms
from kling_relay.simulator.timers import Scheduler
from kling_relay.simulator.urls import UrlSigner
from kling_relay.simulator.validation import CreateRequest
from kling_relay.simulator.video import FfmpegRunner, RenderError, render_slideshow

log = logging.getLogger("simulator")
#: The video id of a result's watermarked copy is the video's id with this suffix.
WATERMARK_SUFFIX = "-watermarked"


@dataclass
class _Outcome:
    status: str
    message: str = ""
    video_id: str = ""
    duration: float = 0.0
    size: int = 0
    path: Path | None = None
    sha256: str | None = None


class Engine:
    def __init__(self, *, faults: Faults, stats: Stats, scheduler: Scheduler, dispatcher: CallbackDispatcher,
                 signer: UrlSigner, data_dir: Path, generation_workers: int = 2) -> None:
        self.store = TaskStore()
        self._faults = faults
        self._stats = stats
        self._scheduler = scheduler
        self._dispatcher = dispatcher
        self._signer = signer
        self._data_dir = data_dir
        self._pool = ThreadPoolExecutor(generation_workers, thread_name_prefix="sim-generate")
        self._runner = FfmpegRunner()
        self._epoch = 0

    # -- creating and moving tasks ---------------------------------------------------------------
    def create(self, request: CreateRequest) -> dict[str, Any]:
        """Store a new task (ApiError 1201 duplicate / 1303 cap), start its schedule, and return the
        task object as created (status 'submitted', even if the schedule moves on at once)."""
        knobs = self._faults.knobs
        try:
            task = self.store.create(request, max_in_flight=knobs.max_in_flight)
        except ApiError as exc:
            if exc.code == 1201 and request.external_task_id is not None:
                self._stats.duplicate_create(request.external_task_id)
            raise
        self._stats.task_created(task.task_id, request.external_task_id)
        created = task.to_json()
        self._notify(task, created)
        epoch = self._epoch
        self._scheduler.call_later(knobs.submitted_seconds, lambda: self._start_processing(task.task_id, epoch))
        return created

    def _change(self, task: Task, status: str, message: str = "", videos: list[Video] | None = None) -> None:
        with self.store.lock:
            if task.status in FINAL or task.status == status:
                return
            task.status = status
            task.status_msg = message
            task.videos = videos or []
            units = self._faults.knobs.final_units
            if status in FINAL and units > 0:
                task.units = f"{units:g}"
            task.updated_at = max(now_ms(), task.updated_at)
            payload = task.to_json()
        self._notify(task, payload)

    def _notify(self, task: Task, payload: dict[str, Any]) -> None:
        url = task.request.callback_url
        if url is None:
            return
        status = payload["task_status"]
        if status == "processing" and self._faults.knobs.callback_reorder:
            task.held_callback = payload
            return
        self._dispatcher.send(task.task_id, url, payload)
        if status in FINAL and task.held_callback is not None:
            held, task.held_callback = task.held_callback, None
            self._dispatcher.send(task.task_id, url, held)

    def _start_processing(self, task_id: str, epoch: int) -> None:
        task = self.store.get(task_id)
        if epoch != self._epoch or task is None or task.status != "submitted":
            return
        self._change(task, "processing")
        try:
            self._pool.submit(self._generate, task, epoch, time.monotonic())
        except RuntimeError:  # pool shut down: the simulator is stopping
            pass

    def _generate(self, task: Task, epoch: int, started: float) -> None:
        knobs = self._faults.knobs
        request = task.request
        try:
            if self._faults.hit("fail"):
                outcome = _Outcome("failed", knobs.fail_message)
            else:
                images = [load_image(v, i, timeout=knobs.image_fetch_timeout)
                          for i, v in enumerate(request.images)]
                video_id = str(uuid.uuid4())
                if knobs.video_bytes > 0:
                    outcome = _Outcome("succeed", video_id=video_id, duration=float(request.duration),
                                       size=knobs.video_bytes)
                else:
                    rendered = render_slideshow(
                        images, aspect_ratio=request.aspect_ratio, duration=request.duration,
                        fps=knobs.video_fps, out_path=self._data_dir / task.task_id / f"{video_id}.mp4",
                        runner=self._runner)
                    outcome = _Outcome("succeed", video_id=video_id, duration=rendered.duration,
                                       size=rendered.size, path=rendered.path, sha256=rendered.sha256)
        except (ImageError, RenderError) as exc:
            outcome = _Outcome("failed", str(exc))
        except Exception:
            log.exception("generation of task %s crashed", task.task_id)
            outcome = _Outcome("failed", "Internal error while generating the video")
        remaining = knobs.processing_seconds - (time.monotonic() - started)
        self._scheduler.call_later(remaining, lambda: self._finish(task, epoch, outcome))

    def _finish(self, task: Task, epoch: int, outcome: _Outcome) -> None:
        if epoch != self._epoch:
            if outcome.path is not None:
                outcome.path.unlink(missing_ok=True)
            return
        if outcome.status == "failed":
            self._change(task, "failed", outcome.message)
            return
        expires = int(time.time() + self._faults.knobs.url_ttl)
        watermark_url = (self._signer.url(task.task_id, outcome.video_id + WATERMARK_SUFFIX, expires)
                         if task.request.watermark else None)
        video = Video(id=outcome.video_id, url=self._signer.url(task.task_id, outcome.video_id, expires),
                      duration=f"{outcome.duration:.1f}", expires=expires, size=outcome.size,
                      path=outcome.path, sha256=outcome.sha256, watermark_url=watermark_url)
        self._change(task, "succeed", "", [video])

    # -- results and housekeeping ----------------------------------------------------------------
    def find_video(self, task_id: str, video_id: str) -> Video | None:
        """The video served at this id; `<video_id>-watermarked` is its watermarked copy (the same bytes here:
        the simulator draws no watermark), served only when the task asked for one."""
        task = self.store.get(task_id)
        if task is None or task.status != "succeed":
            return None
        if video_id.endswith(WATERMARK_SUFFIX):
            base = video_id[:-len(WATERMARK_SUFFIX)]
            return next((v for v in task.videos if v.id == base and v.watermark_url is not None), None)
        return next((v for v in task.videos if v.id == video_id), None)

    def video_stats(self) -> dict[str, list[dict[str, Any]]]:
        """Per succeeded task: id, size and sha256 of each video (synthetic hashes computed once)."""
        videos = [(t.task_id, v) for t in self.store.all() if t.status == "succeed" for v in t.videos]
        out: dict[str, list[dict[str, Any]]] = {}
        for task_id, video in videos:
            if video.sha256 is None:
                video.sha256 = SyntheticVideo(video.id, video.size).sha256()
            out.setdefault(task_id, []).append({"video_id": video.id, "size": video.size,
                                                "sha256": video.sha256, "synthetic": video.synthetic})
        return out

    def reset(self) -> None:
        """Forget all tasks, scheduled work and queued callbacks, and delete the rendered files."""
        self._epoch += 1
        self._scheduler.clear()
        self._dispatcher.reset()
        self.store.clear()
        for child in self._data_dir.iterdir():
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)

    def shutdown(self) -> None:
        self._epoch += 1
        self._runner.kill_all()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._dispatcher.shutdown()
        self._scheduler.stop()
