"""Checks for one image reference of a multi-image2video request: an http(s) URL or raw base64.

Kling accepts each image as a URL it will fetch, or as raw base64 of a PNG or JPEG file (no ``data:``
prefix), at most 10 MB, each side at least 300 px, aspect ratio between 1:2.5 and 2.5:1.

The relay never fetches URLs: it only checks their shape. Base64 is decoded strictly, the format is
decided by the content (magic bytes, never a file name), and Pillow reads only the header to learn
the size: pixels are never decoded, so a large image costs one base64 decode and a header parse.

Every function here returns problem sentences (``list[str]``); an empty list means the image is fine.
Sentences never echo the image string itself (it may be megabytes long, or a URL with a token in it).
"""

from __future__ import annotations

import base64
import io
from urllib.parse import urlsplit

from PIL import ImageFile, JpegImagePlugin, PngImagePlugin

from kling_relay.shared.limits import URL_MAX_CHARS

URL_SCHEMES = frozenset({"http", "https"})
_MB = 1024 * 1024

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._")
_BASE64_HINT = "standard alphabet A-Z a-z 0-9 + /, '=' padding, no whitespace or line breaks"


def sniff_format(data: bytes) -> str | None:
    """Name the image format of ``data`` from its leading bytes, or None when it is not recognised.

    Only "PNG" and "JPEG" are acceptable to Kling; other names exist so a rejection can say what was sent.
    """
    if data.startswith(_PNG_MAGIC):
        return "PNG"
    if data.startswith(_JPEG_MAGIC):
        return "JPEG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[:2] == b"BM":
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"mif1", b"avif", b"msf1"):
        return "HEIF/AVIF"
    return None


def read_size(data: bytes, fmt: str) -> tuple[int, int]:
    """Width and height of a PNG or JPEG read from its header only.

    The plugin class is chosen from the sniffed format and used directly, so Pillow neither guesses
    formats nor decodes pixels. Raises ValueError when the header is damaged or truncated.
    """
    opener: type[ImageFile.ImageFile]
    opener = PngImagePlugin.PngImageFile if fmt == "PNG" else JpegImagePlugin.JpegImageFile
    try:
        with opener(io.BytesIO(data)) as image:
            width, height = image.size
    except Exception as exc:  # untrusted bytes: Pillow raises SyntaxError, OSError, struct.error, ...
        raise ValueError(f"not a readable {fmt} image ({type(exc).__name__})") from exc
    if width <= 0 or height <= 0:
        raise ValueError(f"not a readable {fmt} image (it declares a {width}x{height} size)")
    return width, height


def url_problems(value: str) -> list[str]:
    """Problems with an image URL: only ``http(s)://host[:port]/path?query``, ASCII, ≤ 2048 characters."""
    if len(value) > URL_MAX_CHARS:
        return [f"URL is {len(value)} characters long; at most {URL_MAX_CHARS} are allowed"]
    if not value.isascii() or any(c.isspace() or not c.isprintable() for c in value):
        return ["URL contains spaces, control or non-ASCII characters; percent-encode them"]
    try:
        parts = urlsplit(value)
        port = parts.port  # parses the port; raises ValueError when it is not a number in range
    except ValueError:
        return ["is not a well-formed URL (bad host or port); send http(s)://host[:port]/path"]
    if parts.scheme not in URL_SCHEMES:
        return [f"URL scheme {parts.scheme!r} is not allowed; use http or https"]
    problems: list[str] = []
    host = parts.hostname or ""
    bracketed = parts.netloc.rpartition("@")[2].startswith("[")
    if not host or not (bracketed or set(host) <= _HOST_CHARS):
        problems.append("URL has no valid host; send http(s)://host[:port]/path")
    if parts.username is not None or parts.password is not None:
        problems.append("URL must not carry a user name or password (user@host); use a plain or signed URL")
    if port == 0:
        problems.append("URL port 0 is not valid")
    if parts.fragment or value.endswith("#"):
        problems.append("URL must not have a #fragment; send http(s)://host[:port]/path?query")
    return problems


def base64_image_problems(value: str, *, max_bytes: int, min_side: int,
                          aspect_min: float, aspect_max: float) -> list[str]:
    """Problems with a raw base64 PNG/JPEG: strict decoding, size, format by content, sides, aspect ratio.

    The string's length is checked before decoding so an oversized image is refused without the cost
    of decoding it; the decoded length is then checked exactly.
    """
    longest = 4 * -(-max_bytes // 3)  # longest base64 text whose decoded size can still be ≤ max_bytes
    if len(value) > longest:
        return [f"image is about {len(value) * 3 / 4 / _MB:.1f} MB after base64 decoding; "
                f"at most {max_bytes / _MB:g} MB is allowed"]
    try:
        data = base64.b64decode(value, validate=True)
    except ValueError:  # binascii.Error, or non-ASCII characters
        return [f"is neither an http(s) URL nor valid base64 ({_BASE64_HINT})"]
    if len(data) > max_bytes:
        return [f"image is {len(data) / _MB:.1f} MB after base64 decoding; "
                f"at most {max_bytes / _MB:g} MB is allowed"]
    fmt = sniff_format(data)
    if fmt not in ("PNG", "JPEG"):
        what = f"is a {fmt} image" if fmt else "decodes to data that is not an image Kling accepts"
        return [f"{what}; the image must be PNG or JPEG"]
    try:
        width, height = read_size(data, fmt)
    except ValueError as exc:
        return [f"is {exc}; the image must be a complete PNG or JPEG file"]
    problems: list[str] = []
    if min(width, height) < min_side:
        problems.append(f"image is {width}x{height} px; each side must be at least {min_side} px")
    ratio = width / height
    if not aspect_min <= ratio <= aspect_max:
        problems.append(f"image is {width}x{height} px, aspect ratio {ratio:.2f} (width/height); "
                        f"it must be between 1:{1 / aspect_min:g} and {aspect_max:g}:1")
    return problems


def image_problems(value: str, *, max_bytes: int, min_side: int,
                   aspect_min: float, aspect_max: float) -> list[str]:
    """Problems with one image string, URL or raw base64.

    A string containing ":" is treated as a URL (the base64 alphabet has no colon), except a
    ``data:`` URL, which gets its own advice: Kling wants the raw base64 without that prefix.
    """
    if not value:
        return ["must not be empty; send an http(s) URL or raw base64 of a PNG or JPEG"]
    if value[:5].lower() == "data:":
        return ["starts with a data: URL prefix; remove the data: prefix, send raw base64 "
                "(only the part after 'base64,')"]
    if ":" in value:
        return url_problems(value)
    return base64_image_problems(value, max_bytes=max_bytes, min_side=min_side,
                                 aspect_min=aspect_min, aspect_max=aspect_max)
