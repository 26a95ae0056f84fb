"""Input checks shared by the API, the Python client, the CLI and the store (shared/inputs.py), and the walk over a
job body for text that could not be stored (shared/validation.py: text_problems)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kling_relay.shared.inputs import is_job_id, reason_problem, safe_text, text_problem
from kling_relay.shared.limits import REASON_MAX_CHARS as MAX_REASON_CHARS
from kling_relay.shared.validation import MAX_TEXT_REPORTED, text_problems, validate_multi_image2video

LONE = "\ud800"
BODY: dict[str, Any] = {"image_list": [{"image": "https://example.com/a.png"}], "prompt": "a cat"}


@pytest.mark.parametrize("job_id", ["job_01HZX0000000000000000000000", "job_nope", "a", "x" * 64, "a-b_C9"])
def test_job_ids_that_can_be_looked_up(job_id: str) -> None:
    assert is_job_id(job_id)


@pytest.mark.parametrize("job_id", ["", "x" * 65, "job_x:events", "job_x:request", "job x", "job_\udcff", "jöb",
                                    "job_x\n", None, 5])
def test_job_ids_that_are_never_looked_up(job_id: object) -> None:
    assert not is_job_id(job_id)


@pytest.mark.parametrize("text", [LONE, "ok" + "\udfff", "\udcff", "a\ud83d"])
def test_a_lone_surrogate_is_not_text(text: str) -> None:
    assert "not valid text" in str(text_problem(text))
    assert safe_text(text).encode("utf-8")  # escaped, so it can be shown or logged
    assert "\\ud" in safe_text(text)


def test_a_surrogate_pair_is_one_character_and_fine() -> None:
    emoji = json.loads('"\\ud83d\\ude00"')
    assert text_problem(emoji) is None and safe_text(emoji) == emoji


@pytest.mark.parametrize("reason", [None, "", "customer left", "line one\nline two\tx", "é" * MAX_REASON_CHARS])
def test_reasons_that_are_fine(reason: str | None) -> None:
    assert reason_problem(reason) is None


@pytest.mark.parametrize(("reason", "says"), [
    ("x" * (MAX_REASON_CHARS + 1), "at most 500"), ("x" * 100_000, "at most 500"), (5, "must be a string"),
    (["x"], "must be a string"), ("bad \udcff bytes", "not valid text"), (LONE, "not valid text"),
    ("nul\x00", "control characters"), ("esc\x1b[31m", "control characters"), ("cr\r", "control characters"),
    ("c1\x85", "control characters"),
], ids=["501", "100k", "int", "list", "surrogateescape", "lone", "nul", "escape", "cr", "c1"])
def test_reasons_that_are_refused(reason: object, says: str) -> None:
    assert says in str(reason_problem(reason))


@pytest.mark.parametrize(("body", "field"), [
    ({**BODY, "prompt": "a " + LONE}, "prompt"),
    ({**BODY, "negative_prompt": LONE}, "negative_prompt"),
    ({**BODY, "metadata": {"foo": LONE}}, "metadata.foo"),
    ({**BODY, "metadata": {LONE: "x"}}, 'metadata["\\ud800"]'),
    ({**BODY, "metadata": {"a": {"b": ["ok", LONE]}}}, "metadata.a.b[1]"),
    ({**BODY, "metadata": {"a.b": LONE}}, 'metadata["a.b"]'),
    ({**BODY, "image_list": [{"image": "https://example.com/" + LONE + ".png"}]}, "image_list[0].image"),
    ({**BODY, "mode": LONE}, "mode"),
    ({**BODY, "notify_url": "https://example.com/" + LONE}, "notify_url"),
    ({**BODY, LONE: 1}, '["\\ud800"]'),
], ids=["prompt", "negative_prompt", "metadata-value", "metadata-key", "nested", "dotted-key", "image", "mode",
        "notify_url", "top-level-key"])
def test_a_lone_surrogate_anywhere_in_a_job_body_is_refused_naming_its_field(body: dict[str, Any],
                                                                             field: str) -> None:
    result = validate_multi_image2video(body, extra_fields=("notify_url", "metadata"))
    assert not result.ok and result.request is None
    assert field in [p.field for p in result.problems]
    for problem in result.problems:  # the answer itself must be storable, printable text
        (problem.field + problem.problem).encode("utf-8")
    assert all(not text_problems(v) for v in result.extras.values())


def test_text_problems_are_counted_past_the_limit_and_need_no_recursion() -> None:
    many = {f"k{i}": LONE for i in range(3 * MAX_TEXT_REPORTED)}
    problems = text_problems(many, "metadata")
    assert len(problems) == MAX_TEXT_REPORTED + 1 and "20 more" in problems[-1].problem
    deep: Any = LONE
    for _ in range(50_000):  # deeper than Python's recursion limit
        deep = [deep]
    assert [p.field for p in text_problems(deep, "x")] == ["x" + "[0]" * 50_000]


def test_valid_unicode_everywhere_is_fine() -> None:
    body = {**BODY, "prompt": "un chat 🐈 — 猫", "metadata": {"ключ": ["значение", {"😀": "ok"}]}}
    assert validate_multi_image2video(body, extra_fields=("metadata",)).ok
