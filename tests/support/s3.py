"""A real S3 for tests: moto's server as a subprocess on a free 127.0.0.1 port.

    server = start_moto_s3(log_dir)          # or: with moto_s3(log_dir) as server:
    s3 = server.client()                      # boto3 client, dummy credentials, path-style addressing
    s3.create_bucket(Bucket="videos")
    server.stop()

Processes that talk to it (celery workers, probes) need credentials in their environment: pass
`server.env()` (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY = testing, AWS_DEFAULT_REGION, S3_ENDPOINT_URL).

Moto enforces S3's 5 MiB minimum for every part but the last; `min_part_size` lowers it in the server
(moto's `S3_UPLOAD_PART_MIN_SIZE`) so tests can use small parts.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from tests.support.procs import Process, free_port, wait_for_port

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"


class S3Calls:
    """The S3 operations a boto3 client sends, in order (one per HTTP attempt, retries included): `take()` returns
    those sent since the last call."""

    def __init__(self, s3: Any) -> None:
        self.ops: list[str] = []
        s3.meta.events.register("request-created.s3", self._seen)

    def _seen(self, operation_name: str, **kwargs: Any) -> None:
        self.ops.append(operation_name)

    def take(self) -> list[str]:
        ops, self.ops = self.ops, []
        return ops


class MotoS3:
    """A running moto server; `.endpoint_url`, `.client()`, `.env()`, `.stop()`."""

    def __init__(self, log_dir: Path, *, min_part_size: int | None = None) -> None:
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
               "AWS_DEFAULT_REGION": REGION}
        if min_part_size is not None:
            env["S3_UPLOAD_PART_MIN_SIZE"] = str(min_part_size)
        self.process: Process | None = Process(
            f"moto-s3-{self.port}",
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            log_dir=log_dir, env=env,
        )
        try:
            wait_for_port(self.port, proc=self.process.proc)
        except BaseException:
            self.stop()
            raise

    def env(self) -> dict[str, str]:
        """Environment for a subprocess that should use this server."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_DEFAULT_REGION": REGION, "S3_ENDPOINT_URL": self.endpoint_url}

    def client(self, **config: Any) -> Any:
        """A boto3 S3 client for this server (timeouts set; extra botocore Config options allowed)."""
        options: dict[str, Any] = {"connect_timeout": 5, "read_timeout": 60,
                                   "s3": {"addressing_style": "path"}, "retries": {"max_attempts": 2}}
        options.update(config)
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, region_name=REGION, aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY, config=Config(**options),
        )

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def log_tail(self, lines: int = 60) -> str:
        return self.process.log_tail(lines) if self.process else ""


def start_moto_s3(log_dir: Path, *, min_part_size: int | None = None) -> MotoS3:
    """Start moto's S3 server; the caller must call .stop()."""
    return MotoS3(log_dir, min_part_size=min_part_size)


@contextmanager
def moto_s3(log_dir: Path, *, min_part_size: int | None = None) -> Iterator[MotoS3]:
    """start_moto_s3 as a context manager: the server is stopped on exit."""
    server = start_moto_s3(log_dir, min_part_size=min_part_size)
    try:
        yield server
    finally:
        server.stop()


def moto_fixture(*, bucket: str | None = None) -> Any:
    """A module-scoped pytest fixture named `moto`: one moto S3 server for all the module's tests, with `bucket`
    created when given. Use as `moto = moto_fixture(...)` at module level."""

    @pytest.fixture(scope="module", name="moto")
    def _moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
        with moto_s3(tmp_path_factory.mktemp("moto-logs")) as server:
            if bucket is not None:
                server.client().create_bucket(Bucket=bucket)
            yield server

    return _moto


def no_credentials_client(moto: MotoS3, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A boto3 client for moto that finds no credentials anywhere (as on a machine where none were set up)."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                 "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return boto3.session.Session().client("s3", endpoint_url=moto.endpoint_url, region_name="us-east-1")
