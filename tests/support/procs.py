"""Test-side name for deploy.procs (the one place that starts local processes, shared with `make demo`)."""

from deploy.procs import Process, RedisServer, free_port, redis_server_binary, wait_for_port

__all__ = ["Process", "RedisServer", "free_port", "redis_server_binary", "wait_for_port"]
