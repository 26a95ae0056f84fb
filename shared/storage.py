"""The copy of finished videos into S3: a streaming download, one PutObject or a multipart upload, the manifest last.

Layout (docs/architecture.md): ``<prefix><yyyy>/<mm>/<dd>/<job_id>/video.mp4`` (``video-<n>.mp4``, n from 1, when a task
has several videos), then ``manifest.json`` beside them, written LAST with a conditional create
(``IfNoneMatch="*"``): consumers trigger on the manifest, and a copy that finds it in place does nothing, so a
re-run after success neither downloads nor uploads again. Moto (the test S3) honours ``If-None-Match: *`` on
PutObject and answers 412, which the tests check, so no HEAD guard is added in front of it.

`Storage.copy_stream` reads the stream into parts of `part_size` (8 MiB). A stream that ends within its first
part (a short video) goes up in one PutObject from that buffer: S3 stores it whole or not at all, the size is
the bytes sent (no HEAD), and no multipart upload exists that a crash could leave open. A longer stream goes up
as one multipart upload, and the object appears only on CompleteMultipartUpload, never half-written. Memory
stays bounded whatever the size: one part being assembled plus `max_in_flight` parts uploading (default 6, on a
thread pool, so the download overlaps the upload), i.e. about 7 × part_size on top of the interpreter (each part
is filled in place and uploaded from that buffer, never copied again, and the buffers are reused part after
part); bench/copy_memory.py measures the peak
RSS (kept under 150 MB with 8 MiB parts, as the memory test in tests/shared/test_storage.py checks). Any failure
aborts the upload (no incomplete upload left behind) and raises `CopyError`. A process killed mid-copy cannot
abort, so every multipart upload first aborts the uploads left open on its own key (`Storage.abort_stale_uploads`;
a short video, one PutObject, skips that listing on its job's first run, `fresh`); for jobs never copied again,
give the bucket a lifecycle rule ``AbortIncompleteMultipartUpload`` too (a day is plenty).

Integrity: every upload of a video carries its CRC32 (`PART_CHECKSUM`, computed here, `_crc32`; S3 refuses a body
that does not match). Computed here rather than by botocore: over https botocore would send it as a trailer of an
aws-chunked body, which it builds from a copy of the part (two buffers per part in flight instead of one).
A multipart upload declares CRC32 at CreateMultipartUpload and names each part's CRC32 (with its ETag, S3's MD5
of the part) again in CompleteMultipartUpload, which S3 checks against the parts it holds; the
object keeps a composite CRC32 (``GetObject(ChecksumMode="ENABLED")``). This is what boto3's own `upload_fileobj`
sends. Without the declaration, S3 (and moto) build a full-object CRC64NVME of their own at completion; moto does
it by concatenating the whole object once more, which cost it 1-2 CPU seconds per GiB (bench/copy_memory.py).
A client configured with ``request_checksum_calculation="when_required"`` (``AWS_REQUEST_CHECKSUM_CALCULATION``,
the setting for S3-compatible stores that refuse checksum headers) sends no checksum, as botocore itself would.
The SHA-256 the manifest records is the copy's own, computed on the way.

S3 requests of one copy of a 1-video job: first run of a short video, PutObject + the manifest's conditional
PutObject (2); a later run adds the manifest GET and the LIST of stale uploads; a long video takes the LIST,
CreateMultipartUpload, one UploadPart per part, CompleteMultipartUpload and a HEAD instead of the PutObject.

`CopyError.retryable` tells the caller whether a retry can help: network errors, 5xx, truncated downloads and
S3 hiccups are retryable; 403/404/410 from the source (expired result URL: re-read the task from Kling for a
fresh one), oversize sources and S3 configuration errors (no bucket, access denied) are not. S3 errors that
refuse every request alike — no bucket, access denied, missing or bad credentials, a wrong region — raise
`StorageUnusable` (a CopyError with the S3 code): the caller pauses copying until the operator fixes the setting
(`Storage.probe` tells when that is done). Policy refusals of a URL raise `kling_relay.shared.urlguard.UrlRefused`
unchanged.

Result URLs are signed and temporary: logs and error messages carry them without their query string.
The S3 client (boto3, credentials from its usual chain) is created by the caller, with its own timeouts.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, cast

import requests
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError
from urllib3.exceptions import HTTPError as Urllib3Error

from kling_relay.shared.urlguard import UrlAllowlist, UrlResolutionError, close_response, get_checked, redact_url

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

log = logging.getLogger(__name__)

VIDEO_CONTENT_TYPE = "video/mp4"
MANIFEST_NAME = "manifest.json"
#: The manifest's shape, as docs/manifest.schema.json describes it; raised only for a change consumers must know.
MANIFEST_SCHEMA_VERSION = 1
MAX_PARTS = 10_000
#: The checksum every video upload carries (see `Storage.copy_stream`): CRC32, as boto3's own upload_fileobj uses.
PART_CHECKSUM: Final = "CRC32"
# S3 errors that refuse every request alike until an operator fixes a setting (bucket, credentials, region,
# policy): StorageUnusable, copying pauses. "Forbidden" is how a HEAD request (no body) reports AccessDenied.
_UNUSABLE_S3_CODES = frozenset({
    "AccessDenied", "Forbidden", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "NoSuchBucket", "InvalidBucketName", "AccountProblem", "ExpiredToken", "InvalidToken",
    "AuthorizationHeaderMalformed", "PermanentRedirect",
})
# S3 errors that no retry will fix: the caller fails the job's copy (or, for the ones above, pauses copying).
_PERMANENT_S3_CODES = _UNUSABLE_S3_CODES | {"InvalidRequest", "InvalidArgument", "EntityTooLarge"}
PROBE_FOLDER = ".kling-relay-probe/"
_PERMANENT_SOURCE_STATUSES = frozenset({400, 401, 403, 404, 405, 410, 451})
_MANIFEST_CORE_KEYS = frozenset({"schema_version", "job_id", "kling_task_id", "created_at", "stored_at", "videos"})


class CopyError(Exception):
    """The copy failed; `retryable` says whether trying again later can succeed."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class StoredVideo:
    """One video as stored: where it is, its SHA-256 (hex) and size, Kling's duration string, and Kling's
    `watermark_url` (the watermarked copy's temporary URL, recorded as given, never downloaded; None without one)."""

    bucket: str
    key: str
    sha256: str
    bytes: int
    duration: str | None
    watermark_url: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"bucket": self.bucket, "key": self.key, "sha256": self.sha256, "bytes": self.bytes,
                "duration": self.duration, "watermark_url": self.watermark_url}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StoredVideo:
        return cls(bucket=str(data["bucket"]), key=str(data["key"]), sha256=str(data["sha256"]),
                   bytes=int(data["bytes"]), duration=_str_or_none(data.get("duration")),
                   watermark_url=_str_or_none(data.get("watermark_url")))


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)


class StorageUnusable(CopyError):
    """S3 refuses every request alike (no bucket, access denied, no or bad credentials): no retry of a copy can
    succeed until an operator fixes a setting. `code` is S3's error code (`NoSuchBucket`, `AccessDenied`, ...) or
    `NoCredentials` when boto3 found no credentials at all."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message, retryable=False)
        self.code = code


def _s3_error(exc: Exception, action: str) -> CopyError:
    """Translate a boto3 failure into CopyError: StorageUnusable for configuration problems (see module docstring),
    permanent for requests S3 will never accept, retryable otherwise."""
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in _UNUSABLE_S3_CODES:
            code = "AccessDenied" if code == "Forbidden" else code
            return StorageUnusable(f"S3 {action} failed: {code}", code=code)
        retryable = code not in _PERMANENT_S3_CODES and (status >= 500 or status in (0, 408, 429)
                                                         or code in ("SlowDown", "RequestTimeout", "NoSuchUpload"))
        return CopyError(f"S3 {action} failed: {code or status}", retryable=retryable)
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return StorageUnusable(f"S3 {action} failed: no credentials", code="NoCredentials")
    return CopyError(f"S3 {action} failed: {type(exc).__name__}", retryable=True)


class Storage:
    """The destination bucket: key layout, streaming multipart copy, and the manifest (see module docstring)."""

    def __init__(self, s3_client: S3Client | None, bucket: str, prefix: str = "", *,
                 part_size: int = 8 * 1024 * 1024, max_in_flight: int = 6,
                 make_s3: Callable[[], S3Client] | None = None) -> None:
        """`s3_client`: a boto3 S3 client; or None and `make_s3`, a function that makes one when S3 is first used
        (`Storage.lazy`)."""
        if part_size <= 0 or max_in_flight <= 0:
            raise ValueError("part_size and max_in_flight must be positive")
        if (s3_client is None) == (make_s3 is None):
            raise ValueError("give an S3 client or a function that makes one (make_s3), not both")
        self._s3 = s3_client
        self._make_s3 = make_s3
        self._s3_lock = threading.Lock()
        self.bucket = bucket
        self.prefix = prefix
        self.part_size = part_size
        self.max_in_flight = max_in_flight

    @classmethod
    def lazy(cls, make_s3: Callable[[], S3Client], bucket: str, prefix: str = "") -> Storage:
        """A Storage whose boto3 client is made by `make_s3` when S3 is first used: a client takes about 0.3 s of
        CPU to make, which a process that never reaches S3 (the web process, every time gunicorn replaces a worker)
        goes without."""
        return cls(None, bucket, prefix, make_s3=make_s3)

    @property
    def s3(self) -> S3Client:
        """The boto3 client (made on first use when a function was given: once, whatever the threads)."""
        client = self._s3
        if client is None:
            with self._s3_lock:
                if self._s3 is None:
                    assert self._make_s3 is not None
                    self._s3 = self._make_s3()
                client = self._s3
        return client

    def __repr__(self) -> str:
        return f"Storage(bucket={self.bucket!r}, prefix={self.prefix!r}, part_size={self.part_size})"

    def job_prefix(self, job_id: str, created_at: float) -> str:
        """``<prefix><yyyy>/<mm>/<dd>/<job_id>/`` with the date of created_at (epoch seconds) in UTC."""
        if not job_id or "/" in job_id or job_id in (".", "..") or not job_id.isprintable():
            raise ValueError(f"job id {job_id!r} cannot be part of an object key")
        day = datetime.fromtimestamp(created_at, tz=UTC)
        return f"{self.prefix}{day:%Y/%m/%d}/{job_id}/"

    def video_key(self, job_id: str, created_at: float, index: int, count: int) -> str:
        """Key of video number index (0-based) of count: ``video.mp4`` alone, else ``video-<index+1>.mp4``."""
        if not 0 <= index < count:
            raise ValueError(f"video index {index} out of range for {count} videos")
        name = "video.mp4" if count == 1 else f"video-{index + 1}.mp4"
        return self.job_prefix(job_id, created_at) + name

    def manifest_key(self, job_id: str, created_at: float) -> str:
        return self.job_prefix(job_id, created_at) + MANIFEST_NAME

    def read_manifest(self, job_id: str, created_at: float) -> dict[str, Any] | None:
        """The job's manifest, or None if it does not exist yet; CopyError if S3 fails or it is not JSON."""
        key = self.manifest_key(job_id, created_at)
        try:
            body = self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise _s3_error(exc, "get manifest") from exc
        except BotoCoreError as exc:
            raise _s3_error(exc, "get manifest") from exc
        try:
            manifest = json.loads(body)
        except ValueError as exc:
            raise CopyError(f"manifest {key} is not JSON", retryable=False) from exc
        if not isinstance(manifest, dict):
            raise CopyError(f"manifest {key} is not a JSON object", retryable=False)
        return manifest

    def write_manifest(self, job_id: str, created_at: float, manifest: dict[str, Any]) -> bool:
        """Create the manifest only if absent: True if written, False if one already existed (412/409)."""
        body = json.dumps(manifest, sort_keys=True, indent=2).encode()
        try:
            self.s3.put_object(Bucket=self.bucket, Key=self.manifest_key(job_id, created_at), Body=body,
                               ContentType="application/json", IfNoneMatch="*")
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return False
            raise _s3_error(exc, "put manifest") from exc
        except BotoCoreError as exc:
            raise _s3_error(exc, "put manifest") from exc
        return True

    def copy_stream(self, chunks: Iterable[bytes], *, key: str, expected_bytes: int | None,
                    metadata: dict[str, str], fresh: bool = False) -> tuple[str, int]:
        """Stream chunks into key; returns (sha256 hex, size). The SHA-256 is computed on the way.

        A stream that ends within its first part (`part_size`) goes up in ONE PutObject from that buffer: the size
        is the bytes sent, which S3 stores whole or not at all, so no HEAD follows and no multipart upload exists
        to leave behind. A longer stream goes up as one multipart upload: parts of `part_size` (memory bounded by
        max_in_flight + 1 parts), completed only if the byte count equals expected_bytes (when given), and the
        object is then HEAD-checked for the same size (deleted if it differs). On any failure the multipart upload
        is aborted and CopyError raised (other exceptions, e.g. a worker's time limit, abort the upload and
        propagate unchanged). In both cases a byte count that differs from expected_bytes writes nothing.

        Before writing, any multipart upload still open on the same key is aborted (`abort_stale_uploads`): a
        worker killed mid-copy, or an abort that S3 refused, leaves one behind, and the retry cleans it up.
        `fresh=True` skips that listing for a video that fits in one part: the caller believes that no earlier copy
        ever wrote to this key (the job's first copy run, `copy_videos`). A multipart upload always lists first,
        whatever `fresh` says, so an upload left open is found even when that belief is wrong (a Redis write lost
        in a failover, an ops retry made by an older release that cleared the attempt counters).
        """
        sha = hashlib.sha256()
        spare: list[bytearray] = []  # full-size part buffers whose upload is done, refilled by _cut
        short = expected_bytes is not None and 0 <= expected_bytes < self.part_size
        parts = self._cut(chunks, sha, spare, first_size=expected_bytes if short else None)
        head = [next(parts)]
        if head[0][1]:  # the stream ended within its first part
            if not fresh:
                self.abort_stale_uploads(key)
            return self._put_whole(head.pop()[0], sha, key=key, expected_bytes=expected_bytes, metadata=metadata)
        self.abort_stale_uploads(key)  # always before a multipart upload: one LIST beside parts of 8 MiB
        try:
            upload_id = self.s3.create_multipart_upload(
                Bucket=self.bucket, Key=key, ContentType=VIDEO_CONTENT_TYPE, Metadata=metadata,
                **self._checksum())["UploadId"]
        except (ClientError, BotoCoreError) as exc:
            raise _s3_error(exc, "create multipart upload") from exc
        try:
            size, completed = self._upload_parts(_prepend(head, parts), key, upload_id, spare)
            if expected_bytes is not None and size != expected_bytes:
                raise CopyError(f"source sent {size} bytes, expected {expected_bytes}", retryable=True)
            self.s3.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                              MultipartUpload={"Parts": completed})
        except BaseException as exc:
            self._abort(key, upload_id)
            if isinstance(exc, (ClientError, BotoCoreError)):
                raise _s3_error(exc, "multipart upload") from exc
            raise
        self._verify_size(key, size)
        return sha.hexdigest(), size

    def _put_whole(self, body: bytearray, sha: hashlib._Hash, *, key: str, expected_bytes: int | None,
                   metadata: dict[str, str]) -> tuple[str, int]:
        """The whole stream fits in one part: one PutObject of that buffer (see `copy_stream`)."""
        size = len(body)
        if expected_bytes is not None and size != expected_bytes:
            raise CopyError(f"source sent {size} bytes, expected {expected_bytes}", retryable=True)
        try:
            # botocore sends any bytes-like body (the stubs name only bytes): the buffer as it is, uncopied
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=cast(bytes, body), ContentType=VIDEO_CONTENT_TYPE,
                               Metadata=metadata, **self._checksum(body))
        except (ClientError, BotoCoreError) as exc:
            raise _s3_error(exc, "put object") from exc
        return sha.hexdigest(), size

    def _checksum(self, body: bytearray | None = None) -> dict[str, Any]:
        """``ChecksumAlgorithm=CRC32`` for an upload of a video (see the module docstring), with `body`'s CRC32 when
        it is given; nothing when the client is configured to send checksums only where S3 requires them."""
        config = getattr(getattr(self.s3, "meta", None), "config", None)
        if getattr(config, "request_checksum_calculation", None) == "when_required":
            return {}
        if body is None:
            return {"ChecksumAlgorithm": PART_CHECKSUM}
        return {"ChecksumAlgorithm": PART_CHECKSUM, "ChecksumCRC32": _crc32(body)}

    def _cut(self, chunks: Iterable[bytes], sha: hashlib._Hash, spare: list[bytearray],
             first_size: int | None = None) -> Iterator[tuple[bytearray, bool]]:
        """The stream as parts of exactly `part_size` bytes (the last one shorter, or empty for an empty stream),
        each with whether it is the last one; `sha` is fed each chunk on the way (in the reading thread: a hashing
        thread of its own was measured slower at a moderate load, faster only on a machine loaded 6-8 times over).

        Each part is filled in place (one copy per byte, into a buffer of exactly part_size) and handed out as it
        is: no part is copied again. A full part is handed out once the next chunk shows the stream goes on (or
        ends), so at most one chunk is held beside it. A buffer is taken from `spare` (parts whose upload has
        returned, put back by `_upload_parts`) when there is one, else allocated: no zero-filled 8 MiB per part, and
        never more than max_in_flight + 1 buffers.

        `first_size`: the stream's announced length when it is under one part (a short video): the first buffer
        is only that big, instead of a zero-filled part (8 MiB of memset and page faults for a 1 KiB video, ~5 ms
        of CPU: bench/pipeline.py). Should the stream go on past it, the buffer grows to a whole part.
        """
        buf = bytearray(first_size) if first_size is not None else self._buffer(spare)
        view = memoryview(buf)
        held = 0
        for chunk in chunks:
            if not chunk:
                continue
            sha.update(chunk)
            with memoryview(chunk) as rest:
                while rest:
                    if held == len(buf) < self.part_size:  # a short stream's buffer, and more follows: a part
                        view.release()
                        buf.extend(bytes(self.part_size - held))
                        view = memoryview(buf)
                    elif held == self.part_size:  # full, and more follows
                        view.release()
                        yield buf, False
                        buf = self._buffer(spare)
                        view = memoryview(buf)
                        held = 0
                    take = min(len(rest), len(buf) - held)
                    view[held:held + take] = rest[:take]
                    held += take
                    rest = rest[take:]
        view.release()
        try:
            del buf[held:]
        except BufferError:  # a reused buffer something still holds a view of (none known): copy the last part
            buf = buf[:held]
        yield buf, True

    def _buffer(self, spare: list[bytearray]) -> bytearray:
        return spare.pop() if spare else bytearray(self.part_size)

    def _upload_parts(self, parts: Iterable[tuple[bytearray, bool]], key: str, upload_id: str,
                      spare: list[bytearray]) -> tuple[int, list[CompletedPartTypeDef]]:
        """Upload the parts, at most `max_in_flight` at a time (bounded memory); (bytes sent, completed parts).
        A full-size part's buffer goes back to `spare` once its upload_part has returned (botocore, retries
        included, is done with it then), for `_cut` to fill again; a failed part's buffer is never reused."""
        size = 0
        completed: list[CompletedPartTypeDef] = []
        in_flight: deque[tuple[Future[CompletedPartTypeDef], bytearray]] = deque()
        submitted = 0

        def finish_oldest() -> None:
            future, body = in_flight.popleft()
            completed.append(future.result())
            if len(body) == self.part_size:
                spare.append(body)

        def upload(number: int, body: bytearray) -> CompletedPartTypeDef:
            # botocore sends any bytes-like body (the stubs name only bytes): the part's own buffer, uncopied
            checksum = self._checksum(body)
            answer = self.s3.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number,
                                         Body=cast(bytes, body), **checksum)
            part: CompletedPartTypeDef = {"ETag": answer["ETag"], "PartNumber": number}
            if "ChecksumCRC32" in checksum:  # the complete names each part's CRC32 again (S3 checks it too)
                part["ChecksumCRC32"] = checksum["ChecksumCRC32"]
            return part

        # Leaving the with-block waits for the parts in flight, so an abort never races an upload_part.
        with ThreadPoolExecutor(max_workers=self.max_in_flight, thread_name_prefix="s3-part") as pool:
            for body, _last in parts:
                while len(in_flight) >= self.max_in_flight:
                    finish_oldest()
                if submitted >= MAX_PARTS:
                    raise CopyError(f"more than {MAX_PARTS} parts of {self.part_size} bytes", retryable=False)
                submitted += 1
                size += len(body)
                in_flight.append((pool.submit(upload, submitted, body), body))
                del body
            while in_flight:
                finish_oldest()
        return size, completed

    def probe(self) -> str:
        """Check that a copy can write here: the bucket answers (HEAD bucket), and a tiny object can be created and
        deleted under the prefix (``<prefix>.kling-relay-probe/<random>``; consumers that trigger on
        ``manifest.json`` never see it). Returns the key used. Raises StorageUnusable (no bucket, access denied,
        no credentials...) or CopyError (retryable: S3 did not answer properly). Used by the reconciler while
        copying is paused, and by operators' checks. In a versioned bucket the delete leaves a delete marker (and
        the probe's old version), as any delete there does: a lifecycle rule for noncurrent versions clears them.
        """
        key = f"{self.prefix}{PROBE_FOLDER}{uuid.uuid4().hex}"
        try:
            self.s3.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NotFound", "NoSuchBucket"):
                raise StorageUnusable("S3 head bucket failed: NoSuchBucket", code="NoSuchBucket") from exc
            if exc.response.get("Error", {}).get("Code") in ("403", "Forbidden"):
                raise StorageUnusable("S3 head bucket failed: AccessDenied", code="AccessDenied") from exc
            raise _s3_error(exc, "head bucket") from exc
        except BotoCoreError as exc:
            raise _s3_error(exc, "head bucket") from exc
        try:
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=b"kling-relay storage probe",
                               ContentType="text/plain")
        except (ClientError, BotoCoreError) as exc:
            raise _s3_error(exc, "put probe object") from exc
        try:
            self.s3.delete_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            raise _s3_error(exc, "delete probe object") from exc
        return key

    def delete(self, keys: Sequence[str]) -> None:
        """Delete these objects (a copy that must leave nothing behind); CopyError if S3 refuses."""
        try:
            for key in keys:
                self.s3.delete_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            raise _s3_error(exc, "delete") from exc

    def abort_stale_uploads(self, key: str) -> int:
        """Abort every open multipart upload on exactly `key`; returns how many were aborted.

        Keys derive from the job id, so an open upload on this key can only be an earlier copy of the same job
        that died (SIGKILL, lost connection) or whose abort failed. Should two copies of one job ever run at
        once, the later one aborts the earlier one's upload: that copy then fails with NoSuchUpload (retryable),
        finds the manifest on its retry and does nothing; no object is ever half-written. Listing errors raise
        CopyError (retryable for 5xx and network errors); an upload already gone is not an error.
        """
        aborted = 0
        key_marker = upload_marker = ""
        while True:
            try:
                if key_marker:
                    page = self.s3.list_multipart_uploads(Bucket=self.bucket, Prefix=key, KeyMarker=key_marker,
                                                          UploadIdMarker=upload_marker)
                else:
                    page = self.s3.list_multipart_uploads(Bucket=self.bucket, Prefix=key)
            except (ClientError, BotoCoreError) as exc:
                raise _s3_error(exc, "list multipart uploads") from exc
            for upload in page.get("Uploads", []):
                if upload.get("Key") != key or "UploadId" not in upload:
                    continue
                try:
                    self.s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload["UploadId"])
                except ClientError as exc:
                    if exc.response.get("Error", {}).get("Code") == "NoSuchUpload":
                        continue
                    raise _s3_error(exc, "abort stale multipart upload") from exc
                except BotoCoreError as exc:
                    raise _s3_error(exc, "abort stale multipart upload") from exc
                aborted += 1
            next_markers = (page.get("NextKeyMarker", ""), page.get("NextUploadIdMarker", ""))
            if not page.get("IsTruncated") or not next_markers[0] or next_markers == (key_marker, upload_marker):
                break
            key_marker, upload_marker = next_markers
        if aborted:
            log.warning("aborted stale multipart uploads", extra={"key": key, "count": aborted})
        return aborted

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            self.s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except (ClientError, BotoCoreError) as exc:
            log.error("abort multipart upload failed", extra={"key": key, "error": repr(exc)})

    def _verify_size(self, key: str, size: int) -> None:
        try:
            stored = self.s3.head_object(Bucket=self.bucket, Key=key)["ContentLength"]
        except (ClientError, BotoCoreError) as exc:
            raise _s3_error(exc, "head object") from exc
        if stored != size:
            try:
                self.s3.delete_object(Bucket=self.bucket, Key=key)
            except (ClientError, BotoCoreError) as exc:
                log.error("delete of a mis-sized object failed", extra={"key": key, "error": repr(exc)})
            raise CopyError(f"stored object {key} has {stored} bytes, copied {size}", retryable=True)


def _prepend(head: list[tuple[bytearray, bool]], rest: Iterator[tuple[bytearray, bool]]
             ) -> Iterator[tuple[bytearray, bool]]:
    """The part taken out of `head` (so that no other reference keeps it once uploaded), then the rest."""
    yield head.pop()
    yield from rest


@dataclass
class Download:
    """An open streaming download: iterate `chunks` once; `close()` (or the context manager) releases it."""

    chunks: Iterator[bytes]
    content_length: int | None
    final_url: str
    _response: requests.Response = field(repr=False)

    def close(self) -> None:
        close_response(self._response)

    def __enter__(self) -> Download:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Download(url={redact_url(self.final_url)!r}, content_length={self.content_length})"


def _content_length(response: requests.Response) -> int | None:
    raw = response.headers.get("Content-Length")
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        return None
    return value if value >= 0 else None


def _body(response: requests.Response, content_length: int | None, chunk_size: int,
          max_bytes: int | None, where: str) -> Iterator[bytes]:
    """The raw body (no content decoding) in chunks; CopyError on network errors or truncation."""
    received = 0
    try:
        for chunk in response.raw.stream(chunk_size, decode_content=False):
            received += len(chunk)
            if max_bytes is not None and received > max_bytes:
                raise CopyError(f"{where} is larger than {max_bytes} bytes", retryable=False)
            yield chunk
    except (Urllib3Error, requests.RequestException, OSError) as exc:
        raise CopyError(f"download of {where} failed after {received} bytes: {type(exc).__name__}",
                        retryable=True) from exc
    finally:
        close_response(response)
    if content_length is not None and received != content_length:
        raise CopyError(f"download of {where} truncated: {received} of {content_length} bytes", retryable=True)


def _crc32(body: bytearray) -> str:
    """The body's CRC32 as S3 names it: base64 of the 4 big-endian bytes (zlib releases the GIL over a part)."""
    return base64.b64encode(zlib.crc32(body).to_bytes(4, "big")).decode("ascii")


def download_chunks(url: str, allowlist: UrlAllowlist, *, session: requests.Session,
                    timeout: tuple[float, float] = (5, 60), chunk_size: int = 1 << 20,
                    max_bytes: int | None = None) -> Download:
    """Open a streaming GET of url through the allow-list (vetted address, redirects re-checked).

    Raises UrlRefused for policy refusals, CopyError(retryable=False) for 4xx such as 403/404/410 (an
    expired result URL) or a source larger than max_bytes, CopyError(retryable=True) for DNS/network errors,
    timeouts, 408/429/5xx; a body shorter than Content-Length raises CopyError(retryable=True) from the
    chunks iterator. Requests ``Accept-Encoding: identity`` and never decodes, so the bytes are the file.
    """
    where = redact_url(url)
    try:
        response = get_checked(url, allowlist, session=session, timeout=timeout,
                               headers={"Accept-Encoding": "identity"})
    except UrlResolutionError as exc:
        raise CopyError(f"download of {where}: {exc}", retryable=True) from exc
    except (requests.RequestException, Urllib3Error, OSError) as exc:
        raise CopyError(f"download of {where} failed: {type(exc).__name__}", retryable=True) from exc
    where = redact_url(response.url or url)
    status = response.status_code
    if status != 200:
        close_response(response)
        retryable = status not in _PERMANENT_SOURCE_STATUSES and (status >= 500 or status in (408, 425, 429))
        raise CopyError(f"download of {where} answered HTTP {status}", retryable=retryable)
    length = _content_length(response)
    if max_bytes is not None and length is not None and length > max_bytes:
        close_response(response)
        raise CopyError(f"{where} is {length} bytes, more than {max_bytes}", retryable=False)
    return Download(chunks=_body(response, length, chunk_size, max_bytes, where), content_length=length,
                    final_url=response.url or url, _response=response)


#: A video to copy: (video_id, url, duration), or with Kling's watermark_url as a fourth item.
SourceVideo = tuple[str, str, str | None] | tuple[str, str, str | None, str | None]


class CopyCanceled(Exception):  # noqa: N818 - an outcome, not a failure
    """The job stopped wanting its copy (canceled, timed out) before the manifest: nothing is left in S3."""


def copy_videos(job_id: str, created_at: float, kling_task_id: str,
                videos: Sequence[SourceVideo], storage: Storage, allowlist: UrlAllowlist,
                session: requests.Session, *, extra_manifest: dict[str, Any],
                timeout: tuple[float, float] = (5, 60), max_bytes: int | None = None,
                still_wanted: Callable[[], bool] | None = None, fresh: bool = False) -> list[StoredVideo]:
    """Copy a finished task's videos ((video_id, url, duration) or (video_id, url, duration, watermark_url)) into
    S3, exactly once per job; a watermark_url is recorded with its video, not downloaded.

    If the job's manifest exists the videos it lists are returned and nothing is downloaded. Otherwise each
    video is streamed into its key, then the manifest ``{"schema_version": 1, "job_id", "kling_task_id",
    "created_at", "stored_at" (epoch seconds), "videos": [...], **extra_manifest}`` (docs/manifest.schema.json)
    is created last, conditionally; if another copy won that race, its manifest's videos are returned. Raises
    CopyError / UrlRefused.
    `still_wanted()` is asked right before the manifest: if it says no, the videos just written are deleted and
    CopyCanceled is raised, so consumers (who trigger on the manifest) never see a canceled job's video.
    `fresh=True`: the caller knows that no earlier copy of this job ever ran (its first copy run), so no manifest
    nor upload of it can exist: the manifest is not read first and no stale uploads are listed (the manifest is
    still created conditionally).
    """
    clash = _MANIFEST_CORE_KEYS & extra_manifest.keys()
    if clash:
        raise ValueError(f"extra_manifest may not set {sorted(clash)}")
    existing = None if fresh else storage.read_manifest(job_id, created_at)
    if existing is not None:
        log.info("manifest already present, nothing to copy", extra={"job_id": job_id})
        return [StoredVideo.from_dict(v) for v in existing.get("videos", [])]
    if not videos:
        raise CopyError("the task has no videos to copy", retryable=False)
    stored: list[StoredVideo] = []
    for index, source in enumerate(videos):
        video_id, url, duration = source[:3]
        watermark_url = source[3] if len(source) > 3 else None
        key = storage.video_key(job_id, created_at, index, len(videos))
        started = time.monotonic()
        with download_chunks(url, allowlist, session=session, timeout=timeout, max_bytes=max_bytes) as dl:
            metadata = {"job-id": job_id, "kling-task-id": kling_task_id, "kling-video-id": video_id}
            sha256, size = storage.copy_stream(dl.chunks, key=key, expected_bytes=dl.content_length,
                                               metadata=metadata, fresh=fresh)
        stored.append(StoredVideo(bucket=storage.bucket, key=key, sha256=sha256, bytes=size, duration=duration,
                                  watermark_url=watermark_url))
        log.info("copied video", extra={"job_id": job_id, "key": key, "bytes": size,
                                        "seconds": round(time.monotonic() - started, 3)})
    if still_wanted is not None and not still_wanted():
        storage.delete([v.key for v in stored])
        raise CopyCanceled(job_id)
    manifest = {"schema_version": MANIFEST_SCHEMA_VERSION, "job_id": job_id, "kling_task_id": kling_task_id,
                "created_at": created_at, "stored_at": time.time(), "videos": [v.as_dict() for v in stored],
                **extra_manifest}
    if storage.write_manifest(job_id, created_at, manifest):
        return stored
    winner = storage.read_manifest(job_id, created_at)
    if winner is None:
        raise CopyError("manifest create was refused but no manifest is readable", retryable=True)
    log.info("another copy wrote the manifest first", extra={"job_id": job_id})
    return [StoredVideo.from_dict(v) for v in winner.get("videos", [])]
