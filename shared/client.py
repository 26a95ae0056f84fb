"""The in-process Python client, for code on the relay's own hosts: submit, read, wait — straight in Redis, no HTTP.

Backend apps elsewhere use `kling_relay.shared.http_client.RelayClient` (the relay's URL and an API token).

    from kling_relay.shared.client import Relay
    relay = Relay.from_env()                      # REDIS_URL (and the optional intake limits) only
    job = relay.submit(image_list=[{"image": "https://..."}], prompt="...", idempotency_key="order-42")
    job = relay.wait(job.id, timeout=900)         # returns when stored, failed or canceled
    job.videos                                    # [{"bucket", "key", "sha256", "bytes", "duration"}]

    relay.cancel(job.id, reason="customer left")   # ops actions: cancel an unfinished job,
    relay.retry(job.id)                           # or retry a failed one (see shared/ops.py for which)

Bad input raises `ValidationFailed` (its `.problems` list every `{field, problem}`) and stores nothing. The ops
actions raise `JobNotFound` for an unknown id (or one that cannot be a job id), `ValidationFailed` for a reason the HTTP
API would refuse (over 500 characters, not valid text, control characters), and `ActionRefused` (`.reason`) when the
job's state forbids them. `list` raises `InvalidCursor` (a ValueError) for a cursor it did not return.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from kling_relay.shared import copy_flow, usage
from kling_relay.shared.intake import accept_job
from kling_relay.shared.jobs import TERMINAL, Job, JobNotFound, JobState, JobStore
from kling_relay.shared.notify import EventsStream
from kling_relay.shared.ops import cancel_job, retry_job, submission_status
from kling_relay.shared.queue import Enqueuer, make_celery
from kling_relay.shared.redis_conn import redis_client
from kling_relay.shared.settings import ClientSettings, Settings, load_client_settings


class Relay:
    """In-process client for code on the relay's own hosts: needs Redis (REDIS_URL) only; Kling, S3 and the API
    tokens are the relay processes' business. Backend apps elsewhere use the HTTP client
    (`kling_relay.shared.http_client.RelayClient`) with the relay's URL and an API token instead.

    `settings` may be the relay processes' full `Settings` or the `ClientSettings` that `from_env()` loads.
    """

    def __init__(self, settings: Settings | ClientSettings, *, store: JobStore | None = None,
                 enqueuer: Enqueuer | None = None) -> None:
        self.settings = settings
        self._owned: list[Any] = []  # clients made here, closed by close()
        if store is None:
            client = redis_client(settings.redis_url)
            self._owned.append(client)
            store = JobStore(client, job_ttl_seconds=settings.job_ttl_seconds)
        self.store = store
        if enqueuer is None:
            app = make_celery(settings.redis_url)
            self._owned.append(app)
            enqueuer = Enqueuer(app)
        self.enqueuer = enqueuer

    def close(self) -> None:
        """Close the Redis connections this Relay opened (not those of a store or enqueuer passed in)."""
        for owned in self._owned:
            owned.close()
        self._owned.clear()

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Relay:
        """A Relay from the environment (default os.environ): REDIS_URL, plus the optional KLING_MODELS,
        PROMPT_MAX_CHARS, JOB_TTL_SECONDS, JOB_DEADLINE_SECONDS, RECONCILE_QUIET_SECONDS, NOTIFY_SECRET,
        NOTIFY_URL_ALLOWLIST, EVENTS_STREAM and EVENTS_STREAM_MAXLEN (as the relay's processes read them, so jobs are
        taken in and canceled alike). Raises SettingsError naming each bad variable. No Kling key, CALLBACK_SECRET,
        API_TOKENS or S3_BUCKET is needed."""
        return cls(load_client_settings(env))

    def submit(self, *, idempotency_key: str | None = None, app: str | None = None, **fields: Any) -> Job:
        """Queue one job; `fields` are the POST /v1/jobs body (Kling's names plus notify_url and metadata).

        `app`: the app the job belongs to, as if its token had sent it (its idempotency keys, its list); None: a
        job of no app, which only operators see. The in-process client itself is operator-level (all jobs)."""
        return accept_job(fields, store=self.store, enqueuer=self.enqueuer, settings=self.settings,
                          idempotency_key=idempotency_key, app=app).job

    def get(self, job_id: str) -> Job | None:
        """The job, or None if there is none (or `job_id` cannot be a job id)."""
        return self.store.get(job_id)

    def list(self, *, state: JobState | str | None = None, limit: int = 50, cursor: str | None = None,
             app: str | None = None) -> tuple[list[Job], str | None]:
        """Jobs newest first, all or one state's (and with `app`, one app's): `(jobs, next_cursor)`; pass
        next_cursor back for the next page."""
        return self.store.list(state=JobState(state) if state is not None else None, limit=limit, cursor=cursor,
                               app=app)

    def retry(self, job_id: str, *, reason: str | None = None, via: str = "python") -> Job:
        """Put a failed job back to work (copy failures re-copy, submit-side failures re-submit); the job now.

        Raises `JobNotFound`, or `kling_relay.shared.ops.ActionRefused` saying why (e.g. Kling's task failed: a
        new job is needed, since Kling allows one task per job id).
        """
        return retry_job(self.store, self.enqueuer, job_id, detail=_who(via, reason),
                         due_in=self.settings.reconcile_quiet_seconds).job

    def cancel(self, job_id: str, *, reason: str | None = None, via: str = "python") -> Job:
        """Cancel a queued or in-flight job; the job now. A Kling task already made still runs at Kling (no
        cancel API) but its outcome is ignored. Raises `JobNotFound`, or `ActionRefused` for a finished job."""
        return cancel_job(self.store, self.enqueuer, job_id, detail=_who(via, reason),
                          stream=EventsStream.of(self.settings)).job

    def status(self) -> dict[str, Any]:
        """Submission and copying open or paused (and why), tasks in flight at Kling, jobs whose copy waits on a
        setting, jobs per state: as GET /v1/status."""
        return submission_status(self.store)

    def resume_submission(self, *, via: str = "python") -> dict[str, Any] | None:
        """Clear a pause (account or keys fixed; a budget pause: the daily unit budget is off until midnight UTC);
        returns the pause that was cleared, or None."""
        return usage.operator_resume(self.store.redis, by=via)

    def resume_copy(self, *, via: str = "python") -> dict[str, Any] | None:
        """Clear a copy pause (the bucket, credentials or policy fixed); returns the pause cleared, or None."""
        return copy_flow.resume(self.store.redis, by=via)

    def wait(self, job_id: str, *, timeout: float = 900.0, poll: float = 1.0,
             on_change: Callable[[Job], None] | None = None) -> Job:
        """Poll until the job is stored, failed or canceled; TimeoutError with the last state otherwise."""
        deadline = time.monotonic() + timeout
        last_state = None
        while True:
            job = self.store.get(job_id)
            if job is None:
                raise JobNotFound(job_id)
            if job.state != last_state:
                last_state = job.state
                if on_change:
                    on_change(job)
            if job.state in TERMINAL:
                return job
            if time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {job.state.value} after {timeout}s")
            time.sleep(poll)


def _who(via: str, reason: str | None) -> dict[str, Any]:
    detail: dict[str, Any] = {"via": via}
    if reason:
        detail["reason"] = reason
    return detail
