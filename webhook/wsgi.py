"""Entry shim for gunicorn (`kling_relay.webhook.wsgi:app`, Procfile); nothing imports it."""

from kling_relay.shared.logs import configure_logging
from kling_relay.webhook.app import create_app

configure_logging()
app = create_app()
