"""S3 has a bad minute, for real: the relay's processes reach moto through tests/support/faulty_proxy.py,
which answers 503 SlowDown or resets connections until healed. Copies retry and finish, nothing is written
twice, and no multipart upload is left open (a copy aborts what an earlier, failed copy of its key left).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, ConnectionClosedError, EndpointConnectionError

from deploy.stack import BUCKET, LocalStack
from kling_relay.shared.storage import Storage
from tests.e2e.conftest import job_body, submit, wait_jobs
from tests.e2e.faults_conftest import assert_stored_once, fault_stack, get_jobs, retry_notes, wait_until
from tests.support.faulty_proxy import FaultyProxy

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalStack, FaultyProxy]]:
    proxy: FaultyProxy | None = None

    def put_proxy_in_front(stack: LocalStack) -> None:
        nonlocal proxy
        proxy = FaultyProxy(stack.s3_endpoint).start()
        stack.route_s3_through(proxy.url)

    try:
        with fault_stack(tmp_path_factory.mktemp("faults-s3"), before_start=put_proxy_in_front) as stack:
            assert proxy is not None
            yield stack, proxy
    finally:
        if proxy is not None:
            proxy.stop()


@pytest.fixture()
def stack(proxied: tuple[LocalStack, FaultyProxy]) -> LocalStack:
    proxied[0].sim_reset()
    return proxied[0]


@pytest.fixture()
def proxy(proxied: tuple[LocalStack, FaultyProxy]) -> Iterator[FaultyProxy]:
    yield proxied[1]
    proxied[1].heal()


def client_through(proxy: FaultyProxy) -> Any:
    """A boto3 client via the proxy that does not retry, so each refusal is seen."""
    return boto3.client("s3", endpoint_url=proxy.url, aws_access_key_id="testing", aws_secret_access_key="testing",
                        region_name="us-east-1",
                        config=Config(retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=5,
                                      read_timeout=10))


# --- the proxy itself -------------------------------------------------------------------------------------------

def test_proxy_forwards_then_refuses_then_heals(stack: LocalStack, proxy: FaultyProxy) -> None:
    s3 = client_through(proxy)
    s3.put_object(Bucket=BUCKET, Key="proxy/a.bin", Body=b"x" * 70_000)
    assert s3.head_object(Bucket=BUCKET, Key="proxy/a.bin")["ContentLength"] == 70_000
    assert s3.get_object(Bucket=BUCKET, Key="proxy/a.bin")["Body"].read() == b"x" * 70_000

    proxy.refuse("503", count=2)
    for _ in range(2):
        with pytest.raises(ClientError) as refused:
            s3.get_object(Bucket=BUCKET, Key="proxy/a.bin")
        assert refused.value.response["Error"]["Code"] == "SlowDown"
    assert not proxy.refusing  # healed by itself after two refusals
    assert s3.get_object(Bucket=BUCKET, Key="proxy/a.bin")["Body"].read() == b"x" * 70_000

    proxy.refuse("reset", match=lambda method, path: method == "PUT")
    with pytest.raises((ConnectionClosedError, EndpointConnectionError, ConnectionError)):
        s3.put_object(Bucket=BUCKET, Key="proxy/b.bin", Body=b"y")
    assert s3.get_object(Bucket=BUCKET, Key="proxy/a.bin")["Body"].read() == b"x" * 70_000  # GET not matched
    proxy.heal()
    s3.put_object(Bucket=BUCKET, Key="proxy/b.bin", Body=b"y")
    # a refused request never reached moto: only the healed PUT wrote b.bin
    assert len(stack.s3().list_object_versions(Bucket=BUCKET, Prefix="proxy/b.bin")["Versions"]) == 1


# --- the storage fix: a copy aborts what a dead copy of its key left open ------------------------------------------

def test_copy_aborts_uploads_left_open_on_its_own_key_only(stack: LocalStack) -> None:
    s3 = stack.s3()
    key = "stale/2026/01/01/job_stale/video.mp4"
    left = [s3.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"] for _ in range(2)]
    s3.upload_part(Bucket=BUCKET, Key=key, UploadId=left[0], PartNumber=1, Body=b"half a video")
    sibling = s3.create_multipart_upload(Bucket=BUCKET, Key=key + ".other")["UploadId"]

    data = bytes(range(256)) * 1000
    sha, size = Storage(s3, BUCKET).copy_stream(iter([data]), key=key, expected_bytes=len(data), metadata={})

    assert (sha, size) == (hashlib.sha256(data).hexdigest(), len(data))
    assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == data
    open_uploads = {(u["Key"], u["UploadId"]) for u in stack.multipart_uploads()}
    assert open_uploads == {(key + ".other", sibling)}  # only the other key's upload is left
    s3.abort_multipart_upload(Bucket=BUCKET, Key=key + ".other", UploadId=sibling)


# --- the pipeline through an S3 outage ----------------------------------------------------------------------------

def jobs_with_failed_copy(stack: LocalStack, ids: list[str]) -> set[str]:
    """The jobs (of ids) with at least one failed copy attempt noted (retry reason "copy: ...")."""
    return {job_id for job_id, job in get_jobs(stack, ids).items() if retry_notes(job, "copy:")}


def test_s3_slow_down_on_uploads_copies_retry_and_leave_no_open_upload(stack: LocalStack,
                                                                       proxy: FaultyProxy) -> None:
    # Parts, completes and aborts answer 503: a copy opens an upload it can neither fill nor abort, gives up
    # after boto3's retries (tens of seconds of back-off), and leaves the upload open. The videos are over one
    # part (8 MiB): a shorter one goes up in a single PutObject, with no upload to leave open.
    stack.sim_control(video_bytes=9 * 1024 * 1024)
    proxy.refuse("503", match=FaultyProxy.multipart_requests)
    ids = [submit(stack, job_body(2000 + n)) for n in range(3)]
    failed = wait_until(lambda: jobs_with_failed_copy(stack, ids), timeout=150, what="a failed copy attempt",
                        stack=stack, interval=0.5)
    left_open = {u["Key"].rsplit("/", 2)[-2] for u in stack.multipart_uploads()}
    assert failed <= left_open  # the failed copies left their uploads open
    assert {j["state"] for j in get_jobs(stack, ids).values()} == {"generated"}
    proxy.heal()
    jobs = wait_jobs(stack, ids, timeout=120)
    assert_stored_once(stack, jobs)  # includes: no multipart upload open under any job's prefix


def test_s3_connection_resets_copies_retry_and_finish(stack: LocalStack, proxy: FaultyProxy) -> None:
    proxy.refuse("reset")
    ids = [submit(stack, job_body(2100 + n)) for n in range(3)]
    wait_until(lambda: jobs_with_failed_copy(stack, ids) == set(ids), timeout=150,
               what="a failed copy attempt on every job", stack=stack, interval=0.5)
    refused = proxy.refused
    proxy.heal()
    jobs = wait_jobs(stack, ids, timeout=120)
    assert refused >= 3 * 6  # boto3 tried each call six times before each copy gave up for a while
    assert_stored_once(stack, jobs)


# --- the S3 requests of a copy (issue 11) ---------------------------------------------------------------------------

def s3_requests_of(proxy: FaultyProxy, job_id: str, since: int) -> list[tuple[str, str]]:
    """(method, object name and query) of the requests the relay sent on the job's keys, from seen[since] on."""
    return [(method, path.rsplit("/", 1)[-1]) for method, path in proxy.seen[since:] if f"/{job_id}/" in path]


def test_a_short_video_is_stored_with_two_s3_requests_and_a_long_one_still_in_parts(stack: LocalStack,
                                                                                      proxy: FaultyProxy) -> None:
    """Issue 11: a 1 KiB video took seven S3 requests (GET manifest, LIST uploads, create, part, complete, HEAD,
    manifest PUT). The job's first copy of a video that fits in one part is now its PutObject and the manifest's
    conditional PutObject; a video over one part (8 MiB) still goes up as a multipart upload, HEAD-checked."""
    stack.sim_control(video_bytes=1024)
    since = len(proxy.seen)
    short = submit(stack, job_body(2200))
    jobs = wait_jobs(stack, [short], timeout=120)
    assert s3_requests_of(proxy, short, since) == [("PUT", "video.mp4"), ("PUT", "manifest.json")]

    stack.sim_control(video_bytes=9 * 1024 * 1024)
    since = len(proxy.seen)
    long = submit(stack, job_body(2201))
    jobs.update(wait_jobs(stack, [long], timeout=120))
    sent = [(method, name.split("?", 1)[1].split("=", 1)[0] if "?" in name else name)
            for method, name in s3_requests_of(proxy, long, since)]
    # create, two parts (PUT ...?uploadId=...&partNumber=n), complete, HEAD, the manifest
    assert sent == [("POST", "uploads"), ("PUT", "uploadId"), ("PUT", "uploadId"), ("POST", "uploadId"),
                    ("HEAD", "video.mp4"), ("PUT", "manifest.json")], sent
    assert_stored_once(stack, jobs)
