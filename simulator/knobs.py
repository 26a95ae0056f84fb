"""The simulator's knobs: schedule, limits and fault injection, settable by CLI flag and at runtime.

Every knob is a field of `Knobs`; `add_knob_arguments` turns each into a `--kebab-case` flag and
`Knobs.updated` applies a JSON object from `POST /_sim/control`, checking names, types and ranges.
Conventions: `*_every_n` = 0, `*_first_n` = 0 and `*_probability` = 0 mean "off"; "every Nth" counts
the requests that reach that check (the Nth, 2Nth, ... hit), "first N" fires on the first N of them; both
counters restart whenever their knob is set.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from kling_relay.simulator.errors import ERROR_TABLE, SERVER_ERROR_CODES


def _knob(default: Any, help: str, *, choices: tuple[Any, ...] | None = None,
          minimum: float | None = 0) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices, "minimum": minimum})


@dataclass(frozen=True)
class Knobs:
    # schedule
    submitted_seconds: float = _knob(0.5, "seconds a task stays 'submitted'")
    processing_seconds: float = _knob(0.5, "minimum seconds a task stays 'processing'")
    # request limits
    prompt_max_chars: int = _knob(2500, "longest accepted prompt (Kling: 2500; some resellers: 5000)",
                                  minimum=1)
    # results
    url_ttl: float = _knob(3600.0, "seconds a result URL stays valid after the task succeeded")
    video_bytes: int = _knob(0, "0: real ffmpeg slideshow; N > 0: serve N synthetic bytes instead")
    video_fps: int = _knob(5, "frame rate of the generated slideshow", minimum=1)
    image_fetch_timeout: float = _knob(5.0, "timeout in seconds when fetching an image URL")
    # rate limit and concurrency (creates only)
    rate_limit_every_n: int = _knob(0, "every Nth create answers 429 1302")
    rate_limit_probability: float = _knob(0.0, "probability that a create answers 429 1302")
    rate_limit_first_n: int = _knob(0, "the first N creates (since set or reset) answer 429 1302")
    max_in_flight: int = _knob(0, "tasks in submitted/processing above which a create answers 429 1303")
    # server errors
    server_error_every_n: int = _knob(0, "every Nth request in scope answers a 5xx")
    server_error_probability: float = _knob(0.0, "probability that a request in scope answers a 5xx")
    server_error_code: int = _knob(5000, "5000 (HTTP 500), 5001 (503) or 5002 (504)",
                                   choices=SERVER_ERROR_CODES)
    server_error_on: str = _knob("create", "scope of server errors", choices=("create", "query", "all"))
    server_error_creates_task: bool = _knob(False, "a create that answers 5xx still creates the task")
    # forced account/auth errors
    force_error_code: int = _knob(0, "answer this Kling error code (e.g. 1101, 1102) until cleared with 0")
    force_error_on: str = _knob("create", "scope of the forced error", choices=("create", "query", "all"))
    # generation failures
    fail_every_n: int = _knob(0, "every Nth task ends 'failed'")
    fail_probability: float = _knob(0.0, "probability that a task ends 'failed'")
    fail_message: str = _knob("Video generation failed, please try again later",
                              "task_status_msg of a task failed by the knobs above", minimum=None)
    # callbacks
    callback_drop_every_n: int = _knob(0, "every Nth callback is never sent")
    callback_drop_probability: float = _knob(0.0, "probability that a callback is never sent")
    callback_duplicate: int = _knob(1, "send each callback this many times", minimum=1)
    callback_reorder: bool = _knob(False, "send 'processing' only after the final status")
    callback_delay: float = _knob(0.0, "seconds to wait before sending each callback")
    callback_retries: int = _knob(3, "extra attempts after a failed delivery (non-2xx or error)")
    callback_retry_backoff: float = _knob(0.2, "first retry delay in seconds, doubled each attempt")
    callback_timeout: float = _knob(5.0, "timeout in seconds of one callback POST")
    # downloads
    download_rate: int = _knob(0, "bytes per second a result download is limited to (0: unlimited)")
    download_truncate_bytes: int | None = _knob(
        None, "close result downloads after this many body bytes (full Content-Length announced)")
    # ambiguous creates: the task is created, then the answer is lost
    ambiguous_create_every_n: int = _knob(0, "every Nth successful create loses its answer")
    ambiguous_create_probability: float = _knob(0.0, "probability that a successful create loses its answer")
    ambiguous_create_mode: str = _knob("drop", "drop: close the connection without a response; "
                                       "delay: answer after ambiguous_create_delay seconds",
                                       choices=("drop", "delay"))
    ambiguous_create_delay: float = _knob(120.0, "seconds a 'delay' ambiguous create waits before answering")
    # the read routes (a reseller may serve only the create) and the answers' shape
    no_query: bool = _knob(False, "serve no read routes (get-by-id, list): a GET answers 404 with a gateway's own "
                                  "page, not Kling's envelope, like a reseller that serves only the create")
    foreign_answers: str = _knob("off", "answer in a gateway's own JSON shape instead of Kling's envelope: off, "
                                 "query (the read routes) or all (the create too)", choices=("off", "query", "all"))
    path_external_id: bool = _knob(True, "GET .../{id} also finds a task by its external_task_id (Kling's docs "
                                         "allow either reading; off: by task_id only)")
    list_order: str = _knob("newest", "order of the task list (Kling does not document one)",
                            choices=("newest", "oldest"))
    # billing
    final_units: float = _knob(0.0, "units a finished task reports as final_unit_deduction (a string); 0: none")
    # randomness
    seed: int = _knob(0, "seed of the fault RNG (set at runtime to reseed)", minimum=None)

    def updated(self, changes: dict[str, Any]) -> Knobs:
        """A copy with `changes` applied; ValueError names the first bad knob or value."""
        known = {f.name: f for f in dataclasses.fields(self)}
        clean: dict[str, Any] = {}
        for name, value in changes.items():
            if name not in known:
                raise ValueError(f"unknown knob {name!r}")
            clean[name] = _coerce(known[name], value)
        return dataclasses.replace(self, **clean)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(Knobs)


def _typed(name: str, base: Any, value: Any) -> Any:
    """`value` checked against the knob's type (int, float or str; a float knob takes an int too)."""
    if base is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"knob {name!r} needs an integer")
    if base is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"knob {name!r} needs a number")
        return float(value)
    if base is str and not isinstance(value, str):
        raise ValueError(f"knob {name!r} needs a string")
    return value


def _coerce(f: dataclasses.Field[Any], value: Any) -> Any:
    kind = _field_types()[f.name]
    optional = isinstance(kind, types.UnionType)
    base = int if optional else kind
    if value is None:
        if optional:
            return None
        raise ValueError(f"knob {f.name!r} cannot be null")
    if base is bool:
        if not isinstance(value, bool):
            raise ValueError(f"knob {f.name!r} needs true or false")
        return value
    value = _typed(f.name, base, value)
    choices = f.metadata["choices"]
    if choices is not None and value not in choices:
        raise ValueError(f"knob {f.name!r} must be one of {list(choices)}")
    minimum = f.metadata["minimum"]
    if minimum is not None and isinstance(value, int | float) and value < minimum:
        raise ValueError(f"knob {f.name!r} must be >= {minimum}")
    if f.name.endswith("_probability") and value > 1:
        raise ValueError(f"knob {f.name!r} must be between 0 and 1")
    if f.name == "force_error_code" and value != 0 and value not in ERROR_TABLE:
        raise ValueError(f"knob 'force_error_code' must be 0 or a Kling error code, not {value}")
    return value


def add_knob_arguments(parser: argparse.ArgumentParser) -> None:
    """One `--kebab-case` flag per knob, defaulting to None so only given flags override."""
    group = parser.add_argument_group("knobs (also settable at runtime with POST /_sim/control)")
    kinds = _field_types()
    for f in dataclasses.fields(Knobs):
        flag = "--" + f.name.replace("_", "-")
        kind = kinds[f.name]
        help_text = f"{f.metadata['help']} (default: {f.default})"
        if kind is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        else:
            parse = int if isinstance(kind, types.UnionType) else kind
            group.add_argument(flag, dest=f.name, type=parse, default=None, help=help_text,
                               choices=f.metadata["choices"])


def knobs_from_args(args: argparse.Namespace) -> Knobs:
    """Knobs with every flag the user gave applied (validated like a runtime change)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Knobs)
             if getattr(args, f.name) is not None}
    return Knobs().updated(given)
