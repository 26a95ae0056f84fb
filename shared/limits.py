"""The limits of the relay's API, written once: validation, the HTTP API, its OpenAPI description, the Python
client and the CLI all read them from here (the prompt's limit is a setting: `PROMPT_MAX_CHARS`)."""

from __future__ import annotations

#: Version of the HTTP API's description (`/openapi.json` info.version); the routes live under `/v1`.
API_VERSION = "0.1.0"

#: What a job id can look like (ours are `job_` + 26 base32 characters): anything else is never looked up.
JOB_ID_PATTERN = "^[A-Za-z0-9_-]{1,64}$"
#: Jobs per page of `GET /v1/jobs` (and `Relay.list`, `kling-relay jobs list`).
LIST_LIMIT_DEFAULT = 50
LIST_LIMIT_MAX = 200
#: The reason of a retry or cancel, in characters.
REASON_MAX_CHARS = 500
#: The optional JSON body of a retry or cancel.
ACTION_BODY_MAX_BYTES = 16 * 1024
#: An image URL or a notify_url, in characters.
URL_MAX_CHARS = 2048
#: Kling's documented limit for negative_prompt (the prompt's default limit is the same, see PROMPT_MAX_CHARS).
NEGATIVE_PROMPT_MAX_CHARS = 2500
PROMPT_MAX_CHARS_DEFAULT = 2500
#: A job's metadata, as compact JSON.
METADATA_MAX_BYTES = 16 * 1024
#: The Idempotency-Key header, in characters.
IDEMPOTENCY_KEY_MAX_CHARS = 255
