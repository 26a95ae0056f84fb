"""The pipeline's steps as plain functions: submit to Kling, apply a task status, copy into S3, notify.

Celery tasks (worker/tasks.py) and Flask views (webhook/) only call these. One module per step (`submit`,
`status`, `copy`, `notify`), and what they share in `common`: the outcomes, the Kling error policy (`decide`:
pause, throttle, fail or retry), the retry and throttle back-off, the per-job lock.

Every step leaves a non-terminal job in the due index with a time after which the reconciler
(`shared/reconcile.py`) may assume the work was lost: `RECONCILE_QUIET_SECONDS` after a state step, past the
retry's countdown after a RetryIn, the probe interval while submission is paused (`shared/flow.py`).
"""

from kling_relay.shared.jobs_model import CREATE_SENT
from kling_relay.shared.pipeline.common import Decision, Failure, Outcome, RetryIn, decide, fail, finished
from kling_relay.shared.pipeline.copy import copy_job, copy_overran
from kling_relay.shared.pipeline.notify import NOTIFY_MAX_ATTEMPTS, notify_job
from kling_relay.shared.pipeline.status import KLING_STATUS_TO_STATE, apply_task_status, record_task
from kling_relay.shared.pipeline.submit import callback_url, submit_job

__all__ = [
    "CREATE_SENT", "KLING_STATUS_TO_STATE", "NOTIFY_MAX_ATTEMPTS", "Decision", "Failure", "Outcome", "RetryIn",
    "apply_task_status", "callback_url", "copy_job", "copy_overran", "decide", "fail", "finished", "notify_job",
    "record_task", "submit_job",
]
