"""gunicorn settings for the web process (Procfile `web`, and the local stack of the demo and the tests).

The access log leaves out query strings: a callback URL carries its job's token (`?token=...`). Request line,
header count and header size are capped; workers are recycled now and then. gunicorn's threads read requests
themselves, so in production put a buffering reverse proxy in front (nginx: `proxy_request_buffering on`,
`client_header_timeout 10s`, `client_body_timeout 10s`, `client_max_body_size` ≥ MAX_REQUEST_BYTES): slow clients
then cost the proxy, not a worker thread that a Kling callback needs.
"""

import os

bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '8000')}"  # noqa: S104 - a server binds
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
threads = int(os.environ.get("WEB_THREADS", "4"))
timeout = 30
graceful_timeout = 5
keepalive = 5
max_requests = 1000
max_requests_jitter = 100
limit_request_line = 4094
limit_request_fields = 50
limit_request_field_size = 8190
accesslog = "-"
# %(U)s is the path without the query string (the callback token never reaches a log).
access_log_format = '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(M)sms "%(a)s"'
