"""Copy flow control, shared by every process through Redis: the storage pause and the jobs waiting on a setting.

When a job is `generated`, Kling has made (and billed) its video. A copy error that no retry can fix is a setting
to correct, and must not cost that video; two kinds exist, handled differently:

- **Storage unusable** (`storage.StorageUnusable`: no bucket, access denied, no or bad credentials, a wrong
  region). Every copy would fail alike, so copying pauses for everyone, the way an account error pauses
  submission (`flow`): `pause` records reason `storage`, S3's code and message, since when. While paused a copy
  leaves its job `generated` without calling Kling or S3 and without using an attempt, due again after
  KLING_PAUSE_PROBE_SECONDS, and the reconciler does not re-queue copies; `GET /v1/status` says why. The
  reconciler probes storage (`Storage.probe`: HEAD bucket, a tiny object written and deleted under the prefix)
  every KLING_PAUSE_PROBE_SECONDS and resumes on success; an operator resumes with `POST /v1/copy/resume`
  (`Relay.resume_copy`, `kling-relay copy resume`). A probe that writes is a fair test: it needs what a copy needs.
- **Video host refused** (the result URL's host is not on VIDEO_URL_ALLOWLIST, or resolves to an address only an
  entry naming it may allow): a wait of that one job (`wait`), not a global pause. The allow-list is a setting of
  each worker process, read at start: only the operator can widen it (and restart the workers), so no probe could
  end a pause, and the other jobs, whose URLs are on the list, must keep copying meanwhile — one odd host must not
  stop every copy. The job stays `generated` with reason `video_host_refused` naming the host (in its timeline,
  in `GET /v1/status` under `copy_waiting`, and in a warning log line), due again every
  KLING_PAUSE_PROBE_SECONDS: the reconciler then re-queues its copy, which re-reads the task from Kling and copies
  as soon as a worker with a wider list takes it. The wait ends at the job's deadline (the reconciler fails it
  `timed_out`, saying what it waited for) or at the URL's expiry when the URL carries one (`url_expiry`; the copy
  fails it `copy_exhausted`), whichever comes first.

Keys (`keys`): `kr:flow:copy_pause` (hash), `kr:flow:copy_probe` (a recent probe's mark, expires after the probe
interval), `kr:flow:copy_waits` (hash: job id → JSON `{reason, host, message, since, until}`). Waits of jobs no
longer `generated` (stored, canceled, failed) or past their `until` are dropped when `waiting` reads them.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from typing import Any, cast
from urllib.parse import parse_qsl, urlsplit

import redis

from kling_relay.shared import keys
from kling_relay.shared.jobs_model import iso_utc, json_object

log = logging.getLogger(__name__)

STORAGE = "storage"
VIDEO_HOST_REFUSED = "video_host_refused"
MAX_LISTED_WAITS = 100
# Query parameters that carry a signed URL's expiry as Unix seconds (CDNs, OSS, our simulator).
_EXPIRY_PARAMS = ("expires", "x-expires", "expire", "x-oss-expires")


# --- the storage pause --------------------------------------------------------------------------------------------

def pause(client: redis.Redis, *, code: str, message: str, job_id: str | None = None) -> bool:
    """Pause copying because storage refuses every request; True if it was not paused before.

    A repeated pause keeps `since`, updates code and message and counts `hits`.
    """
    now = repr(time.time())
    pipe = client.pipeline(transaction=True)
    pipe.hsetnx(keys.COPY_PAUSE, "since", now)
    pipe.hset(keys.COPY_PAUSE, mapping={"reason": STORAGE, "code": code, "message": message[:500],
                                        "job_id": job_id or "", "updated_at": now})
    pipe.hincrby(keys.COPY_PAUSE, "hits", 1)
    newly = bool(pipe.execute()[0])
    if newly:
        log.error("copying paused: storage refuses every request", extra={"code": code, "error": message[:500],
                                                                           "job_id": job_id})
    return newly


def current_pause(client: redis.Redis) -> dict[str, Any] | None:
    """The pause in force, decoded (`{"reason": "storage", "code", "message", "since", "updated_at", "job_id",
    "hits"}`, times ISO-8601 UTC), or None."""
    raw = cast(dict[str, str], client.hgetall(keys.COPY_PAUSE))
    return _decode_pause(raw) if raw else None


def resume(client: redis.Redis, *, by: str = "ops") -> dict[str, Any] | None:
    """Clear the pause (the ops action, or the reconciler's probe). Returns the pause that was cleared, or None.

    Waiting jobs are not copied here: the reconciler re-queues their copies as they come due (within the probe
    interval).
    """
    pipe = client.pipeline(transaction=True)
    pipe.hgetall(keys.COPY_PAUSE)
    pipe.delete(keys.COPY_PAUSE)
    raw = cast(dict[str, str], pipe.execute()[0])
    if not raw:
        return None
    record = _decode_pause(raw)
    log.warning("copying resumed", extra={"by": by, "code": record["code"]})
    return record


def claim_probe(client: redis.Redis, every: float) -> bool:
    """True at most once per `every` seconds across all processes: whether the caller should probe storage now."""
    return bool(client.set(keys.COPY_PROBE, "1", nx=True, px=max(1, int(every * 1000))))


def _decode_pause(raw: dict[str, str]) -> dict[str, Any]:
    return {
        "reason": raw.get("reason", STORAGE),
        "code": raw.get("code") or None,
        "message": raw.get("message", ""),
        "since": _when(raw.get("since")),
        "updated_at": _when(raw.get("updated_at")),
        "job_id": raw.get("job_id") or None,
        "hits": int(raw.get("hits", "0")),
    }


def _when(value: str | float | None) -> str | None:
    return iso_utc(float(value)) if value not in (None, "") else None


# --- jobs waiting on a setting ------------------------------------------------------------------------------------

def wait(client: redis.Redis, job_id: str, *, reason: str, host: str | None, message: str,
         until: float | None, since: float | None = None) -> None:
    """Record that this job's copy waits (reason, the host concerned, why, until when it may wait)."""
    record = {"reason": reason, "host": host, "message": message[:500],
              "since": time.time() if since is None else since, "until": until}
    client.hset(keys.COPY_WAITS, job_id, json.dumps(record))


def take_wait(client: redis.Redis, job_id: str) -> dict[str, Any] | None:
    """Remove this job's wait and return it as recorded (`since`, `until` as Unix seconds), or None."""
    pipe = client.pipeline(transaction=True)
    pipe.hget(keys.COPY_WAITS, job_id)
    pipe.hdel(keys.COPY_WAITS, job_id)
    raw = cast(str | None, pipe.execute()[0])
    return _load(raw)


def wait_of(client: redis.Redis, job_id: str) -> dict[str, Any] | None:
    """This job's wait as recorded (`since`, `until` as Unix seconds), or None."""
    return _load(cast(str | None, client.hget(keys.COPY_WAITS, job_id)))


def waiting(client: redis.Redis, *, now: float | None = None) -> list[dict[str, Any]]:
    """Every job waiting on a setting, oldest first: `{"job_id", "reason", "host", "message", "since", "until"}`
    (times ISO-8601 UTC). Waits of jobs no longer `generated`, or past their `until`, are dropped here."""
    now = time.time() if now is None else now
    raw = cast(dict[str, str], client.hgetall(keys.COPY_WAITS))
    if not raw:
        return []
    pipe = client.pipeline(transaction=False)
    for job_id in raw:
        pipe.hget(keys.job(job_id), "state")
    states = cast(list[str | None], pipe.execute())
    live: list[dict[str, Any]] = []
    stale: list[str] = []
    for (job_id, text), state in zip(raw.items(), states, strict=True):
        record = _load(text)
        if record is None or state != "generated" or (record["until"] is not None and record["until"] <= now):
            stale.append(job_id)
        else:
            live.append({"job_id": job_id, **record})
    if stale:
        client.hdel(keys.COPY_WAITS, *stale)
    live.sort(key=lambda w: (w["since"], w["job_id"]))
    return [{**w, "since": _when(w["since"]), "until": _when(w["until"])} for w in live]


def _load(raw: str | None) -> dict[str, Any] | None:
    record = json_object(raw)
    if record is None:
        return None
    return {"reason": str(record.get("reason", "")), "host": record.get("host"),
            "message": str(record.get("message", "")), "since": float(record.get("since") or 0),
            "until": None if record.get("until") is None else float(record["until"])}


def url_expiry(url: str) -> float | None:
    """When a signed URL stops working (Unix seconds), if it says: an `Expires`-style parameter holding Unix
    seconds, or AWS/GCS-style `X-Amz-Date` + `X-Amz-Expires` (`X-Goog-…`); None when the URL does not tell."""
    try:
        params = {name.lower(): value for name, value in parse_qsl(urlsplit(url).query)}
    except ValueError:
        return None
    for name in _EXPIRY_PARAMS:
        value = params.get(name, "")
        if value.isdigit() and 10**9 <= int(value) < 10**11:
            return float(value)
    for vendor in ("amz", "goog"):
        signed_at, lifetime = params.get(f"x-{vendor}-date", ""), params.get(f"x-{vendor}-expires", "")
        if signed_at and lifetime.isdigit():
            try:
                start = datetime.strptime(signed_at, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
            except ValueError:
                return None
            return start + int(lifetime)
    return None


# --- the view ---------------------------------------------------------------------------------------------------

def status(client: redis.Redis) -> dict[str, Any]:
    """Copy state for /healthz and the ops views: `{"copy": "open" | "paused", "copy_pause": None | {...} (see
    `current_pause`), "copy_waiting": {"count", "jobs": [...] (the oldest MAX_LISTED_WAITS, see `waiting`)}}`.
    Never contains a secret (S3 codes and messages name the action and the code only)."""
    record = current_pause(client)
    waits = waiting(client)
    return {"copy": "paused" if record else "open", "copy_pause": record,
            "copy_waiting": {"count": len(waits), "jobs": waits[:MAX_LISTED_WAITS]}}


def state(client: redis.Redis) -> str:
    """`open` or `paused` (for /healthz)."""
    return "paused" if client.exists(keys.COPY_PAUSE) else "open"
