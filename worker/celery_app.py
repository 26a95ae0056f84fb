"""Entry shim for `celery -A worker.celery_app worker|beat` (Procfile); nothing imports it."""

from shared.logs import configure_logging
from worker.tasks import create_worker_app

configure_logging()
app = create_worker_app()
