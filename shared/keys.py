"""The Redis key layout, written once. Every module that keeps keys in Redis builds them here.

All keys start with `kr:`; one Redis (database) serves one relay.
- `kr:job:<id>` hash: the job and its timeline (`jobs_model` has the field encoding: defaults not written, values
  over 64 bytes in pieces `<field>~<n>`, so the hash stays a listpack under Redis's default config; the timeline
  in `tl`); `kr:job:<id>:request` string: its Kling request as JSON (deleted by the step into `stored`: the
  manifest records it); `kr:job:<id>:events` list: the timeline of a job written before 2026-12-08, or one grown
  past `jobs_lua.TIMELINE_MAX_BYTES` (`Event.from_json`)
- `kr:jobs:all`, `kr:jobs:state:<state>` sorted sets (score = created_at): listing newest first, counts
- `kr:jobs:app:<app>` sorted set (score = created_at): one app's jobs, for its listing (entries of expired jobs
  dropped by the sweep, `kr:sweep`); `kr:jobs:app:<group>:state:<state>` sorted sets for the non-terminal states
  (queued, submitted, processing, generated) of the app's jobs (`<group>` is the app, or `_` for jobs without one):
  its active count (APP_MAX_ACTIVE_JOBS) and its share of the in-flight cap; `kr:apps` set: the groups seen
  (pruned by the in-flight reservation once a group has no active job). The job scripts build these names
  from `APP_PREFIX` and the job's `app` field.
- `kr:jobs:due` sorted set (score = when the reconciler should look next)
- `kr:jobs:by_task` hash: Kling task id → job id (written with the task id; a lookup, never a scan)
- `kr:sweep` hash: where the sweep of index entries of expired jobs resumes (`JobStore.sweep`, run by each
  reconciler pass): per sorted-set index, a field `<index key>` = `<score> <n>` (the last score it examined and how
  many entries at that score it kept); `by_task` = the `HSCAN` cursor of `kr:jobs:by_task`. A field is dropped
  when its sweep reaches the end, so the next pass starts again from the oldest entry.
- `kr:sweep:apps` set: the apps whose listing index (`kr:jobs:app:<app>`) the sweep looks after (added by the
  create script, removed by the sweep once the index is empty and gone)
- `kr:idem:<sha256(idempotency key)>` string: the job id without `job_`, then the first 12 bytes of the sha256 of
  the canonical body in base64url (`JobStore.create`; before 2026-12-08 a hash: `job_id` and `body`, still read)
- `kr:outbox` sorted set of `<id>|<state>|<at>` (score = at): steps still to be announced (`shared/notify.py`)
- `kr:flow:rate` (GCRA theoretical arrival time), `kr:flow:in_flight` (sorted set of submit reservations),
  `kr:flow:in_flight:app:<group>` (the same reservations, per app group), `kr:flow:pause` (hash),
  `kr:flow:probe` (a recent probe's mark)
- `kr:usage:units:day:<yyyy-mm-dd>`, `kr:usage:units:month:<yyyy-mm>` (units Kling deducted, UTC, as floats),
  `kr:usage:estimates` (hash: `<model>|<mode>|<duration>` → the last deduction seen), `kr:usage:pending` (hash:
  job id → its `<model>|<mode>|<duration>`, from its submit until its deduction is recorded), `kr:usage:override`
  (the UTC day on which an operator resumed a budget pause); a job's own deduction is in its hash (`units`,
  `balance_deduction`)
- `kr:flow:copy_pause` (hash: copying paused, storage unusable), `kr:flow:copy_probe` (a recent storage probe's
  mark), `kr:flow:copy_waits` (hash: job id → JSON, jobs whose copy waits for the operator)
- `kr:lock:<step>:<job_id>` (submit, copy) and `kr:lock:reconcile`: locks with a token and an expiry
- `kr:job:<id>:heard` hash: the tasks Kling's callbacks named for the job (`shared/heard.py`; deleted by the step
  into `stored`);
  `kr:heard:awaiting` hash: job id → why the job waits for a callback; `kr:kling:reads` the `KLING_QUERY=auto`
  verdict (`shared/kling_reads.py`)
- `kr:reconcile:last` string: JSON summary of the reconciler's last pass (`shared/reconcile.py`)
- `kr:stats:<state>:<minute>` counters (jobs that entered `stored`/`failed` in that UTC minute, epoch // 60) and
  `kr:stats:failed_reasons:<minute>` hashes (reason → count), each expiring after two hours (`shared/stats.py`)
- `kr:dashboard:session:<sha256(id)>` hash: a signed-in dashboard session (`shared/dashboard_auth.py`)
- the consumers' events stream: its name is the `EVENTS_STREAM` setting

Celery's own keys (queues `submit`, `copy`, `notify`, `reconcile`, `unacked*`, `_kombu.*`) share the database.
"""

from __future__ import annotations

PREFIX = "kr:"

JOBS_ALL = f"{PREFIX}jobs:all"
JOBS_DUE = f"{PREFIX}jobs:due"
JOBS_BY_TASK = f"{PREFIX}jobs:by_task"
RECONCILE_LAST = f"{PREFIX}reconcile:last"
SWEEP = f"{PREFIX}sweep"
SWEEP_APPS = f"{PREFIX}sweep:apps"  # the create script names it itself
OUTBOX = f"{PREFIX}outbox"
JOB_KEY_PREFIX = f"{PREFIX}job:"  # the Lua create script builds `<this><id>` itself
APP_PREFIX = f"{PREFIX}jobs:app:"  # the Lua job scripts build `<this><group>:state:<state>` themselves
APPS = f"{PREFIX}apps"
#: The group of jobs without an app (not a valid token name, so no app can be called that).
NO_APP_GROUP = "_"
#: The states an app's active count (and its per-state indexes) covers.
ACTIVE_STATES = ("queued", "submitted", "processing", "generated")

FLOW_RATE = f"{PREFIX}flow:rate"
FLOW_IN_FLIGHT = f"{PREFIX}flow:in_flight"
FLOW_PAUSE = f"{PREFIX}flow:pause"
FLOW_PROBE = f"{PREFIX}flow:probe"
COPY_PAUSE = f"{PREFIX}flow:copy_pause"
COPY_PROBE = f"{PREFIX}flow:copy_probe"
COPY_WAITS = f"{PREFIX}flow:copy_waits"

USAGE_ESTIMATES = f"{PREFIX}usage:estimates"
USAGE_PENDING = f"{PREFIX}usage:pending"
USAGE_OVERRIDE = f"{PREFIX}usage:override"

RECONCILE_LOCK = f"{PREFIX}lock:reconcile"

AWAITING_CALLBACK = f"{PREFIX}heard:awaiting"
KLING_READS = f"{PREFIX}kling:reads"


def job(job_id: str) -> str:
    return f"{JOB_KEY_PREFIX}{job_id}"


def job_request(job_id: str) -> str:
    return f"{JOB_KEY_PREFIX}{job_id}:request"


def job_events(job_id: str) -> str:
    return f"{JOB_KEY_PREFIX}{job_id}:events"


def job_heard(job_id: str) -> str:
    return f"{JOB_KEY_PREFIX}{job_id}:heard"


def jobs_in_state(state: str) -> str:
    return f"{PREFIX}jobs:state:{state}"


def app_jobs(app: str) -> str:
    """One app's jobs, by created_at."""
    return f"{APP_PREFIX}{app}"


def app_jobs_in_state(group: str, state: str) -> str:
    """One app group's jobs in a non-terminal state (`ACTIVE_STATES`)."""
    return f"{APP_PREFIX}{group}:state:{state}"


def app_in_flight(group: str) -> str:
    """One app group's in-flight reservations (a subset of FLOW_IN_FLIGHT's)."""
    return f"{PREFIX}flow:in_flight:app:{group}"


def idempotency(key_hash: str) -> str:
    return f"{PREFIX}idem:{key_hash}"


def job_lock(step: str, job_id: str) -> str:
    return f"{PREFIX}lock:{step}:{job_id}"


def units_on_day(day: str) -> str:
    """Units deducted on a UTC day, `day` as `yyyy-mm-dd`."""
    return f"{PREFIX}usage:units:day:{day}"


def units_in_month(month: str) -> str:
    """Units deducted in a UTC month, `month` as `yyyy-mm`."""
    return f"{PREFIX}usage:units:month:{month}"


def stats_count(state: str, minute: int) -> str:
    """Jobs that entered `state` in the UTC minute `minute` (Unix seconds // 60)."""
    return f"{PREFIX}stats:{state}:{minute}"


def stats_failed_reasons(minute: int) -> str:
    """Hash reason → failures in the UTC minute `minute`."""
    return f"{PREFIX}stats:failed_reasons:{minute}"


def dashboard_session(id_hash: str) -> str:
    return f"{PREFIX}dashboard:session:{id_hash}"
