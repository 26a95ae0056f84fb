"""What Kling's callbacks said about a job's task, and the jobs that wait for a callback.

For when the relay cannot read tasks back from Kling (`KLING_QUERY` off, or `auto` without read routes: see
`shared/kling_reads.py`), and for callbacks that beat the create's answer:

- `remember`: each callback that passed the webhook's checks (its job's token; its task is the job's, or it
  names the job while no task is recorded yet) is kept under its status and task id in `kr:job:<id>:heard`, at
  most `MAX_HEARD` entries, expiring with the job. `heard(redis, job_id, task_id)` answers the most advanced
  status heard for that one task: the copy takes a `succeed`'s video URLs from it in callbacks-only mode, and the
  submit applies a status heard before the create's answer recorded the task. Nothing here binds a job to a
  task: entries are read only for the task id that Kling's own answer bound (the create's, or a lookup's), so
  a forged callback with a made-up task id is never used.
- `flag_awaiting`: a job whose create's outcome is unknown while tasks cannot be read back. It is never sent
  again (that could make a second, billed task): it stays `queued` and waits for a callback that can be trusted
  to name its task (a signed one, `may_bind_from_callback`), or for the operator. `awaiting` lists them for
  GET /v1/status.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import redis

from kling_relay.shared import keys
from kling_relay.shared.jobs_model import CREATE_SENT, Job, JobState, iso_utc
from kling_relay.shared.kling import KlingTask

#: Most (status, task id) entries kept per job: a forged flood with a stolen token stays small.
MAX_HEARD = 8
#: Most flagged jobs `awaiting` lists (the oldest first).
MAX_LISTED = 100
_RANK = {"submitted": 0, "processing": 1, "succeed": 2, "failed": 2}


def task_json(task: KlingTask) -> dict[str, Any]:
    """The task in Kling's task-object shape (what `KlingTask.from_json` reads back)."""
    obj: dict[str, Any] = {"task_id": task.task_id, "task_status": task.status, "task_status_msg": task.status_msg,
                           "task_info": {"external_task_id": task.external_task_id},
                           "created_at": task.created_at_ms, "updated_at": task.updated_at_ms}
    if task.videos:
        obj["task_result"] = {"videos": [{"id": v.id, "url": v.url, "duration": v.duration} for v in task.videos]}
    if task.final_unit_deduction is not None:
        obj["final_unit_deduction"] = task.final_unit_deduction
    if task.final_balance_deduction is not None:
        obj["final_balance_deduction"] = task.final_balance_deduction
    return obj


def remember(client: redis.Redis, job_id: str, task: KlingTask, *, ttl_seconds: int) -> bool:
    """Keep what a callback said about the job's task; False when the job already has `MAX_HEARD` entries."""
    key = keys.job_heard(job_id)
    field = f"{task.status}:{task.task_id}"
    if not client.hexists(key, field) and cast(int, client.hlen(key)) >= MAX_HEARD:
        return False
    pipe = client.pipeline(transaction=False)
    pipe.hset(key, field, json.dumps(task_json(task), ensure_ascii=False))
    pipe.expire(key, ttl_seconds)
    pipe.execute()
    return True


# KEYS: 1 the job's hash, 2 its heard hash. ARGV: 1 task id, 2 field, 3 task JSON, 4 ttl seconds, 5 MAX_HEARD.
# Returns {kept (0/1), state ('' = no job), kling_task_id}; keeps the task only if it is the job's bound one and
# the job is not stored (the step into `stored` deletes what was kept: nothing reads it after that).
_READ_AND_REMEMBER = """
local job = redis.call('HMGET', KEYS[1], 'state', 'kling_task_id')
if not job[1] then return {0, '', ''} end
local tid = job[2] or ''
if tid ~= ARGV[1] or job[1] == 'stored' then return {0, job[1], tid} end
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 0 and redis.call('HLEN', KEYS[2]) >= tonumber(ARGV[5]) then
  return {0, job[1], tid}
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return {1, job[1], tid}
"""


@dataclass(frozen=True)
class Glimpse:
    """What one round trip tells a callback: the job's state and bound task (None: no job; task None: unbound),
    and whether the callback was kept (only when its task is the job's bound one)."""

    state: JobState | None
    kling_task_id: str | None
    kept: bool


def read_and_remember(client: redis.Redis, job_id: str, task: KlingTask, *, ttl_seconds: int) -> Glimpse:
    """One round trip for a callback: the job's state and bound task and, when `task` is that bound task,
    `remember` it as well. A task that is not the job's bound one is not kept here: the caller checks it and
    calls `remember` itself where that is allowed."""
    field = f"{task.status}:{task.task_id}"
    kept, state, task_id = cast(list[Any], client.register_script(_READ_AND_REMEMBER)(
        keys=[keys.job(job_id), keys.job_heard(job_id)],
        args=[task.task_id, field, json.dumps(task_json(task), ensure_ascii=False), ttl_seconds, MAX_HEARD]))
    return Glimpse(JobState(state) if state else None, task_id or None, bool(int(kept)))


def heard(client: redis.Redis, job_id: str, task_id: str) -> KlingTask | None:
    """The most advanced status callbacks reported for this task of the job (None if none did)."""
    best: KlingTask | None = None
    for field, raw in cast(dict[str, str], client.hgetall(keys.job_heard(job_id))).items():
        if field.split(":", 1)[-1] != task_id:
            continue
        task = KlingTask.from_json(json.loads(raw))
        if best is None or _RANK[task.status] > _RANK[best.status]:
            best = task
    return best


def is_beyond(later: KlingTask, earlier: KlingTask) -> bool:
    """Whether `later`'s status is a step past `earlier`'s."""
    return _RANK[later.status] > _RANK[earlier.status]


def may_bind_from_callback(job: Job, task: KlingTask, *, signed: bool) -> bool:
    """Whether a callback may bind the job to its task: only a callback signed by Kling (Kling's own word, unlike
    the per-job token, which a leaked URL gives away), naming this job, while the job is queued after a create
    was sent and no task is recorded."""
    return (signed and job.state is JobState.QUEUED and job.kling_task_id is None
            and job.attempts.get(CREATE_SENT, 0) > 0 and task.external_task_id == job.id)


# -- jobs awaiting a callback -------------------------------------------------------------------------------------

def flag_awaiting(client: redis.Redis, job_id: str, message: str, *, now: float | None = None) -> bool:
    """Flag the job as waiting for its callback (see the module docstring); True if it was not flagged yet."""
    entry = json.dumps({"since": time.time() if now is None else now, "message": message[:500]}, ensure_ascii=False)
    return bool(client.hsetnx(keys.AWAITING_CALLBACK, job_id, entry))


def awaiting_reason(client: redis.Redis, job_id: str) -> dict[str, Any] | None:
    """`{"since": <unix seconds>, "message"}` if the job is flagged, else None."""
    raw = cast(str | None, client.hget(keys.AWAITING_CALLBACK, job_id))
    return None if raw is None else cast(dict[str, Any], json.loads(raw))


def unflag_awaiting(client: redis.Redis, job_id: str) -> None:
    client.hdel(keys.AWAITING_CALLBACK, job_id)


def awaiting(client: redis.Redis, get_job: Callable[[str], Job | None]) -> list[dict[str, Any]]:
    """Flagged jobs still waiting (queued, no task recorded), oldest first: `{"job_id", "since", "message"}`.

    `get_job(job_id)` reads a job (`JobStore.get`); flags of jobs that moved on or are gone are dropped here.
    """
    flagged = cast(dict[str, str], client.hgetall(keys.AWAITING_CALLBACK))
    listed: list[dict[str, Any]] = []
    for job_id, raw in flagged.items():
        job = get_job(job_id)
        if job is None or job.state is not JobState.QUEUED or job.kling_task_id is not None:
            unflag_awaiting(client, job_id)
            continue
        entry = json.loads(raw)
        listed.append({"job_id": job_id, "since": float(entry["since"]), "message": entry["message"]})
    listed.sort(key=lambda e: e["since"])
    return [{**e, "since": iso_utc(e["since"])} for e in listed[:MAX_LISTED]]
