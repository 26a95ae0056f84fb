"""Entry shim for `celery -A kling_relay.worker.celery_app worker|beat` (Procfile); nothing imports it."""

from kling_relay.shared.logs import configure_logging
from kling_relay.worker.tasks import create_worker_app

configure_logging()
app = create_worker_app()
