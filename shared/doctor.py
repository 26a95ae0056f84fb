"""`kling-relay doctor`: check, from the operator's shell, what the relay needs, without spending money.

Each check is a plain function returning `Check`s (`ok`, `warn`, `fail` or `info`, and a sentence saying what was
seen); `diagnose` runs them all and says what the relay will do. Nothing is ever created at Kling (no create is
sent, so nothing is billed): Kling is asked only for a task that cannot exist and for one page of one task.

- **Redis**: a PING.
- **S3**: the bucket (head_bucket, which also proves the credentials), then a tiny object written under
  `S3_PREFIX` and deleted again.
- **Kling's read routes** (`kling_reads.probe_reads`): get-by-id and list, each `works`, `missing`, `foreign`
  (answers in another shape than Kling's envelope: the detail names what it sent), `auth_failed` or `unknown`.
- **Kling auth**, from those answers: accepted when a route answered past the auth check; refused on an auth or
  account code; unknown when no read route exists (only a create could tell, and a create is billed).
- **Clock** (JWT auth signs `nbf` = now - 5 s and `exp` = now + 30 min): this host's clock against the `Date`
  header of Kling's answers.
- **Public URL**: `PUBLIC_BASE_URL` must be https for Kling to call back from the internet.
- **Video hosts**: a warning when the Kling base URL's host is not on `VIDEO_URL_ALLOWLIST` (a reseller that
  serves the videos from its own host would have every copy refused).
- **Reads** (`KLING_QUERY`): whether the relay will read tasks back or run callbacks-only, and whether the setting
  fits what the routes answer (`on` without read routes fails).

The relay is ready (`Report.ready`, the CLI's exit status 0) when no check failed; warnings say what works less
well (e.g. callbacks-only mode).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

import redis
import requests

from kling_relay.shared.kling import KlingClient
from kling_relay.shared.kling_reads import AUTH_FAILED, UNKNOWN, WORKS, ReadsProbe, RouteCheck, probe_reads
from kling_relay.shared.settings import Settings
from kling_relay.shared.urlguard import UrlAllowlist, UrlRefused

OK, WARN, FAIL, INFO = "ok", "warn", "fail", "info"
#: JWT auth: `nbf` = now - 5 s, so a clock ahead of Kling's by more than this is refused ("not yet valid").
JWT_NBF_MARGIN_SECONDS = 5.0
#: The client renews its JWT this long before `exp`: a clock behind by more sends tokens Kling finds expired.
JWT_RENEW_MARGIN_SECONDS = 300.0
JWT_LIFETIME_SECONDS = 1800.0
_CLOSE_ENOUGH_SECONDS = 2.0

CALLBACKS_ONLY = ("run callbacks-only: the copy downloads the video URL of the succeed callback (allow-list and "
                  "SSRF guard as always), quiet jobs are not polled (they wait for their callbacks until their "
                  "deadline), and a create whose outcome is unknown is never sent again (the job waits for its "
                  "callback, listed under awaiting_callback in GET /v1/status)")
READS_BACK = ("read tasks back from Kling: the copy takes a fresh video URL, the reconciler polls quiet jobs, and a "
              "create whose outcome is unknown is looked up by external_task_id before any new create")


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok, warn, fail, info
    detail: str


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    verdict: str = ""  # what the relay will do

    @property
    def ready(self) -> bool:
        """True when nothing the relay needs failed."""
        return all(c.status != FAIL for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {"ready": self.ready, "verdict": self.verdict, "checks": [asdict(c) for c in self.checks]}


# -- the host's own side ------------------------------------------------------------------------------------------

def check_redis(client: redis.Redis) -> Check:
    try:
        client.ping()
    except redis.RedisError as exc:
        return Check("redis", FAIL, f"no answer: {type(exc).__name__}: {exc}")
    return Check("redis", OK, "answered PING")


def check_s3(s3: Any, bucket: str, prefix: str) -> Check:
    """head_bucket, then a tiny object written under the prefix and deleted (never left behind on success)."""
    key = f"{prefix}kling-relay-doctor/{secrets.token_hex(8)}.txt"
    step = "head_bucket"
    try:
        s3.head_bucket(Bucket=bucket)
        step = "put_object"
        s3.put_object(Bucket=bucket, Key=key, Body=b"kling-relay doctor: safe to delete\n",
                      ContentType="text/plain")
        step = "delete_object"
        s3.delete_object(Bucket=bucket, Key=key)
    except Exception as exc:  # botocore's errors (credentials, endpoint, access denied, no such bucket)
        return Check("s3", FAIL, f"{step} on s3://{bucket}/{key if step != 'head_bucket' else ''} failed: "
                                 f"{type(exc).__name__}: {exc}")
    return Check("s3", OK, f"bucket {bucket!r} answered; wrote and deleted s3://{bucket}/{key}")


def check_public_url(public_base_url: str) -> Check:
    if public_base_url.startswith("https://"):
        return Check("public url", OK, f"{public_base_url} is https")
    return Check("public url", WARN, f"{public_base_url} is plain http on a loopback host: only a Kling on this "
                                     "machine (the simulator) can call it back; Kling needs an https URL")


def check_video_hosts(kling_base_url: str, video_url_allowlist: str) -> Check:
    try:
        UrlAllowlist.parse(video_url_allowlist).check_without_dns(kling_base_url)
    except UrlRefused as exc:
        return Check("video hosts", WARN, f"the Kling base URL's host is not on VIDEO_URL_ALLOWLIST ({exc}): if "
                                          "this reseller serves the videos from its own host, every copy is refused")
    return Check("video hosts", OK, "the Kling base URL's host is on VIDEO_URL_ALLOWLIST")


# -- Kling ----------------------------------------------------------------------------------------------------------

class DateRecorder:
    """A `requests` response hook keeping (this host's time, the server's `Date`) of each answer."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.readings: list[tuple[float, float]] = []

    def __call__(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        header = response.headers.get("Date")
        if not header:
            return
        try:
            server = parsedate_to_datetime(header).timestamp()
        except (TypeError, ValueError):
            return
        self.readings.append((self.clock(), server))

    def skew(self) -> float | None:
        """Seconds this host's clock is ahead of the server's (negative: behind), or None without a Date header.

        `Date` has whole seconds and is stamped before the answer travels: half a second is taken off."""
        if not self.readings:
            return None
        return min(local - server - 0.5 for local, server in self.readings)


def check_clock(skew: float | None, auth_mode: str) -> Check:
    if skew is None:
        return Check("clock", INFO if auth_mode == "api_key" else WARN, "Kling's answers carried no Date header: "
                                                                        "the clock could not be compared")
    seen = f"this host's clock is {abs(skew):.1f} s {'ahead of' if skew >= 0 else 'behind'} Kling's"
    if auth_mode == "api_key":
        return Check("clock", INFO, f"{seen} (a static key signs nothing: the clock does not matter for auth)")
    if skew > JWT_NBF_MARGIN_SECONDS:
        return Check("clock", FAIL, f"{seen}: the JWT's nbf (now - 5 s) lies in Kling's future, so Kling refuses it "
                                    "as not yet valid (1003): fix the host's time (NTP)")
    if -skew > JWT_LIFETIME_SECONDS - 60:
        return Check("clock", FAIL, f"{seen}: every JWT has expired by Kling's clock (1004): fix the host's time")
    if -skew > JWT_RENEW_MARGIN_SECONDS:
        return Check("clock", WARN, f"{seen}: tokens expire by Kling's clock before the relay renews them (each "
                                    "costs one refused call): fix the host's time (NTP)")
    if abs(skew) > _CLOSE_ENOUGH_SECONDS:
        return Check("clock", WARN, f"{seen}: close to the JWT's 5 s margin; keep the host's time in sync")
    return Check("clock", OK, seen)


def _route(check: RouteCheck) -> Check:
    """A read route: ok when it works; a refused key fails; missing, foreign or unknown warn (the `reads` check
    says whether the relay can do without it)."""
    status = OK if check.verdict == WORKS else FAIL if check.verdict == AUTH_FAILED else WARN
    return Check(f"kling {check.route}", status, f"{check.verdict}: {check.detail}")


def check_auth(probe: ReadsProbe, auth_mode: str) -> Check:
    routes = (probe.get_by_id, probe.list)
    failed = [r for r in routes if r.verdict == AUTH_FAILED]
    if failed:
        return Check("kling auth", FAIL, f"refused ({auth_mode}): {failed[0].detail}")
    if any(r.verdict == WORKS for r in routes):
        return Check("kling auth", OK, f"accepted ({auth_mode}): a read route answered past the auth check")
    if all(r.verdict == UNKNOWN for r in routes) and all(r.http_status is None for r in routes):
        return Check("kling auth", FAIL, f"Kling did not answer: {probe.get_by_id.detail}")
    return Check("kling auth", WARN, "unknown: no read route answers in Kling's envelope, and only a create (which "
                                     "is billed) could tell; the first job will, and a refused key pauses submission")


def reads_verdict(probe: ReadsProbe, kling_query: str) -> tuple[Check, str]:
    """The `reads` check for the configured KLING_QUERY, and what the relay will do."""
    available = probe.available
    if kling_query == "off":
        hint = " (the read routes work: KLING_QUERY=auto would use them)" if available else ""
        return Check("reads", WARN if available else OK, f"KLING_QUERY=off: callbacks only{hint}"), CALLBACKS_ONLY
    if available:
        return Check("reads", OK, f"KLING_QUERY={kling_query}: get-by-id and list answer Kling's envelope"), READS_BACK
    missing = ", ".join(f"{r.route} {r.verdict}" for r in (probe.get_by_id, probe.list) if r.verdict != WORKS)
    if kling_query == "on":
        if available is None:
            return (Check("reads", WARN, f"KLING_QUERY=on, but the read routes could not be checked ({missing})"),
                    READS_BACK)
        return (Check("reads", FAIL, f"KLING_QUERY=on, but {missing}: copies, polls and lookups would fail; set "
                                     "KLING_QUERY=auto or off"), READS_BACK)
    if available is None:
        return (Check("reads", WARN, f"KLING_QUERY=auto could not tell yet ({missing}): the relay reads tasks back "
                                     "until a probe gets a clear answer"), READS_BACK)
    return Check("reads", WARN, f"KLING_QUERY=auto: {missing}, so the relay runs callbacks-only"), CALLBACKS_ONLY


def check_kling(client: KlingClient, recorder: DateRecorder, settings: Settings) -> tuple[list[Check], str]:
    probe = probe_reads(client)
    mode = settings.kling_auth_mode
    reads, verdict = reads_verdict(probe, settings.kling_query)
    checks = [_route(probe.get_by_id), _route(probe.list), check_auth(probe, mode),
              check_clock(recorder.skew(), mode), reads]
    return checks, verdict


# -- all of it ----------------------------------------------------------------------------------------------------

def diagnose(settings: Settings, *, kling_client: Callable[[requests.Session], KlingClient],
             s3_client: Any, redis_client: redis.Redis, clock: Callable[[], float] = time.time) -> Report:
    """Run every check. `kling_client(session)` builds the Kling client over a session whose answers' Date headers
    are recorded (for the clock check)."""
    recorder = DateRecorder(clock)
    session = requests.Session()
    session.headers["user-agent"] = "kling-relay doctor"
    session.hooks["response"].append(recorder)
    report = Report()
    report.checks.append(check_redis(redis_client))
    report.checks.append(check_s3(s3_client, settings.s3_bucket, settings.s3_prefix))
    try:
        with kling_client(session) as client:
            kling, report.verdict = check_kling(client, recorder, settings)
    finally:
        session.close()
    report.checks += kling
    report.checks.append(check_public_url(settings.public_base_url))
    report.checks.append(check_video_hosts(settings.kling_base_url, settings.video_url_allowlist))
    return report


def render(report: Report, settings: Settings) -> str:
    """The report as the CLI prints it."""
    lines = [f"kling-relay doctor: Kling at {settings.kling_base_url} ({settings.kling_auth_mode} auth), "
             f"KLING_QUERY={settings.kling_query}"]
    width = max(len(c.name) for c in report.checks)
    lines += [f"  {c.status:<5} {c.name:<{width}}  {c.detail}" for c in report.checks]
    lines.append(f"The relay will {report.verdict}.")
    failed = [c.name for c in report.checks if c.status == FAIL]
    warned = [c.name for c in report.checks if c.status == WARN]
    if failed:
        lines.append(f"NOT READY: {', '.join(failed)} failed.")
    else:
        lines.append("READY" + (f", with warnings: {', '.join(warned)}." if warned else "."))
    return "\n".join(lines)
