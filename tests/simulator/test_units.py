"""In-process checks of the simulator's pure parts: JWT auth codes, synthetic bytes, knob parsing."""

from __future__ import annotations

import base64
import json
import struct
import time

import pytest

from kling_relay.simulator.auth import Authenticator
from kling_relay.simulator.errors import ApiError
from kling_relay.simulator.knobs import Knobs
from kling_relay.simulator.synthetic import SyntheticVideo
from tests.support.sim import make_jwt

AK, SK = "ak-unit", "sk-unit-0123456789abcdef0123456789abcdef"


def code(auth: Authenticator, header: str | None, now: float | None = None) -> int:
    try:
        auth.check(header, time.time() if now is None else now)
    except ApiError as exc:
        return exc.code
    return 0


def test_jwt_codes() -> None:
    auth = Authenticator(access_key=AK, secret_key=SK, leeway=5)
    now = time.time()
    assert code(auth, f"Bearer {make_jwt(AK, SK)}") == 0
    assert code(auth, None) == 1001
    assert code(auth, "") == 1001
    assert code(auth, "Bearer ") == 1001
    assert code(auth, f"Basic {make_jwt(AK, SK)}") == 1002
    assert code(auth, "Bearer a.b.c") == 1002
    assert code(auth, f"Bearer {make_jwt(AK, SK + 'x')}") == 1002
    assert code(auth, f"Bearer {make_jwt('other', SK)}") == 1002
    assert code(auth, f"Bearer {make_jwt(AK, SK, claims={'exp': None})}") == 1002
    # leeway: a few seconds of skew are fine, more is not
    assert code(auth, f"Bearer {make_jwt(AK, SK, now=now, nbf_offset=3)}", now) == 0
    assert code(auth, f"Bearer {make_jwt(AK, SK, now=now, nbf_offset=30)}", now) == 1003
    assert code(auth, f"Bearer {make_jwt(AK, SK, now=now, exp_in=-3)}", now) == 0
    assert code(auth, f"Bearer {make_jwt(AK, SK, now=now, exp_in=-30)}", now) == 1004


def test_unsigned_jwt_is_refused() -> None:
    auth = Authenticator(access_key=AK, secret_key=SK)

    def b64(obj: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    token = f"{b64({'alg': 'none'})}.{b64({'iss': AK, 'exp': time.time() + 60})}."
    assert code(auth, f"Bearer {token}") == 1002


def test_api_key_mode_and_repr_hide_secrets() -> None:
    auth = Authenticator(api_key="static-key-1")
    assert code(auth, "Bearer static-key-1") == 0
    assert code(auth, "Bearer static-key-2") == 1002
    assert "static-key" not in repr(auth)


@pytest.mark.parametrize("size", [0, 5, 31, 32, 65536, 65537, 1_000_003])
def test_synthetic_ranges_agree_with_the_whole(size: int) -> None:
    video = SyntheticVideo("vid-1", size)
    whole = b"".join(video.iter_range())
    assert len(whole) == size
    for start, end in [(0, size), (size // 3, size // 2), (max(0, size - 7), size), (1, 1)]:
        assert b"".join(video.iter_range(start, end)) == whole[start:end]
    if size > 64:  # another video id gives other bytes
        assert SyntheticVideo("vid-2", size).sha256() != video.sha256()


def test_synthetic_header_is_an_mp4_box_sequence() -> None:
    video = SyntheticVideo("v", 100_000)
    head = next(video.iter_range(0, 64))
    ftyp_size, ftyp = struct.unpack(">I4s", head[:8])
    mdat_size, mdat = struct.unpack(">I4s", head[24:32])
    assert (ftyp_size, ftyp, mdat) == (24, b"ftyp", b"mdat")
    assert ftyp_size + mdat_size == 100_000
    huge = next(SyntheticVideo("v", 5 << 30).iter_range(0, 64))
    assert struct.unpack(">I4sQ", huge[24:40]) == (1, b"mdat", (5 << 30) - 24)


def test_knob_updates_are_checked() -> None:
    knobs = Knobs()
    assert knobs.updated({"callback_delay": 1, "download_truncate_bytes": 10}).callback_delay == 1.0
    assert knobs.updated({"download_truncate_bytes": None}).download_truncate_bytes is None
    for bad in ({"video_bytes": 1.5}, {"video_bytes": True}, {"callback_delay": -1},
                {"ambiguous_create_mode": "explode"}, {"fail_message": 3}, {"max_in_flight": None}):
        with pytest.raises(ValueError):
            knobs.updated(bad)
