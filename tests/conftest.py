"""Shared fixtures. Real services only: a private redis-server per test session."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.support.procs import RedisServer


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test id unique. `make test` runs on two pytest-xdist workers with `--dist loadscope`: a module's tests
    run in one worker, one after the other, so that a module-scoped fixture (a module's own LocalStack) starts once
    (session fixtures start once per worker). The scheduler keys tests by id and would run only one of several
    tests that share one: schemathesis gives each operation's test (tests/e2e/test_fuzz.py) the function's bare id,
    while its name has the operation, so such a test gets its name as its id.
    """
    shared = {nodeid for nodeid, count in Counter(item.nodeid for item in items).items() if count > 1}
    for item in items:
        if item.nodeid in shared and item.parent is not None:
            item._id = item.parent.id.child(item.name)  # how pytest itself derives the id (_pytest/nodes.py)
    duplicates = [nodeid for nodeid, count in Counter(item.nodeid for item in items).items() if count > 1]
    if duplicates:
        raise pytest.UsageError(f"tests that share an id (pytest-xdist would run one of each): {duplicates}")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture()
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """A clean database on the session's redis-server for each test."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    yield redis_server.url


@pytest.fixture()
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture()
def log_dir(tmp_path: Path) -> Path:
    d = tmp_path / "logs"
    d.mkdir()
    return d
