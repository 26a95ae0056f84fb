"""Entry shim for gunicorn (`kling_relay.webhook.wsgi:app`, Procfile); nothing imports it.

An app that cannot load (a bad setting) is one JSON record naming every problem, then exit status 4, which
gunicorn's master reads as "App failed to load" and stops on (rather than printing the error as raw text and
booting workers again and again).
"""

import logging
import sys

from kling_relay.shared.logs import configure_logging
from kling_relay.shared.settings import SettingsError
from kling_relay.webhook.app import create_app

APP_LOAD_ERROR = 4  # gunicorn's Arbiter.APP_LOAD_ERROR

configure_logging()
log = logging.getLogger("kling_relay.webhook")
try:
    app = create_app()
except SettingsError as exc:
    log.critical("invalid configuration", extra={"problems": exc.problems})
    sys.exit(APP_LOAD_ERROR)
except Exception:
    log.exception("web app failed to load")
    sys.exit(APP_LOAD_ERROR)
