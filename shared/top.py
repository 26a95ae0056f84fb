"""`kling-relay top` and `kling-relay jobs watch <id>`: the relay's state in a terminal, read straight from Redis.

`overview()` is a cheap read (a few round trips for counters, whatever the number of jobs: no scan): submission
open or paused (and why), copying open or paused (and why), jobs per state, tasks in flight at Kling against the
cap (KLING_MAX_IN_FLIGHT), the depth of each Celery queue (the length of its Redis list: messages waiting for a
worker, not those a worker holds or those retried with a countdown), and the Kling units spent today against the
daily budget. `render()` draws it with `rich`; `top()` redraws it every second until Ctrl-C (through a Redis
restart, saying so meanwhile), `once=True` prints one frame (plain text when the output is not a terminal).

`watch()` follows one job until it is stored, failed or canceled: one line per new event of its timeline (state
changes, retries, waits), then the outcome. Both need only REDIS_URL (and read KLING_MAX_IN_FLIGHT and
KLING_DAILY_UNIT_BUDGET when they are set, for the cap and the budget).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import IO, Any

import redis
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from kling_relay.shared.jobs import TERMINAL, Event, Job, JobNotFound, JobState, JobStore
from kling_relay.shared.overview import QUEUES, snapshot
from kling_relay.shared.settings_spec import SETTINGS

REFRESH_SECONDS = 1.0
WATCH_EVENTS = 200  # the latest events read per poll (a job's timeline is capped; see JobStore max_events)
_STATE_STYLE = {"stored": "green", "failed": "red", "canceled": "yellow"}


def env_setting(name: str, env: Mapping[str, str] | None = None) -> Any:
    """A setting as the relay's processes read it (its default when unset), or None when the value is bad."""
    env = os.environ if env is None else env
    spec = next(s for s in SETTINGS if s.env == name)
    raw = env.get(name)
    if raw is None or raw == "":
        return spec.default
    try:
        return spec.parse(raw, name)
    except ValueError:
        return None


def overview(store: JobStore, *, cap: int | None = None, budget: float | None = None,
             now: float | None = None) -> dict[str, Any]:
    """The relay's state in one dict (see the module docstring and `overview.snapshot`); no read per job."""
    return snapshot(store, max_in_flight=cap, budget=budget, now=now)


def _when(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _pause_text(what: str, state: str, pause: dict[str, Any] | None) -> Text:
    if pause is None:
        return Text.assemble(f"{what}: ", (state, "green"))
    why = " ".join(str(part) for part in (pause.get("reason"), pause.get("code")) if part not in (None, ""))
    return Text.assemble(f"{what}: ", ("paused", "bold red"), f" ({why}) since {pause.get('since')}: ",
                         str(pause.get("message") or ""))


def render(view: Mapping[str, Any]) -> Group:
    """One frame of `top`: the flow lines, jobs per state, queue depths."""
    cap = view["max_in_flight"]
    units = view["units"]
    budget = view["budget"]
    head = Text.assemble(("kling-relay", "bold"), f"  {_when(view['now'])}")
    flow_lines = [
        _pause_text("submission", view["submission"], view["pause"]),
        _pause_text("copy", view["copy"], view["copy_pause"]),
        Text(f"in flight at Kling: {view['in_flight_total']} / {cap if cap is not None else '?'}"),
        Text(f"units today ({units['day']}): {units['today']:g}"
             + (f" / {budget:g}" if budget is not None else " (no daily budget)")
             + (" (budget overridden today)" if units.get("budget_override") else "")),
    ]
    jobs = Table(title="jobs", show_edge=False)
    for state in JobState:
        jobs.add_column(state.value, justify="right", style=_STATE_STYLE.get(state.value))
    jobs.add_row(*(str(view["jobs"].get(state.value, 0)) for state in JobState))
    queues = Table(title="queues (messages waiting)", show_edge=False)
    for queue in QUEUES:
        queues.add_column(queue, justify="right")
    queues.add_row(*(str(view["queues"][queue]) for queue in QUEUES))
    return Group(head, *flow_lines, Text(""), jobs, Text(""), queues)


def top(store: JobStore, *, once: bool = False, console: Console | None = None,
        refresh: float = REFRESH_SECONDS, env: Mapping[str, str] | None = None,
        sleep: Callable[[float], None] = time.sleep) -> None:
    """Draw the overview every `refresh` seconds until interrupted; `once`: print one frame and return."""
    console = console or Console()
    cap = env_setting("KLING_MAX_IN_FLIGHT", env)
    budget = env_setting("KLING_DAILY_UNIT_BUDGET", env)

    def frame() -> Group:
        return render(overview(store, cap=cap, budget=budget))

    def live_frame() -> Group | Text:
        try:
            return frame()
        except redis.RedisError as exc:  # a Redis restart: say so, and show the relay again once it is back
            return Text(f"{_when(time.time())}  Redis did not answer: {type(exc).__name__}", style="bold red")

    if once:
        console.print(frame())
        return
    with Live(live_frame(), console=console, auto_refresh=False, screen=False) as live:
        while True:
            sleep(refresh)
            live.update(live_frame(), refresh=True)


def progress_line(job: Job, event: Event | None) -> str:
    """One line about a job: when, state, what the event says (retry, wait, failure), its Kling task."""
    at = event.at if event is not None else job.updated_at
    parts = [datetime.fromtimestamp(at, UTC).strftime("%H:%M:%S"), job.id]
    if event is not None and event.to_state != event.from_state:
        parts.append(f"{event.from_state or 'new'} -> {event.to_state}")
    else:
        parts.append(job.state.value)
    if event is not None:
        parts.append(f"({event.source})")
        detail = {k: v for k, v in event.detail.items() if k != "kling_task_id"}
        if detail:
            parts.append(", ".join(f"{k}={v}" for k, v in detail.items()))
    if job.kling_task_id:
        parts.append(f"kling_task_id={job.kling_task_id}")
    return " ".join(parts)


def watch(store: JobStore, job_id: str, *, out: IO[str], poll: float = 1.0, timeout: float | None = None,
          sleep: Callable[[float], None] = time.sleep) -> Job:
    """Print the job's timeline as it grows, one line per event, until the job is terminal; returns the job.

    Raises JobNotFound for an unknown job, TimeoutError after `timeout` seconds (None: wait for ever).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    last: Event | None = None
    while True:
        job = store.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        events = store.events(job_id, limit=WATCH_EVENTS)
        for event in _after(events, last):
            print(progress_line(job, event), file=out, flush=True)
            last = event
        if job.state in TERMINAL:
            print(_outcome(job), file=out, flush=True)
            return job
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"job {job_id} still {job.state.value} after {timeout}s")
        sleep(poll)


def _after(events: list[Event], last: Event | None) -> list[Event]:
    """The events after the last one printed (found by value: the timeline is capped, so positions shift)."""
    if last is None:
        return events
    for i in range(len(events) - 1, -1, -1):
        if events[i] == last:
            return events[i + 1:]
    return events  # it was trimmed away: everything read now is newer


def _outcome(job: Job) -> str:
    if job.state is JobState.STORED:
        where = ", ".join(f"s3://{v.get('bucket')}/{v.get('key')}" for v in job.videos)
        return f"{job.id} stored: {where}"
    error = job.error or {}
    why = " ".join(str(error[k]) for k in ("reason", "message") if error.get(k))
    return f"{job.id} {job.state.value}: {why}" if why else f"{job.id} {job.state.value}"


def connect(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=10, socket_connect_timeout=5)
