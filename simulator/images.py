"""Fetch or decode the request's images and check them against Kling's image rules.

An image is an http(s) URL (fetched with a short timeout, proxies ignored, at most 10 MB) or raw
base64. It must decode as JPEG or PNG, be at least 300 px on each side, with an aspect ratio between
1:2.5 and 2.5:1. Any failure raises ImageError whose message becomes the failed task's
task_status_msg.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.error
import urllib.request

from PIL import Image, UnidentifiedImageError

MAX_IMAGE_BYTES = 10 * 1024 * 1024
MIN_SIDE = 300
MAX_RATIO = 2.5
FORMATS = ("JPEG", "MPO", "PNG")

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ImageError(Exception):
    """An image the task cannot use; str() is the message for task_status_msg."""


def fetch_url(url: str, index: int, timeout: float) -> bytes:
    if not url[:8].lower().startswith(("http://", "https://")):
        raise ImageError(f"image_list[{index}] URL must be http or https")
    request = urllib.request.Request(url, headers={"User-Agent": "kling-image-fetch/1.0"})  # noqa: S310
    try:
        with _opener.open(request, timeout=timeout) as response:
            data: bytes = response.read(MAX_IMAGE_BYTES + 1)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise ImageError(f"image_list[{index}] could not be downloaded: HTTP {exc.code}") from None
    except (OSError, ValueError) as exc:
        raise ImageError(f"image_list[{index}] could not be downloaded: {type(exc).__name__}") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"image_list[{index}] is larger than 10 MB")
    return data


def decode_base64(value: str, index: int) -> bytes:
    try:
        data = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"image_list[{index}] is neither a URL nor valid base64") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"image_list[{index}] is larger than 10 MB")
    return data


def open_checked(data: bytes, index: int) -> Image.Image:
    """The decoded RGB image, or ImageError if it breaks one of Kling's image rules."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            img.load()
            rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise ImageError(f"image_list[{index}] could not be decoded as a JPEG or PNG image") from None
    if fmt not in FORMATS:
        raise ImageError(f"image_list[{index}] format {fmt} is not supported (use JPEG or PNG)")
    width, height = rgb.size
    if min(width, height) < MIN_SIDE:
        raise ImageError(f"image_list[{index}] is {width}x{height}; each side must be at least {MIN_SIDE} px")
    if max(width / height, height / width) > MAX_RATIO:
        raise ImageError(f"image_list[{index}] aspect ratio {width}x{height} is outside 1:2.5 to 2.5:1")
    return rgb


def load_image(value: str, index: int, *, timeout: float) -> Image.Image:
    """Fetch (URL) or decode (base64) image number `index` and check it."""
    is_url = value[:8].lower().startswith(("http://", "https://"))
    data = fetch_url(value, index, timeout) if is_url else decode_base64(value, index)
    return open_checked(data, index)
