"""Synthetic result videos for benchmarks: N deterministic bytes made on the fly.

The stream is a sequence of 64 KiB blocks: block k is an 8-byte big-endian k followed by a
pseudo-random pattern seeded by the video id, so the content never repeats exactly, any byte range
can be produced without the ones before it, and memory stays at one block whatever N is. The first
bytes are an MP4 `ftyp` box and an `mdat` box header covering the rest, so content sniffers see an
MP4 (it does not play: there is no `moov`).
"""

from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Iterator

BLOCK = 64 * 1024


def _header(size: int) -> bytes:
    if size < 32:
        return b""
    ftyp = struct.pack(">I4s4sI4s4s", 24, b"ftyp", b"isom", 0x200, b"isom", b"mp41")
    rest = size - len(ftyp)
    if rest <= 0xFFFFFFFF:
        return ftyp + struct.pack(">I4s", rest, b"mdat")
    return ftyp + struct.pack(">I4sQ", 1, b"mdat", rest)


class SyntheticVideo:
    def __init__(self, video_id: str, size: int) -> None:
        self.size = size
        self._pattern = random.Random(f"kling-sim:{video_id}").randbytes(BLOCK)
        self._header = _header(size)

    def _block(self, k: int) -> bytes:
        block = k.to_bytes(8, "big") + self._pattern[8:]
        if k == 0:
            block = self._header + block[len(self._header):]
        return block

    def iter_range(self, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Bytes [start, end) of the stream (end defaults to the size), in chunks of at most 64 KiB."""
        end = self.size if end is None else min(end, self.size)
        pos = start
        while pos < end:
            k, offset = divmod(pos, BLOCK)
            chunk = self._block(k)[offset:offset + (end - pos)]
            yield chunk
            pos += len(chunk)

    def sha256(self) -> str:
        digest = hashlib.sha256()
        for chunk in self.iter_range():
            digest.update(chunk)
        return digest.hexdigest()
