"""The worker's Celery app: the reconciler on beat's schedule, its own queue, every task registered."""

from __future__ import annotations

from kling_relay.shared.queue import COPY_TASK, NOTIFY_TASK, RECONCILE_QUEUE, RECONCILE_TASK, SUBMIT_TASK
from kling_relay.shared.settings import load_settings
from kling_relay.worker.tasks import create_worker_app

ENV = {
    "REDIS_URL": "redis://127.0.0.1:1/0",
    "KLING_BASE_URL": "https://api-singapore.klingai.com",
    "KLING_API_KEY": "reseller-key",
    "PUBLIC_BASE_URL": "https://relay.example.com",
    "CALLBACK_SECRET": "callback-secret-0123456789",
    "API_TOKENS": "token-aaaaaaaaaaaaaaaa",
    "S3_BUCKET": "videos",
    "RECONCILE_INTERVAL_SECONDS": "7",
}


def test_beat_schedules_the_reconciler_on_its_own_queue() -> None:
    app = create_worker_app(load_settings(ENV))
    try:
        entry = app.conf.beat_schedule["reconcile"]
        assert entry["task"] == RECONCILE_TASK and entry["schedule"] == 7.0
        assert entry["options"] == {"queue": RECONCILE_QUEUE, "expires": 7.0}
        assert app.amqp.router.route({}, RECONCILE_TASK)["queue"].name == RECONCILE_QUEUE
        assert {SUBMIT_TASK, COPY_TASK, NOTIFY_TASK, RECONCILE_TASK} <= set(app.tasks)
    finally:
        app.close()
