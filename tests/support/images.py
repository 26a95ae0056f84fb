"""Real images for tests, made with Pillow: solid colour (optionally a white band across the middle), any size,
mode and format Pillow writes.

    image_bytes(400, 300)                       # PNG bytes
    image_b64(640, 480, (220, 40, 40), fmt="JPEG")   # raw base64 (no data: prefix), as Kling and the API take it
"""

from __future__ import annotations

import base64
import io
from typing import Any

from PIL import Image

DEFAULT_COLOUR = (30, 120, 200)


def encode(image: Image.Image, fmt: str = "PNG", **params: Any) -> bytes:
    """The image encoded by Pillow in `fmt`; `params` go to Image.save (e.g. compress_level=0)."""
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def image_bytes(width: int = 400, height: int = 300, colour: Any = DEFAULT_COLOUR, *, fmt: str = "PNG",
                mode: str = "RGB", band: bool = False, **params: Any) -> bytes:
    """An image of `width` x `height` in `colour` (a tuple for RGB, an int for one-band modes such as L).

    `band`: a 20-pixel white band across the middle, so the picture is not one flat colour.
    """
    image = Image.new(mode, (width, height), colour)
    if band:
        image.paste((255, 255, 255), (0, height // 2 - 10, width, height // 2 + 10))
    return encode(image, fmt, **params)


def image_b64(width: int = 400, height: int = 300, colour: Any = DEFAULT_COLOUR, *, fmt: str = "PNG",
              mode: str = "RGB", band: bool = False, **params: Any) -> str:
    """image_bytes(...) as raw base64 text."""
    return base64.b64encode(image_bytes(width, height, colour, fmt=fmt, mode=mode, band=band, **params)).decode()
