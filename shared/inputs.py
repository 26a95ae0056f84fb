"""Checks on what callers hand the relay, shared by the HTTP API, the Python client, the CLI and the job store.

- Job ids: ``is_job_id`` accepts what a job id can look like (ours are ``job_`` + 26 base32 characters; the
  pattern allows 1 to 64 of ``[A-Za-z0-9_-]``). Anything else is never looked up, so an id cannot name another
  key of the store (e.g. a job's ``:events`` list, another Redis type): it is simply not a job.
- Text: a Python ``str`` can hold a lone UTF-16 surrogate (JSON's ``"\\ud800"`` escape, or a command-line
  argument that was not valid UTF-8, which Python keeps as ``surrogateescape`` code points). Such a string
  cannot be written to Redis as UTF-8, so ``text_problem`` refuses it before anything is stored, and
  ``safe_text`` escapes it (``\\ud800``, as text) where it must be shown or kept anyway.
- Ops reasons (retry, cancel): ``reason_problem`` allows at most ``REASON_MAX_CHARS`` characters of valid text
  with no control characters other than newline and tab.

Problem sentences never repeat the offending text.
"""

from __future__ import annotations

import re
import unicodedata

from kling_relay.shared.limits import JOB_ID_PATTERN, REASON_MAX_CHARS

_JOB_ID = re.compile(JOB_ID_PATTERN)
_ALLOWED_CONTROLS = frozenset("\n\t")


def is_job_id(value: object) -> bool:
    """Whether ``value`` can be a job id (a string of 1 to 64 of ``[A-Za-z0-9_-]``)."""
    return isinstance(value, str) and _JOB_ID.fullmatch(value) is not None


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def has_lone_surrogate(value: str) -> bool:
    """Whether ``value`` holds a code point U+D800..U+DFFF, which no UTF-8 text can carry."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def text_problem(value: str, *, controls: bool = True) -> str | None:
    """Why ``value`` is not acceptable text, or None. ``controls=False`` also refuses control characters other
    than newline and tab."""
    if has_lone_surrogate(value):
        return ("is not valid text: it holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape without its pair, "
                "or bytes that are not UTF-8); send valid Unicode")
    if not controls and any(c not in _ALLOWED_CONTROLS and unicodedata.category(c) == "Cc" for c in value):
        return "must not hold control characters (newline and tab are allowed)"
    return None


def safe_text(value: str) -> str:
    """``value`` with every lone surrogate written as a ``\\udxxx`` escape: always encodable as UTF-8. For text
    shown back to whoever typed it (the escape says what was wrong)."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def replaced_text(value: str) -> str:
    """``value`` with every lone surrogate replaced by U+FFFD: always encodable as UTF-8. For a third party's text
    kept as data (Kling's messages, URLs, durations)."""
    return _LONE_SURROGATE.sub("\ufffd", value)


def reason_problem(reason: object) -> str | None:
    """Why ``reason`` (of a retry or cancel; None means none given) is refused, or None when it is fine."""
    if reason is None:
        return None
    if not isinstance(reason, str):
        return f"must be a string of at most {REASON_MAX_CHARS} characters"
    if len(reason) > REASON_MAX_CHARS:
        return f"is {len(reason)} characters long; at most {REASON_MAX_CHARS} characters are allowed"
    return text_problem(reason, controls=False)
