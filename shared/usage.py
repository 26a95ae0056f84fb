"""What Kling bills: each job's deduction, units spent per UTC day and month, estimates, and the daily budget guard.

**Recording.** A finished Kling task carries `final_unit_deduction` (units; callbacks may add
`final_balance_deduction`). `record_deduction` writes them on the job (hash fields `units`, `balance_deduction`)
only if the job has none yet, and in the same script adds the units to the counters of the UTC day and month
the deduction was learned on: a duplicated callback, the reconciler's poll and the copy's re-read of the task
all report the same deduction, and it counts once. A canceled job whose task still finishes at Kling is billed
there, so its deduction is recorded too.

**Estimates.** Before its create, a job's `<model>|<mode>|<duration>` is put in a pending hash; when its
deduction is recorded from a succeeded task, that amount becomes the estimate for the combination (the last one
seen wins). A combination never seen is estimated at `KLING_DEFAULT_UNITS_ESTIMATE`.

**Budget guard** (`KLING_DAILY_UNIT_BUDGET`, unset = off). Right before a create, `admit` adds up the units spent
today, the estimates of the jobs in flight (submitted, processing, and submits holding an in-flight reservation)
and this job's estimate; over the budget, the submit pauses submission with reason `budget` (`pause_for_budget`,
the same pause as account errors: jobs stay queued, nothing fails) instead of calling Kling. The check and the
job's pending entry are one script, so two workers cannot both take the last units. The pause ends:
- by itself (`budget_pause_over`, asked by the reconciler on each pass; Kling is never probed for it) when the
  UTC day changes, when the budget is unset, or when the sum fits again (the budget was raised, or a job in
  flight finished without the units it was estimated at);
- by an operator's resume (`operator_resume`), which also lets submission go on for the rest of that UTC day
  without the guard ("override until midnight UTC"): resuming is the operator's decision to spend more today.
An account or auth pause takes precedence: a budget pause never replaces one (an account pause replaces a budget
pause; once it is resumed, the next submit checks the budget again).

Days and months are UTC, taken from the caller's clock (`now`), so tests can move it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import redis

from kling_relay.shared import flow, keys
from kling_relay.shared.kling import KlingTask

log = logging.getLogger(__name__)

REASON = "budget"
#: How long the per-day and per-month counters are kept.
DAY_COUNTER_TTL = 40 * 86400
MONTH_COUNTER_TTL = 400 * 86400

# KEYS: 1 job, 2 day counter, 3 month counter, 4 estimates, 5 pending.
# ARGV: 1 units ('' = none), 2 balance ('' = none), 3 job id, 4 day ttl, 5 month ttl, 6 learn the estimate ('1').
# Returns {units counted now (1/0), balance recorded now (1/0)}; {-1, -1} when the job does not exist.
_RECORD = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, -1} end
local counted, balanced = 0, 0
if ARGV[1] ~= '' and redis.call('HSETNX', KEYS[1], 'units', ARGV[1]) == 1 then
  redis.call('INCRBYFLOAT', KEYS[2], ARGV[1])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
  redis.call('INCRBYFLOAT', KEYS[3], ARGV[1])
  redis.call('EXPIRE', KEYS[3], ARGV[5])
  local combo = redis.call('HGET', KEYS[5], ARGV[3])
  if combo and ARGV[6] == '1' then redis.call('HSET', KEYS[4], combo, ARGV[1]) end
  redis.call('HDEL', KEYS[5], ARGV[3])
  counted = 1
end
if ARGV[2] ~= '' and redis.call('HSETNX', KEYS[1], 'balance_deduction', ARGV[2]) == 1 then balanced = 1 end
return {counted, balanced}
"""

# KEYS: 1 pending, 2 estimates, 3 today's counter, 4 submitted index, 5 processing index, 6 in-flight
#       reservations, 7 override.
# ARGV: 1 job id, 2 its combination, 3 budget ('' = none), 4 default estimate, 5 job key prefix, 6 today,
#       7 register the job as pending when admitted ('1').
# Returns {admitted 1/0, spent today, estimate in flight, this job's estimate} (numbers as text).
_ADMIT = """
local TERMINAL = {stored=true, failed=true, canceled=true}
local default = tonumber(ARGV[4])
local function estimate(combo)
  if not combo then return default end
  return tonumber(redis.call('HGET', KEYS[2], combo) or '') or default
end
local t = redis.call('TIME')
local now = string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1000000)
local seen = {[ARGV[1]] = true}
local in_flight = 0
local function count(ids)
  for _, id in ipairs(ids) do
    if not seen[id] then
      seen[id] = true
      in_flight = in_flight + estimate(redis.call('HGET', KEYS[1], id))
    end
  end
end
count(redis.call('ZRANGE', KEYS[4], 0, -1))
count(redis.call('ZRANGE', KEYS[5], 0, -1))
count(redis.call('ZRANGEBYSCORE', KEYS[6], now, '+inf'))
for _, id in ipairs(redis.call('HKEYS', KEYS[1])) do
  if not seen[id] then
    local state = redis.call('HGET', ARGV[5] .. id, 'state')
    if not state or TERMINAL[state] then redis.call('HDEL', KEYS[1], id) end
  end
end
local spent = tonumber(redis.call('GET', KEYS[3]) or '0') or 0
local need = estimate(ARGV[2])
local ok = ARGV[3] == '' or redis.call('GET', KEYS[7]) == ARGV[6]
  or spent + in_flight + need <= tonumber(ARGV[3]) + 1e-9
if ok and ARGV[7] == '1' then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
local function num(x) return string.format('%.17g', x) end
return {ok and 1 or 0, num(spent), num(in_flight), num(need)}
"""

# KEYS: 1 pause. ARGV: 1 message, 2 job id, 3 now, 4 day, 5 budget, 6 combination, 7 resume at.
# Returns 1 if newly paused, 0 if a budget pause was renewed, -1 if another pause (auth/account) is in force.
_PAUSE = """
local reason = redis.call('HGET', KEYS[1], 'reason')
if reason and reason ~= 'budget' then return -1 end
local new = redis.call('EXISTS', KEYS[1]) == 0
if new then redis.call('HSET', KEYS[1], 'since', ARGV[3]) end
redis.call('HSET', KEYS[1], 'reason', 'budget', 'code', '', 'message', ARGV[1], 'job_id', ARGV[2],
           'updated_at', ARGV[3], 'day', ARGV[4], 'budget', ARGV[5], 'combination', ARGV[6], 'resume_at', ARGV[7])
redis.call('HINCRBY', KEYS[1], 'hits', 1)
if new then return 1 end
return 0
"""

# KEYS: 1 pause. Clears it only if it is a budget pause; returns 1 if cleared.
_LIFT = """
if redis.call('HGET', KEYS[1], 'reason') ~= 'budget' then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""


def utc_day(now: float) -> str:
    """`yyyy-mm-dd` of `now` in UTC."""
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")


def utc_month(now: float) -> str:
    """`yyyy-mm` of `now` in UTC."""
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m")


def next_midnight(now: float) -> float:
    """The Unix time at which the UTC day of `now` ends."""
    day = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return (day + timedelta(days=1)).timestamp()


def combination(request: Mapping[str, Any]) -> str:
    """The price class of a request, `<model>|<mode>|<duration>` (the normalized request has all three)."""
    return "|".join(str(request.get(k) or "") for k in ("model_name", "mode", "duration"))


def _text(amount: float | None) -> str:
    return "" if amount is None else repr(amount)


@dataclass(frozen=True)
class Recorded:
    """What `record_deduction` did: whether the units (balance) were recorded now, not earlier."""

    units: bool
    balance: bool


def record_deduction(client: redis.Redis, job_id: str, task: KlingTask, *, now: float | None = None) -> Recorded:
    """Keep what Kling billed for the job's task (see the module docstring); a no-op when the task says nothing,
    when the job already has it, or when the job is gone. Only a succeeded task teaches the estimate."""
    units, balance = task.final_unit_deduction, task.final_balance_deduction
    if units is None and balance is None:
        return Recorded(False, False)
    at = time.time() if now is None else now
    names = [keys.job(job_id), keys.units_on_day(utc_day(at)), keys.units_in_month(utc_month(at)),
             keys.USAGE_ESTIMATES, keys.USAGE_PENDING]
    args: list[str | int] = [_text(units), _text(balance), job_id, DAY_COUNTER_TTL, MONTH_COUNTER_TTL,
            "1" if task.status == "succeed" else "0"]
    counted, balanced = (int(n) for n in cast(list[int], client.register_script(_RECORD)(keys=names, args=args)))
    if counted > 0:
        log.info("kling deduction recorded", extra={"job_id": job_id, "units": units, "balance": balance})
    return Recorded(counted > 0, balanced > 0)


def spent(client: redis.Redis, *, now: float | None = None) -> dict[str, Any]:
    """Units spent in the UTC day and month of `now`, for GET /v1/status:
    `{"day": "yyyy-mm-dd", "today": n, "month": n, "budget_override": bool}` (`budget_override`: an operator
    resumed a budget pause today, so the guard is off until midnight UTC)."""
    at = time.time() if now is None else now
    day = utc_day(at)
    pipe = client.pipeline(transaction=False)
    pipe.get(keys.units_on_day(day))
    pipe.get(keys.units_in_month(utc_month(at)))
    pipe.get(keys.USAGE_OVERRIDE)
    today, month, override = pipe.execute()
    return {"day": day, "today": _amount(today), "month": _amount(month), "budget_override": override == day}


def _amount(raw: str | None) -> int | float:
    value = float(raw) if raw else 0.0
    return int(value) if value.is_integer() else value


@dataclass(frozen=True)
class Verdict:
    """The budget guard's answer for one job: may it be created, and the sum that decided it."""

    admitted: bool
    spent: float  # units recorded today
    in_flight: float  # estimate of the jobs in flight (this one left out)
    estimate: float  # this job's estimate
    budget: float | None

    def message(self) -> str:
        return (f"daily unit budget {self.budget:g} reached: spent today {self.spent:g} + in flight (estimated) "
                f"{self.in_flight:g} + next job {self.estimate:g}")


def admit(client: redis.Redis, job_id: str, combo: str, *, budget: float | None, default_estimate: float,
          now: float | None = None, register: bool = True) -> Verdict:
    """Whether the job's create fits in today's budget (always, with no budget or an operator's override);
    when it does and `register`, the job is put in the pending hash (see the module docstring)."""
    at = time.time() if now is None else now
    day = utc_day(at)
    names = [keys.USAGE_PENDING, keys.USAGE_ESTIMATES, keys.units_on_day(day), keys.jobs_in_state("submitted"),
             keys.jobs_in_state("processing"), keys.FLOW_IN_FLIGHT, keys.USAGE_OVERRIDE]
    args = [job_id, combo, _text(budget), repr(default_estimate), keys.JOB_KEY_PREFIX, day, "1" if register else "0"]
    ok, spent_today, in_flight, need = cast(list[Any], client.register_script(_ADMIT)(keys=names, args=args))
    return Verdict(int(ok) == 1, float(spent_today), float(in_flight), float(need), budget)


def pause_for_budget(client: redis.Redis, verdict: Verdict, *, job_id: str, combo: str,
                     now: float | None = None) -> bool:
    """Pause submission with reason `budget`; True if it was not paused before. An auth or account pause in force
    is left as it is (it already holds every submit)."""
    at = time.time() if now is None else now
    args = [verdict.message(), job_id, repr(at), utc_day(at), _text(verdict.budget), combo,
            repr(next_midnight(at))]
    newly = int(cast(int, client.register_script(_PAUSE)(keys=[keys.FLOW_PAUSE], args=args))) == 1
    if newly:
        log.warning("kling submission paused: daily unit budget", extra={
            "job_id": job_id, "budget": verdict.budget, "spent": verdict.spent, "in_flight": verdict.in_flight,
            "estimate": verdict.estimate})
    return newly


def budget_pause_over(client: redis.Redis, *, budget: float | None, default_estimate: float,
                      now: float | None = None) -> str | None:
    """Why the budget pause in force may end now (`budget unset`, `new UTC day`, `fits again`), or None while it
    holds (or when the pause in force is not a budget pause)."""
    raw = cast(dict[str, str], client.hgetall(keys.FLOW_PAUSE))
    if raw.get("reason") != REASON:
        return None
    at = time.time() if now is None else now
    if budget is None:
        return "budget unset"
    if raw.get("day") != utc_day(at):
        return "new UTC day"
    verdict = admit(client, raw.get("job_id") or "", raw.get("combination") or "", budget=budget,
                    default_estimate=default_estimate, now=at, register=False)
    return "fits again" if verdict.admitted else None


def lift_budget_pause(client: redis.Redis, *, why: str) -> bool:
    """End the pause if (still) a budget pause; True if it was ended. Queued jobs resume as they come due."""
    lifted = bool(client.register_script(_LIFT)(keys=[keys.FLOW_PAUSE]))
    if lifted:
        log.warning("kling submission resumed: daily unit budget", extra={"why": why})
    return lifted


def operator_resume(client: redis.Redis, *, by: str, now: float | None = None) -> dict[str, Any] | None:
    """The ops action: clear any pause (`flow.resume`); a budget pause's resume also switches the guard off until
    midnight UTC. Returns the pause cleared, or None."""
    cleared = flow.resume(client, by=by)
    if cleared is not None and cleared.get("reason") == REASON:
        at = time.time() if now is None else now
        client.set(keys.USAGE_OVERRIDE, utc_day(at), exat=int(next_midnight(at)) + 1)
        log.warning("daily unit budget overridden until midnight UTC", extra={"by": by})
    return cleared
