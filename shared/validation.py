"""Validation of a multi-image2video request before it costs money.

``validate_multi_image2video(body)`` checks a user's body against Kling's contract
(docs/kling-contract.md) and returns either a normalized Kling body, defaults filled in, or the
complete list of problems, every field at once, each as ``{field, problem}``: a path such as
``"image_list[2].image"`` and a sentence saying what is wrong and what is allowed.

Behaviour worth knowing:
- A JSON ``null`` in an optional field counts as "not given" (the default applies).
- ``callback_url`` and ``external_task_id`` are refused: the relay sets them itself.
- ``model_name`` must be one of ``Limits.model_names`` (the setting KLING_MODELS); the first is the default.
- ``watermark_info`` is ``{"enabled": true|false}``, forwarded to Kling as given (Kling then returns a
  ``watermark_url`` beside each video's ``url``).
- The single-image fields ``image``, ``image_tail`` and ``cfg_scale`` are refused with a pointer to
  ``image_list``, never dropped silently, unless they are empty (``""``, a blank string or null): a reseller's
  own example body sends ``"image_tail": ""``, so an empty one counts as absent and is not forwarded. Other
  unknown fields are refused unless the caller lists them in ``extra_fields``; their values come back untouched
  in ``Validated.extras``.
- Every string anywhere in the body (values, object keys, nested ``metadata``) must be valid text: a lone
  UTF-16 surrogate (JSON's ``"\\ud800"`` without its pair) is refused with the path of the field that holds
  it, e.g. ``metadata.tags[2]``, since it could not be stored; such an extra field is left out of
  ``Validated.extras`` (it is refused anyway, and nothing downstream should check it further).
- Validating a normalized request again returns the same request.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from kling_relay.shared import limits

# FieldProblem is re-exported: the client and the API speak one shape.
from kling_relay.shared.http_client import FieldProblem as FieldProblem
from kling_relay.shared.images import image_problems
from kling_relay.shared.inputs import has_lone_surrogate, safe_text, text_problem

MODEL_NAMES = ("kling-v1-6",)
DEFAULT_MODEL_NAME = "kling-v1-6"
MODES = ("std", "pro")
DEFAULT_MODE = "std"
DURATIONS = ("5", "10")
DEFAULT_DURATION = "5"
ASPECT_RATIOS = ("16:9", "9:16", "1:1")
DEFAULT_ASPECT_RATIO = "16:9"

USER_FIELDS = ("model_name", "image_list", "prompt", "negative_prompt", "mode", "duration", "aspect_ratio",
               "watermark_info")
RELAY_FIELDS = ("callback_url", "external_task_id")
SINGLE_IMAGE_FIELDS = ("image", "image_tail", "cfg_scale")
_ALIASES = {"model": "model_name", "images": "image_list", "negativePrompt": "negative_prompt",
            "aspectRatio": "aspect_ratio"}


@dataclass(frozen=True)
class Limits:
    """Kling's documented limits; ``prompt_max_chars`` is configurable (a reseller allows 5,000), and so are the
    models accepted (``model_names``, KLING_MODELS: resellers and newer Kling models; the first is the default)."""

    prompt_max_chars: int = limits.PROMPT_MAX_CHARS_DEFAULT
    negative_prompt_max_chars: int = limits.NEGATIVE_PROMPT_MAX_CHARS
    image_max_bytes: int = 10 * 1024 * 1024
    image_min_side: int = 300
    aspect_min: float = 1 / 2.5
    aspect_max: float = 2.5
    max_images: int = 4
    model_names: tuple[str, ...] = MODEL_NAMES

    def __post_init__(self) -> None:
        if not self.model_names:
            raise ValueError("model_names must name at least one model")


DEFAULT_LIMITS = Limits()


class ValidationFailed(Exception):
    """Raised by callers that prefer an exception; ``problems`` holds every problem found."""

    def __init__(self, problems: Iterable[FieldProblem]) -> None:
        self.problems = tuple(problems)
        fields = ", ".join(p.field for p in self.problems)
        super().__init__(f"invalid request: {len(self.problems)} problem(s) in {fields}")


@dataclass(frozen=True)
class Validated:
    """The outcome: ``request`` is the normalized Kling body, or None when there are ``problems``."""

    request: dict[str, Any] | None
    extras: dict[str, Any] = field(default_factory=dict)
    problems: tuple[FieldProblem, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems

    def require(self) -> dict[str, Any]:
        """The normalized request, or ValidationFailed carrying the problems."""
        if self.request is None:
            raise ValidationFailed(self.problems)
        return self.request


#: Unknown fields named one by one; the rest are counted in one problem, so a 422 never outgrows its request.
MAX_UNKNOWN_REPORTED = 10
#: Likewise for strings that are not valid text.
MAX_TEXT_REPORTED = 10
_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def problems_payload(problems: Iterable[FieldProblem]) -> dict[str, Any]:
    """The HTTP 422 body of the relay's API: ``{"error": "invalid request", "fields": [...]}``."""
    return {"error": "invalid request", "fields": [p.as_dict() for p in problems]}


def validate_multi_image2video(body: object, *, limits: Limits = DEFAULT_LIMITS,
                               extra_fields: Collection[str] = ()) -> Validated:
    """Check ``body`` against the multi-image2video contract and report every problem at once."""
    if not isinstance(body, dict):
        return Validated(None, {}, (FieldProblem("body", f"the request body must be a JSON object, "
                                                         f"got {_json_type(body)}"),))
    out = text_problems(body)
    request: dict[str, Any] = {
        "model_name": _choice(body, "model_name", limits.model_names, limits.model_names[0], out),
        "image_list": _image_list(body.get("image_list"), limits, out),
        "prompt": _text(body, "prompt", limits.prompt_max_chars, out, required=True),
    }
    if _given(body, "negative_prompt"):
        request["negative_prompt"] = _text(body, "negative_prompt", limits.negative_prompt_max_chars, out)
    request["mode"] = _choice(body, "mode", MODES, DEFAULT_MODE, out)
    request["duration"] = _duration(body, out)
    request["aspect_ratio"] = _choice(body, "aspect_ratio", ASPECT_RATIOS, DEFAULT_ASPECT_RATIO, out)
    if _given(body, "watermark_info"):
        request["watermark_info"] = _watermark_info(body["watermark_info"], out)
    extras = _other_fields(body, extra_fields, out)
    extras = {k: v for k, v in extras.items() if not text_problems(v)}  # refused already: not checked further
    return Validated(None if out else request, extras, tuple(out))


def text_problems(value: object, path: str = "") -> list[FieldProblem]:
    """A problem for each string in ``value`` (a JSON value, walked to any depth) that is not valid text.

    Each names where the string is: ``prompt``, ``metadata.foo``, ``image_list[0].image``; an object key that
    is not valid text is named by its escaped form, e.g. ``metadata["\\ud800"]``. At most MAX_TEXT_REPORTED are
    listed, then one problem counts the rest. The walk uses no recursion (no nesting depth can break it) and
    visits each container once (a Python caller's circular value ends).
    """
    out: list[FieldProblem] = []
    found = 0
    seen: set[int] = set()
    # (parent, step) chains, made into a path string only for a problem: no copying per level
    todo: list[tuple[_Where, object]] = [(None, value)]

    def report(where: _Where, problem: str) -> None:
        nonlocal found
        found += 1
        if found <= MAX_TEXT_REPORTED:
            out.append(FieldProblem(_path(path, where) or "body", problem))

    while todo:
        where, item = todo.pop()
        if isinstance(item, str):
            problem = text_problem(item)
            if problem is not None:
                report(where, problem)
        elif isinstance(item, dict | list | tuple) and id(item) not in seen:
            seen.add(id(item))
            if isinstance(item, dict):
                for key, inner in reversed(list(item.items())):
                    name = str(key)
                    if has_lone_surrogate(name):
                        report((where, name), "the key " + str(text_problem(name)))
                    else:
                        todo.append(((where, name), inner))
            else:
                todo += [((where, i), inner) for i, inner in reversed(list(enumerate(item)))]
    if found > MAX_TEXT_REPORTED:
        out.append(FieldProblem(path or "body", f"and {found - MAX_TEXT_REPORTED} more strings that are not "
                                                f"valid text"))
    return out


_Where = tuple["_Where", "str | int"] | None


def _path(root: str, where: _Where) -> str:
    """The field path of ``where`` below ``root``: ``.key`` for a plain name, ``["..."]`` (JSON-escaped) for
    another key, ``[i]`` for a list index."""
    steps: list[str | int] = []
    while where is not None:
        where, step = where
        steps.append(step)
    out = root
    for step in reversed(steps):
        if isinstance(step, int):
            out += f"[{step}]"
        elif _PLAIN_KEY.match(step):
            out += f".{step}" if out else step
        else:
            out += f"[{json.dumps(step)}]"
    return out


def _given(body: dict[Any, Any], name: str) -> bool:
    return body.get(name) is not None


def _choice(body: dict[Any, Any], name: str, allowed: tuple[str, ...], default: str,
            out: list[FieldProblem]) -> str:
    if not _given(body, name):
        return default
    value = body[name]
    if value not in allowed or not isinstance(value, str):
        out.append(FieldProblem(name, f"{_show(value)} is not allowed; use {_one_of(allowed)}"))
    return str(value)


def _text(body: dict[Any, Any], name: str, max_chars: int, out: list[FieldProblem],
          *, required: bool = False) -> str | None:
    value: object = body.get(name)
    if value is None:
        if required:
            out.append(FieldProblem(name, f"{name} is required: a non-blank string of at most "
                                          f"{max_chars} characters"))
        return None
    if not isinstance(value, str):
        out.append(FieldProblem(name, f"must be a string, got {_json_type(value)}"))
    elif required and not value.strip():
        out.append(FieldProblem(name, f"must not be empty or blank; describe the video in at most "
                                      f"{max_chars} characters"))
    elif len(value) > max_chars:
        out.append(FieldProblem(name, f"is {len(value)} characters long; at most {max_chars} "
                                      f"characters are allowed"))
    return value if isinstance(value, str) else None


def _duration(body: dict[Any, Any], out: list[FieldProblem]) -> str:
    if not _given(body, "duration"):
        return DEFAULT_DURATION
    value = body["duration"]
    if type(value) is int and str(value) in DURATIONS:  # not bool, not float: 5.0 and True are refused
        return str(value)
    if isinstance(value, str) and value in DURATIONS:
        return value
    out.append(FieldProblem("duration", f"{_show(value)} is not allowed; use \"5\" or \"10\" "
                                        f"(seconds, as a string or the whole number 5 or 10)"))
    return DEFAULT_DURATION


def _watermark_info(value: object, out: list[FieldProblem]) -> dict[str, bool]:
    shape = 'an object {"enabled": true} or {"enabled": false}'
    if not isinstance(value, dict):
        out.append(FieldProblem("watermark_info", f"must be {shape}, got {_json_type(value)}"))
        return {"enabled": False}
    extra = [str(k) for k in value if k != "enabled"]
    enabled = value.get("enabled")
    if extra:
        out.append(FieldProblem("watermark_info", f"has unexpected key(s) {', '.join(map(repr, extra))}; "
                                                  f"it must be {shape}"))
    if not isinstance(enabled, bool):
        what = "is missing" if "enabled" not in value else f"got {_json_type(enabled)}"
        out.append(FieldProblem("watermark_info.enabled", f"{what}; it must be true or false"))
        return {"enabled": False}
    return {"enabled": enabled}


def _empty(value: object) -> bool:
    """A value a copied example body carries for a field it does not use: null, or a blank string."""
    return value is None or (isinstance(value, str) and not value.strip())


def _image_list(value: object, limits: Limits, out: list[FieldProblem]) -> list[dict[str, str]]:
    shape = f'a list of 1 to {limits.max_images} objects {{"image": "<http(s) URL or raw base64>"}}'
    if value is None:
        out.append(FieldProblem("image_list", f"image_list is required: {shape}"))
        return []
    if not isinstance(value, list):
        out.append(FieldProblem("image_list", f"must be {shape}, got {_json_type(value)}"))
        return []
    if not value:
        out.append(FieldProblem("image_list", f"is empty; it must be {shape}"))
    elif len(value) > limits.max_images:
        out.append(FieldProblem("image_list", f"has {len(value)} images; at most {limits.max_images} "
                                              f"are allowed"))
    items: list[dict[str, str]] = []
    # Items past twice the limit are not checked: the answer stays small whatever was sent.
    for index, item in enumerate(value[: 2 * limits.max_images]):
        where = f"image_list[{index}]"
        if not isinstance(item, dict):
            out.append(FieldProblem(where, f'must be an object {{"image": "<URL or base64>"}}, '
                                           f"got {_json_type(item)}"))
            continue
        extra = [str(k) for k in item if k != "image"]
        if extra:
            out.append(FieldProblem(where, f"has unexpected key(s) {', '.join(map(repr, extra))}; "
                                           f'each item must be exactly {{"image": "<URL or base64>"}}'))
        image = item.get("image")
        if not isinstance(image, str):
            what = "is missing" if image is None else f"must be a string, got {_json_type(image)}"
            out.append(FieldProblem(f"{where}.image", f"{what}; send an http(s) URL or raw base64 "
                                                      f"of a PNG or JPEG"))
            continue
        for problem in image_problems(image, max_bytes=limits.image_max_bytes,
                                      min_side=limits.image_min_side,
                                      aspect_min=limits.aspect_min, aspect_max=limits.aspect_max):
            out.append(FieldProblem(f"{where}.image", problem))
        items.append({"image": image})
    return items


def _other_fields(body: dict[Any, Any], extra_fields: Collection[str],
                  out: list[FieldProblem]) -> dict[str, Any]:
    """Collect allowed extras and report every field that is neither Kling's nor allowed."""
    extras: dict[str, Any] = {}
    unknown = 0
    for key, value in body.items():
        name = str(key)
        if key in USER_FIELDS or has_lone_surrogate(name):  # a name that is not text: reported by text_problems
            continue
        if key in SINGLE_IMAGE_FIELDS and _empty(value):  # e.g. the reseller's example `"image_tail": ""`
            continue
        if key not in extra_fields and key not in RELAY_FIELDS and key not in SINGLE_IMAGE_FIELDS:
            unknown += 1
            if unknown > MAX_UNKNOWN_REPORTED:
                continue
        if key in extra_fields:
            extras[name] = value
        elif key in RELAY_FIELDS:
            out.append(FieldProblem(name, f"{name} is set by the relay, not by the caller; remove it"))
        elif key in SINGLE_IMAGE_FIELDS:
            out.append(FieldProblem(name, f"{name} belongs to Kling's single-image endpoint (image2video), "
                                          f"not multi-image2video; remove it (or leave it empty) and put the "
                                          f'images in image_list as {{"image": ...}} items'))
        else:
            hint = f"; did you mean {_ALIASES[name]}?" if name in _ALIASES else ""
            allowed = ", ".join((*USER_FIELDS, *sorted(extra_fields)))
            out.append(FieldProblem(name, f"unknown field {_show(name)}{hint} (allowed: {allowed})"))
    if unknown > MAX_UNKNOWN_REPORTED:
        out.append(FieldProblem("body", f"and {unknown - MAX_UNKNOWN_REPORTED} more unknown fields"))
    return extras


def _one_of(allowed: tuple[str, ...]) -> str:
    quoted = [f'"{a}"' for a in allowed]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def _show(value: object) -> str:
    """A short repr of a user value for a problem sentence (long values are cut)."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=repr)
    except (ValueError, RecursionError):  # circular or absurdly nested: not worth showing
        text = f"<{type(value).__name__}>"
    text = safe_text(text)
    return text if len(text) <= 40 else text[:37] + "..."


def _json_type(value: object) -> str:
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "an array", dict: "an object"}
    return names.get(type(value), type(value).__name__)
