"""Flow control towards Kling, shared by every worker process through Redis: rate, in-flight cap, pause.

Three guards, each one atomic Lua script so that N workers cannot overshoot together:

- **Rate limit** (`KLING_RATE_LIMIT_PER_SECOND`): a GCRA limiter (`RateLimiter`) that every Kling request of a
  worker passes through (`rate_limited_session` mounts it under the client's HTTP session, so creates, gets,
  lists and the lookups inside `get_task_by_external_id` all count). Bursts of up to one second's worth are
  let through; a request that would exceed the rate waits up to `max_wait` seconds, or raises `RateLimited`
  (a `KlingRetryLater` carrying `retry_after`) without sending anything.
- **In-flight cap** (`KLING_MAX_IN_FLIGHT`): `reserve_in_flight` admits a submit only while jobs in `submitted` +
  `processing` (the job store's state indexes) plus submits holding a reservation stay under the cap. A
  reservation is a member of a sorted set scored by its expiry, so one left behind by a killed worker lapses.
  The cap is shared fairly between the apps with queued work (see `reserve_in_flight`).
- **Pause**: an account or auth answer from Kling (1000-1004, 1100-1103, 1304) records a pause
  (`pause`: reason, code, Kling's message, since) instead of failing jobs. While paused, `gate` tells every
  submit to leave its job queued without calling Kling. The pause ends with `resume` (the ops action, or the
  reconciler's probe). For `auth` pauses (credentials, IP allow-list: every call fails alike) a cheap list call
  that succeeds proves the cause gone, and the reconciler resumes. For `account` pauses (arrears, resource pack,
  permissions) a list may succeed while creates still fail, so a successful probe opens a *trial* instead:
  `gate` lets exactly one job's submit through; its success resumes submission, another account error renews
  the pause. 1103 (no permission for the resource or model) pauses too: the relay sends one model
  (`kling-v1-6`), so the permission is the account's, not the request's. A third reason, `budget` (the daily
  unit budget), is set and lifted by `shared/usage.py`; the reconciler never probes Kling for it.

Keys (`keys`): `kr:flow:rate` (GCRA theoretical arrival time), `kr:flow:in_flight` (sorted set of reservations),
`kr:flow:pause` (hash), `kr:flow:probe` (marks a recent probe; expires after the probe interval).
Times inside the scripts come from Redis' own clock (`TIME`), so workers on hosts with skewed clocks agree.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, cast

import redis
import requests
from requests.adapters import HTTPAdapter

from kling_relay.shared import http_session, keys, metrics
from kling_relay.shared.kling import KlingRetryLater
from kling_relay.shared.kling_codes import pause_reason

log = logging.getLogger(__name__)

_NOW = """
local function now_seconds()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""

# KEYS: 1 tat key. ARGV: 1 emission interval (s), 2 burst tolerance (s), 3 now ('' = Redis clock).
# Returns {1, '0'} when the request may go now, else {0, seconds to wait} (a string: Lua numbers would be truncated).
_GCRA = _NOW + """
local now = ARGV[3] ~= '' and tonumber(ARGV[3]) or now_seconds()
local interval, tolerance = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if tat < now then tat = now end
local allow_at = tat - tolerance
if now < allow_at then return {0, string.format('%.6f', allow_at - now)} end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.6f', new_tat), 'PX', math.ceil((new_tat - now + tolerance) * 1000) + 1000)
return {1, '0'}
"""

# KEYS: 1 reservations, 2 submitted index, 3 processing index, 4 the apps set, 5 the job's app's reservations.
# ARGV: 1 job id, 2 cap, 3 ttl seconds, 4 the job's app group, 5 the app state-index prefix.
_RESERVE = _NOW + """
local now = now_seconds()
local stale = string.format('%.6f', now)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', stale)
for _, held in ipairs(redis.call('ZRANGE', KEYS[5], 0, -1)) do  -- the global set is the authority
  if not redis.call('ZSCORE', KEYS[1], held) then redis.call('ZREM', KEYS[5], held) end
end
local expiry = string.format('%.6f', now + tonumber(ARGV[3]))
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], expiry, ARGV[1])
  redis.call('ZADD', KEYS[5], expiry, ARGV[1])
  return 1
end
local cap = tonumber(ARGV[2])
local n = redis.call('ZCARD', KEYS[1]) + redis.call('ZCARD', KEYS[2]) + redis.call('ZCARD', KEYS[3])
if n >= cap then return 0 end
local waiting = 1
for _, group in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  if group ~= ARGV[4] then
    local base = ARGV[5] .. group .. ':state:'
    if redis.call('ZCARD', base .. 'queued') > 0 then
      waiting = waiting + 1
    elseif redis.call('ZCARD', base .. 'submitted') + redis.call('ZCARD', base .. 'processing')
        + redis.call('ZCARD', base .. 'generated') == 0 then
      redis.call('SREM', KEYS[4], group)
    end
  end
end
local share = math.ceil(cap / waiting)
local base = ARGV[5] .. ARGV[4] .. ':state:'
local mine = redis.call('ZCARD', KEYS[5]) + redis.call('ZCARD', base .. 'submitted')
  + redis.call('ZCARD', base .. 'processing')
if mine >= share then return 0 end
redis.call('ZADD', KEYS[1], expiry, ARGV[1])
redis.call('ZADD', KEYS[5], expiry, ARGV[1])
return 1
"""

# KEYS: 1 pause. ARGV: reason, code, message, job id, now (unix seconds, as text). Returns 1 if newly paused.
_PAUSE = """
local new = redis.call('EXISTS', KEYS[1]) == 0
if new then redis.call('HSET', KEYS[1], 'since', ARGV[5]) end
redis.call('HSET', KEYS[1], 'reason', ARGV[1], 'code', ARGV[2], 'message', ARGV[3], 'job_id', ARGV[4],
           'updated_at', ARGV[5])
redis.call('HINCRBY', KEYS[1], 'hits', 1)
redis.call('HDEL', KEYS[1], 'trial_until', 'trial_job')
if new then return 1 end
return 0
"""

# KEYS: 1 pause. ARGV: 1 job id. Returns 'open', 'trial' (this job may try) or 'paused'.
_GATE = _NOW + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'open' end
local until_at = tonumber(redis.call('HGET', KEYS[1], 'trial_until') or '0') or 0
if until_at > now_seconds() then
  local holder = redis.call('HGET', KEYS[1], 'trial_job')
  if not holder or holder == '' or holder == ARGV[1] then
    redis.call('HSET', KEYS[1], 'trial_job', ARGV[1])
    return 'trial'
  end
end
return 'paused'
"""

# KEYS: 1 pause. ARGV: 1 seconds the trial window stays open. Returns 1 if a pause was there to open.
_OPEN_TRIAL = _NOW + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'trial_until', string.format('%.6f', now_seconds() + tonumber(ARGV[1])))
redis.call('HDEL', KEYS[1], 'trial_job')
return 1
"""

# KEYS: 1 pause. Returns the cleared record as a flat list (empty when there was no pause).
_RESUME = """
local record = redis.call('HGETALL', KEYS[1])
redis.call('DEL', KEYS[1])
return record
"""


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- rate limit ---------------------------------------------------------------------------------------------------

class RateLimited(KlingRetryLater):
    """The shared rate limit would be exceeded: nothing was sent; try again after `retry_after` seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"shared Kling rate limit reached; next slot in {retry_after:.2f}s")
        self.retry_after = retry_after


class RateLimiter:
    """GCRA over Redis: at most `per_second` requests per second across all processes, bursts up to `burst`.

    `burst` defaults to one second's worth (at least 1). `clock` is for tests; by default the script reads Redis'
    clock, the one clock every worker shares.
    """

    def __init__(self, client: redis.Redis, per_second: float, *, burst: int | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        if per_second <= 0:
            raise ValueError("per_second must be positive")
        self.per_second = per_second
        self.burst = burst if burst is not None else max(1, int(per_second))
        if self.burst < 1:
            raise ValueError("burst must be at least 1")
        self._interval = 1.0 / per_second
        self._tolerance = self._interval * (self.burst - 1)
        self._key = keys.FLOW_RATE
        self._clock = clock
        self._script = client.register_script(_GCRA)

    def __repr__(self) -> str:
        return f"RateLimiter(per_second={self.per_second}, burst={self.burst})"

    def try_acquire(self) -> float:
        """Take a slot now if there is one (returns 0.0), else return the seconds until the next one."""
        now = "" if self._clock is None else repr(self._clock())
        granted, wait = self._script(keys=[self._key], args=[repr(self._interval), repr(self._tolerance), now])
        return 0.0 if granted == 1 else max(float(wait), 1e-6)

    def acquire(self, max_wait: float, sleep: Callable[[float], None] = time.sleep) -> None:
        """Take a slot, sleeping while the wait is short; raise `RateLimited` once it would exceed `max_wait`."""
        waited = 0.0
        while True:
            wait = self.try_acquire()
            if wait <= 0:
                return
            if waited + wait > max_wait:
                metrics.rate_limit_refused()
                raise RateLimited(wait)
            sleep(wait)
            metrics.rate_limit_waited(wait)
            waited += wait


class RateLimitedAdapter(HTTPAdapter):
    """An HTTP adapter that takes a rate-limit slot before each request it sends (RateLimited if none soon)."""

    def __init__(self, limiter: RateLimiter, max_wait: float) -> None:
        super().__init__()
        self.limiter = limiter
        self.max_wait = max_wait

    def send(self, request: requests.PreparedRequest, stream: bool = False,
             timeout: None | float | tuple[float, float] | tuple[float, None] = None,
             verify: bool | str = True, cert: None | bytes | str | tuple[bytes | str, bytes | str] = None,
             proxies: Mapping[str, str] | None = None) -> requests.Response:
        self.limiter.acquire(self.max_wait)
        return super().send(request, stream=stream, timeout=timeout, verify=verify, cert=cert, proxies=proxies)


def rate_limited_session(client: redis.Redis, per_second: float, *, max_wait: float = 1.0) -> requests.Session:
    """An HTTP session whose every request first takes a slot of the shared rate limit (see module docstring)."""
    session = http_session.Session()
    session.headers["user-agent"] = "kling-relay"
    adapter = RateLimitedAdapter(RateLimiter(client, per_second), max_wait)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


# --- in-flight cap ------------------------------------------------------------------------------------------------

def reserve_in_flight(client: redis.Redis, job_id: str, cap: int, ttl: float, app: str | None = None) -> bool:
    """Reserve a place under the in-flight cap for this job's submit; False if the cap (or the app's share of it)
    is reached.

    Counts jobs in `submitted` and `processing` plus live reservations, and adds this job's reservation, in one
    script. A job that already holds a reservation renews it. Release it with `release_in_flight` once the job
    is recorded as submitted (it then counts through the state index) or the submit ends otherwise; a
    reservation not released lapses after `ttl` seconds.

    Fair share between apps: the cap is shared by the apps (`app`, the job's; None for jobs without one) that
    have queued work. With `k` such apps (this job's always counts), an app may hold at most `ceil(cap / k)`
    places (its jobs submitted, processing, or holding a reservation). So a throttled submit of an app that
    holds its share leaves the next free place to another app's job, however long the first app's backlog is
    in the submit queue; an app alone gets the whole cap. The counts are the per-app state indexes the job
    scripts maintain and a per-app copy of the reservations; apps without active jobs are pruned from the
    `kr:apps` set here.
    """
    group = app or keys.NO_APP_GROUP
    names = [keys.FLOW_IN_FLIGHT, keys.jobs_in_state("submitted"), keys.jobs_in_state("processing"), keys.APPS,
             keys.app_in_flight(group)]
    return bool(client.register_script(_RESERVE)(keys=names, args=[job_id, cap, repr(ttl), group,
                                                                   keys.APP_PREFIX]))


def release_in_flight(client: redis.Redis, job_id: str, app: str | None = None) -> None:
    """Drop this job's reservation (no-op if it has none)."""
    pipe = client.pipeline(transaction=True)
    pipe.zrem(keys.FLOW_IN_FLIGHT, job_id)
    pipe.zrem(keys.app_in_flight(app or keys.NO_APP_GROUP), job_id)
    pipe.execute()


def in_flight(client: redis.Redis) -> dict[str, int]:
    """Counts the cap is checked against: jobs submitted, processing, and reservations (expired ones included)."""
    pipe = client.pipeline(transaction=False)
    pipe.zcard(keys.jobs_in_state("submitted"))
    pipe.zcard(keys.jobs_in_state("processing"))
    pipe.zcard(keys.FLOW_IN_FLIGHT)
    submitted, processing, reserved = (int(n) for n in pipe.execute())
    return {"submitted": submitted, "processing": processing, "reserved": reserved}


# --- pause --------------------------------------------------------------------------------------------------------

def pause(client: redis.Redis, *, code: int | None, message: str, job_id: str | None = None) -> bool:
    """Pause submission because Kling answered an account/auth error; True if it was not paused before.

    A repeated pause keeps `since`, updates code and message, counts `hits` and closes any trial window.
    """
    now = repr(time.time())
    args = [pause_reason(code), "" if code is None else str(code), message[:500], job_id or "", now]
    newly = bool(client.register_script(_PAUSE)(keys=[keys.FLOW_PAUSE], args=args))
    if newly:
        log.error("kling submission paused", extra={"code": code, "kling_message": message[:500], "job_id": job_id})
    return newly


def gate(client: redis.Redis, job_id: str) -> str:
    """Whether this job's submit may call Kling: `open`, `trial` (the one job let through a trial) or `paused`."""
    return cast(str, client.register_script(_GATE)(keys=[keys.FLOW_PAUSE], args=[job_id]))


def open_trial(client: redis.Redis, seconds: float) -> bool:
    """Let one job's submit through the pause for the next `seconds`; False if submission is not paused."""
    return bool(client.register_script(_OPEN_TRIAL)(keys=[keys.FLOW_PAUSE], args=[repr(seconds)]))


def resume(client: redis.Redis, *, by: str = "ops") -> dict[str, Any] | None:
    """Clear the pause (the ops action, or the reconciler's probe). Returns the pause that was cleared, or None.

    Queued jobs are not sent here: the reconciler re-enqueues them as they come due (within the probe interval).
    """
    raw = cast(list[str], client.register_script(_RESUME)(keys=[keys.FLOW_PAUSE]))
    if not raw:
        return None
    record = _decode_pause(dict(zip(raw[0::2], raw[1::2], strict=True)))
    log.warning("kling submission resumed", extra={"by": by, "code": record.get("code")})
    return record


def current_pause(client: redis.Redis) -> dict[str, Any] | None:
    """The pause in force, decoded (see `status`), or None."""
    raw = cast(dict[str, str], client.hgetall(keys.FLOW_PAUSE))
    return _decode_pause(raw) if raw else None


def _decode_pause(raw: dict[str, str]) -> dict[str, Any]:
    def when(name: str) -> str | None:
        value = raw.get(name)
        return _iso(float(value)) if value else None

    code = raw.get("code")
    record: dict[str, Any] = {
        "reason": raw.get("reason", "auth"),
        "code": int(code) if code else None,
        "message": raw.get("message", ""),
        "since": when("since"),
        "updated_at": when("updated_at"),
        "job_id": raw.get("job_id") or None,
        "hits": int(raw.get("hits", "0")),
        "trial_until": when("trial_until"),
        "trial_job": raw.get("trial_job") or None,
    }
    if record["reason"] == "budget":  # set by shared/usage.py: the budget and when the pause ends by itself
        record.update(budget=float(raw["budget"]) if raw.get("budget") else None, resume_at=when("resume_at"))
    return record


def claim_probe(client: redis.Redis, every: float) -> bool:
    """True at most once per `every` seconds across all processes: whether the caller should probe Kling now."""
    return bool(client.set(keys.FLOW_PROBE, "1", nx=True, px=max(1, int(every * 1000))))


def status(client: redis.Redis) -> dict[str, Any]:
    """Flow state for /healthz and the ops views.

    `{"submission": "open" | "paused", "pause": None | {"reason": "auth" | "account" | "budget", "code",
    "message", "since", "updated_at", "job_id", "hits", "trial_until", "trial_job"} (a `budget` pause, see
    shared/usage.py, adds "budget" and "resume_at"), "in_flight": {"submitted", "processing", "reserved"}}`;
    times are ISO-8601 UTC. Never contains a secret.
    """
    record = current_pause(client)
    return {"submission": "paused" if record else "open", "pause": record,
            "in_flight": in_flight(client)}
