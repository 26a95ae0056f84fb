"""Copy: stream a generated job's video(s) into S3, then mark it stored. A re-run after success does nothing.

A per-job lock, kept alive by a heartbeat while the copy runs, keeps a re-queued copy (the reconciler's, or a
redelivered message) from copying the same job at the same time: the second one returns `busy`. A worker killed
mid-copy stops the heartbeat, so the lock lapses within `JOB_LOCK_SECONDS` and the job can be rescued.

The task is read again from Kling for a fresh URL (never the callback's body), and must be this job's task. When
tasks cannot be read back (callbacks-only mode, `shared/kling_reads.py`), the URLs are those of the `succeed`
callback for the job's own task id (`shared/heard.py`), through the same allow-list and SSRF guard.

A setting that is wrong never costs the video (see `shared/copy_flow.py`): while copying is paused (storage
unusable) a copy leaves its job `generated` and due, without calling Kling or S3 and without using an attempt; an
S3 error that refuses every request alike (`StorageUnusable`) pauses copying; a result URL that VIDEO_URL_ALLOWLIST
refuses makes this job wait (reason `video_host_refused`, naming the host) until the list is widened, the job's
deadline, or the URL's expiry. These outcomes are `paused`.

The job's first copy run is `fresh`: no copy of it ran before (its `copy` attempt counter is 0 under the lock,
and no ops retry cleared an earlier one: `copy_ran`), so nothing of it can be in S3 and the copy neither reads
the manifest nor, for a short video, lists stale multipart uploads (`storage.copy_videos`): a 1 KiB video then
costs two S3 requests, its PutObject and the manifest's conditional create. Any later run (a retry, a
redelivery, the reconciler's re-queue after a crash) takes the careful path. `fresh` can be wrong (the counter's
write lost in a Redis failover, or cleared by an ops retry of a release without `copy_ran`, during a rolling
upgrade): the manifest is still created conditionally, and a multipart upload (a video over one part) lists and
aborts the key's open uploads whatever `fresh` says, so what a wrong `fresh` can cost is one rewrite of a short
video with the same bytes.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from kling_relay.shared import copy_flow, heard, metrics, usage
from kling_relay.shared.jobs import Job, JobState
from kling_relay.shared.kling import KlingError, KlingTask
from kling_relay.shared.kling_reads import reads_available
from kling_relay.shared.pipeline import common
from kling_relay.shared.pipeline.common import Budget, Failure, Outcome, fail, retry_or_fail
from kling_relay.shared.storage import CopyCanceled, CopyError, StorageUnusable, StoredVideo, copy_videos
from kling_relay.shared.urlguard import UrlRefused, redact_url

if TYPE_CHECKING:  # the wiring module is handed in, never imported at run time
    from kling_relay.shared.runtime import Runtime

log = logging.getLogger(__name__)


def copy_job(rt: Runtime, job_id: str) -> Outcome:
    """Copy a generated job's video(s) into S3, then mark it stored (see the module docstring)."""
    return common.under_job_lock(rt, "copy", job_id, JobState.GENERATED, _copy_locked)


def _copy_locked(rt: Runtime, job: Job) -> Outcome:
    assert job.kling_task_id is not None
    paused = copy_flow.current_pause(rt.redis)
    if paused is not None:
        return _wait(rt, job, {"waiting": "copy paused", "reason": paused["reason"], "code": paused["code"],
                               "message": paused["message"]}, counted=False)
    prior_wait = copy_flow.take_wait(rt.redis, job.id)
    # No copy of this job ever ran (read under the lock, before this run is counted): nothing of it can be in S3.
    fresh = job.attempts.get("copy", 0) == 0 and not job.copy_ran
    attempt = common.count_attempt(rt, job, "copy")
    budget = Budget("copy", attempt, rt.settings.copy_max_attempts,
                    Failure("copy_exhausted", f"could not copy the video after {attempt} attempts"))
    try:
        task = _result_task(rt, job.kling_task_id, job.id)
    except KlingError as exc:  # the copy never fails on Kling's word: a refusal retries within the budget
        return common.on_kling_error(rt, job.id, budget, exc, "re-reading task", refusal_fails=False)
    if task is None:
        rt.store.note(job.id, source="worker", detail={"copy": "no succeed callback with the video URL yet"})
        return retry_or_fail(rt, job.id, budget, "callbacks only: no succeed callback with the video URL yet")
    if task.task_id != job.kling_task_id or task.external_task_id not in (None, job.id):
        # Never store another job's video under this job's keys, whatever bound the task id.
        message = f"Kling task {task.task_id} belongs to {task.external_task_id!r}, not this job"
        fail(rt, job.id, Failure("copy_exhausted", message), source="worker")
        return Outcome.FAILED
    usage.record_deduction(rt.redis, job.id, task, now=rt.clock())  # once per job, whoever reports it first
    if task.status != "succeed" or not task.videos:
        rt.store.note(job.id, source="worker", detail={"copy": "task has no video", "kling_status": task.status})
        return retry_or_fail(rt, job.id, budget, "task has no video yet")
    recorded = _manifest_request(rt.store.request(job.id))
    started = time.monotonic()
    try:
        stored = _copy_videos(rt, job, task, recorded, fresh=fresh)
    except CopyCanceled:
        log.info("copy dropped: the job was canceled or ended meanwhile", extra={"job_id": job.id})
        return Outcome.SKIPPED
    except UrlRefused as exc:
        return _host_refused(rt, job, task, exc, prior_wait)
    except StorageUnusable as exc:
        copy_flow.pause(rt.redis, code=exc.code, message=str(exc), job_id=job.id)
        return _wait(rt, job, {"paused": copy_flow.STORAGE, "code": exc.code, "message": str(exc)}, counted=True)
    except CopyError as exc:
        return retry_or_fail(rt, job.id, budget, f"copy: {exc}")
    metrics.copied(sum(v.bytes for v in stored), time.monotonic() - started)
    return _mark_stored(rt, job, stored, recorded)


def _result_task(rt: Runtime, task_id: str, job_id: str) -> KlingTask | None:
    """The task with its video URLs: read from Kling (a fresh URL), or as its callback reported it (callbacks only)."""
    if reads_available(rt):
        return rt.kling.get_task(task_id)  # never trust the callback body for the URL when Kling can be asked
    return heard.heard(rt.redis, job_id, task_id)


def _wait(rt: Runtime, job: Job, detail: dict[str, Any], *, counted: bool, due_in: float | None = None) -> Outcome:
    """Leave the job `generated`, with a note saying why, due again after the probe interval (or `due_in`).

    `counted`: this run counted a copy attempt; it is given back (the wait is not the job's fault).
    """
    if counted:
        rt.store.bump_attempt(job.id, "copy_throttled")
    if detail:
        rt.store.note(job.id, source="worker", detail=detail)
    probe = rt.settings.kling_pause_probe_seconds
    rt.store.set_due(job.id, probe if due_in is None else min(probe, due_in))
    return Outcome.PAUSED


def _host_refused(rt: Runtime, job: Job, task: KlingTask, exc: UrlRefused,
                  prior: dict[str, Any] | None) -> Outcome:
    """The allow-list refused a result URL: wait for the operator to widen it (see `shared/copy_flow.py`).

    Fails the job only when no allow-list entry could allow the URL (a malformed URL, another scheme), or when the
    URL carries an expiry that has passed. The note and the warning are written when the wait begins (or its host
    changes), not on every re-check.
    """
    if exc.host is None:
        fail(rt, job.id, Failure("copy_exhausted", f"video URL refused: {exc.reason}"), source="worker")
        return Outcome.FAILED
    now = time.time()
    expiries = [e for e in (copy_flow.url_expiry(v.url) for v in task.videos) if e is not None]
    expiry = min(expiries, default=None)
    if expiry is not None and expiry <= now:
        message = (f"video URL expired while its host was refused ({exc.reason}): widen VIDEO_URL_ALLOWLIST "
                   f"and retry the job for a fresh URL")
        fail(rt, job.id, Failure("copy_exhausted", message), source="worker")
        return Outcome.FAILED
    until = min((t for t in (expiry, job.deadline_at) if t is not None), default=None)
    same = prior is not None and prior["reason"] == copy_flow.VIDEO_HOST_REFUSED and prior["host"] == exc.host
    copy_flow.wait(rt.redis, job.id, reason=copy_flow.VIDEO_HOST_REFUSED, host=exc.host, message=exc.reason,
                   until=until, since=prior["since"] if same and prior is not None else None)
    detail: dict[str, Any] = {}
    if not same:
        detail = {"waiting": copy_flow.VIDEO_HOST_REFUSED, "host": exc.host, "message": exc.reason}
        log.warning("copy waits: video URL host refused by VIDEO_URL_ALLOWLIST",
                    extra={"job_id": job.id, "host": exc.host, "url": redact_url(task.videos[0].url),
                           "reason": exc.reason})
    else:
        log.info("copy still waits: video URL host refused", extra={"job_id": job.id, "host": exc.host})
    return _wait(rt, job, detail, counted=True, due_in=None if expiry is None else expiry - now)


def _copy_videos(rt: Runtime, job: Job, task: KlingTask, recorded: dict[str, Any], *,
                 fresh: bool) -> list[StoredVideo]:
    for video in task.videos:  # scheme/host/port first, before touching S3 (addresses are checked on connect)
        rt.allowlist.match(video.url)
    return copy_videos(
        job.id, job.created_at, task.task_id, [(v.id, v.url, v.duration, v.watermark_url) for v in task.videos],
        rt.storage, rt.allowlist, rt.http,
        extra_manifest={"metadata": job.metadata, "request": recorded, **_billing(rt, job)},
        max_bytes=rt.settings.max_video_bytes, still_wanted=lambda: common.in_state(rt, job.id, JobState.GENERATED),
        fresh=fresh,
    )


def _billing(rt: Runtime, job: Job) -> dict[str, Any]:
    """What Kling billed for the job, as recorded on it (None when Kling has not said): the manifest's `units`
    and `balance_deduction`."""
    public = rt.store.require(job.id).public_dict()
    return {"units": public["units"], "balance_deduction": public["balance_deduction"]}


def _mark_stored(rt: Runtime, job: Job, stored: list[StoredVideo], recorded: dict[str, Any]) -> Outcome:
    videos = [v.as_dict() for v in stored]
    result = rt.store.step(job.id, JobState.STORED, source="worker", detail={"videos": len(videos)},
                           set_fields={"videos": videos}, only_from=[JobState.GENERATED], due_in=None)
    if not result.applied and result.job.state is not JobState.STORED:
        # Canceled or ended between the manifest and this step: take the result back out of S3.
        rt.storage.delete([*(v["key"] for v in videos), rt.storage.manifest_key(job.id, job.created_at)])
        log.warning("copy withdrawn: the job ended meanwhile", extra={"job_id": job.id,
                                                                     "state": result.job.state.value})
        return Outcome.SKIPPED
    if result.applied:
        log.info("stored", extra={"job_id": job.id, "keys": [v["key"] for v in videos]})
        common.finished(rt, result.job)
    return Outcome.STORED


def copy_overran(rt: Runtime, job_id: str) -> Outcome:
    """The copy hit its time limit (the worker's soft limit): count it like any failed copy attempt."""
    job = rt.store.get(job_id)
    if job is None or job.state is not JobState.GENERATED:
        return Outcome.SKIPPED
    attempt = job.attempts.get("copy", 0) - job.attempts.get("copy_throttled", 0)
    budget = Budget("copy", attempt, rt.settings.copy_max_attempts,
                    Failure("copy_exhausted", f"the copy overran its time limit ({attempt} attempts)"))
    return retry_or_fail(rt, job_id, budget, "copy overran its time limit")


def _manifest_request(request: dict[str, Any]) -> dict[str, Any]:
    """The request as the manifest records it: everything but the images' base64 payloads (idempotent)."""
    if "image_list" not in request:
        return request  # already recorded this way (a stored job's request)
    images = [item["image"] if str(item.get("image", "")).startswith(("http://", "https://")) else "<base64>"
              for item in request.get("image_list", [])]
    return {**{k: v for k, v in request.items() if k != "image_list"}, "images": images}
