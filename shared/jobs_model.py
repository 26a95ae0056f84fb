"""The job record as values: its states, its timeline events, and the `Job` read back from Redis.

Nothing here talks to Redis; `shared/jobs.py` stores and steps these values. A job is kept as one Redis hash
of strings (its id is its key's, `from_hash`): plain strings for ids and timestamps (`""` or no field meaning
"none"), JSON for the structured fields (`metadata`, `error`, `videos`, and `notify_events`, where `""` means the
default: the terminal states; the request lives in its own key), one `attempt:<kind>` integer field per retry
counter (cleared by the step into `stored`), and what Kling billed once it says so (`units`, `balance_deduction`:
numbers as text, each written once by `shared/usage.py`, never by a state step), and `copy_ran` ("1": a copy ran
before an ops retry cleared the attempt counters; written by that retry).

Memory (Redis keeps a hash compact, as a listpack, only while every value is at most `hash-max-listpack-value`
bytes, 64 by default, and it has at most 128 fields; one longer value turns the whole hash into a hashtable, about
twice the size: `bench/job_memory.py`): a field left at its default is not written (`from_hash` reads a missing
field as its default, so hashes written before, with every field, read the same), and a value longer than
`PIECE_BYTES` is kept in pieces of at most that many bytes: the first under the field's own name, the rest under
`<name>~1`, `<name>~2`, ... (`pieces`, joined back by `from_hash`; the job scripts read and clear them the same way).
The timeline is in the hash too, in its `tl` field (in pieces like any long value): one line per event
(`Event.to_line`: the time in milliseconds, relative to the first line's, then one character per state and source,
then the detail), which saves a key per job (~220 bytes of Redis bookkeeping) and ~half the bytes of the JSON
arrays. A job written before 2026-12-08 (or whose timeline grew past `jobs_lua.TIMELINE_MAX_BYTES`) has it in its
own list instead (`keys.job_events`: lines with absolute times, and the older JSON arrays and objects, still read).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any


class JobState(StrEnum):
    """Where a job is: `queued → submitted → processing → generated → stored`, or `failed` / `canceled`."""

    QUEUED = "queued"
    SUBMITTED = "submitted"
    PROCESSING = "processing"
    GENERATED = "generated"
    STORED = "stored"
    FAILED = "failed"
    CANCELED = "canceled"


TERMINAL: frozenset[JobState] = frozenset({JobState.STORED, JobState.FAILED, JobState.CANCELED})

#: States a job's `notify_url` may be told about (`notify_events`): every state a step can enter, in order.
NOTIFY_STATES: tuple[str, ...] = tuple(s.value for s in JobState if s is not JobState.QUEUED)
#: What a job with `notify_url` and no `notify_events` is told about: its terminal states.
DEFAULT_NOTIFY_EVENTS: tuple[str, ...] = (JobState.STORED.value, JobState.FAILED.value, JobState.CANCELED.value)

# Forward order of the happy path; failed/canceled have no rank (reachable from any non-terminal state).
RANK: dict[JobState, int] = {
    JobState.QUEUED: 0,
    JobState.SUBMITTED: 1,
    JobState.PROCESSING: 2,
    JobState.GENERATED: 3,
    JobState.STORED: 4,
}


def step_applies(current: JobState, to: JobState) -> bool:
    """Whether `JobStore.step(to)` (no `only_from`) would change a job now in `current`: the step script's own rule
    (never from a terminal state; `failed`/`canceled` from any other; else only to a higher rank). States only
    move forward (but for the ops retry of a failed job), so False from a state read earlier stays False."""
    if current in TERMINAL:
        return False
    if to in (JobState.FAILED, JobState.CANCELED):
        return True
    return RANK[to] > RANK[current]


# Who may write a timeline event.
SOURCES: frozenset[str] = frozenset({"api", "worker", "callback", "reconciler"})

# Fields `JobStore.step(set_fields=...)` may write.
SETTABLE_FIELDS: frozenset[str] = frozenset({"kling_task_id", "error", "videos"})

ATTEMPT_PREFIX = "attempt:"
#: Attempt counter of creates sent to Kling for a job: while it is > 0, a submit looks the task up before any
#: create (set before each create is sent, cleared when Kling definitely refused a first create).
CREATE_SENT = "create_sent"

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def iso_utc(ts: float) -> str:
    """A Unix timestamp as ISO-8601 UTC with milliseconds, e.g. `2026-05-01T12:00:00.123Z`."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_EPOCH = datetime.fromtimestamp(0, UTC)


def millis(ts: float) -> int:
    """A Unix timestamp in whole milliseconds, as `iso_utc` shows it (so `iso_utc(millis(t) / 1000) == iso_utc(t)`)."""
    return (datetime.fromtimestamp(ts, UTC) - _EPOCH) // timedelta(milliseconds=1)


def normalize_notify_events(events: object) -> tuple[str, ...] | None:
    """`notify_events` in the one stored form: the states in state order, None for the default (terminal) set.

    Raises ValueError for anything but a non-empty list of distinct states from NOTIFY_STATES.
    """
    if events is None:
        return None
    if not isinstance(events, list | tuple) or not events:
        raise ValueError("notify_events must be a non-empty list of states")
    if any(not isinstance(e, str) or e not in NOTIFY_STATES for e in events) or len(set(events)) != len(events):
        raise ValueError(f"notify_events must list distinct states from {', '.join(NOTIFY_STATES)}")
    ordered = tuple(s for s in NOTIFY_STATES if s in events)
    return None if ordered == DEFAULT_NOTIFY_EVENTS else ordered


def _base32(value: int, width: int) -> str:
    chars = []
    for _ in range(width):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def new_job_id(now: float) -> str:
    """`job_` + a 26-character ULID: 48 bits of milliseconds then 80 random bits, Crockford base32.

    Ids sort by creation time (to the millisecond), use only `[A-Za-z0-9_]` and are 30 characters long, so
    they are safe as Kling's `external_task_id`, in URLs and in S3 keys.
    """
    millis = int(now * 1000) & ((1 << 48) - 1)
    return "job_" + _base32(millis, 10) + _base32(secrets.randbits(80), 16)


def dumps(value: Any) -> str:
    """Compact, key-sorted JSON: the one encoding used for stored fields and body hashes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


#: The longest value a job's hash field holds: Redis's default `hash-max-listpack-value` (see the module doc).
PIECE_BYTES = 64
#: Between a field's name and the number of one of its further pieces (no field name contains it).
PIECE_MARK = "~"
#: The fields whose values are JSON documents.
JSON_FIELDS: frozenset[str] = frozenset({"metadata", "error", "videos", "notify_events"})

#: The job hash's field holding its timeline (in pieces, see `timeline_of`), while the job has no timeline list.
TIMELINE_FIELD = "tl"
#: One character per state in a timeline line (`Event.to_line`), and "-" for no state (the creation's `from`).
STATE_CODES: dict[str, str] = {s.value: str(n) for n, s in enumerate(JobState)}
#: One character per source in a timeline line.
SOURCE_CODES: dict[str, str] = {"api": "a", "worker": "w", "callback": "c", "reconciler": "r"}
_STATES_BY_CODE = {c: s for s, c in STATE_CODES.items()}
_SOURCES_BY_CODE = {c: s for s, c in SOURCE_CODES.items()}


def pieces(name: str, value: str) -> list[str]:
    """`[name, piece, name~1, piece, ...]`: `value` cut into pieces of at most PIECE_BYTES UTF-8 bytes, never
    inside a character (so each piece decodes on its own); `[name, value]` for a value that fits."""
    if len(value.encode()) <= PIECE_BYTES:
        return [name, value]
    out: list[str] = []
    piece, size = "", 0
    for char in value:
        width = len(char.encode())
        if size + width > PIECE_BYTES:
            out += [f"{name}{PIECE_MARK}{len(out) // 2}" if out else name, piece]
            piece, size = "", 0
        piece += char
        size += width
    out += [f"{name}{PIECE_MARK}{len(out) // 2}" if out else name, piece]
    return out


def _whole_json(value: str) -> bool:
    """Whether `value` is a JSON document on its own. The first piece of a longer JSON object or array never is,
    so a JSON field that is whole has been written over its pieces by a process of the older layout (which knew
    nothing of pieces): its further pieces are stale."""
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


def joined(h: dict[str, str]) -> dict[str, str]:
    """A job hash as read from Redis with each value's pieces (`pieces`) joined back under its own name (stale
    pieces under a whole JSON value ignored, see `_whole_json`)."""
    if not any(PIECE_MARK in k for k in h):
        return h
    out: dict[str, str] = {}
    for name, value in h.items():
        if PIECE_MARK in name:
            continue
        if f"{name}{PIECE_MARK}1" in h and not (name in JSON_FIELDS and _whole_json(value)):
            n = 1
            while (more := h.get(f"{name}{PIECE_MARK}{n}")) is not None:
                value += more
                n += 1
        out[name] = value
    return out


@dataclass(frozen=True)
class Event:
    """One entry of a job's timeline. `from_state` is None for the creation event; a note has from == to."""

    at: float
    from_state: str | None
    to_state: str
    source: str
    detail: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        """The public shape: `{"at": ISO-8601 UTC, "from", "to", "source", "detail"}`."""
        return {"at": iso_utc(self.at), "from": self.from_state, "to": self.to_state,
                "source": self.source, "detail": dict(self.detail)}

    def to_json(self) -> str:
        """An event as the timeline list stored it before 2026-12-08: `[at, from, to, source]`, plus `detail` when it
        is not empty (still read: `from_json`)."""
        return dumps([self.at, self.from_state, self.to_state, self.source, *([self.detail] if self.detail else [])])

    def to_line(self, base_ms: int = 0) -> str:
        """How the timeline stores it now: `<ms>,<from><to><source>[<detail JSON>]`, `<ms>` the event's time in
        milliseconds minus `base_ms`, then one character per state and source (`STATE_CODES`, `SOURCE_CODES`; `-`
        for no `from`), then the detail when it is not empty. The job scripts write the same (`jobs_lua`)."""
        return (f"{millis(self.at) - base_ms},{STATE_CODES[self.from_state] if self.from_state else '-'}"
                f"{STATE_CODES[self.to_state]}{SOURCE_CODES[self.source]}{dumps(self.detail) if self.detail else ''}")

    @classmethod
    def from_line(cls, line: str, base_ms: int = 0) -> Event:
        """An event as `to_line` wrote it (its time `base_ms` + the line's milliseconds)."""
        ms, rest = line.split(",", 1)
        return cls(at=(base_ms + int(ms)) / 1000, from_state=_STATES_BY_CODE.get(rest[0]),
                   to_state=_STATES_BY_CODE[rest[1]], source=_SOURCES_BY_CODE[rest[2]],
                   detail=json.loads(rest[3:]) if len(rest) > 3 else {})

    @classmethod
    def from_json(cls, raw: str) -> Event:
        """An entry of a timeline list: a line as `to_line` writes it (absolute milliseconds), or as the list held it
        before: a JSON array (`to_json`) or a JSON object `{"at", "from", "to", "source", "detail"}` (the layout
        before 2026-12: the timelines of jobs stored then read the same)."""
        if raw[:1] not in ("[", "{"):
            return cls.from_line(raw)
        data = json.loads(raw)
        if isinstance(data, list):
            at, from_state, to_state, source, *rest = data
            return cls(at=float(at), from_state=from_state, to_state=to_state, source=source,
                       detail=rest[0] if rest else {})
        return cls(at=float(data["at"]), from_state=data.get("from"), to_state=data["to"],
                   source=data["source"], detail=data.get("detail") or {})


def timeline_of(h: dict[str, str]) -> list[Event]:
    """The timeline a job hash (as read, pieces joined: `joined`) holds in `TIMELINE_FIELD`, oldest first: lines
    (`Event.to_line`) separated by newlines, the first with its absolute time in milliseconds, the others relative
    to it. Empty when the field is missing (a job whose timeline is in its list: `keys.job_events`)."""
    raw = h.get(TIMELINE_FIELD)
    if not raw:
        return []
    lines = raw.split("\n")
    first = Event.from_line(lines[0])
    base = int(lines[0].split(",", 1)[0])
    return [first, *(Event.from_line(line, base) for line in lines[1:])]


def _opt(raw: str | None) -> str | None:
    return raw if raw else None


def _opt_float(raw: str | None) -> float | None:
    return float(raw) if raw else None


def _number(value: float | None) -> int | float | None:
    """A billing amount for JSON: a whole number without its `.0` (units are usually whole)."""
    if value is None:
        return None
    return int(value) if value.is_integer() else value


def json_object(raw: str | None) -> dict[str, Any] | None:
    """The JSON object `raw` holds, or None when `raw` is empty, not JSON, or JSON but not an object (a record
    kept in Redis that something else overwrote is read as missing, never as an error)."""
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _json_or(raw: str | None, default: Any) -> Any:
    if not raw:
        return default
    value = json.loads(raw)
    return default if value is None else value


@dataclass(frozen=True)
class Job:
    """A snapshot of one job. The request body is not part of it: `JobStore.request(id)` reads it when needed."""

    id: str
    state: JobState
    notify_url: str | None = field(repr=False)
    metadata: dict[str, Any] = field(repr=False)
    kling_task_id: str | None
    created_at: float
    updated_at: float
    error: dict[str, Any] | None
    videos: list[dict[str, Any]] = field(repr=False)
    attempts: dict[str, int]
    deadline_at: float | None
    units: float | None = None  # Kling's final_unit_deduction for the job's task, once known
    balance_deduction: float | None = None  # Kling's final_balance_deduction, when a callback carried it
    notify_events: tuple[str, ...] = field(default=DEFAULT_NOTIFY_EVENTS, repr=False)
    app: str | None = None  # the app (API token name) that created the job; None: the in-process client's, or older
    copy_ran: bool = False  # a copy ran before an ops retry cleared the attempt counters (see shared/pipeline/copy.py)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def wants_notification(self, state: JobState | str) -> bool:
        """Whether entering `state` is to be POSTed to the job's `notify_url` (it has one, and asked for it)."""
        return bool(self.notify_url) and JobState(state).value in self.notify_events

    def public_dict(self, events: list[Event] | None = None) -> dict[str, Any]:
        """The `GET /v1/jobs/<id>` shape; timestamps as ISO-8601 UTC strings.

        Never includes the request (and so never its images, base64 or URL). `events` is included only
        when given, as a list of `Event.as_dict()`.
        """
        out: dict[str, Any] = {
            "id": self.id,
            "state": self.state.value,
            "kling_task_id": self.kling_task_id,
            "created_at": iso_utc(self.created_at),
            "updated_at": iso_utc(self.updated_at),
            "error": dict(self.error) if self.error is not None else None,
            "videos": [dict(v) for v in self.videos],
            "metadata": dict(self.metadata),
            "notify_url": self.notify_url,
            "units": _number(self.units),
            "balance_deduction": _number(self.balance_deduction),
            "notify_events": list(self.notify_events),
            "app": self.app,
        }
        if events is not None:
            out["events"] = [e.as_dict() for e in events]
        return out

    @classmethod
    def from_hash(cls, h: dict[str, str], job_id: str | None = None) -> Job:
        """Decode the Redis hash of job `job_id` written by `JobStore` (a client with `decode_responses=True`): fields
        in pieces are joined, missing fields read as their defaults. The id is the key's (the hash of a job written
        before 2026-12-08 has it in its `id` field too)."""
        h = joined(h)
        attempts = {k[len(ATTEMPT_PREFIX):]: int(v) for k, v in h.items() if k.startswith(ATTEMPT_PREFIX)}
        found = job_id or h.get("id")
        if not found:
            raise KeyError("id")
        return cls(
            id=found,
            state=JobState(h["state"]),
            notify_url=_opt(h.get("notify_url")),
            metadata=_json_or(h.get("metadata"), {}),
            kling_task_id=_opt(h.get("kling_task_id")),
            created_at=float(h["created_at"]),
            updated_at=float(h["updated_at"]),
            error=_json_or(h.get("error"), None),
            videos=_json_or(h.get("videos"), []),
            attempts=attempts,
            deadline_at=_opt_float(h.get("deadline_at")),
            units=_opt_float(h.get("units")),
            balance_deduction=_opt_float(h.get("balance_deduction")),
            notify_events=tuple(_json_or(h.get("notify_events"), DEFAULT_NOTIFY_EVENTS)),
            app=_opt(h.get("app")),
            copy_ran=h.get("copy_ran") == "1",
        )


@dataclass(frozen=True)
class Transition:
    """One applied step to announce: the job entered `state` at `at` (Unix seconds, as the step stored them).

    Its `member` in the store's outbox is `<job_id>|<state>|<repr(at)>`, exactly as the step script writes it
    (Python's float repr round-trips, so the job's `updated_at` right after the step gives the same text).
    """

    job_id: str
    state: JobState
    at: float

    @property
    def member(self) -> str:
        return f"{self.job_id}|{self.state.value}|{self.at!r}"

    @classmethod
    def of(cls, job: Job) -> Transition:
        """The step that just left `job` as it is (the job as the applied step returned it)."""
        return cls(job.id, job.state, job.updated_at)

    @classmethod
    def parse(cls, member: str) -> Transition | None:
        try:
            job_id, state, at = member.split("|")
            return cls(job_id, JobState(state), float(at))
        except ValueError:
            return None


@dataclass(frozen=True)
class StepResult:
    """What `JobStore.step`/`retry` did: `applied` False means nothing changed; `job` is the state after."""

    applied: bool
    job: Job
    from_state: JobState


class IdempotencyConflict(Exception):
    """An idempotency key was reused with a different body (request, notify_url, metadata)."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"idempotency key already used for job {job_id} with a different body")


class AppBusy(Exception):
    """The app already has `active` jobs queued or in progress, its cap (APP_MAX_ACTIVE_JOBS): nothing stored."""

    def __init__(self, app: str, active: int, cap: int) -> None:
        self.app, self.active, self.cap = app, active, cap
        super().__init__(f"app {app} has {active} jobs queued or in progress (its cap: {cap})")


class JobNotFound(KeyError):
    """No job with this id (never created, or expired after its TTL)."""
