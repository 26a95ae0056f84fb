"""Whether the relay may read tasks back from Kling (`KLING_QUERY`), and the probe that finds out.

Kling's read routes (one task: `GET .../multi-image2video/{id}`; the list: `GET .../multi-image2video`) are what
the copy (a fresh video URL), the reconciler (polling quiet jobs) and the lookup after an ambiguous create use.
A reseller's gateway may serve only the create: no read route, or answers in its own shape. `KLING_QUERY` says
what the relay does:

- `on`: read tasks back (a read that fails is an error, retried like any other);
- `off`: callbacks only: never read a task back (see the README's "Resellers and callbacks-only mode");
- `auto` (the default): probe both read routes once (`probe_reads`: an id that cannot exist, and a list page
  of one task; nothing is created, nothing is billed) and read tasks back only if both answer in Kling's
  envelope. A definite verdict (the routes answer Kling's envelope; or one is missing or answers in another
  shape) is shared by every process through Redis for `AUTO_VERDICT_SECONDS`, then probed again. A probe that
  cannot tell (a timeout, a 5xx, an auth or account error, the rate limit) is not kept, and this call reads as
  `on`: the read that follows fails alike and is retried, which never makes a second task.

A route "works" when it answers Kling's envelope: code 0, or a refusal that shows it looked at the request
(1203 for the id that cannot exist, 1200/1201). It is "missing" when it answers Kling's 1202 (no such method
there) or a 4xx that is not Kling's envelope (a gateway's own 404 page), and "foreign" when it answers 2xx in
another shape than Kling's envelope (`detail` names what it sent).
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kling_relay.shared import keys
from kling_relay.shared.kling import (
    KlingClient,
    KlingError,
    KlingFixAccount,
    KlingFixRequest,
    KlingProtocolError,
    KlingTaskNotFound,
)
from kling_relay.shared.kling_codes import pause_reason

if TYPE_CHECKING:  # the wiring module is handed in, never imported at run time
    from kling_relay.shared.runtime import Runtime

log = logging.getLogger(__name__)

#: How long an `auto` verdict is kept in Redis before the read routes are probed again.
AUTO_VERDICT_SECONDS = 900
#: Route verdicts.
WORKS, MISSING, FOREIGN, AUTH_FAILED, UNKNOWN = "works", "missing", "foreign", "auth_failed", "unknown"
_NO_ROUTE_CODE = 1202  # "invalid request method": Kling's own answer for a route it does not serve
_AUTH_STATUSES = (401, 403)


@dataclass(frozen=True)
class RouteCheck:
    """What one read route answered: `verdict` (works, missing, foreign, auth_failed, unknown) and why."""

    route: str  # "get-by-id" or "list"
    verdict: str
    detail: str
    code: int | None = None
    http_status: int | None = None

    @property
    def works(self) -> bool | None:
        """True: answers Kling's envelope; False: missing or in another shape; None: could not tell."""
        if self.verdict == WORKS:
            return True
        if self.verdict in (MISSING, FOREIGN):
            return False
        return None


@dataclass(frozen=True)
class ReadsProbe:
    """Both read routes; `available` is what `auto` makes of them."""

    get_by_id: RouteCheck
    list: RouteCheck

    @property
    def available(self) -> bool | None:
        """True if both routes work, False if either is missing or foreign, else None (could not tell)."""
        answers = (self.get_by_id.works, self.list.works)
        if False in answers:
            return False
        if None in answers:
            return None
        return True


def impossible_id() -> str:
    """A task id no task can have (nor an external_task_id the relay ever sends: those are job ids)."""
    return "kling-relay-probe-" + secrets.token_hex(8)


def _from_error(route: str, exc: KlingError) -> RouteCheck:
    fields = {"code": exc.code, "http_status": exc.http_status}
    if isinstance(exc, KlingTaskNotFound):
        return RouteCheck(route, WORKS, f"answered Kling's {exc.code} for an id that cannot exist", **fields)
    if isinstance(exc, KlingFixRequest):
        if exc.code == _NO_ROUTE_CODE:
            return RouteCheck(route, MISSING, f"answered Kling's 1202 (no such route or method): {exc}", **fields)
        return RouteCheck(route, WORKS, f"answered in Kling's envelope: {exc}", **fields)
    if isinstance(exc, KlingFixAccount):
        return RouteCheck(route, AUTH_FAILED, f"{pause_reason(exc.code)} error: {exc}", **fields)
    if isinstance(exc, KlingProtocolError) and exc.http_status is not None:
        if 200 <= exc.http_status < 300:
            return RouteCheck(route, FOREIGN, f"answered in another shape than Kling's envelope: {exc.message}",
                              **fields)
        if exc.http_status in _AUTH_STATUSES:
            return RouteCheck(route, AUTH_FAILED, f"refused, not in Kling's envelope: {exc.message}", **fields)
        if 400 <= exc.http_status < 500:  # a gateway's own "no such route" page, or its own "not found" shape
            return RouteCheck(route, MISSING, f"not served here, or not in Kling's shape: {exc.message}", **fields)
    return RouteCheck(route, UNKNOWN, f"could not tell: {exc}", **fields)


def probe_get_by_id(client: KlingClient) -> RouteCheck:
    """Ask for a task that cannot exist (nothing is created): Kling answers 1203 in its envelope."""
    try:
        task = client.get_task(impossible_id())
    except KlingError as exc:
        return _from_error("get-by-id", exc)
    return RouteCheck("get-by-id", WORKS, f"answered a task ({task.task_id}) in Kling's envelope", code=0)


def probe_list(client: KlingClient) -> RouteCheck:
    """Ask for one page of one task (nothing is created)."""
    try:
        tasks = client.list_tasks(page_num=1, page_size=1)
    except KlingError as exc:
        return _from_error("list", exc)
    return RouteCheck("list", WORKS, f"answered a page of {len(tasks)} task(s) in Kling's envelope", code=0)


def probe_reads(client: KlingClient) -> ReadsProbe:
    """Both read routes, as `auto` and `kling-relay doctor` see them."""
    return ReadsProbe(get_by_id=probe_get_by_id(client), list=probe_list(client))


def cached_verdict(rt: Runtime) -> bool | None:
    """The `auto` verdict other processes found (True: read tasks back), or None when none is kept."""
    value = rt.redis.get(keys.KLING_READS)
    return None if value is None else value == "on"


def reads_available(rt: Runtime) -> bool:
    """Whether this relay reads tasks back from Kling now (see the module docstring)."""
    mode = rt.settings.kling_query
    if mode != "auto":
        return mode == "on"
    cached = cached_verdict(rt)
    if cached is not None:
        return cached
    probe = probe_reads(rt.kling)
    available = probe.available
    if available is None:
        log.info("kling read routes: could not tell, reading for now",
                 extra={"get_by_id": probe.get_by_id.verdict, "list": probe.list.verdict})
        return True
    rt.redis.set(keys.KLING_READS, "on" if available else "off", ex=AUTO_VERDICT_SECONDS)
    level = logging.INFO if available else logging.WARNING
    log.log(level, "kling read routes probed", extra={
        "reads": "on" if available else "off (callbacks only)", "get_by_id": probe.get_by_id.verdict,
        "list": probe.list.verdict, "get_by_id_detail": probe.get_by_id.detail, "list_detail": probe.list.detail})
    return available
