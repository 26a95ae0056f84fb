"""What the operators' dashboard (`webhook/dashboard.py`) shows, read from Redis (and S3 for one job's manifest).

Every read is bounded whatever the number of jobs: counts are one ZCARD per state index, the chart and the
failure reasons come from per-minute counters (`shared/stats.py`), queue depths are one LLEN per Celery queue,
a job list is one page of an index (`JobStore.list`), a search is at most three direct lookups (job id, Kling
task id through `kr:jobs:by_task`, idempotency key through its `kr:idem:` record). Nothing here scans jobs.

The values returned are plain data: the templates escape all of it (job metadata, prompts and Kling's messages
are untrusted), and a job's images never come back as base64 text: `job_detail` lists them as URLs or as
numbered base64 images that `request_image` decodes for a thumbnail.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from kling_relay.shared import copy_flow, flow, stats, usage
from kling_relay.shared.inputs import is_job_id
from kling_relay.shared.jobs import Event, InvalidCursor, Job, JobNotFound, JobState, JobStore
from kling_relay.shared.ops import CANCELABLE, ActionRefused, retry_mode
from kling_relay.shared.queue import COPY_QUEUE, NOTIFY_QUEUE, RECONCILE_QUEUE, SUBMIT_QUEUE
from kling_relay.shared.reconcile import last_pass

if TYPE_CHECKING:  # handed in
    from kling_relay.shared.runtime import Runtime

log = logging.getLogger(__name__)

QUEUES: tuple[str, ...] = (SUBMIT_QUEUE, COPY_QUEUE, NOTIFY_QUEUE, RECONCILE_QUEUE)
PAGE_SIZE = 50
EVENTS_SHOWN = 200
PRESIGN_SECONDS = 3600
#: Strings longer than this in a shown manifest or request are cut (a stray base64 payload stays unshown).
SHOWN_STRING_CHARS = 500
_IMAGE_TYPES = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"))


def snapshot(store: JobStore, *, max_in_flight: int | None, budget: float | None,
             now: float | None = None) -> dict[str, Any]:
    """The relay's state in a few round trips, none per job (what `kling-relay top` draws and the dashboard's
    overview starts from): submission and copying (open or paused, why, since), jobs per state, tasks in flight
    against `max_in_flight`, Celery queue depths, units spent today and this month against `budget`."""
    at = time.time() if now is None else now
    client = store.redis
    pipe = client.pipeline(transaction=False)
    for queue in QUEUES:
        pipe.llen(queue)
    depths = dict(zip(QUEUES, (int(n) for n in pipe.execute()), strict=True))
    submission = flow.status(client)
    in_flight = submission["in_flight"]
    return {
        **submission,
        **copy_flow.status(client),
        "jobs": store.counts(),
        "in_flight_total": int(in_flight.get("submitted", 0)) + int(in_flight.get("processing", 0)),
        "max_in_flight": max_in_flight,
        "queues": depths,
        "units": usage.spent(client, now=at),
        "budget": budget,
        "now": at,
    }


def overview(rt: Runtime, *, now: float | None = None) -> dict[str, Any]:
    """The overview page: `snapshot` plus stored and failed per minute over the last hour, failures by reason
    over the last hour and the reconciler's last pass."""
    view = snapshot(rt.store, max_in_flight=rt.settings.kling_max_in_flight,
                    budget=rt.settings.kling_daily_unit_budget, now=now)
    at = view["now"]
    return {
        **view,
        "per_minute": stats.per_minute(rt.redis, now=at),
        "failed_reasons": stats.failed_reasons(rt.redis, now=at),
        "reconcile": last_pass(rt.redis),
    }


@dataclass(frozen=True)
class JobPage:
    jobs: list[Job]
    next_cursor: str | None
    found_by: str | None = None  # a search: "job id", "Kling task id", "idempotency key"
    problem: str | None = None


def find(rt: Runtime, query: str) -> JobPage:
    """One job by its id, its Kling task id or the Idempotency-Key that created it (one lookup per configured app
    for the key, which is scoped per app)."""
    query = query.strip()
    if is_job_id(query):
        job = rt.store.get(query)
        if job is not None:
            return JobPage([job], None, "job id")
    job = rt.store.find_by_task(query)
    if job is not None:
        return JobPage([job], None, "Kling task id")
    # keys are per app: the key of a job of no app, then each configured app's (a few HGETs)
    apps = [None, *(t.name for t in (*rt.settings.api_tokens, *(rt.settings.ops_tokens or ())))]
    for app in apps:
        job = rt.store.find_by_idempotency_key(query, app)
        if job is not None:
            return JobPage([job], None, "idempotency key")
    return JobPage([], None, None, "no job has this id, Kling task id or idempotency key")


def jobs_page(rt: Runtime, *, state: str | None, cursor: str | None, limit: int = PAGE_SIZE) -> JobPage:
    """One page of jobs, newest first, all or in one state; a bad state or cursor gives an empty page with why."""
    wanted: JobState | None = None
    if state:
        try:
            wanted = JobState(state)
        except ValueError:
            return JobPage([], None, None, "no such state")
    try:
        jobs, next_cursor = rt.store.list(state=wanted, limit=limit, cursor=cursor or None)
    except InvalidCursor:
        return JobPage([], None, None, "that page link is not valid any more: start from the first page")
    return JobPage(jobs, next_cursor)


def _shown(value: Any) -> Any:
    """`value` with every string over SHOWN_STRING_CHARS cut to a note of its length (nested too)."""
    if isinstance(value, str):
        return value if len(value) <= SHOWN_STRING_CHARS else f"<{len(value)} characters, not shown>"
    if isinstance(value, dict):
        return {str(k): _shown(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shown(v) for v in value]
    return value


def _images(request: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's images: `{"url": ...}` or `{"base64": n}` (its index, served by `request_image`), or
    `{"removed": True}` once the job is stored (the relay drops the payloads then)."""
    out: list[dict[str, Any]] = []
    if "image_list" in request:
        for index, item in enumerate(request.get("image_list") or []):
            image = str((item or {}).get("image", "")) if isinstance(item, dict) else ""
            out.append({"url": image} if image.startswith(("http://", "https://")) else {"base64": index})
    else:
        for image in request.get("images") or []:
            text = str(image)
            out.append({"url": text} if text.startswith(("http://", "https://")) else {"removed": True})
    return out


def _retry_refusal(job: Job) -> str | None:
    try:
        retry_mode(job)
    except ActionRefused as exc:
        return exc.reason
    return None


def job_detail(rt: Runtime, job_id: str) -> dict[str, Any] | None:
    """Everything the job page shows, or None for no such job: the job, its latest events, its request without
    image payloads (a stored job's from its manifest: the step into `stored` drops it from Redis), its stored videos
    with presigned S3 URLs (valid PRESIGN_SECONDS), its manifest (stored jobs only: one S3 read), and whether retry
    and cancel apply (with the reason when retry does not)."""
    job = rt.store.get(job_id)
    if job is None:
        return None
    events: list[Event] = rt.store.events(job_id, limit=EVENTS_SHOWN)
    try:
        request = rt.store.request(job_id)
    except JobNotFound:
        request = {}
    videos = []
    for video in job.videos:
        url = None
        try:
            url = rt.storage.s3.generate_presigned_url(
                "get_object", Params={"Bucket": video["bucket"], "Key": video["key"]}, ExpiresIn=PRESIGN_SECONDS)
        except Exception:  # no credentials to sign with: the page shows the location only
            log.warning("could not presign a video URL", extra={"job_id": job_id}, exc_info=True)
        videos.append({**_shown(video), "url": url})
    manifest: dict[str, Any] | None = None
    manifest_error = None
    if job.state is JobState.STORED:
        try:
            manifest = rt.storage.read_manifest(job.id, job.created_at)
        except Exception as exc:
            manifest_error = type(exc).__name__
    if not request and manifest is not None and isinstance(manifest.get("request"), dict):
        request = manifest["request"]
    return {
        "job": job,
        "public": _shown(job.public_dict()),
        "events": [_shown(e.as_dict()) for e in events],
        "request": _shown({k: v for k, v in request.items() if k not in ("image_list", "images")}),
        "images": _images(request),
        "videos": videos,
        "manifest": _shown(manifest) if manifest is not None else None,
        "manifest_error": manifest_error,
        "cancelable": job.state in CANCELABLE,
        "retry_refused": _retry_refusal(job) if job.state is JobState.FAILED else "only a failed job can be retried",
    }


def request_image(rt: Runtime, job_id: str, index: int) -> tuple[bytes, str] | None:
    """The bytes and media type of image `index` of a job's request when it is a base64 PNG or JPEG, else None."""
    try:
        request = rt.store.request(job_id)
    except JobNotFound:
        return None
    items = request.get("image_list") or []
    if not isinstance(items, list) or not 0 <= index < len(items) or not isinstance(items[index], dict):
        return None
    text = str(cast(dict[str, Any], items[index]).get("image", ""))
    if text.startswith(("http://", "https://")):
        return None
    try:
        data = base64.b64decode(text.split(",", 1)[-1], validate=False)
    except (binascii.Error, ValueError):
        return None
    for magic, media_type in _IMAGE_TYPES:
        if data.startswith(magic):
            return data, media_type
    return None
