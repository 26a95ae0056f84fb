"""The reconciler: one pass over the jobs that are due, re-doing lost work and learning what callbacks missed.

Celery beat runs `reconcile(rt)` every `RECONCILE_INTERVAL_SECONDS` (task `kling_relay.reconcile`). A pass reads
only the due-time index (`JobStore.due`: up to `RECONCILE_BATCH_SIZE` jobs whose due time has passed, earliest
first) and those jobs, never a scan of all jobs, so its cost follows the number of due jobs. Each pipeline step
leaves a non-terminal job due at a time after which its work may be presumed lost (see `shared/pipeline.py`).

For each due job:
- past its `deadline_at` (`JOB_DEADLINE_SECONDS`): `failed` with reason `timed_out` — or, for a job still
  `queued` while submission is paused, with the pause's reason (`auth` / `account`), code and Kling's message,
  since that is why it never ran. A job whose submit or copy is running right now (its lock is held) is left
  to finish first;
- `queued`: its submit message may be lost: re-enqueue the submit. While submission is paused, leave it waiting
  (due again after the probe interval), except for the one job sent as a trial (see `shared/flow.py`);
- `submitted` / `processing`: its callbacks may be lost: ask Kling (`get_task` by task id, or by external id when
  no task id was recorded) and apply the answer through the same step as the webhook
  (`pipeline.apply_task_status(..., source="reconciler")`), which queues the copy once the task succeeded;
- `generated`: its copy may be lost: re-enqueue the copy, unless a copy holds the job's lock (still running).
  While copying is paused (storage unusable, see `shared/copy_flow.py`), leave it waiting, due again after the
  probe interval. A job whose copy waits for the allow-list to be widened is re-queued like any other (its copy
  re-checks the list), without a timeline note each time; past its deadline it fails `timed_out` with what it
  waited for in the message;
- then its due time moves forward by `RECONCILE_QUIET_SECONDS`, so a pass never hammers one job.

The queued and generated jobs are looked after together, once the others are done, in a few round trips for them
all (`_Pass._resend`): their checks read at once, their messages published in one batch, then their due pushes and
notes written at once. A job's due time moves only after its message went out, so a pass that stops or fails before
leaves it due, and the next pass sends it (again: the submit and the copy take duplicates).

When tasks cannot be read back (callbacks-only mode, `shared/kling_reads.py`), the pass polls no job (a quiet job
waits for its callbacks until its deadline), leaves a queued job awaiting its callback where it is (its create is
never sent again), and its pause probe, which needs the list, opens a trial instead (one job's create is let
through; its success resumes submission). A job that timed out while awaiting its callback (its create's outcome
unknown, `shared/heard.py`) says so in its error.

Then it announces the steps left in the store's outbox for over `ANNOUNCE_GRACE_SECONDS` (the process that made
the step died, or Redis or the broker failed, before it appended the consumers' stream entry or queued the
notification; see `shared/notify.py`), up to the batch size, oldest first.

Last, it sweeps the index entries of jobs that expired (`JobStore.sweep`: the `all`, terminal state, app listing and
task-id indexes; at most `jobs.SWEEP_BATCH` candidates an index, resumed next pass where this one stopped), so Redis
memory stays bounded by the jobs still alive; `swept` in the report counts the entries removed.

Kling calls go through the shared rate limit: when it says wait, the pass stops polling and leaves the rest due
for the next pass. While submission is paused, the pass first probes Kling (one `list_tasks(page_size=1)`, at
most every `KLING_PAUSE_PROBE_SECONDS` across all processes); a pause for the daily unit budget is never probed:
the pass lifts it when the UTC day of `now` changed or the budget allows again (`usage.budget_pause_over`). While
copying is paused, it probes storage (`Storage.probe`, as often) and resumes copying when that succeeds. Only one
pass runs at a time, even with several beat processes: it holds a Redis lock (token, short expiry, heartbeat); a
pass that finds it held returns at once. A pass that ran leaves its summary in `kr:reconcile:last` (`last_pass`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, cast

import redis

from kling_relay.shared import copy_flow, flow, heard, keys, metrics, usage
from kling_relay.shared.jobs import Job, JobState, JobWrites
from kling_relay.shared.jobs_model import json_object
from kling_relay.shared.kling import KlingError, KlingFixAccount, KlingTask, KlingTaskNotFound
from kling_relay.shared.kling_reads import reads_available
from kling_relay.shared.locks import RedisLock, job_lock
from kling_relay.shared.logs import add, bound
from kling_relay.shared.notify import EventsStream, announce
from kling_relay.shared.pipeline import Failure, apply_task_status, fail
from kling_relay.shared.storage import CopyError, StorageUnusable

if TYPE_CHECKING:  # the wiring module is handed in, never imported at run time
    from kling_relay.shared.runtime import Runtime

log = logging.getLogger(__name__)

#: How long a step's own process has to announce it before the reconciler does (a duplicate if it was only slow).
ANNOUNCE_GRACE_SECONDS = 60.0


@dataclass
class ReconcileReport:
    """What one pass did (logged by the Celery task, asserted by tests)."""

    ran: bool = True  # False: another pass held the lock, this one did nothing
    due: int = 0  # job ids read from the due index
    resubmitted: list[str] = field(default_factory=list)
    recopied: list[str] = field(default_factory=list)
    polled: list[str] = field(default_factory=list)  # jobs whose Kling task was read
    advanced: list[str] = field(default_factory=list)  # jobs a poll moved a step forward
    timed_out: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)  # left as they are: paused, or their step is running
    missing: list[str] = field(default_factory=list)  # in the due index but gone from the store
    errors: list[str] = field(default_factory=list)  # jobs whose poll failed this time
    probe: str | None = None  # while paused: resumed, trial, still_failing, error, rate_limited; budget_lifted,
    # budget_holds (a budget pause)
    copy_probe: str | None = None  # while copying is paused: resumed, still_failing, error
    stopped_polling: str | None = None  # rate_limited, paused: the rest of this pass's polls were skipped
    announced: list[str] = field(default_factory=list)  # jobs whose step was announced from the outbox
    swept: int = 0  # index entries of expired jobs removed (`JobStore.sweep`)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> dict[str, Any]:
        """Counts instead of id lists, for a log line."""
        return {k: len(v) if isinstance(v, list) else v for k, v in asdict(self).items()}


def reconcile(rt: Runtime, *, now: float | None = None, limit: int | None = None) -> ReconcileReport:
    """Run one pass (see the module docstring); `now` defaults to the clock, `limit` to RECONCILE_BATCH_SIZE."""
    lock = RedisLock(rt.redis, keys.RECONCILE_LOCK, rt.settings.job_lock_seconds)
    if not lock.acquire():
        report = ReconcileReport(ran=False)
        metrics.reconcile_pass(report.summary(), seconds=0.0, ended_at=time.time())
        return report
    started = time.time()
    try:
        with lock.heartbeat():
            report = _Pass(rt, rt.clock() if now is None else now, limit or rt.settings.reconcile_batch_size).run()
    finally:
        lock.release()
    ended = time.time()
    metrics.reconcile_pass(report.summary(), seconds=ended - started, ended_at=ended)
    _remember(rt, report, started, ended)
    return report


def _remember(rt: Runtime, report: ReconcileReport, started: float, ended: float) -> None:
    """Keep this pass's summary in `kr:reconcile:last` (`last_pass`): when it ended, how long it took, what it did."""
    record = {"at": ended, "duration_ms": round((ended - started) * 1000, 1), **report.summary()}
    try:
        rt.redis.set(keys.RECONCILE_LAST, json.dumps(record, separators=(",", ":")))
    except Exception:  # the record is for people; the pass is done
        log.warning("could not record the reconciler pass", exc_info=True)


def last_pass(client: redis.Redis) -> dict[str, Any] | None:
    """The summary the last completed pass left (`at` Unix seconds, `duration_ms`, counts), or None."""
    return json_object(cast(str | None, client.get(keys.RECONCILE_LAST)))


class _Pass:
    def __init__(self, rt: Runtime, now: float, limit: int) -> None:
        self.rt = rt
        self.now = now
        self.limit = limit
        self.quiet = rt.settings.reconcile_quiet_seconds
        self.report = ReconcileReport()
        self.pause: dict[str, Any] | None = None
        self.copy_pause: dict[str, Any] | None = None
        self.trial_sent = False
        self._reads: bool | None = None

    def reads(self) -> bool:
        """Whether tasks can be read back from Kling (asked once per pass)."""
        if self._reads is None:
            self._reads = reads_available(self.rt)
        return self._reads

    def run(self) -> ReconcileReport:
        every = self.rt.settings.kling_pause_probe_seconds
        self.pause = flow.current_pause(self.rt.redis)
        if self.pause is not None and self.pause["reason"] == usage.REASON:
            self._budget_pause()
        elif self.pause is not None and flow.claim_probe(self.rt.redis, every):
            self._probe()
        self.copy_pause = copy_flow.current_pause(self.rt.redis)
        if self.copy_pause is not None and copy_flow.claim_probe(self.rt.redis, every):
            self._probe_storage()
        ids = self.rt.store.due(now=self.now, limit=self.limit)
        self.report.due = len(ids)
        # The due jobs are read in one round trip, not one each (the pass is still linear in the due jobs only).
        # Each is acted on from this read as it was from its own read before: every action re-checks (the
        # submit and copy under their job lock and state, the steps in their scripts), so a job that moved since
        # is left as it is. Queued and generated jobs are set aside and re-sent together (`_resend`).
        resend: list[Job] = []
        for job_id, job in zip(ids, self.rt.store.get_many(ids), strict=True):
            self._one(job_id, job, resend)
        self._resend(resend)
        self._announce_left_over()
        self._sweep()
        return self.report

    def _sweep(self) -> None:
        """Drop a bounded number of index entries whose job expired (see the module docstring). Housekeeping: a
        sweep that fails is logged and left to the next pass, the pass's work is done."""
        apps = [token.name for token in self.rt.settings.api_tokens]
        try:
            self.report.swept = self.rt.store.sweep(now=self.now, apps=apps)["removed"]
        except redis.RedisError:
            log.warning("the sweep of expired jobs' index entries failed; the next pass tries again", exc_info=True)

    def _announce_left_over(self) -> None:
        """Announce the steps whose own process did not (see the module docstring); an expired job is dropped."""
        stream = EventsStream.of(self.rt.settings)
        for step in self.rt.store.unannounced(before=self.now - ANNOUNCE_GRACE_SECONDS, limit=self.limit):
            job = self.rt.store.get(step.job_id)
            if job is None:
                self.rt.store.announced(step)
            elif announce(self.rt.store, self.rt.enqueuer, job, stream, transition=step):
                self.report.announced.append(step.job_id)

    # -- the pause ---------------------------------------------------------------------------------------------

    def _probe(self) -> None:
        """One cheap call while paused: clears an auth pause, opens a trial for an account pause."""
        assert self.pause is not None
        if not self.reads():  # nothing cheap to ask: let one create through instead
            flow.open_trial(self.rt.redis, self.rt.settings.kling_pause_probe_seconds)
            self.report.probe = "trial"
            self.pause = flow.current_pause(self.rt.redis)
            return
        try:
            self.rt.kling.list_tasks(page_num=1, page_size=1)
        except flow.RateLimited:
            self.report.probe = "rate_limited"
            return
        except KlingFixAccount as exc:
            flow.pause(self.rt.redis, code=exc.code, message=exc.message)
            self.report.probe = "still_failing"
        except KlingError as exc:
            log.info("pause probe failed", extra={"kind": exc.kind.value, "code": exc.code})
            self.report.probe = "error"
        else:
            if self.pause["reason"] == "auth":
                flow.resume(self.rt.redis, by="reconciler probe")
                self.report.probe = "resumed"
            else:
                flow.open_trial(self.rt.redis, self.rt.settings.kling_pause_probe_seconds)
                self.report.probe = "trial"
        self.pause = flow.current_pause(self.rt.redis)

    def _budget_pause(self) -> None:
        """A budget pause ends with the UTC day (or once the budget allows again); Kling is not asked."""
        settings = self.rt.settings
        why = usage.budget_pause_over(self.rt.redis, budget=settings.kling_daily_unit_budget,
                                      default_estimate=settings.kling_default_units_estimate, now=self.now)
        if why is not None and usage.lift_budget_pause(self.rt.redis, why=why):
            self.report.probe = "budget_lifted"
        else:
            self.report.probe = "budget_holds"
        self.pause = flow.current_pause(self.rt.redis)
    def _probe_storage(self) -> None:
        """While copying is paused: write and delete a tiny object; resume copying if that works."""
        try:
            self.rt.storage.probe()
        except StorageUnusable as exc:
            copy_flow.pause(self.rt.redis, code=exc.code, message=str(exc))
            self.report.copy_probe = "still_failing"
        except CopyError as exc:
            log.info("storage probe failed", extra={"error": str(exc)})
            self.report.copy_probe = "error"
        else:
            copy_flow.resume(self.rt.redis, by="reconciler probe")
            self.report.copy_probe = "resumed"
        self.copy_pause = copy_flow.current_pause(self.rt.redis)

    def _trial_wanted(self) -> bool:
        return (self.pause is not None and not self.trial_sent and self.pause["trial_until"] is not None
                and self.pause["trial_job"] is None)

    # -- one job -----------------------------------------------------------------------------------------------

    def _one(self, job_id: str, job: Job | None, resend: list[Job]) -> None:
        if job is None or job.terminal:  # deleted by hand, or expired: nothing to look after
            self.rt.redis.zrem(keys.JOBS_DUE, job_id)
            self.report.missing.append(job_id)
            return
        with bound(job_id=job.id, kling_task_id=job.kling_task_id):  # on every log line about this job
            if job.deadline_at is not None and job.deadline_at <= self.now and self._time_out(job):
                return
            if job.state in (JobState.QUEUED, JobState.GENERATED):
                resend.append(job)
            elif job.state in (JobState.SUBMITTED, JobState.PROCESSING):
                self._in_flight(job)

    def _busy(self, job: Job) -> bool:
        """Whether the job's submit (queued) or copy (generated) is running right now."""
        step = {JobState.QUEUED: "submit", JobState.GENERATED: "copy"}.get(job.state)
        return step is not None and job_lock(self.rt.redis, step, job.id, 1).held_by_anyone()

    def _push(self, job: Job, seconds: float | None = None) -> None:
        self.rt.store.set_due(job.id, self.quiet if seconds is None else seconds)

    def _time_out(self, job: Job) -> bool:
        if self._busy(job):
            return False
        waited = self._copy_wait(job)
        if job.state is JobState.QUEUED and self.pause is not None:
            failure = Failure(self.pause["reason"], "deadline passed while Kling submission was paused: "
                              + str(self.pause["message"]), self.pause["code"])
        elif waited is not None:
            failure = Failure("timed_out", f"not finished within {self.rt.settings.job_deadline_seconds:g}s: "
                                           f"the copy waited ({waited})")
        else:
            failure = Failure("timed_out", f"not finished within {self.rt.settings.job_deadline_seconds:g}s "
                                           f"(last state {job.state.value})" + self._awaited(job))
        fail(self.rt, job.id, failure, source="reconciler")
        self.report.timed_out.append(job.id)
        return True

    def _awaited(self, job: Job) -> str:
        flagged = heard.awaiting_reason(self.rt.redis, job.id) if job.state is JobState.QUEUED else None
        if flagged is None:
            return ""
        return (f": no callback bound its task; it was never sent again since Kling's tasks could not be read back "
                f"({flagged['message']})")

    def _copy_wait(self, job: Job) -> str | None:
        """What a generated job's copy waits for (the storage pause, a refused host), or None."""
        if job.state is not JobState.GENERATED:
            return None
        if self.copy_pause is not None:
            return f"copying paused: storage {self.copy_pause['code']}: {self.copy_pause['message']}"
        record = copy_flow.take_wait(self.rt.redis, job.id)
        if record is None:
            return None
        return f"{record['reason']} {record['host']}: {record['message']}"

    # -- queued and generated jobs: their lost messages, re-sent together ---------------------------------------

    def _resend(self, jobs: list[Job]) -> None:
        """Look after the due queued and generated jobs (in due order) in a few round trips for them all: their
        checks read together (`_checks`); then each decided in turn, where a trial submit (Kling's pause letting one
        job through) is sent at once and alone, since the decisions after it depend on whether it went; then the
        other messages published together (one batch, `Enqueuer.batch`); then their due pushes and notes written
        together (`JobStore.writes`).

        A job's due time moves only after its message went out, so a pass that stops or fails anywhere before
        leaves it due, to be sent (again) by the next pass: at least once, as the submit and the copy expect (each
        re-checks under its job lock and state). A publish that fails leaves every job of the batch due."""
        if not jobs:
            return
        checks = self._checks(jobs)
        if self.report.stopped_polling == "paused":  # a poll of this pass paused the submission: the pause holds
            self.pause = flow.current_pause(self.rt.redis)
        writes = self.rt.store.writes()
        sent: list[tuple[Job, str, bool]] = []  # (job, step, quietly: no timeline note)
        batched: list[tuple[Job, str, bool]] = []
        for job, (busy, flagged) in zip(jobs, checks, strict=True):
            with bound(job_id=job.id, kling_task_id=job.kling_task_id):
                step = (self._queued(job, busy, flagged, writes) if job.state is JobState.QUEUED
                        else self._generated(job, busy, writes))
                if step == "submit" and self.pause is not None:  # the trial: sent now, alone
                    if self._enqueue(job, step):
                        self.trial_sent = True
                        sent.append((job, step, False))
                elif step is not None:
                    batched.append((job, step, step == "copy" and flagged))
        sent += self._publish(batched)
        for job, step, quietly in sent:
            writes.set_due(job.id, self.quiet)
            (self.report.resubmitted if step == "submit" else self.report.recopied).append(job.id)
            if not quietly:  # a copy waiting on a setting (`copy_flow.wait_of`) is re-checked without a note
                writes.note(job.id, source="reconciler", detail={"requeued": step})
        writes.execute()

    def _publish(self, batch: list[tuple[Job, str, bool]]) -> list[tuple[Job, str, bool]]:
        """Send the batch's messages together; the batch if they went, else nothing (each of its jobs stays due)."""
        if not batch:
            return []
        try:
            with self.rt.enqueuer.batch(len(batch)) as enqueuer:
                for job, step, _ in batch:
                    with bound(job_id=job.id, kling_task_id=job.kling_task_id):  # on whatever the send logs
                        if step == "submit":
                            enqueuer.submit(job.id)
                        else:
                            enqueuer.copy(job.id)
        except Exception:  # the broker is down: every job of the batch stays due, the next pass tries again
            log.exception("could not re-queue: the jobs stay due", extra={"jobs": [job.id for job, _, _ in batch]})
            return []
        return batch

    def _checks(self, jobs: list[Job]) -> list[tuple[bool, bool]]:
        """`(busy, flagged)` of each queued or generated job, read together in one round trip: busy, its submit or
        copy is running (its job lock is held, as `_busy`); flagged, a queued job awaits the callback of a create
        never answered (`heard.awaiting_reason`), a generated job's copy waits on a setting (`copy_flow.wait_of`)."""
        pipe = self.rt.redis.pipeline(transaction=False)
        for job in jobs:
            queued = job.state is JobState.QUEUED
            pipe.exists(keys.job_lock("submit" if queued else "copy", job.id))
            pipe.hget(keys.AWAITING_CALLBACK if queued else keys.COPY_WAITS, job.id)
        replies = pipe.execute()
        return [(bool(held), raw is not None if job.state is JobState.QUEUED else json_object(raw) is not None)
                for job, held, raw in zip(jobs, replies[0::2], replies[1::2], strict=True)]

    def _queued(self, job: Job, busy: bool, awaiting: bool, writes: JobWrites) -> str | None:
        """"submit" to re-send it, or None: left waiting, due again later."""
        if busy:
            self.report.waiting.append(job.id)
            writes.set_due(job.id, self.quiet)
            return None
        if awaiting and not self.reads():
            self.report.waiting.append(job.id)  # never sent again while tasks cannot be read back: nothing to re-send
            writes.set_due(job.id, self.quiet)
            return None
        if self.pause is not None and not self._trial_wanted():
            self.report.waiting.append(job.id)
            writes.set_due(job.id, self.rt.settings.kling_pause_probe_seconds)
            return None
        return "submit"

    def _generated(self, job: Job, busy: bool, writes: JobWrites) -> str | None:
        """"copy" to re-send it, or None: left waiting, due again later."""
        if busy:
            self.report.waiting.append(job.id)
            writes.set_due(job.id, self.quiet)
            return None
        if self.copy_pause is not None:
            self.report.waiting.append(job.id)
            writes.set_due(job.id, self.rt.settings.kling_pause_probe_seconds)
            return None
        return "copy"

    def _enqueue(self, job: Job, step: str) -> bool:
        try:
            if step == "submit":
                self.rt.enqueuer.submit(job.id)
            else:
                self.rt.enqueuer.copy(job.id)
        except Exception:  # the broker is down: the job stays due, the next pass tries again
            log.exception("could not re-queue", extra={"job_id": job.id, "step": step})
            return False
        return True

    # -- submitted and processing jobs: polled ----------------------------------------------------------------------

    def _in_flight(self, job: Job) -> None:
        if self.report.stopped_polling:
            return  # stays due: the next pass polls it
        if not self.reads():  # callbacks only: the job waits for them, up to its deadline
            self.report.waiting.append(job.id)
            self._push(job)
            return
        try:
            task = (self.rt.kling.get_task(job.kling_task_id) if job.kling_task_id
                    else self.rt.kling.get_task_by_external_id(job.id))
        except flow.RateLimited:
            self.report.stopped_polling = "rate_limited"
            return
        except KlingTaskNotFound as exc:
            self.rt.store.note(job.id, source="reconciler", detail={"poll": "Kling does not know the task",
                                                                   "message": exc.message})
            self.report.errors.append(job.id)
        except KlingFixAccount as exc:
            flow.pause(self.rt.redis, code=exc.code, message=exc.message, job_id=job.id)
            self.report.stopped_polling = "paused"
            return
        except KlingError as exc:
            log.info("poll failed", extra={"job_id": job.id, "kind": exc.kind.value, "code": exc.code})
            self.report.errors.append(job.id)
        else:
            self.report.polled.append(job.id)
            self._apply(job, task)
        self._push(job)

    def _apply(self, job: Job, task: KlingTask) -> None:
        if job.kling_task_id is None:
            ok, _ = self.rt.store.set_kling_task_id(job.id, task.task_id, source="reconciler")
            if not ok:
                return
            add(kling_task_id=task.task_id)
        result = apply_task_status(self.rt, job.id, task, source="reconciler")
        if result.applied:
            self.report.advanced.append(job.id)
