"""Submit: create the Kling task of a queued job, at most once.

Guards, in order: the job must be `queued`; a per-job lock (another worker submitting the same job: `busy`, the
reconciler comes back); the pause (`paused`: the job stays queued and due, no Kling call); the in-flight cap,
shared fairly between apps (`flow.reserve_in_flight`), and the shared rate limit (RetryIn, no attempt used). Then,
whenever a create may already have reached Kling (counted by
`create_sent`, set before each create is sent and cleared on a definite refusal of a first create), a lookup by
`external_task_id` before any new create; the daily unit budget (`shared/usage.py`: over it, submission pauses with
reason `budget` and the job stays queued, no attempt used, nothing sent); and the create.

When tasks cannot be read back (`KLING_QUERY` off, or `auto` without Kling's read routes: `shared/kling_reads.py`)
no lookup is possible, so a create that may have reached Kling is never sent again: the job stays queued, flagged
as awaiting its callback (`shared/heard.py`; a note in its timeline, listed in GET /v1/status) until a signed
callback binds its task, or its deadline ends it. Never two paid tasks.

Once Kling's answer binds the task, a status its callbacks reported before that (a callback that beat the answer)
is applied at once.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from kling_relay.shared import flow, heard, usage
from kling_relay.shared.jobs_model import CREATE_SENT, Job, JobState
from kling_relay.shared.kling import KlingAmbiguous, KlingError, KlingTask, KlingTaskNotFound
from kling_relay.shared.kling_reads import reads_available
from kling_relay.shared.pipeline import common
from kling_relay.shared.pipeline.common import Budget, Failure, Outcome
from kling_relay.shared.pipeline.status import apply_task_status, record_task
from kling_relay.shared.tokens import callback_token

if TYPE_CHECKING:  # the wiring module is handed in, never imported at run time
    from kling_relay.shared.runtime import Runtime

log = logging.getLogger(__name__)


def callback_url(rt: Runtime, job_id: str) -> str:
    token = callback_token(rt.settings.callback_secret, job_id)
    return f"{rt.settings.public_base_url}/callbacks/kling/{job_id}?token={token}"


def submit_job(rt: Runtime, job_id: str) -> Outcome:
    """Create the Kling task for a queued job, at most once (see the module docstring)."""
    return common.under_job_lock(rt, "submit", job_id, JobState.QUEUED, _submit_locked)


def _submit_locked(rt: Runtime, job: Job) -> Outcome:
    gate = flow.gate(rt.redis, job.id)
    if gate == "paused":
        pause = flow.current_pause(rt.redis) or {}
        rt.store.note(job.id, source="worker", detail={"waiting": "submission paused", "code": pause.get("code")})
        rt.store.set_due(job.id, rt.settings.kling_pause_probe_seconds)
        return Outcome.PAUSED
    cap = rt.settings.kling_max_in_flight
    reservation_ttl = 2 * (rt.settings.kling_connect_timeout_seconds + rt.settings.kling_timeout_seconds) + 10
    if not flow.reserve_in_flight(rt.redis, job.id, cap, reservation_ttl, job.app):
        common.throttle(rt, job.id, "submit", f"{cap} tasks in flight at Kling (or this app's fair share of them)",
                 note=False, cause="in_flight_cap")
    try:
        return _submit_to_kling(rt, job, trial=gate == "trial")
    finally:
        flow.release_in_flight(rt.redis, job.id, job.app)


def _submit_to_kling(rt: Runtime, job: Job, *, trial: bool) -> Outcome:
    # Counted by creates sent (and kept by an ops retry), never inferred from the attempt budget, which throttles
    # leave out.
    create_sent = job.attempts.get(CREATE_SENT, 0) > 0 or job.kling_task_id is not None
    if create_sent and not reads_available(rt):
        return _await_callback(rt, job, "an earlier create for this job may have reached Kling")
    attempt = common.count_attempt(rt, job, "submit")
    budget = Budget("submit", attempt, rt.settings.submit_max_attempts,
                    Failure("submit_exhausted", f"Kling did not accept the task after {attempt} attempts"))
    if create_sent:
        found = _look_up(rt, job, budget)
        if found is not None:
            return found
    request = rt.store.request(job.id)
    if not _within_budget(rt, job, request):
        return Outcome.PAUSED
    body = {**request, "callback_url": callback_url(rt, job.id), "external_task_id": job.id}
    rt.store.bump_attempt(job.id, CREATE_SENT)  # before sending: a worker killed mid-create still looks first next
    try:
        task = rt.kling.create_multi_image2video(body)
    except KlingError as exc:
        if not create_sent and not isinstance(exc, KlingAmbiguous):
            rt.store.forget_attempt(job.id, CREATE_SENT)  # Kling said no (or it was never sent): no task exists
        elif isinstance(exc, KlingAmbiguous) and not reads_available(rt):
            return _await_callback(rt, job, f"create outcome unknown: {exc.message}")
        # A refusal fails the job only when no earlier create can have made its task: otherwise the next attempt
        # looks it up first (Kling keeps external_task_id unique, so our own task may be why it refused).
        return common.on_kling_error(rt, job.id, budget, exc, "create", refusal_fails=not create_sent)
    _record(rt, job.id, task, {"created": True})
    if trial:
        flow.resume(rt.redis, by=f"trial submit of {job.id}")
    return Outcome.SUBMITTED


def _look_up(rt: Runtime, job: Job, budget: Budget) -> Outcome | None:
    """Adopt the job's task if Kling has it (`found`); None when Kling has none and a create may go ahead.

    Whatever the lookup's error, the task may exist at Kling: never fail at once, spend the budget.
    """
    try:
        task = rt.kling.get_task_by_external_id(job.id)
    except KlingTaskNotFound:
        return None
    except KlingError as exc:
        return common.on_kling_error(rt, job.id, budget, exc, "lookup", refusal_fails=False)
    _record(rt, job.id, task, {"found_by": "external_task_id"})
    return Outcome.FOUND


def _record(rt: Runtime, job_id: str, task: KlingTask, detail: dict[str, object]) -> None:
    """Bind the task Kling answered; then apply a later status its callbacks reported before it was bound."""
    record_task(rt, job_id, task, source="worker", detail=detail)
    later = heard.heard(rt.redis, job_id, task.task_id)
    if later is not None and heard.is_beyond(later, task):
        apply_task_status(rt, job_id, later, source="callback")


def _await_callback(rt: Runtime, job: Job, why: str) -> Outcome:
    """Never send the create again: the job waits, queued and flagged, for a callback (see the module docstring)."""
    current = rt.store.get(job.id)
    if current is None or current.state is not JobState.QUEUED:
        return Outcome.SKIPPED  # a signed callback bound its task meanwhile (or it was canceled): nothing to wait for
    if heard.flag_awaiting(rt.redis, job.id, why):
        log.warning("create not sent again: Kling's tasks cannot be read back; the job awaits its callback",
                    extra={"job_id": job.id})
        rt.store.note(job.id, source="worker", detail={
            "waiting": "callback", "why": why,
            "note": "Kling's read routes are not available (KLING_QUERY), so no lookup can tell whether the task "
                    "exists: the create is not sent again. A signed callback naming this job binds its task; "
                    "else the job ends at its deadline (see the README: callbacks-only mode)"})
    rt.store.set_due(job.id, rt.settings.reconcile_quiet_seconds)
    return Outcome.AWAITING


def _within_budget(rt: Runtime, job: Job, request: dict[str, Any]) -> bool:
    """The daily unit budget's guard, right before a create: True when the create may go.

    Over the budget, submission pauses with reason `budget` and the job waits queued and due like any paused
    job; the attempt this run counted is given back (a pause is nobody's failure).
    """
    now = rt.clock()
    combo = usage.combination(request)
    verdict = usage.admit(rt.redis, job.id, combo, budget=rt.settings.kling_daily_unit_budget,
                          default_estimate=rt.settings.kling_default_units_estimate, now=now)
    if verdict.admitted:
        return True
    usage.pause_for_budget(rt.redis, verdict, job_id=job.id, combo=combo, now=now)
    rt.store.bump_attempt(job.id, "submit_throttled")
    rt.store.note(job.id, source="worker", detail={
        "paused": usage.REASON, "budget": verdict.budget, "spent_today": verdict.spent,
        "in_flight_estimate": verdict.in_flight, "estimate": verdict.estimate})
    rt.store.set_due(job.id, rt.settings.kling_pause_probe_seconds)
    return False
