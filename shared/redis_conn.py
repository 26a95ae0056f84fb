"""REDIS_URL to clients: the one place that turns the setting into a redis-py client and into Celery's broker.

Two kinds of URL:

- `redis://`, `rediss://`, `unix://`: one Redis server (redis-py's `Redis.from_url`, kombu's Redis transport).
- `redis+sentinel://[:password@]host:port[,host:port...]/service_name[/db]`: a Sentinel deployment. The hosts are
  the sentinels; `service_name` is the name they monitor (`sentinel monitor <service_name> ...`); the password,
  if any, is the primary's (and its replicas'), the sentinels themselves are asked without one. The store, the
  locks and the rate limiter get a client from `Sentinel.master_for` (each new connection asks the sentinels
  where the primary is, and a connection to a former primary that answers READONLY is dropped), Celery gets
  kombu's sentinel transport (`sentinel://h1:p1;sentinel://h2:p2` with the transport option `master_name`), so
  both follow a failover. Commands in flight when the primary dies fail with a connection error, as they do when
  a single Redis restarts: the task retries or the reconciler picks the job up again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import redis
from redis.sentinel import Sentinel

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_SOCKET_TIMEOUT = 2.0


@dataclass(frozen=True)
class SentinelTarget:
    """What a `redis+sentinel://` URL names."""

    sentinels: tuple[tuple[str, int], ...]
    service_name: str
    db: int = 0
    password: str | None = None


def is_sentinel(url: str) -> bool:
    return urlsplit(url).scheme == SENTINEL_SCHEME


def parse_sentinel(url: str) -> SentinelTarget:
    """Parse `redis+sentinel://[:password@]host:port[,host:port...]/service_name[/db]`; ValueError if malformed."""
    parts = urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        raise ValueError(f"not a {SENTINEL_SCHEME}:// URL")
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    password = unquote(userinfo.partition(":")[2]) if userinfo else None
    sentinels = []
    for item in hostlist.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("each sentinel must be host:port")
        sentinels.append((host.strip("[]"), int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ValueError("the path must be /service_name or /service_name/db")
    if len(path) == 2 and not path[1].isdigit():
        raise ValueError("the database must be a number")
    return SentinelTarget(tuple(sentinels), unquote(path[0]), int(path[1]) if len(path) == 2 else 0,
                          password or None)


def redis_client(url: str, *, decode_responses: bool = True, socket_timeout: float = 10,
                 socket_connect_timeout: float = 5, health_check_interval: int = 30) -> redis.Redis:
    """A redis-py client for REDIS_URL: the primary of a Sentinel deployment, or the one server."""
    if not is_sentinel(url):
        return redis.Redis.from_url(url, decode_responses=decode_responses, socket_timeout=socket_timeout,
                                    socket_connect_timeout=socket_connect_timeout,
                                    health_check_interval=health_check_interval)
    target = parse_sentinel(url)
    sentinel = Sentinel(list(target.sentinels),  # type: ignore[no-untyped-call]
                        sentinel_kwargs={"socket_timeout": SENTINEL_SOCKET_TIMEOUT,
                                         "socket_connect_timeout": SENTINEL_SOCKET_TIMEOUT})
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        target.service_name, db=target.db, password=target.password, decode_responses=decode_responses,
        socket_timeout=socket_timeout, socket_connect_timeout=socket_connect_timeout,
        health_check_interval=health_check_interval)
    return client


def celery_broker(url: str) -> tuple[str, dict[str, Any]]:
    """Celery's broker URL and the settings it needs for REDIS_URL: `broker_transport` (kombu's sentinel transport
    with acks that survive a failover, shared/broker_transport.py) and transport options (beyond the relay's own)."""
    if not is_sentinel(url):
        if urlsplit(url).scheme == "redis":
            return url, {"broker_transport": "kling_relay.shared.broker_transport:FailoverTransport"}
        return url, {}
    target = parse_sentinel(url)
    auth = f":{quote(target.password, safe='')}@" if target.password else ""
    broker = ";".join(f"sentinel://{auth}{host}:{port}/{target.db}" for host, port in target.sentinels)
    return broker, {"broker_transport": "kling_relay.shared.broker_transport:FailoverSentinelTransport",
                    "master_name": target.service_name,
                    "sentinel_kwargs": {"socket_timeout": SENTINEL_SOCKET_TIMEOUT,
                                        "socket_connect_timeout": SENTINEL_SOCKET_TIMEOUT}}
