"""`kling-relay doctor` (issue 9 items 8a and 9): the real command against the simulator (a reseller's prefix and
static key, with and without its read routes, answering in its own shape), moto's S3 and a real Redis; and the
checks that need no server, on their own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from email.utils import formatdate

import pytest
import requests

from kling_relay.shared.doctor import (
    CALLBACKS_ONLY,
    FAIL,
    INFO,
    OK,
    READS_BACK,
    WARN,
    DateRecorder,
    check_clock,
    check_public_url,
    check_video_hosts,
    reads_verdict,
)
from kling_relay.shared.kling_reads import FOREIGN, MISSING, UNKNOWN, WORKS, ReadsProbe, RouteCheck
from tests.support.procs import free_port
from tests.support.s3 import MotoS3, moto_fixture
from tests.support.sim import SimHandle, sim_fixture

API_KEY = "reseller-static-key-0123456789"
BUCKET = "doctor-bucket"
CREATE = "POST /v1/videos/multi-image2video"


sim = sim_fixture(prefix="/kling", api_key=API_KEY)
moto = moto_fixture(bucket=BUCKET)


def doctor(redis_url: str, sim: SimHandle, moto: MotoS3, *args: str, **env: str) -> tuple[int, str]:
    """Run `kling-relay doctor` as a process with a reseller's settings; (exit status, stdout + stderr)."""
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("KLING_", "AWS_", "S3_"))},
        **moto.env(),
        "REDIS_URL": redis_url, "KLING_BASE_URL": sim.base_url, "KLING_API_KEY": API_KEY,
        "PUBLIC_BASE_URL": "https://relay.example.com", "CALLBACK_SECRET": "callback-secret-0123456789",
        "API_TOKENS": "token-aaaaaaaaaaaaaaaa", "S3_BUCKET": BUCKET, "S3_PREFIX": "videos/",
        "VIDEO_URL_ALLOWLIST": sim.root_url, **env,
    }
    done = subprocess.run([sys.executable, "-m", "kling_relay.shared.cli", "doctor", *args], env=environment,
                          capture_output=True, text=True, timeout=120, check=False)
    return done.returncode, done.stdout + done.stderr


def line(output: str, name: str) -> str:
    found = [row for row in output.splitlines() if row.split()[1:2] == [name.split()[0]] and name in row]
    assert found, f"no {name!r} line in:\n{output}"
    return found[0]


@pytest.fixture()
def clean(sim: SimHandle, moto: MotoS3) -> SimHandle:
    sim.reset()
    return sim


def assert_nothing_created_or_left(sim: SimHandle, moto: MotoS3) -> None:
    stats = sim.stats()
    assert stats["tasks_created"] == 0 and CREATE not in stats["requests"], "the doctor never spends money"
    assert moto.client().list_objects_v2(Bucket=BUCKET).get("KeyCount") == 0, "its S3 test object is deleted"


def test_a_reseller_with_read_routes_is_ready_and_read_back(redis_url: str, clean: SimHandle, moto: MotoS3) -> None:
    status, output = doctor(redis_url, clean, moto)
    assert status == 0, output
    for name in ("redis", "s3", "kling get-by-id", "kling list", "kling auth", "reads", "public url", "video hosts"):
        assert line(output, name).split()[0] == OK, output
    assert "wrote and deleted s3://doctor-bucket/videos/kling-relay-doctor/" in line(output, "s3")
    assert line(output, "clock").split()[0] == INFO  # a static key: the clock does not matter
    assert f"The relay will {READS_BACK}." in output
    assert output.rstrip().endswith("READY.")
    assert_nothing_created_or_left(clean, moto)


@pytest.mark.parametrize("query", ["auto", "off"])
def test_a_reseller_without_read_routes_runs_callbacks_only(redis_url: str, clean: SimHandle, moto: MotoS3,
                                                            query: str) -> None:
    clean.control(no_query=True)
    status, output = doctor(redis_url, clean, moto, KLING_QUERY=query)
    assert status == 0, output
    assert line(output, "kling get-by-id").split()[:3] == [WARN, "kling", "get-by-id"]
    assert "missing" in line(output, "kling get-by-id") and "Invalid URL" in line(output, "kling get-by-id")
    assert "missing" in line(output, "kling list")
    assert line(output, "kling auth").split()[0] == WARN and "only a create" in line(output, "kling auth")
    assert f"The relay will {CALLBACKS_ONLY}." in output
    assert "READY, with warnings" in output
    assert_nothing_created_or_left(clean, moto)


def test_kling_query_on_without_read_routes_is_not_ready(redis_url: str, clean: SimHandle, moto: MotoS3) -> None:
    clean.control(no_query=True)
    status, output = doctor(redis_url, clean, moto, KLING_QUERY="on")
    assert status == 1, output
    assert line(output, "reads").split()[0] == FAIL and "set KLING_QUERY=auto or off" in line(output, "reads")
    assert "NOT READY: reads failed." in output


def test_a_gateway_in_its_own_shape_is_named(redis_url: str, clean: SimHandle, moto: MotoS3) -> None:
    """Issue 9.8c: the doctor names what a gateway sent instead of Kling's envelope."""
    clean.control(foreign_answers="query")
    status, output = doctor(redis_url, clean, moto, "--json")
    assert status == 0, output
    report = json.loads(output)
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["kling list"]["detail"].startswith("foreign: answered in another shape than Kling's envelope")
    assert '{"success": true, "result": [' in checks["kling list"]["detail"]
    assert report["verdict"] == CALLBACKS_ONLY and report["ready"] is True


def test_a_wrong_key_fails(redis_url: str, clean: SimHandle, moto: MotoS3) -> None:
    status, output = doctor(redis_url, clean, moto, KLING_API_KEY="not-the-resellers-key-000")
    assert status == 1, output
    assert line(output, "kling auth").split()[0] == FAIL and "1002" in line(output, "kling auth")
    assert "not-the-resellers-key-000" not in output


def test_s3_redis_and_addresses_problems(redis_url: str, clean: SimHandle, moto: MotoS3) -> None:
    status, output = doctor(redis_url, clean, moto, S3_BUCKET="no-such-bucket",
                            REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", PUBLIC_BASE_URL="http://127.0.0.1:8000",
                            VIDEO_URL_ALLOWLIST="*.klingai.com")
    assert status == 1, output
    assert line(output, "s3").split()[0] == FAIL and "head_bucket" in line(output, "s3")
    assert line(output, "redis").split()[0] == FAIL
    assert line(output, "public url").split()[0] == WARN
    hosts = line(output, "video hosts")
    assert hosts.split()[0] == WARN and "not on VIDEO_URL_ALLOWLIST" in hosts


def test_bad_settings_exit_2(redis_url: str, clean: SimHandle, moto: MotoS3) -> None:
    status, output = doctor(redis_url, clean, moto, KLING_QUERY="sometimes")
    assert status == 2 and "KLING_QUERY: must be auto, on or off" in output


# --- checks without a server ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("skew", "mode", "status"), [
    (0.4, "access_key", OK), (-1.9, "access_key", OK), (3.0, "access_key", WARN), (6.0, "access_key", FAIL),
    (-400.0, "access_key", WARN), (-1790.0, "access_key", FAIL), (600.0, "api_key", INFO),
    (None, "access_key", WARN), (None, "api_key", INFO),
])
def test_clock_skew_against_the_jwt_margins(skew: float | None, mode: str, status: str) -> None:
    assert check_clock(skew, mode).status == status


def test_date_recorder_measures_the_skew() -> None:
    recorder = DateRecorder(clock=lambda: 1_700_000_010.7)
    response = requests.Response()
    response.headers["Date"] = formatdate(1_700_000_000, usegmt=True)
    recorder(response)
    assert recorder.skew() == pytest.approx(10.2)
    assert DateRecorder().skew() is None


def test_public_url_and_video_hosts() -> None:
    assert check_public_url("https://relay.example.com").status == OK
    assert check_public_url("http://localhost:8000").status == WARN
    assert check_video_hosts("https://api-singapore.klingai.com", "*.klingai.com").status == OK
    assert check_video_hosts("https://gw.reseller.example/kling", "*.klingai.com").status == WARN


def _probe(get_by_id: str, listing: str) -> ReadsProbe:
    return ReadsProbe(RouteCheck("get-by-id", get_by_id, "..."), RouteCheck("list", listing, "..."))


@pytest.mark.parametrize(("routes", "query", "status", "verdict"), [
    ((WORKS, WORKS), "auto", OK, READS_BACK),
    ((WORKS, WORKS), "on", OK, READS_BACK),
    ((WORKS, WORKS), "off", WARN, CALLBACKS_ONLY),
    ((WORKS, MISSING), "auto", WARN, CALLBACKS_ONLY),
    ((MISSING, MISSING), "off", OK, CALLBACKS_ONLY),
    ((FOREIGN, FOREIGN), "on", FAIL, READS_BACK),
    ((UNKNOWN, WORKS), "auto", WARN, READS_BACK),
    ((UNKNOWN, UNKNOWN), "on", WARN, READS_BACK),
])
def test_reads_verdict(routes: tuple[str, str], query: str, status: str, verdict: str) -> None:
    check, will = reads_verdict(_probe(*routes), query)
    assert (check.status, will) == (status, verdict), check


def test_the_command_list_names_the_doctor(capsys: pytest.CaptureFixture[str]) -> None:
    from kling_relay.shared.cli import main

    assert main(["--help"]) == 0
    assert any(row.split()[:1] == ["doctor"] and "without spending money" in row
               for row in capsys.readouterr().out.splitlines())
