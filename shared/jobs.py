"""The job store: one Redis hash per job, moved through its states by atomic, monotonic steps.

Every state change is one Lua script (`shared/jobs_lua.py`) that checks the current state, writes the new one
with its fields and `updated_at`, appends an event to the job's timeline, moves the job between the state indexes
and updates the due index. A step that would go backwards, repeat the current state or leave a terminal state
changes nothing and records nothing (`applied=False`); only the explicit ops action `retry` leaves a terminal
state (failed → queued).

Keys (the layout is written once, in `shared/keys.py`): the job's hash (field encoding in `shared/jobs_model.py`),
its request (the normalized Kling request as JSON, images included, read only by `request()`; the step into
`stored` deletes it, with what the callbacks said) and its timeline (lines in the job hash, or for a job written
before 2026-12-08 or a long timeline its own list; oldest first, capped at `max_events`); the `all` and
per-state indexes (sorted sets, score = created_at: listing newest first); per app, its listing index and
per-state indexes of its non-terminal jobs (`keys.app_jobs`, `keys.app_jobs_in_state`: an app's list, active
count and in-flight share); the due index (score = when the reconciler should look next; terminal jobs are never
in it); idempotency records (the job id and 96 bits of the sha256 of the canonical body, one string); the
outbox (a sorted set of `<id>|<state>|<at>`, score = at: steps still to be announced to the consumers' stream and
notifications, added by the step itself, removed once announced: `Transition`, `unannounced`, `announced`).

The client must be created with `decode_responses=True` (e.g. `redis.Redis.from_url(url,
decode_responses=True)`); the constructor refuses any other. The scripts touch keys they compute from the job key,
so this needs a standalone (or Sentinel-managed) Redis, not Redis Cluster.

With `job_ttl_seconds`, a job's hash and timeline expire that long after it enters a terminal state (a retry
removes the expiry) and an idempotency key expires that long after the create. Their index entries go with the
sweep (`sweep()`, run by every reconciler pass), so Redis memory stays bounded by the jobs still alive: in the
`all` index, the terminal state indexes (stored, failed, canceled) and each app's listing index, only entries
created more than `job_ttl_seconds` ago can belong to an expired job (a job expires at the earliest that long after
its creation), so only those are candidates, oldest first; each candidate's job is checked with EXISTS in the
script that removes it, so a live one (a job kept by a retry, one written without a TTL) is never removed. The
task-id index has no scores: it is swept with HSCAN, a bounded step per pass from the cursor kept in `kr:sweep`.
Each index gets at most `SWEEP_BATCH` candidates (and the task-id index an HSCAN step of `SWEEP_SCAN_COUNT`) per
pass, resuming where the previous pass stopped: at the default 30 s interval that keeps up with about 16 jobs
expiring a second. Until a pass reaches an expired job's entries, `counts()` includes it; `list()` and
`find_by_task` also drop the entries of expired jobs they come across, as before. The non-terminal state indexes
and the due index hold no job that expires (the step into a terminal state moves it out; the reconciler drops
a due entry whose job is gone).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Collection
from typing import Any, Literal, cast

import redis

from kling_relay.shared import jobs_lua, keys, limits, metrics
from kling_relay.shared.inputs import is_job_id
from kling_relay.shared.jobs_model import (
    ATTEMPT_PREFIX,
    RANK,
    SETTABLE_FIELDS,
    SOURCE_CODES,
    SOURCES,
    STATE_CODES,
    TERMINAL,
    TIMELINE_FIELD,
    AppBusy,
    Event,
    IdempotencyConflict,
    Job,
    JobNotFound,
    JobState,
    StepResult,
    Transition,
    dumps,
    joined,
    millis,
    new_job_id,
    normalize_notify_events,
    pieces,
    timeline_of,
)

__all__ = [
    "RANK", "SOURCES", "TERMINAL", "AppBusy", "Event", "IdempotencyConflict", "InvalidCursor", "Job", "JobNotFound",
    "JobState", "JobStore", "JobWrites", "StepResult", "Transition",
]

_STATES: tuple[JobState, ...] = tuple(JobState)
#: Most candidates (entries older than the TTL) one sweep examines in each sorted-set index (`sweep`).
SWEEP_BATCH = 500
#: The COUNT of the sweep's HSCAN step over the task-id index, per sweep (Redis may return a few more).
SWEEP_SCAN_COUNT = 500
#: The sorted-set indexes the sweep looks after, besides the apps' listing indexes.
SWEPT_INDEXES = (keys.JOBS_ALL, *(keys.jobs_in_state(s) for s in ("stored", "failed", "canceled")))
_KIND = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_FORBIDDEN_REQUEST_KEYS = ("callback_url", "external_task_id")
MAX_LIST_LIMIT = limits.LIST_LIMIT_MAX
#: Longer than any cursor `list()` makes (a created_at and a job id of at most 64 characters, in base64).
MAX_CURSOR_CHARS = 256
#: Scores are created_at times (seconds); a cursor's must be a finite number in this range.
MAX_CURSOR_SCORE = 2.0**53


#: A job id is `job_` and these many characters (`new_job_id`); an idempotency record keeps only them.
JOB_ULID_CHARS = 26
#: Bytes of the body's sha256 an idempotency record keeps (96 bits, as 16 base64 characters: with the job id's 26,
#: 42 characters, which Redis keeps in one allocation with the key's object, an "embstr").
BODY_TAG_BYTES = 12


def _body_tag(digest: bytes) -> str:
    """What an idempotency record keeps of the sha256 of a create's canonical body (see BODY_TAG_BYTES)."""
    return base64.urlsafe_b64encode(digest[:BODY_TAG_BYTES]).decode()


class InvalidCursor(ValueError):
    """A cursor `list()` did not make: not base64, not `[score, job_id]`, a score that is not a finite number
    in range, an id that is not a job id, or too long."""

    def __init__(self) -> None:
        super().__init__("invalid cursor: pass back the next_cursor of a previous page, unchanged")


def _reply(raw: Any) -> list[Any]:
    return cast(list[Any], raw)


def _pairs(flat: list[str]) -> dict[str, str]:
    return dict(zip(flat[0::2], flat[1::2], strict=True))


class JobStore:
    """Create, read, step and list jobs in Redis. Thread-safe: it holds no state besides the client."""

    def __init__(self, redis: redis.Redis, *, clock: Callable[[], float] = time.time,
                 job_ttl_seconds: int | None = None, max_events: int = 1000) -> None:
        if not redis.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError("JobStore needs a Redis client created with decode_responses=True")
        if job_ttl_seconds is not None and job_ttl_seconds <= 0:
            raise ValueError("job_ttl_seconds must be positive")
        if max_events < 1:
            raise ValueError("max_events must be at least 1")
        self._r = redis
        self._clock = clock
        self._ttl = job_ttl_seconds or 0
        self._max_events = max_events
        self._create = redis.register_script(jobs_lua.CREATE)
        self._step = redis.register_script(jobs_lua.STEP)
        self._retry = redis.register_script(jobs_lua.RETRY)
        self._note = redis.register_script(jobs_lua.NOTE)
        self._set_task = redis.register_script(jobs_lua.SET_KLING_TASK_ID)
        self._bump = redis.register_script(jobs_lua.BUMP_ATTEMPT)
        self._set_due = redis.register_script(jobs_lua.SET_DUE)
        self._sweep_index = redis.register_script(jobs_lua.SWEEP_INDEX)
        self._sweep_tasks = redis.register_script(jobs_lua.SWEEP_TASKS)

    @property
    def redis(self) -> redis.Redis:
        """The client this store uses (decode_responses=True), for modules that keep their own keys beside it."""
        return self._r

    def __repr__(self) -> str:
        return f"JobStore(ttl={self._ttl})"

    # -- keys -------------------------------------------------------------------------------------------

    def _job_key(self, job_id: str) -> str:
        """The job's hash key; JobNotFound for a string that is not a job id (it could name another key)."""
        if not is_job_id(job_id):
            raise JobNotFound(job_id)
        return keys.job(job_id)

    def _events_key(self, job_id: str) -> str:
        self._job_key(job_id)  # checks the id
        return keys.job_events(job_id)

    def _request_key(self, job_id: str) -> str:
        self._job_key(job_id)  # checks the id
        return keys.job_request(job_id)

    @staticmethod
    def _index_key(state: JobState | None) -> str:
        return keys.JOBS_ALL if state is None else keys.jobs_in_state(state.value)

    _due_key = keys.JOBS_DUE

    _outbox_key = keys.OUTBOX

    def _step_keys(self, job_id: str) -> list[str]:
        return [self._job_key(job_id), self._events_key(job_id), self._due_key,
                *(self._index_key(s) for s in _STATES), self._outbox_key]

    # -- events -----------------------------------------------------------------------------------------

    @staticmethod
    def _check_source(source: str) -> None:
        if source not in SOURCES:
            raise ValueError(f"source must be one of {sorted(SOURCES)}, not {source!r}")

    @staticmethod
    def _event_head(now: float) -> str:
        """The start of a timeline line (`Event.to_line`): the event's time in milliseconds (the scripts make it
        relative where the line is kept so)."""
        return str(millis(now))

    @staticmethod
    def _event_tail(source: str, detail: dict[str, Any] | None) -> str:
        """The end of a timeline line, after its states: the source's code and the detail, when there is one."""
        return SOURCE_CODES[source] + (dumps(dict(detail)) if detail else "")

    # -- create and read --------------------------------------------------------------------------------

    def create(self, request: dict[str, Any], *, notify_url: str | None = None,
               metadata: dict[str, Any] | None = None, idempotency_key: str | None = None,
               deadline_seconds: float | None = None, due_in: float | None = None,
               source: str = "api", notify_events: Collection[str] | None = None, app: str | None = None,
               max_active: int | None = None, request_id: str | None = None) -> tuple[Job, bool]:
        """Store a new job in state `queued`; returns `(job, created)`.

        `request` is the normalized Kling body without `callback_url`/`external_task_id` (the worker adds
        those). With an `idempotency_key`, a second create with the same body (request, notify_url, metadata)
        returns the first job and `created=False`; a different body raises `IdempotencyConflict`. The check and
        the write are one script, so concurrent creates with one key make one job. `due_in` puts the job in the
        due index that many seconds from now; `deadline_seconds` sets `deadline_at`. `notify_events`: the states
        `notify_url` is told about (None: the terminal ones; see `normalize_notify_events`, ValueError otherwise);
        it is part of the idempotent body only when it is not the default, so older keys still match.

        `app` (a token name) owns the job: it is in the app's listing index, and its idempotency keys are its own
        (the same key from two apps makes two jobs). `max_active`: refuse with `AppBusy` (nothing stored) when
        the app already has that many jobs queued or in progress; an idempotent replay is answered first.
        `request_id` (the `X-Request-ID` of the request that made the job) goes into the first event's detail.
        """
        self._check_source(source)
        if not isinstance(request, dict):
            raise TypeError("request must be a dict")
        for key in _FORBIDDEN_REQUEST_KEYS:
            if key in request:
                raise ValueError(f"request must not carry {key!r}: the worker sets it per job")
        if metadata is not None and not isinstance(metadata, dict):
            raise TypeError("metadata must be a dict")
        if deadline_seconds is not None and deadline_seconds <= 0:
            raise ValueError("deadline_seconds must be positive")
        meta = dict(metadata or {})
        events = normalize_notify_events(None if notify_events is None else list(notify_events))
        now = self._clock()
        job_id = new_job_id(now)
        body = [request, notify_url, meta] if events is None else [request, notify_url, meta, list(events)]
        body_hash = hashlib.sha256(dumps(body).encode()).digest()
        # Fields left at their defaults are not written (`Job.from_hash` reads them back as such).
        fields = {
            # `id`: read back from the key, never from here; written for the step scripts of releases before
            # 2026-12-08, which take it from the hash (an old web pod stepping a new job during a rolling upgrade
            # would otherwise half-apply the step: no index move, no outbox entry, no expiry). ~35 bytes a job.
            "id": job_id,
            "state": JobState.QUEUED.value, "request": dumps(request),
            "notify_url": notify_url or "", "metadata": dumps(meta) if meta else "",
            "notify_events": "" if events is None else dumps(list(events)),
            "created_at": repr(now), "updated_at": repr(now),
            "deadline_at": repr(now + deadline_seconds) if deadline_seconds is not None else "",
            "app": app or "",
        }
        fields[TIMELINE_FIELD] = Event(now, None, JobState.QUEUED.value, source,
                                       {"request_id": request_id} if request_id else {}).to_line()
        names = [self._job_key(job_id), self._events_key(job_id), self._index_key(None),
                self._index_key(JobState.QUEUED), self._due_key, keys.app_jobs(app) if app else "", keys.APPS]
        if idempotency_key is not None:
            if not isinstance(idempotency_key, str) or not idempotency_key:
                raise ValueError("idempotency_key must be a non-empty string")
            names.append(self._idempotency_key(idempotency_key, app))
        args: list[str | int] = [
            job_id, _body_tag(body_hash), self._ttl, repr(now), repr(now + due_in) if due_in is not None else "",
            body_hash.hex(), keys.JOB_KEY_PREFIX, self._max_events, app or keys.NO_APP_GROUP,
            max_active if app and max_active else 0,
        ]
        args += self._create_fields(fields)
        status, found_id = _reply(self._create(keys=names, args=args))
        if status == "busy":
            raise AppBusy(app or "", int(found_id), max_active or 0)
        if status == "conflict":
            raise IdempotencyConflict(found_id)
        job = self.get(found_id)
        if job is None:  # only if someone deleted the job between the script and this read
            raise JobNotFound(found_id)
        return job, status == "created"

    @staticmethod
    def _create_fields(fields: dict[str, str]) -> list[str]:
        """`[name, value, ...]` for the create script: empty fields left out, long values in pieces (`pieces`); the
        request whole (the script keeps it in its own key)."""
        out: list[str] = []
        for name, value in fields.items():
            if name == "request":
                out += [name, value]
            elif value:
                out += pieces(name, value)
        return out

    def get(self, job_id: str) -> Job | None:
        """The job, or None if there is none with this id (or the id is not a job id: nothing is read then)."""
        if not is_job_id(job_id):
            return None
        h = cast(dict[str, str], self._r.hgetall(self._job_key(job_id)))
        return Job.from_hash(h, job_id) if h else None

    def get_many(self, job_ids: list[str]) -> list[Job | None]:
        """Each job (None where there is none, or the id is not a job id), read in one round trip (a pipeline)."""
        valid = [j for j in job_ids if is_job_id(j)]
        pipe = self._r.pipeline(transaction=False)
        for job_id in valid:
            pipe.hgetall(self._job_key(job_id))
        found = dict(zip(valid, cast(list[dict[str, str]], pipe.execute()) if valid else [], strict=True))
        return [Job.from_hash(h, j) if (h := found.get(j)) else None for j in job_ids]

    def find_by_task(self, task_id: str) -> Job | None:
        """The job bound to Kling task `task_id` (one HGET of the index, one read of the job), or None.

        An entry whose job expired is dropped by the sweep (`sweep`), or by a lookup that finds the job gone."""
        if not isinstance(task_id, str) or not task_id or len(task_id) > limits.IDEMPOTENCY_KEY_MAX_CHARS:
            return None
        job_id = cast(str | None, self._r.hget(keys.JOBS_BY_TASK, task_id))
        job = self.get(job_id) if job_id else None
        if job_id and job is None:  # the job expired (JOB_TTL_SECONDS): drop its entry now
            self._r.hdel(keys.JOBS_BY_TASK, task_id)
        return job if job is not None and job.kling_task_id == task_id else None

    @staticmethod
    def _idempotency_key(idempotency_key: str, app: str | None) -> str:
        """The record of an app's key: sha256 of `<app>\n<key>` (of the key alone for jobs without an app)."""
        scoped = f"{app}\n{idempotency_key}" if app else idempotency_key
        return keys.idempotency(hashlib.sha256(scoped.encode()).hexdigest())

    def find_by_idempotency_key(self, idempotency_key: str, app: str | None = None) -> Job | None:
        """The job an `Idempotency-Key` of `app` (None: of no app) created (one HGET, one read), or None."""
        if not isinstance(idempotency_key, str) or not idempotency_key:
            return None
        name = self._idempotency_key(idempotency_key, app)
        # one script would need the key's type first: a GET, and for a record of the older form (a hash) an HGET
        try:
            record = cast(str | None, self._r.get(name))
            job_id = f"job_{record[:JOB_ULID_CHARS]}" if record else None
        except redis.ResponseError:  # WRONGTYPE: a record written before 2026-12-08
            job_id = cast(str | None, self._r.hget(name, "job_id"))
        return self.get(job_id) if job_id else None

    def request(self, job_id: str) -> dict[str, Any]:
        """The job's normalized Kling request (images included; kept apart from the job hash); JobNotFound if none
        (no such job, or a stored one: the step into `stored` drops it, the manifest records it)."""
        raw = cast(str | None, self._r.get(self._request_key(job_id)))
        if raw is None:
            raise JobNotFound(job_id)
        request: dict[str, Any] = json.loads(raw)
        return request

    def require(self, job_id: str) -> Job:
        """The job; raises `JobNotFound` if there is none."""
        job = self.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    def events(self, job_id: str, limit: int = 200) -> list[Event]:
        """The job's latest `limit` events, oldest first (empty for an unknown job)."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        if not is_job_id(job_id):
            return []
        pipe = self._r.pipeline(transaction=True)  # one snapshot: a script may move the timeline between the two
        pipe.hgetall(self._job_key(job_id))
        pipe.lrange(self._events_key(job_id), -limit, -1)
        h, raw = pipe.execute()
        events = [Event.from_json(r) for r in cast(list[str], raw)] + timeline_of(joined(cast(dict[str, str], h)))
        return events[-limit:]

    # -- state changes ----------------------------------------------------------------------------------

    def _encode_fields(self, set_fields: dict[str, Any] | None) -> list[str]:
        """`[name, value, ...]` for the step script, long values in pieces (`pieces`): the script clears a field's
        earlier pieces before it writes the field."""
        out: list[str] = []
        for name, value in (set_fields or {}).items():
            if name not in SETTABLE_FIELDS:
                raise ValueError(f"step cannot set {name!r}; settable: {sorted(SETTABLE_FIELDS)}")
            if name == "kling_task_id":
                if value is not None and not isinstance(value, str):
                    raise TypeError("kling_task_id must be a string or None")
                out += [name, value or ""]
            elif name == "videos":
                if not isinstance(value, list):
                    raise TypeError("videos must be a list")
                out += pieces(name, dumps(value))
            else:
                if value is not None and not isinstance(value, dict):
                    raise TypeError("error must be a dict or None")
                out += pieces(name, dumps(value))
        return out

    def _due_args(self, due_in: float | None | Literal["keep"], now: float) -> list[str]:
        if due_in == "keep":
            return ["keep", ""]
        if due_in is None:
            return ["none", ""]
        return ["set", repr(now + due_in)]

    def _result(self, job_id: str, raw: Any) -> StepResult:
        reply = _reply(raw)
        if reply[0] == "missing":
            raise JobNotFound(job_id)
        result = StepResult(applied=reply[0] == "applied", job=Job.from_hash(_pairs(reply[2]), job_id),
                            from_state=JobState(reply[1]))
        if result.applied:  # every applied step (and ops retry) passes here: counted once, whoever made it
            metrics.transition(result.from_state.value, result.job.state.value)
        return result

    def step(self, job_id: str, to: JobState, *, source: str, detail: dict[str, Any] | None = None,
             set_fields: dict[str, Any] | None = None, only_from: Collection[JobState] | None = None,
             due_in: float | None | Literal["keep"] = "keep") -> StepResult:
        """Move the job to `to` if that is a step forward from a non-terminal state; else change nothing.

        Forward means a higher rank on `queued → submitted → processing → generated → stored`, or `failed` /
        `canceled` from any non-terminal state. `only_from` narrows the states the step may start from.
        `set_fields` (kling_task_id, error, videos) are written only with an applied step. `due_in`: seconds
        until the reconciler should look again, None to drop the job from the due index, "keep" to leave it;
        entering a terminal state always drops it. An applied step appends one event; a no-op appends nothing.
        Raises `JobNotFound` for an unknown job.
        """
        to = JobState(to)
        self._check_source(source)
        fields = self._encode_fields(set_fields)
        allowed = "*" if only_from is None else ",".join(JobState(s).value for s in only_from)
        now = self._clock()
        tail = STATE_CODES[to.value] + self._event_tail(source, detail)
        args: list[str | int] = [to.value, repr(now), self._event_head(now), tail, allowed,
                                 *self._due_args(due_in, now), self._ttl, self._max_events, *fields]
        return self._result(job_id, self._step(keys=self._step_keys(job_id), args=args))

    def retry(self, job_id: str, *, source: str, due_in: float | None = None) -> StepResult:
        """Ops action: put a `failed` job back to `queued`; a no-op from any other state.

        Clears the error and every attempt counter (a fresh budget), keeps `kling_task_id` and videos, removes
        any expiry, and records the previous error in the event's detail. `due_in` puts the job in the due
        index (None: not due-tracked until a later step sets it).
        """
        self._check_source(source)
        now = self._clock()
        tail = STATE_CODES[JobState.QUEUED.value] + self._event_tail(source, None) + '{"previous_error":'
        args: list[str | int] = [repr(now), self._event_head(now), tail, *self._due_args(due_in, now),
                                 self._max_events]
        return self._result(job_id, self._retry(keys=self._step_keys(job_id), args=args))

    def set_kling_task_id(self, job_id: str, task_id: str, *, source: str) -> tuple[bool, str | None]:
        """Record Kling's task id if none is set yet; returns `(ok, existing)`.

        `(True, None)`: set now (with an event); `(True, task_id)`: this id was already set (no event);
        `(False, other)`: a different id is set and is kept. Raises `JobNotFound` for an unknown job. Setting it also
        records task id → job id in the `kr:jobs:by_task` index (`find_by_task`), in the same script.
        """
        self._check_source(source)
        if not isinstance(task_id, str) or not task_id:
            raise ValueError("task_id must be a non-empty string")
        now = self._clock()
        tail = self._event_tail(source, {"kling_task_id": task_id})
        names = [self._job_key(job_id), self._events_key(job_id), keys.JOBS_BY_TASK]
        reply = _reply(self._set_task(
            keys=names, args=[task_id, repr(now), self._event_head(now), tail, self._max_events]))
        if reply[0] == "missing":
            raise JobNotFound(job_id)
        status, existing = reply
        if status == "set":
            return True, None
        return status == "same", existing

    def note(self, job_id: str, *, source: str, detail: dict[str, Any]) -> None:
        """Append an event without changing the state (from == to == current state), e.g. a duplicate callback.

        Does not touch `updated_at`. Raises `JobNotFound` for an unknown job.
        """
        if _reply(self._note_call(job_id, source, detail))[0] == "missing":
            raise JobNotFound(job_id)

    def _note_call(self, job_id: str, source: str, detail: dict[str, Any], client: Any = None) -> Any:
        """The NOTE script's call for `note` (on `client`, a pipeline, when given: its reply comes from there)."""
        self._check_source(source)
        now = self._clock()
        names = [self._job_key(job_id), self._events_key(job_id)]
        return self._note(keys=names, args=[self._event_head(now), self._event_tail(source, detail), self._max_events],
                          client=client)

    def bump_attempt(self, job_id: str, kind: str) -> int:
        """Add one to the job's `kind` counter (e.g. "submit", "copy") and return the new count."""
        if not _KIND.match(kind):
            raise ValueError("attempt kind must match [a-z][a-z0-9_]{0,31}")
        count = int(self._bump(keys=[self._job_key(job_id)], args=[ATTEMPT_PREFIX + kind]))
        if count < 0:
            raise JobNotFound(job_id)
        return count

    def forget_attempt(self, job_id: str, kind: str) -> None:
        """Remove the job's `kind` counter (as if never bumped)."""
        if not _KIND.match(kind):
            raise ValueError("attempt kind must match [a-z][a-z0-9_]{0,31}")
        if not is_job_id(job_id):
            return
        self._r.hdel(self._job_key(job_id), ATTEMPT_PREFIX + kind)

    # -- the outbox -------------------------------------------------------------------------------------------

    def unannounced(self, *, before: float, limit: int = 100) -> list[Transition]:
        """Steps into a terminal or a notified state made before `before` and not yet announced, oldest first."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        raw = cast(list[str], self._r.zrangebyscore(self._outbox_key, "-inf", repr(before), start=0, num=limit))
        found = [Transition.parse(member) for member in raw]
        bad = [member for member, t in zip(raw, found, strict=True) if t is None]
        if bad:  # never written by this store: dropped, or they would block the head of the outbox forever
            self._r.zrem(self._outbox_key, *bad)
        return [t for t in found if t is not None]

    def announced(self, transition: Transition) -> None:
        """Remove a step from the outbox once it is announced (nothing happens if it is not there)."""
        self._r.zrem(self._outbox_key, transition.member)

    # -- due index --------------------------------------------------------------------------------------

    def set_due(self, job_id: str, in_seconds: float) -> None:
        """Ask the reconciler to look at the job `in_seconds` from now; ignored for a terminal job."""
        if int(self._set_due_call(job_id, in_seconds)) < 0:
            raise JobNotFound(job_id)

    def _set_due_call(self, job_id: str, in_seconds: float, client: Any = None) -> Any:
        """The SET_DUE script's call for `set_due` (on `client`, a pipeline, when given)."""
        due_at = self._clock() + in_seconds
        return self._set_due(keys=[self._job_key(job_id), self._due_key], args=[repr(due_at)], client=client)

    def writes(self) -> JobWrites:
        """A batch of `set_due` and `note` writes, sent together in one round trip (see `JobWrites`)."""
        return JobWrites(self)

    def due(self, *, now: float | None = None, limit: int = 100) -> list[str]:
        """Ids of jobs due at `now` (default: the clock), earliest first; one read of the due index only."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        at = self._clock() if now is None else now
        return cast(list[str], self._r.zrangebyscore(self._due_key, "-inf", repr(at), start=0, num=limit))

    # -- listing ----------------------------------------------------------------------------------------

    @staticmethod
    def _encode_cursor(score: float, job_id: str) -> str:
        return base64.urlsafe_b64encode(json.dumps([score, job_id]).encode()).decode().rstrip("=")

    @staticmethod
    def _decode_cursor(cursor: str) -> tuple[float, str]:
        """`(score, job_id)` of a cursor `_encode_cursor` made; InvalidCursor for anything else."""
        try:
            if not isinstance(cursor, str) or len(cursor) > MAX_CURSOR_CHARS:
                raise ValueError
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
            score, job_id = json.loads(raw)
            if isinstance(score, bool) or not isinstance(score, int | float) or not is_job_id(job_id):
                raise ValueError
            value = float(score)  # OverflowError for an int too large for a float
            if not (math.isfinite(value) and -MAX_CURSOR_SCORE <= value <= MAX_CURSOR_SCORE):
                raise ValueError
            return value, job_id
        except (ValueError, TypeError, OverflowError, RecursionError, binascii.Error) as exc:
            raise InvalidCursor from exc

    def _page(self, key: str, limit: int, cursor: str | None) -> list[tuple[str, float]]:
        """Up to limit+1 (id, score) entries after the cursor, newest first (ties: higher id first)."""
        if cursor is None:
            return cast(list[tuple[str, float]], self._r.zrevrange(key, 0, limit, withscores=True))
        score, last = self._decode_cursor(cursor)
        items: list[tuple[str, float]] = []
        offset, batch = 0, limit + 16
        while len(items) <= limit:
            chunk = cast(list[tuple[str, float]], self._r.zrevrangebyscore(
                key, repr(score), "-inf", start=offset, num=batch, withscores=True))
            if not chunk:
                break
            offset += len(chunk)
            # entries at the cursor's score with an id >= the cursor's come first: already served
            items += [(m, s) for m, s in chunk if not (s == score and m >= last)]
        return items[: limit + 1]

    def list(self, *, state: JobState | None = None, limit: int = 50, cursor: str | None = None,
             app: str | None = None) -> tuple[list[Job], str | None]:
        """Jobs newest first (by created_at), all or those in one state; returns `(jobs, next_cursor)`.

        Reads only the sorted-set index and the listed jobs (never a scan). `next_cursor` is an opaque string
        for the next page, None after the last. A job that changed state between the index read and its own
        read is left out of a by-state page; an expired job is left out and its index entry dropped.
        `limit` 1..200; a malformed cursor raises InvalidCursor (a ValueError).

        With `app`, only that app's jobs (its own index); with `app` and `state`, the app's page is filtered by
        state, so a page may hold fewer than `limit` jobs (follow `next_cursor` until it is None).
        """
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise ValueError(f"limit must be between 1 and {MAX_LIST_LIMIT}")
        state = JobState(state) if state is not None else None
        key = self._index_key(state) if app is None else keys.app_jobs(app)
        entries = self._page(key, limit, cursor)
        page = entries[:limit]
        pipe = self._r.pipeline(transaction=False)
        for job_id, _ in page:
            pipe.hgetall(self._job_key(job_id))
        jobs: list[Job] = []
        gone: list[str] = []
        for (job_id, _), h in zip(page, pipe.execute(), strict=True):
            if not h:
                gone.append(job_id)
                continue
            job = Job.from_hash(h, job_id)
            if (state is None or job.state == state) and (app is None or job.app == app):
                jobs.append(job)
        if gone:
            self._r.zrem(key, *gone)
        next_cursor = self._encode_cursor(page[-1][1], page[-1][0]) if len(entries) > limit else None
        return jobs, next_cursor

    # -- the sweep of index entries whose job is gone -------------------------------------------------------------

    def sweep(self, *, now: float | None = None, apps: Collection[str] = (), batch: int = SWEEP_BATCH,
              scan_count: int = SWEEP_SCAN_COUNT) -> dict[str, int]:
        """Remove index entries whose job no longer exists (it expired); returns `{"examined": n, "removed": n}`.

        Bounded work per call: at most `batch` candidates in each sorted-set index (`all`, the terminal state
        indexes and the listing index of each app in `kr:sweep:apps` or in `apps`, the configured ones) and one
        HSCAN step of `scan_count` over the task-id index, each resumed where the previous call stopped (see the
        module docstring and `jobs_lua.SWEEP_INDEX`). Candidates are entries created before `now - job_ttl_seconds`
        (without a TTL: before `now`); each is removed only if its job's hash does not exist. Two round trips:
        the apps set, then one script call per index (each atomic and short, so Redis serves others between them).
        """
        if batch < 1 or scan_count < 1:
            raise ValueError("batch and scan_count must be at least 1")
        at = self._clock() if now is None else now
        cutoff = repr(at - self._ttl)
        known = cast(set[str], self._r.smembers(keys.SWEEP_APPS))
        pipe = self._r.pipeline(transaction=False)
        for index in SWEPT_INDEXES:
            self._sweep_index(keys=[index, keys.SWEEP, keys.SWEEP_APPS],
                              args=[cutoff, batch, keys.JOB_KEY_PREFIX, index, ""], client=pipe)
        for app in sorted(known | set(apps)):
            index = keys.app_jobs(app)
            self._sweep_index(keys=[index, keys.SWEEP, keys.SWEEP_APPS],
                              args=[cutoff, batch, keys.JOB_KEY_PREFIX, index, app], client=pipe)
        self._sweep_tasks(keys=[keys.JOBS_BY_TASK, keys.SWEEP], args=[scan_count, keys.JOB_KEY_PREFIX, "by_task"],
                          client=pipe)
        replies = cast(list[list[int]], pipe.execute())
        return {"examined": sum(int(r[0]) for r in replies), "removed": sum(int(r[1]) for r in replies)}

    def active_count(self, app: str | None) -> int:
        """Jobs of `app` (None: without an app) queued or in progress (one ZCARD per non-terminal state)."""
        pipe = self._r.pipeline(transaction=False)
        for state in keys.ACTIVE_STATES:
            pipe.zcard(keys.app_jobs_in_state(app or keys.NO_APP_GROUP, state))
        return sum(int(n) for n in pipe.execute())

    def counts(self) -> dict[str, int]:
        """Number of jobs in each state (one ZCARD per state index): a job that expired counts until the sweep
        (`sweep`, each reconciler pass) or a `list()` page has dropped its entry."""
        pipe = self._r.pipeline(transaction=False)
        for s in _STATES:
            pipe.zcard(self._index_key(s))
        return {s.value: int(n) for s, n in zip(_STATES, pipe.execute(), strict=True)}


class JobWrites:
    """`set_due` and `note` for many jobs, gathered and then written in one round trip (a pipeline) by `execute`.

    Each write runs the same script as the store's own method, in the order they were asked for; none is atomic with
    another, as when made one by one. Nothing is written before `execute`: a process that stops first leaves each
    job as it was (still due when it was due). Made by `JobStore.writes()`; used once.
    """

    def __init__(self, store: JobStore) -> None:
        self._store = store
        self._pipe = store.redis.pipeline(transaction=False)
        self._ids: list[str] = []

    def __len__(self) -> int:
        return len(self._ids)

    def set_due(self, job_id: str, in_seconds: float) -> None:
        """As `JobStore.set_due` now (`in_seconds` from now), written at `execute`."""
        self._store._set_due_call(job_id, in_seconds, self._pipe)
        self._ids.append(job_id)

    def note(self, job_id: str, *, source: str, detail: dict[str, Any]) -> None:
        """As `JobStore.note` now (the event's time is now), written at `execute`."""
        self._store._note_call(job_id, source, detail, self._pipe)
        self._ids.append(job_id)

    def execute(self) -> list[str]:
        """Write everything gathered; returns the ids of jobs found gone, once each (nothing was written for them:
        where `set_due` and `note` raise `JobNotFound`). A Redis error raises (some writes may have been made)."""
        if not self._ids:
            return []
        ids, self._ids = self._ids, []
        replies = self._pipe.execute()
        gone = [job_id for job_id, reply in zip(ids, replies, strict=True)
                if reply == -1 or (isinstance(reply, list) and reply[0] == "missing")]
        return list(dict.fromkeys(gone))
