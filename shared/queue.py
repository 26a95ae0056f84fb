"""The Celery application factory and the names of tasks and queues.

Both sides use it: the worker process registers the tasks (worker/tasks.py) on the app made here, and
enqueuers (the HTTP API, the Python client, the webhook) send tasks by name without importing the worker.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from celery import Celery

from kling_relay.shared.redis_conn import celery_broker

SUBMIT_QUEUE = "submit"
COPY_QUEUE = "copy"
NOTIFY_QUEUE = "notify"
# The reconciler's own queue, so a pass never waits behind a backlog of submits; every worker consumes it
# whatever its --queues (worker/tasks.py adds it at start-up), and beat's messages expire after one interval.
RECONCILE_QUEUE = "reconcile"

SUBMIT_TASK = "kling_relay.submit_job"
#: The message header with the request id that created a job (see Enqueuer.submit); not a task argument, so the
#: tasks' signatures (and what Flower shows as their arguments) stay the job id alone.
REQUEST_ID_HEADER = "kling_relay_request_id"
COPY_TASK = "kling_relay.copy_video"
NOTIFY_TASK = "kling_relay.notify_job"
RECONCILE_TASK = "kling_relay.reconcile"

# The longest task (a copy of a large video) is capped by its time limit; the broker's visibility timeout must be
# longer, or Redis would hand an unacknowledged message to a second worker while the first still runs it.
COPY_TIME_LIMIT_SECONDS = 3600
VISIBILITY_TIMEOUT_SECONDS = 2 * COPY_TIME_LIMIT_SECONDS


def make_celery(redis_url: str, **overrides: Any) -> Celery:
    """A Celery app on REDIS_URL (one Redis, or a Sentinel deployment: redis_conn.celery_broker) with the delivery
    guarantees of docs/architecture.md (JSON only, late acks, prefetch 1)."""
    broker, transport_options = celery_broker(redis_url)
    transport = transport_options.pop("broker_transport", None)
    app = Celery("kling_relay", broker=broker)
    if transport is not None:
        app.conf.broker_transport = transport
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_SECONDS, **transport_options},
        broker_pool_limit=4,
        task_default_queue=SUBMIT_QUEUE,
        task_routes={
            SUBMIT_TASK: {"queue": SUBMIT_QUEUE},
            COPY_TASK: {"queue": COPY_QUEUE},
            NOTIFY_TASK: {"queue": NOTIFY_QUEUE},
            RECONCILE_TASK: {"queue": RECONCILE_QUEUE},
        },
        worker_hijack_root_logger=False,
        # Task events (sent, received, started, succeeded, retried, failed) and worker heartbeats go out on the
        # broker, so Flower (`celery -A kling_relay.worker.celery_app flower`, Procfile) shows every task with its
        # name, arguments (job ids, and the state of a notify: never a secret) and state. Publishing an event is a
        # PUBLISH on the producer connection: no subscription, nothing for a Redis restart to break.
        worker_send_task_events=True,
        task_send_sent_event=True,
        # No remote control (`celery inspect/control`): its pub/sub connection is where kombu's Redis transport
        # crashes the worker when the broker goes away with messages unacknowledged (Channel.close ->
        # restore_unacked: 'NoneType' object has no attribute 'hostname'); tests/e2e/test_faults_redis.py.
        worker_enable_remote_control=False,
        enable_utc=True,
    )
    app.conf.update(overrides)
    return app


#: kombu's own default for `Producer.batch(max_size=...)`: Redis commands buffered before it sends them.
_KOMBU_BATCH_COMMANDS = 1000


class Enqueuer:
    """Sends pipeline tasks by name; what the API, the webhook and the Python client use to hand work on."""

    def __init__(self, app: Celery, *, producer: Any = None) -> None:
        self.app = app
        self._producer = producer  # a kombu Producer held by `batch()`; None: one from the app's pool per message

    @contextmanager
    def batch(self, messages: int = 0) -> Iterator[Enqueuer]:
        """An enqueuer whose messages (and their task-sent events) wait and go out together when the block ends:
        on one producer, in one round trip to a Redis broker (kombu's `Producer.batch`; a transport or a kombu that
        cannot batch publishes each at once, on that producer). `messages`, how many the block will send, sizes
        kombu's buffer so that they all go at the end (kombu otherwise sends whenever 1,000 Redis commands wait:
        500 messages, each a push and its task-sent event). Leaving the block with an exception discards what
        waits: nothing of it is sent. The send at the end is not retried: an error there raises from the `with`
        (kombu's BatchPublishError, "delivery is uncertain": some messages may have gone, as after a timeout)."""
        with self.app.producer_or_acquire() as producer:
            batching = getattr(producer, "batch", None)
            size = max(_KOMBU_BATCH_COMMANDS, 4 * messages)  # up to a push, an event and a margin for each
            with batching(max_size=size) if batching is not None else nullcontext():
                yield Enqueuer(self.app, producer=producer)

    def submit(self, job_id: str, *, countdown: float | None = None, request_id: str | None = None) -> None:
        """Queue the job's submit; `request_id` (the `X-Request-ID` of the POST that created the job) rides in a
        message header, and the worker binds it to every log line of the submit."""
        headers = {REQUEST_ID_HEADER: request_id} if request_id else None
        self.app.send_task(SUBMIT_TASK, args=[job_id], queue=SUBMIT_QUEUE, countdown=countdown, headers=headers,
                           producer=self._producer)

    def copy(self, job_id: str, *, countdown: float | None = None) -> None:
        self.app.send_task(COPY_TASK, args=[job_id], queue=COPY_QUEUE, countdown=countdown, producer=self._producer)

    def notify(self, job_id: str, state: str) -> None:
        self.app.send_task(NOTIFY_TASK, args=[job_id, state], queue=NOTIFY_QUEUE, producer=self._producer)
