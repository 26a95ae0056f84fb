"""Tests for shared/validation.py and shared/images.py: real images made with Pillow, no mocks."""

from __future__ import annotations

import base64
import copy
import functools
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from kling_relay.shared.images import sniff_format
from kling_relay.shared.validation import (
    FieldProblem,
    Limits,
    Validated,
    ValidationFailed,
    problems_payload,
    validate_multi_image2video,
)
from tests.support import images as pillow

MB = 1024 * 1024
URL = "https://cdn.example.com/frames/first.png?sig=abc123"


# ---------------------------------------------------------------- real images, made once per session


@functools.cache
def image_bytes(fmt: str, width: int, height: int, mode: str = "RGB") -> bytes:
    """A small solid-colour image of the given format and size, encoded by Pillow."""
    colour = 90 if mode == "L" else (40, 120, 200)
    return pillow.image_bytes(width, height, colour, fmt=fmt, mode=mode)


@functools.cache
def b64(fmt: str, width: int, height: int, mode: str = "RGB") -> str:
    return base64.b64encode(image_bytes(fmt, width, height, mode)).decode("ascii")


@functools.cache
def noise_png_over_10mb() -> bytes:
    """A real PNG of random-noise pixels, stored uncompressed: about 10.6 MB, over Kling's 10 MB."""
    side = 1920  # 1920 * 1920 * 3 bytes of pixels = 11,059,200 > 10 MiB
    pixels = random.Random(0).randbytes(side * side * 3)
    data = pillow.encode(Image.frombytes("RGB", (side, side), pixels), "PNG", compress_level=0)
    assert len(data) > 10 * MB
    return data


@dataclass(frozen=True)
class Images:
    """Base64 strings of real images for the table below."""

    png: str
    jpeg: str
    gif: str
    webp: str
    bmp: str
    small_png: str  # 200x200
    tall_png: str  # 300x900, 1:3
    wide_png: str  # 900x300, 3:1
    small_tall_png: str  # 200x600: too small and too tall
    huge_png: str  # > 10 MB
    truncated_png: str
    text: str  # valid base64 of plain text


@pytest.fixture(scope="session")
def images() -> Images:
    png = image_bytes("PNG", 300, 300)
    return Images(
        png=b64("PNG", 300, 300),
        jpeg=b64("JPEG", 300, 400),
        gif=b64("GIF", 300, 300, "L"),
        webp=b64("WEBP", 300, 300),
        bmp=b64("BMP", 300, 300),
        small_png=b64("PNG", 200, 200),
        tall_png=b64("PNG", 300, 900),
        wide_png=b64("PNG", 900, 300),
        small_tall_png=b64("PNG", 200, 600),
        huge_png=base64.b64encode(noise_png_over_10mb()).decode("ascii"),
        truncated_png=base64.b64encode(png[:20]).decode("ascii"),
        text=base64.b64encode(b"hello, this is not an image at all").decode("ascii"),
    )


def body(*images: str, **fields: Any) -> dict[str, Any]:
    """A valid request with the given images (default: one URL), then ``fields`` set or, as None, removed."""
    out: dict[str, Any] = {"image_list": [{"image": i} for i in (images or (URL,))], "prompt": "a cat surfing"}
    for name, value in fields.items():
        if value is _DROP:
            out.pop(name, None)
        else:
            out[name] = value
    return out


_DROP = object()


def fields_of(result: Validated) -> list[str]:
    return [p.field for p in result.problems]


# ---------------------------------------------------------------- the table of bad inputs

Case = tuple[str, Callable[[Images], object], list[tuple[str, str]]]

BAD: list[Case] = [
    # prompt
    ("prompt-2501", lambda im: body(prompt="x" * 2501), [("prompt", "at most 2500 characters")]),
    ("prompt-empty", lambda im: body(prompt=""), [("prompt", "must not be empty")]),
    ("prompt-blank", lambda im: body(prompt=" \n\t "), [("prompt", "must not be empty")]),
    ("prompt-missing", lambda im: body(prompt=_DROP), [("prompt", "prompt is required")]),
    ("prompt-null", lambda im: body(prompt=None), [("prompt", "prompt is required")]),
    ("prompt-number", lambda im: body(prompt=42), [("prompt", "must be a string, got a number")]),
    ("prompt-2501-multibyte", lambda im: body(prompt="é" * 2501), [("prompt", "is 2501 characters long")]),
    # negative_prompt
    ("negative-2501", lambda im: body(negative_prompt="n" * 2501),
     [("negative_prompt", "at most 2500 characters")]),
    ("negative-list", lambda im: body(negative_prompt=["blur"]),
     [("negative_prompt", "must be a string, got an array")]),
    # mode, duration, aspect_ratio, model_name
    ("mode-fast", lambda im: body(mode="fast"), [("mode", 'use "std" or "pro"')]),
    ("mode-upper", lambda im: body(mode="PRO"), [("mode", '"PRO" is not allowed')]),
    ("duration-7", lambda im: body(duration=7), [("duration", 'use "5" or "10"')]),
    ("duration-str-7", lambda im: body(duration="7"), [("duration", '"7" is not allowed')]),
    ("duration-5.5", lambda im: body(duration=5.5), [("duration", "5.5 is not allowed")]),
    ("duration-5.0", lambda im: body(duration=5.0), [("duration", "5.0 is not allowed")]),
    ("duration-true", lambda im: body(duration=True), [("duration", "true is not allowed")]),
    ("aspect-4:3", lambda im: body(aspect_ratio="4:3"), [("aspect_ratio", 'use "16:9", "9:16" or "1:1"')]),
    ("model-v2", lambda im: body(model_name="kling-v2-master"), [("model_name", 'use "kling-v1-6"')]),
    ("model-number", lambda im: body(model_name=16), [("model_name", "16 is not allowed")]),
    # base64 images
    ("data-prefix", lambda im: body("data:image/png;base64," + im.png),
     [("image_list[0].image", "remove the data: prefix, send raw base64")]),
    ("data-prefix-upper", lambda im: body("DATA:image/jpeg;base64," + im.jpeg),
     [("image_list[0].image", "remove the data: prefix")]),
    ("gif", lambda im: body(im.gif), [("image_list[0].image", "is a GIF image; the image must be PNG or JPEG")]),
    ("webp", lambda im: body(URL, im.webp), [("image_list[1].image", "is a WebP image")]),
    ("bmp", lambda im: body(im.bmp), [("image_list[0].image", "must be PNG or JPEG")]),
    ("not-an-image", lambda im: body(im.text), [("image_list[0].image", "must be PNG or JPEG")]),
    ("truncated-png", lambda im: body(im.truncated_png), [("image_list[0].image", "not a readable PNG")]),
    ("png-200x200", lambda im: body(im.small_png),
     [("image_list[0].image", "200x200 px; each side must be at least 300 px")]),
    ("png-1:3", lambda im: body(im.tall_png),
     [("image_list[0].image", "it must be between 1:2.5 and 2.5:1")]),
    ("png-3:1", lambda im: body(im.wide_png), [("image_list[0].image", "aspect ratio 3.00")]),
    ("png-small-and-tall", lambda im: body(im.small_tall_png),
     [("image_list[0].image", "at least 300 px"), ("image_list[0].image", "between 1:2.5 and 2.5:1")]),
    ("png-over-10mb", lambda im: body(im.png, im.huge_png),
     [("image_list[1].image", "at most 10 MB is allowed")]),
    ("base64-broken", lambda im: body(im.png[:-3] + "$%&"),
     [("image_list[0].image", "is neither an http(s) URL nor valid base64")]),
    ("base64-newlines", lambda im: body(im.png[:40] + "\n" + im.png[40:]),
     [("image_list[0].image", "no whitespace or line breaks")]),
    ("base64-no-padding", lambda im: body("QUJDRA"), [("image_list[0].image", "nor valid base64")]),
    ("base64-urlsafe", lambda im: body("ab-_"), [("image_list[0].image", "nor valid base64")]),
    ("image-empty", lambda im: body(""), [("image_list[0].image", "must not be empty")]),
    # URLs
    ("url-ftp", lambda im: body("ftp://example.com/a.png"),
     [("image_list[0].image", "scheme 'ftp' is not allowed; use http or https")]),
    ("url-no-host", lambda im: body("http://"), [("image_list[0].image", "no valid host")]),
    ("url-no-host-path", lambda im: body("https:///a.png"), [("image_list[0].image", "no valid host")]),
    ("url-bad-host", lambda im: body("https://exa!mple.com/a.png"), [("image_list[0].image", "no valid host")]),
    ("url-userinfo", lambda im: body("https://bob:secret@example.com/a.png"),
     [("image_list[0].image", "user name or password")]),
    ("url-space", lambda im: body("https://example.com/a b.png"),
     [("image_list[0].image", "percent-encode")]),
    ("url-non-ascii", lambda im: body("https://example.com/chat-é.png"),
     [("image_list[0].image", "non-ASCII")]),
    ("url-2049", lambda im: body("https://example.com/" + "a" * (2049 - 20)),
     [("image_list[0].image", "2049 characters long; at most 2048")]),
    ("url-fragment", lambda im: body("https://example.com/a.png#frag"), [("image_list[0].image", "#fragment")]),
    ("url-bad-port", lambda im: body("https://example.com:99999/a.png"),
     [("image_list[0].image", "not a well-formed URL")]),
    ("url-javascript", lambda im: body("javascript:alert(1)"),
     [("image_list[0].image", "scheme 'javascript' is not allowed")]),
    # image_list shape
    ("images-0", lambda im: body(image_list=[]), [("image_list", "is empty")]),
    ("images-5", lambda im: body(*[URL] * 5), [("image_list", "has 5 images; at most 4 are allowed")]),
    ("images-missing", lambda im: body(image_list=_DROP), [("image_list", "image_list is required")]),
    ("images-not-list", lambda im: body(image_list=URL), [("image_list", "got a string")]),
    ("images-object", lambda im: body(image_list={"image": URL}), [("image_list", "got an object")]),
    ("item-not-object", lambda im: body(image_list=[{"image": URL}, URL]),
     [("image_list[1]", 'must be an object {"image"')]),
    ("item-extra-key", lambda im: body(image_list=[{"image": URL, "weight": 1}]),
     [("image_list[0]", "unexpected key(s) 'weight'")]),
    ("item-wrong-key", lambda im: body(image_list=[{"url": URL}]),
     [("image_list[0]", "unexpected key(s) 'url'"), ("image_list[0].image", "is missing")]),
    ("item-image-number", lambda im: body(image_list=[{"image": 7}]),
     [("image_list[0].image", "must be a string, got a number")]),
    # fields of other endpoints, relay-owned and unknown fields
    ("image_tail", lambda im: body(image_tail=URL),
     [("image_tail", "image_tail belongs to Kling's single-image endpoint")]),
    ("cfg_scale", lambda im: body(cfg_scale=0.5), [("cfg_scale", "cfg_scale belongs to Kling's single-image")]),
    ("image", lambda im: body(image=URL), [("image", "put the images in image_list")]),
    ("callback_url", lambda im: body(callback_url="https://evil.example/cb"),
     [("callback_url", "set by the relay")]),
    ("external_task_id", lambda im: body(external_task_id="abc"), [("external_task_id", "set by the relay")]),
    ("unknown", lambda im: body(seed=3), [("seed", "unknown field \"seed\"")]),
    ("unknown-model-alias", lambda im: body(model="kling-v1-6"), [("model", "did you mean model_name?")]),
    ("notify_url-not-allowed", lambda im: body(notify_url="https://me/x"), [("notify_url", "unknown field")]),
    # not an object at all
    ("body-list", lambda im: [body()], [("body", "must be a JSON object, got an array")]),
    ("body-string", lambda im: json.dumps(body()), [("body", "must be a JSON object, got a string")]),
    ("body-none", lambda im: None, [("body", "must be a JSON object, got null")]),
    ("body-number", lambda im: 3, [("body", "got a number")]),
    # several problems at once: every one reported, in a stable order
    ("many", lambda im: {
        "model_name": "kling-v9",
        "image_list": [{"image": im.gif}, {"image": "ftp://x/y.png"}, {"image": im.png}, {"image": im.small_png},
                       "oops"],
        "prompt": "",
        "negative_prompt": "n" * 3000,
        "mode": "turbo",
        "duration": 7,
        "aspect_ratio": "21:9",
        "cfg_scale": 0.5,
        "callback_url": "https://x/cb",
        "colour": "blue",
    }, [
        ("model_name", '"kling-v9" is not allowed'),
        ("image_list", "has 5 images"),
        ("image_list[0].image", "GIF"),
        ("image_list[1].image", "ftp"),
        ("image_list[3].image", "at least 300 px"),
        ("image_list[4]", "must be an object"),
        ("prompt", "must not be empty"),
        ("negative_prompt", "3000 characters long"),
        ("mode", '"turbo"'),
        ("duration", "7 is not allowed"),
        ("aspect_ratio", '"21:9"'),
        ("cfg_scale", "single-image endpoint"),
        ("callback_url", "set by the relay"),
        ("colour", "unknown field"),
    ]),
]


@pytest.mark.parametrize(("make", "expected"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_reports_exactly_these_problems(images: Images, make: Callable[[Images], object],
                                                  expected: list[tuple[str, str]]) -> None:
    result = validate_multi_image2video(make(images))
    assert not result.ok
    assert result.request is None
    assert fields_of(result) == [f for f, _ in expected]
    for problem, (_, fragment) in zip(result.problems, expected, strict=True):
        assert fragment in problem.problem, problem
        assert len(problem.problem) < 400, "problem sentences must not echo big values"


def test_table_is_big_enough() -> None:
    assert len(BAD) >= 25


# ---------------------------------------------------------------- valid input and normalization


def test_minimal_body_gets_defaults() -> None:
    result = validate_multi_image2video({"image_list": [{"image": URL}], "prompt": "a cat"})
    assert result.ok and result.problems == ()
    assert result.request == {"model_name": "kling-v1-6", "image_list": [{"image": URL}], "prompt": "a cat",
                              "mode": "std", "duration": "5", "aspect_ratio": "16:9"}
    assert result.extras == {}


def test_full_body_is_normalized(images: Images) -> None:
    given = {"aspect_ratio": "9:16", "duration": 10, "mode": "pro", "negative_prompt": "blur",
             "prompt": "p", "image_list": [{"image": images.png}, {"image": images.jpeg}, {"image": URL},
                                           {"image": "http://127.0.0.1:8080/x.jpg"}],
             "model_name": "kling-v1-6"}
    original = copy.deepcopy(given)
    result = validate_multi_image2video(given)
    assert result.request == {"model_name": "kling-v1-6", "image_list": original["image_list"], "prompt": "p",
                              "negative_prompt": "blur", "mode": "pro", "duration": "10", "aspect_ratio": "9:16"}
    assert list(result.request) == ["model_name", "image_list", "prompt", "negative_prompt", "mode",
                                    "duration", "aspect_ratio"]
    assert given == original, "validation must not modify its input"
    assert result.request["image_list"] is not given["image_list"]


@pytest.mark.parametrize("duration", ["5", "10", 5, 10])
def test_duration_accepted_and_sent_as_string(duration: object) -> None:
    result = validate_multi_image2video(body(duration=duration))
    assert result.require()["duration"] == str(duration)


def test_null_optional_fields_take_defaults() -> None:
    result = validate_multi_image2video(body(model_name=None, negative_prompt=None, mode=None, duration=None,
                                             aspect_ratio=None))
    request = result.require()
    assert "negative_prompt" not in request
    assert (request["model_name"], request["mode"], request["duration"], request["aspect_ratio"]) == (
        "kling-v1-6", "std", "5", "16:9")


def test_empty_negative_prompt_is_kept() -> None:
    assert validate_multi_image2video(body(negative_prompt="")).require()["negative_prompt"] == ""


SEED_EXAMPLE = {  # the seed reseller's own example body, as clients copy it (issue 9 item 5)
    "model_name": "kling-v1-6", "image_list": [{"image": URL}, {"image": URL}], "prompt": "a cat surfing",
    "negative_prompt": "", "mode": "std", "duration": "5", "aspect_ratio": "16:9", "image_tail": "",
    "watermark_info": {"enabled": True},
}


def test_the_seed_resellers_example_body_is_accepted() -> None:
    """Issue 9 item 5: `"image_tail": ""` (the seed's example) was refused as a single-image field. Empty, it counts
    as absent and is not forwarded; `watermark_info` is forwarded as given."""
    request = validate_multi_image2video(SEED_EXAMPLE).require()
    assert request == {"model_name": "kling-v1-6", "image_list": SEED_EXAMPLE["image_list"],
                       "prompt": "a cat surfing", "negative_prompt": "", "mode": "std", "duration": "5",
                       "aspect_ratio": "16:9", "watermark_info": {"enabled": True}}
    assert validate_multi_image2video(request).require() == request


@pytest.mark.parametrize("name", ["image_tail", "image", "cfg_scale"])
@pytest.mark.parametrize("empty", ["", "  ", None])
def test_empty_single_image_fields_are_absent(name: str, empty: object) -> None:
    request = validate_multi_image2video(body(**{name: empty})).require()
    assert name not in request


@pytest.mark.parametrize(("name", "value"), [("image_tail", URL), ("image", "x"), ("cfg_scale", 0.5),
                                             ("cfg_scale", 0), ("image_tail", [])])
def test_non_empty_single_image_fields_are_still_refused_by_name(name: str, value: object) -> None:
    result = validate_multi_image2video(body(**{name: value}))
    assert fields_of(result) == [name]
    assert "single-image endpoint" in result.problems[0].problem and "image_list" in result.problems[0].problem


@pytest.mark.parametrize("enabled", [True, False])
def test_watermark_info_is_forwarded(enabled: bool) -> None:
    assert validate_multi_image2video(body(watermark_info={"enabled": enabled})).require()["watermark_info"] == {
        "enabled": enabled}
    assert "watermark_info" not in validate_multi_image2video(body(watermark_info=None)).require()


@pytest.mark.parametrize(("value", "fields"), [
    (True, ["watermark_info"]), ("on", ["watermark_info"]), ({}, ["watermark_info.enabled"]),
    ({"enabled": "true"}, ["watermark_info.enabled"]), ({"enabled": 1}, ["watermark_info.enabled"]),
    ({"enabled": True, "position": "tl"}, ["watermark_info"]),
])
def test_a_bad_watermark_info_is_refused(value: object, fields: list[str]) -> None:
    result = validate_multi_image2video(body(watermark_info=value))
    assert fields_of(result) == fields
    assert '{"enabled": true}' in result.problems[0].problem or "true or false" in result.problems[0].problem


def test_the_models_accepted_are_the_limits_models() -> None:
    """KLING_MODELS: resellers and newer Kling models; the first is the default."""
    limits = Limits(model_names=("kling-v2-1", "kling-v1-6"))
    assert validate_multi_image2video(body(), limits=limits).require()["model_name"] == "kling-v2-1"
    assert validate_multi_image2video(body(model_name="kling-v1-6"), limits=limits).ok
    result = validate_multi_image2video(body(model_name="kling-v1-6"))
    assert result.ok
    refused = validate_multi_image2video(body(model_name="kling-v2-1"))
    assert fields_of(refused) == ["model_name"] and '"kling-v1-6"' in refused.problems[0].problem
    with pytest.raises(ValueError):
        Limits(model_names=())


@pytest.mark.parametrize(("width", "height"), [(300, 300), (750, 300), (300, 750), (1000, 400)])
def test_image_sizes_on_the_limits_are_accepted(width: int, height: int) -> None:
    for fmt in ("PNG", "JPEG"):
        result = validate_multi_image2video(body(b64(fmt, width, height)))
        assert result.ok, (fmt, width, height, result.problems)


@pytest.mark.parametrize(("width", "height"), [(299, 300), (300, 299), (751, 300), (300, 751)])
def test_image_sizes_just_past_the_limits_are_refused(width: int, height: int) -> None:
    result = validate_multi_image2video(body(b64("PNG", width, height)))
    assert fields_of(result) == ["image_list[0].image"]


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_png_colour_modes_are_accepted(mode: str) -> None:
    encoded = pillow.image_b64(320, 300, 0, mode=mode)
    assert validate_multi_image2video(body(encoded)).ok


def test_format_is_decided_by_content_not_by_name(images: Images) -> None:
    assert sniff_format(base64.b64decode(images.png)) == "PNG"
    assert sniff_format(base64.b64decode(images.jpeg)) == "JPEG"
    assert sniff_format(base64.b64decode(images.gif)) == "GIF"
    # a GIF behind a URL ending in .png is not fetched, so it passes: only base64 content is sniffed
    assert validate_multi_image2video(body("https://example.com/really-a-gif.png")).ok


@pytest.mark.parametrize("url", [
    "http://example.com/a.png", "https://example.com:8443/a/b.jpg?x=1&y=%20", "HTTPS://Example.COM/a.JPG",
    "http://[::1]:9000/a.png", "http://10.0.0.1/a", "https://example.com", "https://my_bucket.s3.local/a.png",
])
def test_well_formed_urls_are_accepted(url: str) -> None:
    result = validate_multi_image2video(body(url))
    assert result.ok, result.problems
    assert result.require()["image_list"] == [{"image": url}]


def test_url_of_2048_characters_is_accepted() -> None:
    url = "https://example.com/" + "a" * (2048 - 20)
    assert len(url) == 2048
    assert validate_multi_image2video(body(url)).ok


def test_image_byte_limit_is_exact() -> None:
    data = image_bytes("PNG", 300, 300)
    encoded = base64.b64encode(data).decode()
    assert validate_multi_image2video(body(encoded), limits=Limits(image_max_bytes=len(data))).ok
    for limit in (len(data) - 1, len(data) - 2, len(data) - 3, len(data) - 4):
        result = validate_multi_image2video(body(encoded), limits=Limits(image_max_bytes=limit))
        assert fields_of(result) == ["image_list[0].image"]
        assert "MB is allowed" in result.problems[0].problem


def test_oversized_string_is_refused_by_length_before_decoding() -> None:
    # not base64 at all, but too long to ever decode to 10 MB or less: the size is the problem reported,
    # which shows the length is checked before any decoding is attempted.
    junk = "!" * (14 * MB)
    result = validate_multi_image2video(body(junk))
    assert fields_of(result) == ["image_list[0].image"]
    assert "about 10.5 MB after base64 decoding; at most 10 MB" in result.problems[0].problem


def test_problems_never_echo_urls_or_image_data(images: Images) -> None:
    secret_url = "https://user:s3cr3t-token@example.com/a.png"
    result = validate_multi_image2video(body(secret_url, images.small_png, "ftp://host/s3cr3t-token"))
    assert len(result.problems) == 3
    text = json.dumps(problems_payload(result.problems))
    assert "s3cr3t" not in text and images.small_png[:30] not in text


def test_extra_fields_come_back_untouched_and_stay_out_of_the_request() -> None:
    metadata = {"order": 12, "tags": ["a"]}
    result = validate_multi_image2video(body(notify_url="not even a url", metadata=metadata),
                                        extra_fields=("notify_url", "metadata", "absent"))
    assert result.ok
    assert result.extras == {"notify_url": "not even a url", "metadata": metadata}
    assert result.extras["metadata"] is metadata
    assert "notify_url" not in result.require() and "metadata" not in result.require()


def test_extras_are_returned_even_when_there_are_problems() -> None:
    result = validate_multi_image2video(body(prompt="", metadata={"k": 1}), extra_fields={"metadata"})
    assert fields_of(result) == ["prompt"]
    assert result.extras == {"metadata": {"k": 1}}


def test_extra_fields_cannot_shadow_kling_fields() -> None:
    result = validate_multi_image2video(body(mode="fast"), extra_fields=("mode",))
    assert fields_of(result) == ["mode"]
    assert result.extras == {}


def test_prompt_limit_is_configurable() -> None:
    long_prompt = "y" * 4000
    assert fields_of(validate_multi_image2video(body(prompt=long_prompt))) == ["prompt"]
    relaxed = validate_multi_image2video(body(prompt=long_prompt), limits=Limits(prompt_max_chars=5000))
    assert relaxed.ok and relaxed.require()["prompt"] == long_prompt
    too_long = validate_multi_image2video(body(prompt="y" * 5001), limits=Limits(prompt_max_chars=5000))
    assert "at most 5000 characters" in too_long.problems[0].problem


def test_prompt_of_exactly_the_limit_is_accepted() -> None:
    assert validate_multi_image2video(body(prompt="字" * 2500, negative_prompt="n" * 2500)).ok


def test_other_limits_are_configurable() -> None:
    limits = Limits(max_images=2, image_min_side=100, aspect_min=1 / 4, aspect_max=4)
    assert validate_multi_image2video(body(b64("PNG", 200, 200), b64("PNG", 120, 480)), limits=limits).ok
    assert fields_of(validate_multi_image2video(body(URL, URL, URL), limits=limits)) == ["image_list"]


def test_require_raises_validation_failed_with_all_problems() -> None:
    result = validate_multi_image2video(body(prompt="", mode="x"))
    with pytest.raises(ValidationFailed) as caught:
        result.require()
    assert [p.field for p in caught.value.problems] == ["prompt", "mode"]
    assert "prompt" in str(caught.value) and "mode" in str(caught.value)


def test_problems_payload_is_the_422_body() -> None:
    result = validate_multi_image2video(body(prompt="", cfg_scale=1))
    payload = problems_payload(result.problems)
    assert json.loads(json.dumps(payload)) == {
        "error": "invalid request",
        "fields": [{"field": "prompt", "problem": result.problems[0].problem},
                   {"field": "cfg_scale", "problem": result.problems[1].problem}],
    }
    assert FieldProblem("a", "b").as_dict() == {"field": "a", "problem": "b"}


def test_circular_value_does_not_break_the_report() -> None:
    loop: list[Any] = []
    loop.append(loop)
    result = validate_multi_image2video(body(mode=loop))
    assert fields_of(result) == ["mode"]


# ---------------------------------------------------------------- properties

VALID_IMAGES = st.sampled_from([
    ("PNG", 300, 300), ("JPEG", 300, 300), ("PNG", 750, 300), ("JPEG", 300, 500), ("PNG", 320, 640),
]).map(lambda spec: b64(*spec))
URLS = st.builds(
    lambda scheme, host, path, query: f"{scheme}://{host}/{path}" + (f"?{query}" if query else ""),
    st.sampled_from(["http", "https"]),
    st.sampled_from(["example.com", "cdn.example.org:8443", "127.0.0.1:9000", "[::1]", "a-b.c_d.io"]),
    st.text("abcXYZ019-._~/%", max_size=60),
    st.text("abc=&%+019", max_size=30),
)
IMAGE_LISTS = st.lists(st.one_of(VALID_IMAGES, URLS).map(lambda s: {"image": s}), min_size=1, max_size=4)
PROMPTS = st.text(min_size=1, max_size=2500).filter(lambda s: s.strip() != "")
VALID_BODIES = st.fixed_dictionaries(
    {"image_list": IMAGE_LISTS, "prompt": PROMPTS},
    optional={
        "model_name": st.sampled_from(["kling-v1-6", None]),
        "negative_prompt": st.one_of(st.none(), st.text(max_size=2500)),
        "mode": st.sampled_from(["std", "pro", None]),
        "duration": st.sampled_from(["5", "10", 5, 10, None]),
        "aspect_ratio": st.sampled_from(["16:9", "9:16", "1:1", None]),
        "watermark_info": st.sampled_from([{"enabled": True}, {"enabled": False}, None]),
        "image_tail": st.sampled_from(["", None]),
        "cfg_scale": st.sampled_from(["", None]),
    },
)
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@PROPERTY_SETTINGS
@given(VALID_BODIES)
def test_valid_bodies_pass_and_round_trip(given_body: dict[str, Any]) -> None:
    result = validate_multi_image2video(given_body)
    assert result.ok, result.problems
    request = result.require()
    assert request["image_list"] == given_body["image_list"]
    assert request["prompt"] == given_body["prompt"]
    assert request["duration"] == str(given_body.get("duration") or "5")
    assert set(request) <= {"model_name", "image_list", "prompt", "negative_prompt", "mode", "duration",
                            "aspect_ratio", "watermark_info"}
    again = validate_multi_image2video(request)
    assert again.ok and again.request == request and again.extras == {}


Mutation = tuple[str, Callable[[dict[str, Any]], None]]


def _set(name: str, value: object) -> Callable[[dict[str, Any]], None]:
    return lambda b: b.__setitem__(name, value)


def _image0(value: object) -> Callable[[dict[str, Any]], None]:
    return lambda b: b["image_list"].__setitem__(0, {"image": value})


MUTATIONS: list[Mutation] = [
    ("prompt", _set("prompt", "z" * 2501)),
    ("prompt", _set("prompt", "   ")),
    ("prompt", lambda b: b.pop("prompt")),
    ("negative_prompt", _set("negative_prompt", "n" * 2501)),
    ("mode", _set("mode", "ultra")),
    ("duration", _set("duration", 7)),
    ("duration", _set("duration", 5.5)),
    ("duration", _set("duration", False)),
    ("aspect_ratio", _set("aspect_ratio", "4:3")),
    ("model_name", _set("model_name", "kling-v2-1")),
    ("image_list", _set("image_list", [])),
    ("image_list", lambda b: b["image_list"].extend([{"image": URL}] * (5 - len(b["image_list"])))),
    ("image_list[0]", lambda b: b["image_list"][0].__setitem__("mask", "x")),
    ("image_list[0]", lambda b: b["image_list"].__setitem__(0, URL)),
    ("image_list[0].image", _image0("data:image/png;base64," + b64("PNG", 300, 300))),
    ("image_list[0].image", _image0(b64("GIF", 300, 300, "L"))),
    ("image_list[0].image", _image0(b64("PNG", 200, 200))),
    ("image_list[0].image", _image0(b64("PNG", 300, 900))),
    ("image_list[0].image", _image0("ftp://example.com/a.png")),
    ("image_list[0].image", _image0("http://")),
    ("image_list[0].image", _image0("not base64!")),
    ("image_tail", _set("image_tail", URL)),
    ("cfg_scale", _set("cfg_scale", 0.5)),
    ("image", _set("image", URL)),
    ("watermark_info", _set("watermark_info", True)),
    ("watermark_info.enabled", _set("watermark_info", {"enabled": "yes"})),
    ("callback_url", _set("callback_url", "https://x/cb")),
    ("external_task_id", _set("external_task_id", "mine")),
    ("whatever", _set("whatever", 1)),
]


@PROPERTY_SETTINGS
@given(VALID_BODIES, st.sampled_from(MUTATIONS))
def test_one_bad_mutation_fails_naming_that_field(given_body: dict[str, Any], mutation: Mutation) -> None:
    field, mutate = mutation
    bad = copy.deepcopy(given_body)
    mutate(bad)
    result = validate_multi_image2video(bad)
    assert not result.ok and result.request is None
    assert {p.field for p in result.problems} == {field}, result.problems


def test_the_answer_stays_small_whatever_was_sent() -> None:
    """A body made of thousands of bad items or unknown keys gets a bounded list of problems."""
    many_items = validate_multi_image2video({"image_list": [{}] * 40_000, "prompt": "p"})
    assert [p.field for p in many_items.problems][:2] == ["image_list", "image_list[0].image"]
    assert len(many_items.problems) <= 1 + 8
    many_keys = validate_multi_image2video({"prompt": "p", "image_list": [{"image": "https://x.example/a.png"}],
                                            **{f"k{i}": i for i in range(20_000)}})
    assert len(many_keys.problems) == 11
    assert many_keys.problems[-1] == FieldProblem("body", "and 19990 more unknown fields")
