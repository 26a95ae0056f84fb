"""Validation of the multi-image2video create body, the way docs/kling-contract.md describes it.

A body that is not a JSON object answers 1200; any bad field answers 1201 with a message naming it; a
`model_name` that is a string but names no model this simulator has answers 1203 ("the requested resource does
not exist, such as the model"), as Kling does. Fields of the single-image endpoint (`image`, `image_tail`,
`cfg_scale`, ...) and unknown fields are refused rather than silently dropped, even when empty: a client must not
forward a copied `"image_tail": ""` to multi-image2video. Optional fields may be null (treated as absent).
`watermark_info` is `{"enabled": true|false}`; enabled, each video of the task gets a `watermark_url` beside its
`url`. Images are only
checked for shape here (URL or raw base64, no `data:` prefix); fetching and decoding happen while the
task is processing, where a bad image makes the task end `failed`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from kling_relay.simulator.errors import ApiError

MODELS = ("kling-v1-6",)
MODES = ("std", "pro")
ASPECT_RATIOS = ("16:9", "9:16", "1:1")
DURATIONS = {"5": 5, "10": 10, 5: 5, 10: 10}
NEGATIVE_PROMPT_MAX_CHARS = 2500
MAX_IMAGES = 4

SINGLE_IMAGE_FIELDS = ("image", "image_tail", "cfg_scale", "static_mask", "dynamic_masks", "camera_control")
KNOWN_FIELDS = ("model_name", "image_list", "prompt", "negative_prompt", "mode", "duration",
                "aspect_ratio", "callback_url", "external_task_id", "watermark_info")


@dataclass(frozen=True)
class CreateRequest:
    model_name: str
    images: tuple[str, ...]
    prompt: str
    negative_prompt: str
    mode: str
    duration: int
    aspect_ratio: str
    callback_url: str | None
    external_task_id: str | None
    watermark: bool | None = None  # watermark_info.enabled; None: not given


def _bad(message: str) -> ApiError:
    return ApiError(1201, message)


def _optional_str(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _bad(f"{name} must be a string")
    return value


def _choice(body: dict[str, Any], name: str, choices: tuple[str, ...], default: str) -> str:
    value = _optional_str(body, name)
    if value is None:
        return default
    if value not in choices:
        raise _bad(f"{name} must be one of {', '.join(choices)}, not {value[:40]!r}")
    return value


def _is_http_url(value: str) -> bool:
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _images(body: dict[str, Any]) -> tuple[str, ...]:
    items = body.get("image_list")
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_IMAGES:
        raise _bad(f"image_list must be an array of 1 to {MAX_IMAGES} items")
    images = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or set(item) != {"image"}:
            raise _bad(f'image_list[{i}] must be an object with exactly one field "image"')
        value = item["image"]
        if not isinstance(value, str) or not value.strip():
            raise _bad(f"image_list[{i}].image must be a non-empty string")
        if value[:5].lower() == "data:":
            raise _bad(f"image_list[{i}].image must be a URL or raw base64 without a data: prefix")
        if "://" in value[:12] and not _is_http_url(value):
            raise _bad(f"image_list[{i}].image URL must be http or https")
        images.append(value)
    return tuple(images)


def _model_name(body: dict[str, Any]) -> str:
    value = _optional_str(body, "model_name")
    if value is None:
        return MODELS[0]
    if value not in MODELS:
        raise ApiError(1203, f"model {value[:40]!r} does not exist (models: {', '.join(MODELS)})")
    return value


def _watermark(body: dict[str, Any]) -> bool | None:
    value = body.get("watermark_info")
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"enabled"} or not isinstance(value["enabled"], bool):
        raise _bad('watermark_info must be {"enabled": true} or {"enabled": false}')
    enabled: bool = value["enabled"]
    return enabled


def _duration(body: dict[str, Any]) -> int:
    value = body.get("duration")
    if value is None:
        return 5
    if isinstance(value, bool) or not isinstance(value, str | int) or value not in DURATIONS:
        raise _bad('duration must be "5" or "10"')
    return DURATIONS[value]


def parse_create(raw: bytes, *, prompt_max_chars: int) -> CreateRequest:
    """The validated request, or ApiError 1200 (not a JSON object) / 1201 (bad field)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(1200, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(1200, "request body must be a JSON object")
    for name in body:
        if name in SINGLE_IMAGE_FIELDS:
            raise _bad(f"{name} is a field of image2video, not of multi-image2video (use image_list)")
        if name == "model":
            raise _bad("unknown field model: multi-image2video takes model_name")
        if name not in KNOWN_FIELDS:
            raise _bad(f"unknown field {name[:40]!r}")
    model_name = _model_name(body)
    images = _images(body)
    prompt = _optional_str(body, "prompt")
    if prompt is None or not prompt.strip():
        raise _bad("prompt is required")
    if len(prompt) > prompt_max_chars:
        raise _bad(f"prompt must be at most {prompt_max_chars} characters")
    negative = _optional_str(body, "negative_prompt") or ""
    if len(negative) > NEGATIVE_PROMPT_MAX_CHARS:
        raise _bad(f"negative_prompt must be at most {NEGATIVE_PROMPT_MAX_CHARS} characters")
    callback_url = _optional_str(body, "callback_url") or None
    if callback_url is not None and not _is_http_url(callback_url):
        raise _bad("callback_url must be an http or https URL")
    return CreateRequest(
        model_name=model_name, images=images, prompt=prompt, negative_prompt=negative,
        mode=_choice(body, "mode", MODES, "std"), duration=_duration(body),
        aspect_ratio=_choice(body, "aspect_ratio", ASPECT_RATIOS, "16:9"),
        callback_url=callback_url, external_task_id=_optional_str(body, "external_task_id") or None,
        watermark=_watermark(body),
    )
