"""The OpenAPI 3.1 description of the web process's HTTP API, served at `GET /openapi.json` (no token needed).

Built as a dict from the settings that shape requests (prompt and body limits), so it states the limits this
relay enforces. It must match what the views return: `tests/e2e/test_fuzz.py` checks every response against it
and `tests/webhook/test_openapi.py` checks the shapes against `Job.public_dict` and the 422 payload.
"""

from __future__ import annotations

from typing import Any

from kling_relay.shared import limits
from kling_relay.shared.jobs import SOURCES, JobState
from kling_relay.shared.jobs_model import DEFAULT_NOTIFY_EVENTS, NOTIFY_STATES
from kling_relay.shared.settings import Settings
from kling_relay.shared.validation import ASPECT_RATIOS, DURATIONS, MODES, SINGLE_IMAGE_FIELDS

_STATES = [s.value for s in JobState]
_NOTIFY_EVENTS = {"type": "array", "items": {"type": "string", "enum": list(NOTIFY_STATES)}, "minItems": 1,
                  "uniqueItems": True}
_NULLABLE_STRING = {"type": ["string", "null"]}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        out["headers"] = headers
    return out


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


_UNAUTHORIZED = _json(_ref("Error"), "Missing or wrong bearer token.", headers={
    "WWW-Authenticate": {"schema": {"type": "string"}, "description": 'Bearer realm="kling-relay"'}})
_INVALID = _json(_ref("ValidationError"), "Invalid input: every problem, each with its field.")
_FORBIDDEN = _error("An app token on an operators' route (x-required-role: ops).")


def _schemas(settings: Settings) -> dict[str, Any]:
    return {
        "Error": {
            "type": "object", "required": ["error"],
            "properties": {"error": {"type": "string", "description": "What went wrong, in a sentence."},
                           "state": {"type": "string", "enum": _STATES,
                                     "description": "The job's state (409 of an ops action)."},
                           "limit": {"type": "string", "enum": ["APP_MAX_ACTIVE_JOBS"],
                                     "description": "The limit a 429 at submit is about."},
                           "active": {"type": "integer", "description": "The app's jobs queued or in progress "
                                                                        "(a 429 at submit)."}},
        },
        "FieldProblem": {
            "type": "object", "required": ["field", "problem"], "additionalProperties": False,
            "properties": {"field": {"type": "string", "description": 'A path, e.g. "image_list[0].image".'},
                           "problem": {"type": "string"}},
        },
        "ValidationError": {
            "type": "object", "required": ["error", "fields"], "additionalProperties": False,
            "properties": {"error": {"type": "string", "const": "invalid request"},
                           "fields": {"type": "array", "minItems": 1, "items": _ref("FieldProblem")}},
        },
        "Video": {
            "type": "object", "required": ["bucket", "key", "sha256", "bytes", "duration"],
            "properties": {"bucket": {"type": "string"}, "key": {"type": "string"},
                           "sha256": {"type": "string", "description": "Hex SHA-256 of the stored object."},
                           "bytes": {"type": "integer", "minimum": 0},
                           "duration": {**_NULLABLE_STRING, "description": "Kling's duration, seconds."},
                           "watermark_url": {**_NULLABLE_STRING,
                                             "description": "Kling's watermarked copy (temporary URL), when "
                                                            "watermark_info was enabled; not downloaded."}},
        },
        "JobError": {
            "type": "object", "required": ["reason"],
            "description": "Why a job failed; `reason` is invalid, kling_rejected:<code>, kling_failed, "
                           "submit_exhausted, copy_exhausted, timed_out, auth, account or budget.",
            "properties": {"reason": {"type": "string"}, "code": {"type": ["integer", "null"]},
                           "message": {"type": "string"}},
        },
        "Event": {
            "type": "object", "required": ["at", "from", "to", "source", "detail"], "additionalProperties": False,
            "description": "One step of the job's timeline; a note keeps the state (from == to); the creation "
                           "event has from null.",
            "properties": {"at": {"type": "string", "format": "date-time"},
                           "from": {"type": ["string", "null"], "enum": [*_STATES, None]},
                           "to": {"type": "string", "enum": _STATES},
                           "source": {"type": "string", "enum": sorted(SOURCES)},
                           "detail": {"type": "object"}},
        },
        "Job": {
            "type": "object", "additionalProperties": False,
            "required": ["id", "state", "kling_task_id", "created_at", "updated_at", "error", "videos", "metadata",
                         "notify_url", "notify_events"],
            "properties": {
                "id": {"type": "string", "pattern": limits.JOB_ID_PATTERN},
                "state": {"type": "string", "enum": _STATES},
                "kling_task_id": _NULLABLE_STRING,
                "created_at": {"type": "string", "format": "date-time"},
                "updated_at": {"type": "string", "format": "date-time"},
                "error": {"oneOf": [{"type": "null"}, _ref("JobError")]},
                "videos": {"type": "array", "items": _ref("Video")},
                "metadata": {"type": "object"},
                "notify_url": _NULLABLE_STRING,
                "units": {"type": ["number", "null"], "minimum": 0,
                          "description": "Units Kling billed for the job's task (final_unit_deduction), once known."},
                "balance_deduction": {"type": ["number", "null"], "minimum": 0,
                                      "description": "Kling's final_balance_deduction, when a callback carried it."},
                "notify_events": {**_NOTIFY_EVENTS, "description": "The states notify_url is told about."},
                "app": {**_NULLABLE_STRING, "description": "The app (its API token's name) that created the job; "
                                                           "null for a job of no app (the in-process client)."},
                "events": {"type": "array", "items": _ref("Event"),
                           "description": "The timeline, oldest first (not in listings)."},
            },
        },
        "JobWithEvents": {"allOf": [_ref("Job"), {"required": ["events"]}]},
        "JobList": {
            "type": "object", "required": ["jobs", "next_cursor"], "additionalProperties": False,
            "properties": {"jobs": {"type": "array", "items": _ref("Job")}, "next_cursor": _NULLABLE_STRING},
        },
        "JobRequest": {
            "type": "object", "required": ["image_list", "prompt"], "additionalProperties": False,
            "description": "Kling's multi-image2video fields plus notify_url and metadata. Each image is an "
                           "http(s) URL (not fetched by the relay) or raw base64 of a PNG or JPEG (no data: "
                           "prefix), at most 10 MB, sides >= 300 px, aspect ratio 1:2.5 to 2.5:1.",
            "properties": {
                "model_name": {"type": ["string", "null"], "enum": [*settings.kling_models, None],
                               "description": f"One of KLING_MODELS; default {settings.kling_models[0]}."},
                "image_list": {"type": "array", "minItems": 1, "maxItems": 4, "items": {
                    "type": "object", "required": ["image"], "additionalProperties": False,
                    "properties": {"image": {"type": "string", "minLength": 1}}}},
                "prompt": {"type": "string", "minLength": 1, "maxLength": settings.prompt_max_chars},
                "negative_prompt": {"type": ["string", "null"], "maxLength": limits.NEGATIVE_PROMPT_MAX_CHARS},
                "mode": {"type": ["string", "null"], "enum": [*MODES, None]},
                "duration": {"oneOf": [{"type": "string", "enum": list(DURATIONS)},
                                       {"type": "integer", "enum": [int(d) for d in DURATIONS]},
                                       {"type": "null"}]},
                "aspect_ratio": {"type": ["string", "null"], "enum": [*ASPECT_RATIOS, None]},
                "watermark_info": {"type": ["object", "null"], "required": ["enabled"],
                                   "additionalProperties": False,
                                   "properties": {"enabled": {"type": "boolean"}},
                                   "description": "Forwarded to Kling; enabled: each stored video also records "
                                                  "Kling's watermark_url."},
                **{name: {"enum": ["", None], "description": "A single-image field: accepted only empty (as "
                                                           "in a reseller's example body) and not forwarded."}
                   for name in SINGLE_IMAGE_FIELDS},
                "notify_url": {"type": ["string", "null"], "format": "uri", "maxLength": limits.URL_MAX_CHARS,
                               "description": "Signed POST (the `jobEvent` webhook) when the job reaches a state "
                                              "of notify_events; needs NOTIFY_SECRET set."},
                "notify_events": {
                    **_NOTIFY_EVENTS, "type": ["array", "null"],
                    "description": "The states to POST to notify_url (needs notify_url), e.g. [\"processing\", "
                                   "\"generated\", \"stored\", \"failed\", \"canceled\"]; default (absent "
                                   f"or null): {', '.join(DEFAULT_NOTIFY_EVENTS)}."},
                "metadata": {"type": ["object", "null"], "description": "Yours, returned as is; <= 16 KiB."},
            },
        },
        "JobEvent": {
            "type": "object", "required": ["type", "timestamp", "data"], "additionalProperties": False,
            "description": "A job's state change, as POSTed to its notify_url and carried in the events stream's "
                           "`payload`.",
            "properties": {
                "type": {"type": "string", "enum": [f"job.{state}" for state in NOTIFY_STATES],
                         "description": "job.<state>: the state the job entered."},
                "timestamp": {"type": "string", "format": "date-time",
                              "description": "When the job entered that state (ISO-8601 UTC)."},
                "data": {**_ref("Job"), "description": "The job (without its timeline) as it is when the event "
                                                       "is sent: it may have moved on since `type`'s state."},
            },
        },
        "ActionRequest": {
            "type": "object", "additionalProperties": False,
            "properties": {"reason": {"type": "string", "maxLength": limits.REASON_MAX_CHARS,
                                      "description": "Why; recorded in the job's timeline. Valid text, no "
                                                     "control characters other than newline and tab."}},
        },
        "KlingTask": {
            "type": "object", "required": ["task_id", "task_status"],
            "description": "Kling's task object, as Kling posts it on each status change.",
            "properties": {
                "task_id": {"type": "string", "minLength": 1},
                "task_status": {"type": "string", "enum": ["submitted", "processing", "succeed", "failed"]},
                "task_status_msg": {"type": ["string", "null"]},
                "task_info": {"type": ["object", "null"],
                              "properties": {"external_task_id": {"type": ["string", "null"]}}},
                "created_at": {"type": ["integer", "null"]},
                "updated_at": {"type": ["integer", "null"]},
                "task_result": {"type": ["object", "null"], "properties": {"videos": {
                    "type": ["array", "null"], "items": {
                        "type": "object", "required": ["url"],
                        "properties": {"id": {"type": ["string", "null"]}, "url": {"type": "string", "minLength": 1},
                                       "duration": {"type": ["string", "null"]}}}}}},
            },
        },
        "CallbackAck": {
            "type": "object", "required": ["ok", "applied", "state"], "additionalProperties": False,
            "properties": {"ok": {"type": "boolean", "const": True},
                           "applied": {"type": "boolean", "description": "False: a duplicate or stale update."},
                           "state": {"type": "string", "enum": _STATES},
                           "note": {"type": "string", "description": "Why a 202 changed nothing."}},
        },
        "Health": {
            "type": "object", "required": ["status"],
            "additionalProperties": False,
            "properties": {"status": {"type": "string", "enum": ["ok", "unhealthy"]},
                           "submission": {"type": "string", "enum": ["open", "paused"]},
                           "copy": {"type": "string", "enum": ["open", "paused"]}},
        },
        "Alive": {
            "type": "object", "required": ["status"], "additionalProperties": False,
            "properties": {"status": {"type": "string", "enum": ["alive"]}},
        },
        "Ready": {
            "type": "object", "required": ["status"], "additionalProperties": False,
            "properties": {"status": {"type": "string", "enum": ["ready", "unready"]}},
        },
        "Pause": {
            "type": ["object", "null"],
            "description": "Why submission to Kling is paused: an account or auth error (codes 1000-1004, "
                           "1100-1103, 1304) and Kling's message, or the daily unit budget (reason budget, "
                           "with the budget and when the pause ends by itself).",
            "properties": {"reason": {"type": "string", "enum": ["auth", "account", "budget"]},
                           "code": {"type": ["integer", "null"]}, "message": {"type": "string"},
                           "since": _NULLABLE_STRING, "updated_at": _NULLABLE_STRING,
                           "budget": {"type": ["number", "null"]}, "resume_at": _NULLABLE_STRING},
        },
        "CopyPause": {
            "type": ["object", "null"],
            "description": "Why copying to S3 is paused: storage refuses every request (no bucket, access denied, "
                           "no or bad credentials). Jobs wait in generated; copying resumes when the reconciler's "
                           "probe succeeds or on POST /v1/copy/resume.",
            "properties": {"reason": {"type": "string", "enum": ["storage"]},
                           "code": {"type": ["string", "null"], "description": "S3's code, e.g. NoSuchBucket, "
                                                                              "AccessDenied, NoCredentials."},
                           "message": {"type": "string"}, "since": _NULLABLE_STRING,
                           "updated_at": _NULLABLE_STRING, "job_id": _NULLABLE_STRING,
                           "hits": {"type": "integer"}},
        },
        "CopyWaiting": {
            "type": "object", "required": ["count", "jobs"],
            "description": "Jobs whose copy waits on a setting, e.g. video_host_refused: the result URL's host is "
                           "not on VIDEO_URL_ALLOWLIST (widen it and restart the workers). Oldest first.",
            "properties": {
                "count": {"type": "integer"},
                "jobs": {"type": "array", "items": {
                    "type": "object", "required": ["job_id", "reason"],
                    "properties": {"job_id": {"type": "string"},
                                   "reason": {"type": "string", "enum": ["video_host_refused"]},
                                   "host": _NULLABLE_STRING, "message": {"type": "string"},
                                   "since": _NULLABLE_STRING,
                                   "until": {**_NULLABLE_STRING, "description": "When the wait ends: the job's "
                                             "deadline or the URL's expiry, whichever comes first."}}}},
            },
        },
        "CopyResumed": {
            "type": "object", "required": ["resumed", "pause"],
            "properties": {"resumed": {"type": "boolean"}, "pause": _ref("CopyPause")},
        },
        "Status": {
            "type": "object", "required": ["submission", "pause", "in_flight", "copy", "copy_pause", "copy_waiting",
                                           "jobs", "units"],
            "properties": {
                "submission": {"type": "string", "enum": ["open", "paused"]},
                "pause": _ref("Pause"),
                "in_flight": {"type": "object", "additionalProperties": {"type": "integer"}},
                "copy": {"type": "string", "enum": ["open", "paused"]},
                "copy_pause": _ref("CopyPause"),
                "copy_waiting": _ref("CopyWaiting"),
                "jobs": {"type": "object", "additionalProperties": {"type": "integer"},
                         "description": "Jobs per state."},
                "units": {
                    "type": "object", "required": ["day", "today", "month", "budget_override"],
                    "description": "Units Kling deducted in the current UTC day and month; budget_override: an "
                                   "operator resumed a budget pause today (no budget check until midnight UTC).",
                    "properties": {"day": {"type": "string", "format": "date"},
                                   "today": {"type": "number", "minimum": 0},
                                   "month": {"type": "number", "minimum": 0},
                                   "budget_override": {"type": "boolean"}},
                },
                "awaiting_callback": {
                    "type": "array", "description": "Queued jobs whose create's outcome is unknown while Kling's "
                                                    "tasks cannot be read back: never sent again, they wait for "
                                                    "a callback (or the operator).",
                    "items": {"type": "object", "properties": {"job_id": {"type": "string"},
                                                               "since": {"type": "string"},
                                                               "message": {"type": "string"}}}},
            },
        },
        "Resumed": {
            "type": "object", "required": ["resumed", "pause"],
            "properties": {"resumed": {"type": "boolean"}, "pause": _ref("Pause")},
        },
    }


#: Marks a route only operators may call (OPS_TOKENS; while unset, every API token is an operator).
_OPS_ONLY = {"x-required-role": "ops"}
_OPS_NOTE = "Operators only (x-required-role: ops): an app token gets 403. "


def _job_id_param() -> dict[str, Any]:
    return {"name": "job_id", "in": "path", "required": True,
            "schema": {"type": "string", "pattern": limits.JOB_ID_PATTERN}}


def _action(summary: str, description: str, operation_id: str) -> dict[str, Any]:
    return {
        "summary": summary, "description": description, "operationId": operation_id, "tags": ["ops"],
        "parameters": [_job_id_param()],
        "requestBody": {"required": False, "content": {"application/json": {"schema": _ref("ActionRequest")}}},
        "responses": {
            "200": _json(_ref("JobWithEvents"), "Applied: the job as it is now."),
            "400": _error("A body that is not JSON."),
            "401": _UNAUTHORIZED,
            "404": _error("No such job (or another app's: an app acts on its own jobs only)."),
            "409": _error("Not allowed in the job's state or history; `error` says why, `state` is the state."),
            "413": _error("Body over 16 KiB."),
            "422": _INVALID,
        },
    }


def _webhook_header(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": True, "description": description, "schema": {"type": "string"}}


def _job_event_webhook() -> dict[str, Any]:
    """The notification the relay POSTs to a job's notify_url (Standard Webhooks)."""
    return {"post": {
        "summary": "A job reached a state it asked to hear about", "operationId": "jobEvent", "tags": ["jobs"],
        "description": "Sent for each state of the job's notify_events (default: stored, failed, canceled) when "
                       "the job enters it, signed per Standard Webhooks with NOTIFY_SECRET; check the signature "
                       "on the raw body (`kling_relay.shared.http_client.verify`). Retried with back-off on a "
                       "5xx, 408, 429 or a network error; redirects are not followed. At-least-once: "
                       "de-duplicate by webhook-id.",
        "security": [],
        "parameters": [
            _webhook_header("webhook-id", "msg_<job_id>_<state>: the same on every delivery of this state."),
            _webhook_header("webhook-timestamp", "Unix seconds when this delivery was signed."),
            _webhook_header("webhook-signature",
                            'v1,<base64 HMAC-SHA256 of "<webhook-id>.<webhook-timestamp>.<body>">'),
        ],
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("JobEvent")}}},
        "responses": {
            "2XX": {"description": "Received: not sent again."},
            "default": {"description": "5xx, 408 and 429 are retried with back-off; any other answer is final."},
        },
    }}


def openapi_document(settings: Settings) -> dict[str, Any]:
    """The whole description as a JSON-ready dict."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "kling-relay",
            "version": limits.API_VERSION,
            "description": "Jobs in, videos in S3 out: submit multi-image2video jobs for Kling, read them, and retry "
                           "or cancel them. `/v1` needs `Authorization: Bearer <token>`: an app's (API_TOKENS) "
                           "sees and acts on its own jobs only (another app's job is 404); an operator's "
                           "(OPS_TOKENS; while unset, every API token is one) on every job and the routes marked "
                           "`x-required-role: ops`, which answer 403 to an app token.",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": _schemas(settings),
        },
        "security": [{"bearer": []}],
        "webhooks": {"jobEvent": _job_event_webhook()},
        "paths": {
            "/v1/jobs": {
                "post": {
                    "summary": "Submit a job", "operationId": "createJob", "tags": ["jobs"],
                    "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                                    "description": "Same key and body: the same job again (Idempotent-Replayed).",
                                    "schema": {"type": "string", "minLength": 1,
                                               "maxLength": limits.IDEMPOTENCY_KEY_MAX_CHARS}}],
                    "requestBody": {"required": True,
                                    "content": {"application/json": {"schema": _ref("JobRequest")}}},
                    "responses": {
                        "202": _json(_ref("JobWithEvents"), "Accepted (or replayed by Idempotency-Key).", headers={
                            "Location": {"schema": {"type": "string"}, "description": "/v1/jobs/<id>"},
                            "Idempotent-Replayed": {"schema": {"type": "string", "enum": ["true"]}}}),
                        "400": _error("Not JSON, or not Content-Type: application/json."),
                        "401": _UNAUTHORIZED,
                        "409": _error("Idempotency-Key already used with a different body (keys are per app)."),
                        "413": _error(f"Body over MAX_REQUEST_BYTES ({settings.max_request_bytes})."),
                        "422": _INVALID,
                        "429": _json(_ref("Error"), "The app has APP_MAX_ACTIVE_JOBS jobs queued or in progress; "
                                     "nothing stored.", headers={"Retry-After": {"schema": {"type": "integer"},
                                                                                 "description": "Seconds to wait."}}),
                    },
                },
                "get": {
                    "summary": "List jobs, newest first", "operationId": "listJobs", "tags": ["jobs"],
                    "parameters": [
                        {"name": "state", "in": "query", "required": False,
                         "schema": {"type": "string", "enum": _STATES}},
                        {"name": "limit", "in": "query", "required": False,
                         "schema": {"type": "integer", "minimum": 1, "maximum": limits.LIST_LIMIT_MAX,
                                    "default": limits.LIST_LIMIT_DEFAULT}},
                        {"name": "cursor", "in": "query", "required": False, "schema": {"type": "string"},
                         "description": "next_cursor of the previous page."},
                        {"name": "app", "in": "query", "required": False, "schema": {"type": "string"},
                         "description": "Only this app's jobs (operators). An app token always lists its own "
                                        "jobs only; with `state` too, a page may hold fewer than `limit`."},
                    ],
                    "responses": {"200": _json(_ref("JobList"), "One page."), "401": _UNAUTHORIZED,
                                  "422": _INVALID},
                },
            },
            "/v1/jobs/{job_id}": {
                "get": {
                    "summary": "One job with its timeline", "operationId": "getJob", "tags": ["jobs"],
                    "parameters": [_job_id_param()],
                    "responses": {"200": _json(_ref("JobWithEvents"), "The job."), "401": _UNAUTHORIZED,
                                  "404": _error("No such job (or another app's).")},
                },
            },
            "/v1/jobs/{job_id}/retry": {"post": _action(
                "Retry a failed job", "copy_exhausted: back to generated and copied again. submit_exhausted, auth, "
                "account, invalid, kling_rejected:<code>: back to queued and submitted again, looking the task up by "
                "external_task_id first and adopting it if an earlier create made it. Anything else, e.g. "
                "kling_failed or timed_out, is refused with 409: Kling allows one task per job id, so such a job "
                "needs a new job.",
                "retryJob")},
            "/v1/jobs/{job_id}/cancel": {"post": _action(
                "Cancel a queued or in-flight job", "queued, submitted, processing or generated: canceled. Kling "
                "cannot cancel a task, so one already made may finish (and be billed); its callbacks and copy "
                "change nothing. A finished job: 409.", "cancelJob")},
            "/v1/status": {
                "get": {
                    "summary": "Submission status", "operationId": "status", "tags": ["ops"], **_OPS_ONLY,
                    "description": _OPS_NOTE + "Whether submission to Kling is open or paused after an account or "
                                   "auth error, "
                                   "tasks in flight, whether copying to S3 is open or paused (storage unusable) "
                                   "and which jobs' copies wait on a setting, and jobs per state.",
                    "responses": {"200": _json(_ref("Status"), "The status."), "401": _UNAUTHORIZED,
                                  "403": _FORBIDDEN},
                },
            },
            "/v1/submission/resume": {
                "post": {
                    "summary": "Resume submission", "operationId": "resumeSubmission", "tags": ["ops"],
                    **_OPS_ONLY,
                    "description": _OPS_NOTE + "Clear a pause once the account or keys are fixed (the reconciler "
                                   "also probes "
                                   "Kling and clears it by itself). Queued jobs then resume.",
                    "responses": {"200": _json(_ref("Resumed"), "Cleared, or nothing was paused."),
                                  "401": _UNAUTHORIZED, "403": _FORBIDDEN},
                },
            },
            "/v1/copy/resume": {
                "post": {
                    "summary": "Resume copying", "operationId": "resumeCopy", "tags": ["ops"], **_OPS_ONLY,
                    "description": _OPS_NOTE + "Clear a copy pause once the bucket, credentials or policy are "
                                   "fixed (the "
                                   "reconciler also probes storage and clears it by itself). Jobs waiting in "
                                   "generated are then copied. A job waiting on a refused video host "
                                   "(video_host_refused) needs VIDEO_URL_ALLOWLIST widened and the workers "
                                   "restarted instead.",
                    "responses": {"200": _json(_ref("CopyResumed"), "Cleared, or nothing was paused."),
                                  "401": _UNAUTHORIZED, "403": _FORBIDDEN},
                },
            },
            "/healthz": {
                "get": {
                    "summary": "Health", "operationId": "health", "tags": ["ops"], "security": [],
                    "description": "No token needed, so the answer names no component.",
                    "responses": {"200": _json(_ref("Health"), "Ready."),
                                  "503": _json(_ref("Health"), "Not ready: try again after Retry-After.")},
                },
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics", "operationId": "metrics", "tags": ["ops"],
                    "security": [] if settings.metrics_public else [{"bearer": []}],
                    "description": "The Prometheus text format: the web process's counters and the job store's "
                                   "gauges. The token is one of METRICS_TOKENS (one of API_TOKENS while it is "
                                   "unset); with METRICS_PUBLIC=true no token is needed.",
                    "responses": {"200": {"description": "Prometheus text exposition format 0.0.4.",
                                          "content": {"text/plain": {"schema": {"type": "string"}}}},
                                  "401": _UNAUTHORIZED},
                },
            },
            "/livez": {
                "get": {
                    "summary": "Liveness", "operationId": "alive", "tags": ["ops"], "security": [],
                    "description": "Kubernetes' liveness probe: 200 while the process answers HTTP; it reads "
                                   "nothing else (not Redis), so an outage elsewhere never restarts the pod.",
                    "responses": {"200": _json(_ref("Alive"), "The process answers.")},
                },
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness", "operationId": "ready", "tags": ["ops"], "security": [],
                    "description": "Kubernetes' readiness probe: 200 while Redis answers, else 503 (no traffic "
                                   "for this process). No token needed, so the answer names no component.",
                    "responses": {"200": _json(_ref("Ready"), "Ready: Redis answers."),
                                  "503": _json(_ref("Ready"), "Not ready: try again after Retry-After.")},
                },
            },
            "/openapi.json": {
                "get": {
                    "summary": "This description", "operationId": "openapi", "tags": ["ops"], "security": [],
                    "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1 document.")},
                },
            },
            "/callbacks/kling/{job_id}": {
                "post": {
                    "summary": "Kling's task callback (Kling's side only)", "operationId": "klingCallback",
                    "tags": ["kling"], "security": [],
                    "description": "The URL, with its per-job token, is given to Kling at submit. Duplicates and "
                                   "stale updates answer 200 and change nothing; a callback that arrives before "
                                   "the worker has recorded the job's task answers 202 and changes nothing.",
                    "parameters": [
                        {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}},
                        {"name": "token", "in": "query", "required": True, "schema": {"type": "string"},
                         "description": "HMAC-SHA256 of the job id keyed with CALLBACK_SECRET."},
                    ],
                    "requestBody": {"required": True,
                                    "content": {"application/json": {"schema": _ref("KlingTask")}}},
                    "responses": {
                        "200": _json(_ref("CallbackAck"), "Recorded (or a duplicate/stale update)."),
                        "202": _json(_ref("CallbackAck"), "Noted, nothing changed: the job's task is not recorded "
                                                          "yet; the worker confirms it with Kling."),
                        "400": _error("Not a Kling task object."),
                        "401": _error("KLING_WEBHOOK_SECRET is set and the Standard Webhooks signature "
                                      "(webhook-id, webhook-timestamp, webhook-signature) is missing, wrong or "
                                      "stale."),
                        "403": _error("Bad callback token."),
                        "404": _error("Unknown job."),
                        "409": _error("task_id or external_task_id is not this job's."),
                        "413": _error(f"Body over MAX_CALLBACK_BYTES ({settings.max_callback_bytes})."),
                    },
                },
            },
        },
    }
