"""The copy into S3 against moto's S3 server (a real subprocess, real HTTP) and a real source HTTP server.

moto enforces S3's 5 MiB minimum part size (all parts but the last), as AWS does, so multi-part tests use
5 MiB parts. The memory acceptance test streams 512 MiB through a copy running in its own process.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from botocore.exceptions import ClientError

from deploy.copy_probe import expected_digests, run_probe, serve_argv
from kling_relay.shared.storage import (
    CopyCanceled,
    CopyError,
    Storage,
    StorageUnusable,
    StoredVideo,
    copy_videos,
    download_chunks,
)
from kling_relay.shared.urlguard import UrlAllowlist, UrlRefused
from tests.support.procs import Process, free_port, wait_for_port
from tests.support.s3 import MotoS3, S3Calls, moto_fixture, no_credentials_client

MIB = 1 << 20
CREATED_AT = 1_767_225_599.5  # 2025-12-31T23:59:59.5Z: the date in the key is UTC's


# --- fixtures -----------------------------------------------------------------------------------------------

moto = moto_fixture()


@pytest.fixture()
def s3(moto: MotoS3) -> Iterator[Any]:
    client = moto.client()
    yield client
    client.close()


@pytest.fixture()
def bucket(s3: Any) -> str:
    name = f"videos-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture()
def storage(s3: Any, bucket: str) -> Storage:
    return Storage(s3, bucket, "relay/", part_size=5 * MIB)


class Source(http.server.BaseHTTPRequestHandler):
    """/v/<name> the payload; /truncate/<name> half of it under the full Content-Length; /status/<code>;
    /to?u=<url> a 302; /chunked/<name> the payload without Content-Length."""

    protocol_version = "HTTP/1.1"
    payloads: dict[str, bytes]
    seen: list[str]

    def do_GET(self) -> None:  # noqa: N802
        self.seen.append(self.path)
        path, _, query = self.path.partition("?")
        _, kind, name = (path.split("/", 2) + ["", ""])[:3]
        if kind == "to":
            self._head(302, {"Location": query.removeprefix("u="), "Content-Length": "0"})
        elif kind == "status":
            self._head(int(name), {"Content-Length": "0"})
        elif kind == "v":
            body = self.payloads[name]
            self._head(200, {"Content-Length": str(len(body)), "Content-Type": "video/mp4"})
            self.wfile.write(body)
        elif kind == "truncate":
            body = self.payloads[name]
            self._head(200, {"Content-Length": str(len(body)), "Connection": "close"})
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
        elif kind == "chunked":
            self._head(200, {"Transfer-Encoding": "chunked"})
            body = self.payloads[name]
            for i in range(0, len(body), 64 * 1024):
                piece = body[i:i + 64 * 1024]
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")

    def _head(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up mid-body (a refused or truncated download) is expected here: no traceback."""


class SourceServer:
    def __init__(self) -> None:
        self.payloads: dict[str, bytes] = {}
        self.seen: list[str] = []
        handler = type("Handler", (Source,), {"payloads": self.payloads, "seen": self.seen})
        self.httpd = _QuietServer(("127.0.0.1", 0), handler)
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.allowlist = UrlAllowlist.parse(self.base)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def add(self, name: str, body: bytes) -> str:
        self.payloads[name] = body
        return f"{self.base}/v/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture()
def source() -> Iterator[SourceServer]:
    server = SourceServer()
    yield server
    server.close()


@pytest.fixture()
def session() -> Iterator[requests.Session]:
    s = requests.Session()
    yield s
    s.close()


def payload(size: int, seed: int = 1) -> bytes:
    return hashlib.shake_256(seed.to_bytes(4, "big")).digest(size)


def chunks_of(data: bytes, size: int = 100_000) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


def incomplete_uploads(s3: Any, bucket: str) -> list[dict[str, Any]]:
    return list(s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def keys(s3: Any, bucket: str) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]


# --- layout -------------------------------------------------------------------------------------------------

def test_key_layout_uses_the_utc_date_of_created_at(storage: Storage) -> None:
    assert storage.job_prefix("job-1", CREATED_AT) == "relay/2025/12/31/job-1/"
    assert storage.video_key("job-1", CREATED_AT, 0, 1) == "relay/2025/12/31/job-1/video.mp4"
    assert storage.video_key("job-1", CREATED_AT, 0, 3) == "relay/2025/12/31/job-1/video-1.mp4"
    assert storage.video_key("job-1", CREATED_AT, 2, 3) == "relay/2025/12/31/job-1/video-3.mp4"
    assert storage.manifest_key("job-1", CREATED_AT + 1) == "relay/2026/01/01/job-1/manifest.json"


@pytest.mark.parametrize("job_id", ["", "a/b", "..", "."])
def test_job_ids_that_would_escape_the_prefix_are_refused(storage: Storage, job_id: str) -> None:
    with pytest.raises(ValueError):
        storage.job_prefix(job_id, CREATED_AT)


def test_video_index_out_of_range(storage: Storage) -> None:
    with pytest.raises(ValueError):
        storage.video_key("job-1", CREATED_AT, 2, 2)


# --- copy_stream --------------------------------------------------------------------------------------------

def test_copy_stream_several_parts_byte_identical(storage: Storage, s3: Any, bucket: str) -> None:
    data = payload(12 * MIB + 12345)
    sha, size = storage.copy_stream(chunks_of(data), key="k/video.mp4", expected_bytes=len(data),
                                    metadata={"job-id": "job-1", "kling-task-id": "task-9"})
    assert (sha, size) == (hashlib.sha256(data).hexdigest(), len(data))
    obj = s3.get_object(Bucket=bucket, Key="k/video.mp4")
    assert obj["Body"].read() == data
    assert obj["ContentType"] == "video/mp4"
    assert obj["Metadata"] == {"job-id": "job-1", "kling-task-id": "task-9"}
    assert obj["ETag"].endswith('-3"')  # 5 MiB + 5 MiB + the rest
    assert incomplete_uploads(s3, bucket) == []


def test_copy_stream_smaller_than_one_part(storage: Storage, s3: Any, bucket: str) -> None:
    data = payload(1000)
    sha, size = storage.copy_stream(iter([data]), key="small.mp4", expected_bytes=None, metadata={})
    assert (sha, size) == (hashlib.sha256(data).hexdigest(), 1000)
    assert s3.get_object(Bucket=bucket, Key="small.mp4")["Body"].read() == data


def test_copy_stream_exact_multiple_of_part_size(s3: Any, bucket: str) -> None:
    data = payload(10 * MIB)
    storage = Storage(s3, bucket, part_size=5 * MIB, max_in_flight=1)
    assert storage.copy_stream(chunks_of(data, MIB), key="even.mp4", expected_bytes=None,
                               metadata={})[1] == len(data)
    obj = s3.get_object(Bucket=bucket, Key="even.mp4")
    assert obj["ETag"].endswith('-2"')
    assert obj["Body"].read() == data


def test_copy_stream_fewer_bytes_than_expected_aborts(storage: Storage, s3: Any, bucket: str) -> None:
    data = payload(6 * MIB)
    with pytest.raises(CopyError) as info:
        storage.copy_stream(chunks_of(data), key="short.mp4", expected_bytes=len(data) + 1, metadata={})
    assert info.value.retryable
    assert keys(s3, bucket) == []
    assert incomplete_uploads(s3, bucket) == []


def test_copy_stream_source_error_aborts_and_propagates(storage: Storage, s3: Any, bucket: str) -> None:
    def failing() -> Iterator[bytes]:
        yield payload(6 * MIB)  # one part is uploaded before the failure
        raise RuntimeError("worker shutting down")

    with pytest.raises(RuntimeError, match="worker shutting down"):
        storage.copy_stream(failing(), key="broken.mp4", expected_bytes=None, metadata={})
    assert keys(s3, bucket) == []
    assert incomplete_uploads(s3, bucket) == []


def test_copy_stream_s3_refusal_is_copy_error_and_aborts(s3: Any, bucket: str) -> None:
    # 1 MiB parts are below S3's (and moto's) 5 MiB minimum: CompleteMultipartUpload fails (EntityTooSmall).
    storage = Storage(s3, bucket, part_size=MIB)
    with pytest.raises(CopyError):
        storage.copy_stream(chunks_of(payload(3 * MIB)), key="tiny-parts.mp4", expected_bytes=None, metadata={})
    assert keys(s3, bucket) == []
    assert incomplete_uploads(s3, bucket) == []


def test_object_changed_before_the_size_check_is_deleted_and_retryable(s3: Any, bucket: str) -> None:
    class Overwritten(Storage):
        """Another writer replaces the object between CompleteMultipartUpload and the HEAD check."""

        def _verify_size(self, key: str, size: int) -> None:
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=b"something else")
            super()._verify_size(key, size)

    data = payload(6 * MIB)  # more than one part: a multipart upload, which is HEAD-checked
    with pytest.raises(CopyError) as info:
        Overwritten(s3, bucket, part_size=5 * MIB).copy_stream(iter([data]), key="raced.mp4",
                                                               expected_bytes=len(data), metadata={})
    assert info.value.retryable
    assert keys(s3, bucket) == []


# --- the S3 requests of a copy (issue 11: a short video's first copy is one PutObject and the manifest) ----------

def test_a_short_video_goes_up_in_one_put_without_head_or_multipart(storage: Storage, s3: Any,
                                                                     bucket: str) -> None:
    calls = S3Calls(s3)
    data = payload(5 * MIB)  # exactly one part: still one PutObject
    sha, size = storage.copy_stream(chunks_of(data), key="one.mp4", expected_bytes=len(data), metadata={"a": "b"},
                                    fresh=True)
    assert calls.take() == ["PutObject"]
    assert (sha, size) == (hashlib.sha256(data).hexdigest(), len(data))
    obj = s3.get_object(Bucket=bucket, Key="one.mp4")
    assert obj["Body"].read() == data and obj["ContentType"] == "video/mp4" and obj["Metadata"] == {"a": "b"}
    assert '-' not in obj["ETag"]  # not a multipart object
    calls.take()
    storage.copy_stream(iter([b""]), key="empty.mp4", expected_bytes=0, metadata={}, fresh=True)
    assert calls.take() == ["PutObject"]
    assert s3.get_object(Bucket=bucket, Key="empty.mp4")["Body"].read() == b""


def test_a_video_one_byte_over_a_part_still_goes_multipart_and_is_head_checked(storage: Storage, s3: Any,
                                                                                bucket: str) -> None:
    calls = S3Calls(s3)
    data = payload(5 * MIB + 1)
    assert storage.copy_stream(chunks_of(data), key="two.mp4", expected_bytes=len(data), metadata={},
                               fresh=True)[1] == len(data)
    assert calls.take() == ["ListMultipartUploads", "CreateMultipartUpload", "UploadPart", "UploadPart",
                            "CompleteMultipartUpload", "HeadObject"]
    assert s3.get_object(Bucket=bucket, Key="two.mp4")["Body"].read() == data
    assert incomplete_uploads(s3, bucket) == []


def _sent_requests(s3: Any) -> list[tuple[str, str, dict[str, str], bytes]]:
    """(operation, url, headers lower-cased, bytes body) of every request the client sends from now on."""
    sent: list[tuple[str, str, dict[str, str], bytes]] = []

    def seen(request: Any, event_name: str, **_: Any) -> None:
        body = request.body if isinstance(request.body, (bytes, bytearray)) else b""
        headers = {k.lower(): (v.decode() if isinstance(v, bytes) else v) for k, v in request.headers.items()}
        sent.append((event_name.rsplit(".", 1)[-1], request.url, headers, bytes(body)))

    s3.meta.events.register("before-send.s3", seen)
    return sent


def _crc32_b64(data: bytes) -> str:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def test_every_upload_carries_a_crc32_and_the_complete_names_each_again(moto: MotoS3, bucket: str) -> None:
    """Issue 11 (moto spent 1-2 CPU s per GiB more on the relay's uploads than on boto3's upload_fileobj): a multipart
    upload created without a checksum algorithm gets a full-object CRC64NVME at completion, which moto builds by
    concatenating the whole object once more. The copy now declares CRC32 at CreateMultipartUpload, as
    upload_fileobj does; each part carries its CRC32 (S3 verifies it on receipt) and CompleteMultipartUpload names
    each part's CRC32 again (S3 checks them against the parts it holds); a short video's PutObject carries its
    CRC32 too."""
    s3 = moto.client()
    sent = _sent_requests(s3)
    storage = Storage(s3, bucket, part_size=5 * MIB)
    data = payload(11 * MIB + 7, seed=5)
    assert storage.copy_stream(chunks_of(data), key="crc.mp4", expected_bytes=len(data), metadata={})[1] == len(data)

    ops = {op: (url, headers, body) for op, url, headers, body in sent if op != "UploadPart"}
    assert ops["CreateMultipartUpload"][1]["x-amz-checksum-algorithm"] == "CRC32"
    parts = {int(url.split("partNumber=")[1].split("&")[0]): headers for op, url, headers, _ in sent
             if op == "UploadPart"}
    assert sorted(parts) == [1, 2, 3]
    for number, headers in parts.items():
        start = (number - 1) * 5 * MIB
        assert headers["x-amz-checksum-crc32"] == _crc32_b64(data[start:start + 5 * MIB])
    complete = ops["CompleteMultipartUpload"][2].decode()
    assert complete.count("<ChecksumCRC32>") == 3
    obj = s3.get_object(Bucket=bucket, Key="crc.mp4", ChecksumMode="ENABLED")
    assert obj["Body"].read() == data
    part_crcs = b"".join(zlib.crc32(data[i:i + 5 * MIB]).to_bytes(4, "big") for i in range(0, len(data), 5 * MIB))
    assert (obj.get("ChecksumType"), obj.get("ChecksumCRC32")) == ("COMPOSITE", _crc32_b64(part_crcs) + "-3")

    sent.clear()
    small = payload(1000, seed=6)
    storage.copy_stream(iter([small]), key="crc-small.mp4", expected_bytes=len(small), metadata={}, fresh=True)
    assert [(op, headers["x-amz-checksum-crc32"]) for op, _, headers, _ in sent] == [("PutObject", _crc32_b64(small))]


def test_the_copy_computes_each_crc32_itself(moto: MotoS3, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each upload hands botocore its CRC32 (`ChecksumCRC32`), so botocore computes none: over https it would send
    its own as the trailer of an aws-chunked body built from a copy of the part (two buffers per part in flight)."""
    s3 = moto.client()
    given: list[tuple[str, str | None]] = []
    for op in ("upload_part", "put_object"):
        real = getattr(s3, op)

        def spy(*args: Any, _real: Any = real, _op: str = op, **kwargs: Any) -> Any:
            given.append((_op, kwargs.get("ChecksumCRC32")))
            return _real(*args, **kwargs)

        monkeypatch.setattr(s3, op, spy)
    storage = Storage(s3, bucket, part_size=5 * MIB)
    data = payload(6 * MIB, seed=9)
    storage.copy_stream(chunks_of(data), key="own-crc.mp4", expected_bytes=len(data), metadata={})
    storage.copy_stream(iter([data[:1000]]), key="own-crc-small.mp4", expected_bytes=1000, metadata={}, fresh=True)
    assert sorted(given) == sorted([("upload_part", _crc32_b64(data[:5 * MIB])),
                                    ("upload_part", _crc32_b64(data[5 * MIB:])),
                                    ("put_object", _crc32_b64(data[:1000]))])
    assert s3.get_object(Bucket=bucket, Key="own-crc.mp4")["Body"].read() == data


def test_a_client_set_to_send_checksums_only_when_required_sends_none(moto: MotoS3, bucket: str) -> None:
    """`request_checksum_calculation="when_required"` (AWS_REQUEST_CHECKSUM_CALCULATION) is how an operator makes
    boto3 work with an S3-compatible store that refuses checksum headers: the copy follows it, as botocore does."""
    s3 = moto.client(request_checksum_calculation="when_required")
    sent = _sent_requests(s3)
    storage = Storage(s3, bucket, part_size=5 * MIB)
    data = payload(6 * MIB, seed=8)
    storage.copy_stream(chunks_of(data), key="plain.mp4", expected_bytes=len(data), metadata={})
    storage.copy_stream(iter([data[:1000]]), key="plain-small.mp4", expected_bytes=1000, metadata={}, fresh=True)
    assert {op for op, *_ in sent} >= {"CreateMultipartUpload", "UploadPart", "PutObject"}
    assert [h for _, _, headers, _ in sent for h in headers if "checksum" in h] == []
    assert s3.get_object(Bucket=bucket, Key="plain.mp4")["Body"].read() == data


def test_a_multipart_copy_believed_fresh_still_aborts_an_upload_left_open(storage: Storage, s3: Any,
                                                                          bucket: str) -> None:
    """`fresh` can be wrong (the attempt counter's write lost in a Redis failover, or cleared by an ops retry of an
    older release): a multipart upload lists the key's open uploads whatever it says, so none is orphaned."""
    s3.create_multipart_upload(Bucket=bucket, Key="believed.mp4")
    data = payload(5 * MIB + 1)
    storage.copy_stream(chunks_of(data), key="believed.mp4", expected_bytes=len(data), metadata={}, fresh=True)
    assert incomplete_uploads(s3, bucket) == []
    assert s3.get_object(Bucket=bucket, Key="believed.mp4")["Body"].read() == data


def test_a_copy_that_is_not_fresh_first_aborts_uploads_left_open(storage: Storage, s3: Any, bucket: str) -> None:
    left = s3.create_multipart_upload(Bucket=bucket, Key="again.mp4")["UploadId"]
    calls = S3Calls(s3)
    storage.copy_stream(iter([payload(100)]), key="again.mp4", expected_bytes=100, metadata={})
    assert calls.take() == ["ListMultipartUploads", "AbortMultipartUpload", "PutObject"]
    assert incomplete_uploads(s3, bucket) == []
    assert left  # the upload a dead copy left open is gone


def test_a_short_video_of_the_wrong_size_writes_nothing(storage: Storage, s3: Any, bucket: str) -> None:
    calls = S3Calls(s3)
    with pytest.raises(CopyError) as info:
        storage.copy_stream(iter([payload(100)]), key="short.mp4", expected_bytes=101, metadata={}, fresh=True)
    assert info.value.retryable
    assert calls.take() == []
    assert keys(s3, bucket) == []


def test_copy_stream_missing_bucket_is_not_retryable(s3: Any) -> None:
    storage = Storage(s3, f"missing-{uuid.uuid4().hex[:8]}")
    with pytest.raises(CopyError) as info:
        storage.copy_stream(iter([b"x"]), key="a.mp4", expected_bytes=None, metadata={})
    assert not info.value.retryable


def test_a_missing_bucket_makes_storage_unusable(s3: Any) -> None:
    """Issue 9.9: no bucket is a setting to fix, not a copy to retry: StorageUnusable with S3's code, from the first
    S3 call of a copy (the manifest read) as from the upload."""
    storage = Storage(s3, f"missing-{uuid.uuid4().hex[:8]}")
    with pytest.raises(StorageUnusable) as info:
        storage.read_manifest("job_a", CREATED_AT)
    assert info.value.code == "NoSuchBucket" and not info.value.retryable
    with pytest.raises(StorageUnusable) as info:
        storage.copy_stream(iter([b"x"]), key="a.mp4", expected_bytes=None, metadata={})
    assert info.value.code == "NoSuchBucket"


def test_no_credentials_make_storage_unusable(moto: MotoS3, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = Storage(no_credentials_client(moto, monkeypatch), bucket)
    with pytest.raises(StorageUnusable) as info:
        storage.read_manifest("job_a", CREATED_AT)
    assert info.value.code == "NoCredentials" and "no credentials" in str(info.value)


# --- probe ------------------------------------------------------------------------------------------------------

def test_probe_writes_and_deletes_one_object_under_the_prefix(storage: Storage, s3: Any, bucket: str) -> None:
    key = storage.probe()
    assert key.startswith("relay/.kling-relay-probe/")
    assert keys(s3, bucket) == []


@pytest.mark.parametrize("problem", ["no bucket", "no credentials"])
def test_probe_says_why_storage_is_unusable(moto: MotoS3, s3: Any, monkeypatch: pytest.MonkeyPatch,
                                            problem: str) -> None:
    if problem == "no bucket":
        storage, code = Storage(s3, f"missing-{uuid.uuid4().hex[:8]}"), "NoSuchBucket"
    else:
        name = f"videos-{uuid.uuid4().hex[:8]}"
        s3.create_bucket(Bucket=name)
        storage, code = Storage(no_credentials_client(moto, monkeypatch), name), "NoCredentials"
    with pytest.raises(StorageUnusable) as info:
        storage.probe()
    assert info.value.code == code


# --- download_chunks ----------------------------------------------------------------------------------------

def test_download_streams_the_body(source: SourceServer, session: requests.Session) -> None:
    data = payload(3 * MIB + 7)
    url = source.add("a", data)
    with download_chunks(url, source.allowlist, session=session, chunk_size=MIB) as dl:
        assert dl.content_length == len(data)
        received = list(dl.chunks)
    assert b"".join(received) == data
    assert max(len(c) for c in received) <= MIB


def test_download_without_content_length(source: SourceServer, session: requests.Session) -> None:
    data = payload(300_000)
    source.add("c", data)
    with download_chunks(f"{source.base}/chunked/c", source.allowlist, session=session) as dl:
        assert dl.content_length is None
        assert b"".join(dl.chunks) == data


def test_download_truncated_body_is_retryable(source: SourceServer, session: requests.Session) -> None:
    source.add("t", payload(2 * MIB))
    with download_chunks(f"{source.base}/truncate/t", source.allowlist, session=session) as dl:
        with pytest.raises(CopyError) as info:
            for _ in dl.chunks:
                pass
    assert info.value.retryable


@pytest.mark.parametrize(("status", "retryable"), [
    (403, False), (404, False), (410, False), (400, False), (500, True), (502, True), (503, True), (429, True),
])
def test_download_status_classification(source: SourceServer, session: requests.Session, status: int,
                                        retryable: bool) -> None:
    with pytest.raises(CopyError) as info:
        download_chunks(f"{source.base}/status/{status}", source.allowlist, session=session)
    assert info.value.retryable is retryable
    assert str(status) in str(info.value)


def test_download_connection_refused_is_retryable(session: requests.Session) -> None:
    port = free_port()
    allow = UrlAllowlist.parse(f"http://127.0.0.1:{port}")
    with pytest.raises(CopyError) as info:
        download_chunks(f"http://127.0.0.1:{port}/v.mp4", allow, session=session, timeout=(2, 2))
    assert info.value.retryable


def test_download_larger_than_max_bytes_is_refused(source: SourceServer, session: requests.Session) -> None:
    url = source.add("big", payload(2 * MIB))
    with pytest.raises(CopyError) as info:
        download_chunks(url, source.allowlist, session=session, max_bytes=MIB)
    assert not info.value.retryable
    source.add("big2", payload(2 * MIB))
    with download_chunks(f"{source.base}/chunked/big2", source.allowlist, session=session,
                         max_bytes=MIB) as dl, pytest.raises(CopyError) as streamed:
        for _ in dl.chunks:
            pass
    assert not streamed.value.retryable


def test_download_redirect_to_a_refused_host(source: SourceServer, session: requests.Session) -> None:
    with pytest.raises(UrlRefused):
        download_chunks(f"{source.base}/to?u=http://169.254.169.254/latest/", source.allowlist, session=session)


def test_download_error_messages_do_not_carry_the_signature(source: SourceServer,
                                                            session: requests.Session) -> None:
    with pytest.raises(CopyError) as info:
        download_chunks(f"{source.base}/status/403?X-Amz-Signature=secret123", source.allowlist, session=session)
    assert "secret123" not in str(info.value)


def test_truncated_download_leaves_no_object_and_no_upload(source: SourceServer, session: requests.Session,
                                                           storage: Storage, s3: Any, bucket: str) -> None:
    source.add("t", payload(12 * MIB))
    with download_chunks(f"{source.base}/truncate/t", source.allowlist, session=session) as dl:
        with pytest.raises(CopyError) as info:
            storage.copy_stream(dl.chunks, key="t.mp4", expected_bytes=dl.content_length, metadata={})
    assert info.value.retryable
    assert keys(s3, bucket) == []
    assert incomplete_uploads(s3, bucket) == []


# --- manifest -----------------------------------------------------------------------------------------------

def test_manifest_conditional_create(storage: Storage, s3: Any, bucket: str) -> None:
    assert storage.read_manifest("job-1", CREATED_AT) is None
    assert storage.write_manifest("job-1", CREATED_AT, {"videos": [], "n": 1}) is True
    assert storage.write_manifest("job-1", CREATED_AT, {"videos": [], "n": 2}) is False
    assert storage.read_manifest("job-1", CREATED_AT) == {"videos": [], "n": 1}
    raw = s3.get_object(Bucket=bucket, Key="relay/2025/12/31/job-1/manifest.json")
    assert raw["ContentType"] == "application/json"


def test_moto_honours_if_none_match_on_put_object(s3: Any, bucket: str) -> None:
    # write_manifest relies on the store refusing IfNoneMatch="*" over an existing key, not on a HEAD first.
    s3.put_object(Bucket=bucket, Key="m.json", Body=b"1", IfNoneMatch="*")
    with pytest.raises(ClientError) as info:
        s3.put_object(Bucket=bucket, Key="m.json", Body=b"2", IfNoneMatch="*")
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert s3.get_object(Bucket=bucket, Key="m.json")["Body"].read() == b"1"


def test_unreadable_manifest_is_a_permanent_error(storage: Storage, s3: Any, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key=storage.manifest_key("job-1", CREATED_AT), Body=b"{not json")
    with pytest.raises(CopyError) as info:
        storage.read_manifest("job-1", CREATED_AT)
    assert not info.value.retryable


# --- copy_videos --------------------------------------------------------------------------------------------

def test_copy_videos_then_rerun_copies_nothing(source: SourceServer, session: requests.Session,
                                               storage: Storage, s3: Any, bucket: str) -> None:
    first, second = payload(6 * MIB, 1), payload(700_000, 2)
    videos = [("vid-a", source.add("a", first) + "?sig=s1", "5.1"), ("vid-b", source.add("b", second), None)]
    before = time.time()
    stored = copy_videos("job-7", CREATED_AT, "task-7", videos, storage, source.allowlist, session,
                         extra_manifest={"metadata": {"user": "u1"}})
    assert stored == [
        StoredVideo(bucket, "relay/2025/12/31/job-7/video-1.mp4", hashlib.sha256(first).hexdigest(), len(first),
                    "5.1"),
        StoredVideo(bucket, "relay/2025/12/31/job-7/video-2.mp4", hashlib.sha256(second).hexdigest(),
                    len(second), None),
    ]
    assert s3.get_object(Bucket=bucket, Key=stored[0].key)["Body"].read() == first
    head = s3.head_object(Bucket=bucket, Key=stored[1].key)
    assert head["Metadata"] == {"job-id": "job-7", "kling-task-id": "task-7", "kling-video-id": "vid-b"}
    manifest = json.loads(s3.get_object(Bucket=bucket, Key="relay/2025/12/31/job-7/manifest.json")["Body"].read())
    assert manifest["job_id"] == "job-7" and manifest["kling_task_id"] == "task-7"
    assert manifest["created_at"] == CREATED_AT and before <= manifest["stored_at"] <= time.time()
    assert manifest["videos"] == [v.as_dict() for v in stored]
    assert manifest["metadata"] == {"user": "u1"}
    assert sorted(keys(s3, bucket)) == sorted([stored[0].key, stored[1].key, "relay/2025/12/31/job-7/manifest.json"])
    requests_so_far = list(source.seen)
    assert len(requests_so_far) == 2

    again = copy_videos("job-7", CREATED_AT, "task-7", videos, storage, source.allowlist, session,
                        extra_manifest={"metadata": {"user": "u1"}})
    assert again == stored
    assert source.seen == requests_so_far  # nothing downloaded the second time


def test_copy_videos_single_video_key(source: SourceServer, session: requests.Session, storage: Storage,
                                      s3: Any, bucket: str) -> None:
    data = payload(1234)
    stored = copy_videos("job-1", CREATED_AT, "task-1", [("v", source.add("v", data), "5")], storage,
                         source.allowlist, session, extra_manifest={})
    assert [v.key for v in stored] == ["relay/2025/12/31/job-1/video.mp4"]
    assert s3.get_object(Bucket=bucket, Key=stored[0].key)["Body"].read() == data


def test_copy_videos_failure_writes_no_manifest(source: SourceServer, session: requests.Session,
                                                storage: Storage, s3: Any, bucket: str) -> None:
    videos = [("a", source.add("a", payload(1000)), "5"), ("b", f"{source.base}/status/410", "5")]
    with pytest.raises(CopyError) as info:
        copy_videos("job-2", CREATED_AT, "task-2", videos, storage, source.allowlist, session, extra_manifest={})
    assert not info.value.retryable  # expired URL: re-read the task for fresh URLs
    assert storage.read_manifest("job-2", CREATED_AT) is None
    assert incomplete_uploads(s3, bucket) == []


def test_a_copy_no_longer_wanted_leaves_nothing(source: SourceServer, session: requests.Session,
                                               storage: Storage, s3: Any, bucket: str) -> None:
    videos = [("a", source.add("wa", payload(1000)), "5"), ("b", source.add("wb", payload(2000)), "5")]
    asked: list[bool] = []

    def still_wanted() -> bool:
        asked.append(True)
        return False

    with pytest.raises(CopyCanceled):
        copy_videos("job-9", CREATED_AT, "task-9", videos, storage, source.allowlist, session, extra_manifest={},
                    still_wanted=still_wanted)
    assert asked == [True]
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=storage.job_prefix("job-9", CREATED_AT))
    assert listing.get("KeyCount", 0) == 0
    assert incomplete_uploads(s3, bucket) == []
    stored = copy_videos("job-9", CREATED_AT, "task-9", videos, storage, source.allowlist, session,
                         extra_manifest={}, still_wanted=lambda: True)
    assert [v.bytes for v in stored] == [1000, 2000] and storage.read_manifest("job-9", CREATED_AT) is not None


def test_copy_videos_refused_url_propagates(source: SourceServer, session: requests.Session,
                                            storage: Storage) -> None:
    with pytest.raises(UrlRefused):
        copy_videos("job-3", CREATED_AT, "task-3", [("a", "http://169.254.169.254/latest/", None)], storage,
                    source.allowlist, session, extra_manifest={})
    assert storage.read_manifest("job-3", CREATED_AT) is None


def test_copy_videos_loses_the_manifest_race_gracefully(source: SourceServer, session: requests.Session,
                                                        s3: Any, bucket: str) -> None:
    winner = StoredVideo(bucket, "relay/2025/12/31/job-4/video.mp4", "0" * 64, 1, "5")

    class RacedStorage(Storage):
        """Another copy of the same job writes its manifest while this one uploads."""

        def copy_stream(self, *args: Any, **kwargs: Any) -> tuple[str, int]:
            result = super().copy_stream(*args, **kwargs)
            assert self.write_manifest("job-4", CREATED_AT, {"videos": [winner.as_dict()]})
            return result

    storage = RacedStorage(s3, bucket, "relay/", part_size=5 * MIB)
    stored = copy_videos("job-4", CREATED_AT, "task-4", [("a", source.add("a", payload(10)), "5")], storage,
                         source.allowlist, session, extra_manifest={})
    assert stored == [winner]


def test_copy_videos_refuses_extra_keys_that_clash(source: SourceServer, session: requests.Session,
                                                   storage: Storage) -> None:
    with pytest.raises(ValueError):
        copy_videos("job-5", CREATED_AT, "task-5", [], storage, source.allowlist, session,
                    extra_manifest={"videos": []})


def test_copy_videos_without_videos_is_permanent(source: SourceServer, session: requests.Session,
                                                 storage: Storage) -> None:
    with pytest.raises(CopyError) as info:
        copy_videos("job-6", CREATED_AT, "task-6", [], storage, source.allowlist, session, extra_manifest={})
    assert not info.value.retryable


def test_stored_video_round_trips_through_json() -> None:
    video = StoredVideo("b", "k", "ab" * 32, 10, None)
    assert StoredVideo.from_dict(json.loads(json.dumps(video.as_dict()))) == video
    assert set(video.as_dict()) == {"bucket", "key", "sha256", "bytes", "duration", "watermark_url"}
    marked = StoredVideo("b", "k", "ab" * 32, 10, "5", "https://cdn.example.com/wm.mp4")
    assert StoredVideo.from_dict(json.loads(json.dumps(marked.as_dict()))) == marked
    old_manifest_entry = {"bucket": "b", "key": "k", "sha256": "ab" * 32, "bytes": 10, "duration": None}
    assert StoredVideo.from_dict(old_manifest_entry) == video


def test_copy_videos_records_the_watermark_url_without_downloading_it(
        source: SourceServer, session: requests.Session, storage: Storage, s3: Any, bucket: str) -> None:
    """Issue 9 item 5: Kling's watermark_url is kept with its video in the manifest (and so in the job)."""
    data = payload(1000)
    watermark_url = "https://cdn.example.com/never-fetched-wm.mp4?sig=x"
    stored = copy_videos("job-w", CREATED_AT, "task-w", [("v", source.add("v", data), "5", watermark_url)],
                         storage, source.allowlist, session, extra_manifest={})
    assert [v.watermark_url for v in stored] == [watermark_url]
    manifest = json.loads(s3.get_object(Bucket=bucket, Key="relay/2025/12/31/job-w/manifest.json")["Body"].read())
    assert manifest["videos"][0]["watermark_url"] == watermark_url
    assert len(source.seen) == 1  # the video only


# --- memory: 512 MiB through a copy in its own process ------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_copy_of_512_mib_stays_under_150_mb_rss(moto: MotoS3, s3: Any, bucket: str, tmp_path: Path) -> None:
    size = 512 * MIB
    port = free_port()
    server = Process("copy-source", serve_argv(port), log_dir=tmp_path)
    try:
        wait_for_port(port, proc=server.proc)
        result = run_probe("stream", f"http://127.0.0.1:{port}/{size}.mp4", moto.endpoint_url, bucket,
                           "big/video.mp4", env=moto.env())
    finally:
        server.stop()
    sha256, etag = expected_digests(size)
    head = s3.head_object(Bucket=bucket, Key="big/video.mp4")
    assert result["bytes"] == size and head["ContentLength"] == size
    assert int(str(result["peak_rss_bytes"])) < 150 * 1000 * 1000, result
    assert result["sha256"] == sha256
    assert head["ETag"] == etag  # moto's MD5s of the parts it received: the stored bytes are the source's
    assert incomplete_uploads(s3, bucket) == []


def test_parts_are_cut_exactly_whatever_the_chunk_sizes(s3: Any, bucket: str) -> None:
    """Issue 11 (the copy copied every part out of a growing bytearray): each part is now filled in place and
    uploaded from its own buffer. Chunks that straddle a part boundary, one larger than a part, empty ones and
    an exact fit must still give parts of exactly `part_size` bytes (the last one shorter), in order, with the
    source's bytes."""
    part = 5 * MIB
    data = payload(3 * part + 12_345, seed=11)
    sizes = [1, part - 1, 0, 3, part + part // 2, 7, 0]
    pieces, at = [], 0
    for n in sizes:
        pieces.append(data[at:at + n])
        at += n
    pieces.append(data[at:])
    storage = Storage(s3, bucket, part_size=part, max_in_flight=3)
    sha, size = storage.copy_stream(iter(pieces), key="odd-chunks.mp4", expected_bytes=len(data), metadata={})
    assert (sha, size) == (hashlib.sha256(data).hexdigest(), len(data))
    assert s3.get_object(Bucket=bucket, Key="odd-chunks.mp4")["Body"].read() == data
    md5s = [hashlib.md5(data[i:i + part]).digest() for i in range(0, len(data), part)]  # noqa: S324
    etag = s3.head_object(Bucket=bucket, Key="odd-chunks.mp4")["ETag"]
    assert etag == f'"{hashlib.md5(b"".join(md5s)).hexdigest()}-{len(md5s)}"'  # noqa: S324


def test_part_buffers_are_reused_once_uploaded_and_the_bytes_stay_the_sources(moto: MotoS3, bucket: str) -> None:
    """Issue 11 (the copy's own CPU per GiB): a fresh zero-filled buffer per part cost the reading thread about 0.15 s
    per GiB; a full part's buffer is now refilled once its upload_part has returned. A 10-part copy with 2 parts in
    flight sends its parts from at most 3 buffers, and every part still carries (and S3 still stores) the source's
    bytes: no buffer is refilled while its part is on the wire."""
    s3 = moto.client()
    bodies: list[Any] = []
    sent: dict[int, str] = {}

    def seen(request: Any, **_: Any) -> None:
        if "partNumber=" in request.url:
            bodies.append(request.body)  # kept alive here, so a new buffer can never take a freed one's id
            sent[int(request.url.split("partNumber=")[1].split("&")[0])] = request.headers["x-amz-checksum-crc32"]

    s3.meta.events.register("before-send.s3.UploadPart", seen)
    part = 5 * MIB
    data = payload(9 * part + 4321, seed=12)
    storage = Storage(s3, bucket, part_size=part, max_in_flight=2)
    assert storage.copy_stream(chunks_of(data, 3 * MIB + 17), key="reused.mp4", expected_bytes=len(data),
                               metadata={})[1] == len(data)
    assert len(bodies) == 10
    assert len({id(body) for body in bodies}) <= 3
    assert s3.get_object(Bucket=bucket, Key="reused.mp4")["Body"].read() == data
    for number, header in sent.items():
        crc = zlib.crc32(data[(number - 1) * part:number * part]).to_bytes(4, "big")
        assert (header.decode() if isinstance(header, bytes) else header) == base64.b64encode(crc).decode()


def test_a_reused_buffer_still_viewed_elsewhere_still_ends_the_stream_right() -> None:
    """The last part is cut to its length in place; should a reused buffer still be viewed by something (an HTTP
    library keeping a memoryview), the cut cannot resize it and copies the last part instead of failing."""
    storage = Storage(object(), "b", part_size=8)  # type: ignore[arg-type]  # _cut never calls S3
    reused = bytearray(b"x" * 8)
    held_view = memoryview(reused)
    spare = [reused, bytearray(8)]  # taken from the end: the viewed one holds the last part
    parts = list(storage._cut(iter([b"0123456789", b"ab"]), hashlib.sha256(), spare))
    assert [(bytes(part), last) for part, last in parts] == [(b"01234567", False), (b"89ab", True)]
    held_view.release()


def test_a_short_stream_gets_a_buffer_of_its_own_size_not_a_whole_part() -> None:
    """Issue 11 (pipeline CPU): a 1 KiB video was cut into a zero-filled 8 MiB buffer (memset and page faults, ~5 ms
    of a copy's CPU). With the announced length under one part, the buffer is that length; a stream that goes on
    past it (the length lied) still comes out whole, in parts."""
    storage = Storage(object(), "b", part_size=8)  # type: ignore[arg-type]  # _cut never calls S3
    sha = hashlib.sha256()
    parts = list(storage._cut(iter([b"abc"]), sha, [], first_size=3))
    assert [(bytes(part), last) for part, last in parts] == [(b"abc", True)]
    assert len(parts[0][0]) == 3 and sha.hexdigest() == hashlib.sha256(b"abc").hexdigest()
    assert [(bytes(p), last) for p, last in storage._cut(iter([]), hashlib.sha256(), [], first_size=0)] == [
        (b"", True)]
    for chunks in ([b"abc", b"defghij", b"klm"], [b"abcdefghijklm"], [b"ab", b"cdefghijk", b"lm"]):
        longer = list(storage._cut(iter(chunks), hashlib.sha256(), [], first_size=3))
        assert [(bytes(part), last) for part, last in longer] == [(b"abcdefgh", False), (b"ijklm", True)], chunks


def test_a_short_copy_with_a_length_that_lies_is_still_refused(s3: Any, bucket: str) -> None:
    """The small first buffer changes nothing of the byte-count check: more bytes than announced write nothing."""
    storage = Storage(s3, bucket)
    with pytest.raises(CopyError, match="expected 3"):
        storage.copy_stream(iter([b"abcdef"]), key="lies.mp4", expected_bytes=3, metadata={})
    assert s3.list_objects_v2(Bucket=bucket, Prefix="lies.mp4").get("KeyCount", 0) == 0


def test_copy_keeps_up_to_six_parts_in_flight_by_default(s3: Any, bucket: str) -> None:
    """Issue 11: at most 2 parts were in flight where boto3 uses up to 10 threads; 6 now, and a part is no longer
    copied out of a bytearray (memory stays under 150 MB with 8 MiB parts: the memory test above)."""
    assert Storage(s3, bucket).max_in_flight == 6


def test_a_storage_given_a_function_makes_its_client_once_on_first_use(moto: MotoS3, bucket: str) -> None:
    """The web process builds a Storage it rarely uses: the boto3 client (~0.3 s of CPU) is made when S3 is first
    used, once, however many threads reach for it at the same time; the copy then works as with a client given."""
    made: list[Any] = []
    gate = threading.Barrier(8)

    def make() -> Any:
        time.sleep(0.05)  # long enough for every thread to be waiting on the first one
        made.append(moto.client())
        return made[-1]

    storage = Storage.lazy(make, bucket, "relay/")
    assert made == []
    clients: list[Any] = []

    def reach() -> None:
        gate.wait()
        clients.append(storage.s3)

    threads = [threading.Thread(target=reach) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1 and all(c is made[0] for c in clients) and len(clients) == 8
    sha256, size = storage.copy_stream([b"x" * 1000], key="j/video.mp4", expected_bytes=1000, metadata={})
    assert size == 1000 and sha256 == hashlib.sha256(b"x" * 1000).hexdigest()
    with pytest.raises(ValueError, match="not both"):
        Storage(made[0], bucket, make_s3=make)
