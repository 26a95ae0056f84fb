"""Entry shim for gunicorn (`webhook.wsgi:app`, Procfile); nothing imports it."""

from shared.logs import configure_logging
from webhook.app import create_app

configure_logging()
app = create_app()
