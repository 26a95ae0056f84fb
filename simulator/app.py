"""The composition root: builds every part once and routes a Request to its handler.

Paths under `/_sim/` are the simulator's own (test-only, no auth); paths under the prefix are Kling's;
anything else answers Kling's 404 code 1202.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from kling_relay.simulator import api, control
from kling_relay.simulator.auth import Authenticator
from kling_relay.simulator.callbacks import CallbackDispatcher
from kling_relay.simulator.engine import Engine
from kling_relay.simulator.errors import ApiError
from kling_relay.simulator.faults import Faults
from kling_relay.simulator.knobs import Knobs
from kling_relay.simulator.replies import Reply, Request, error_envelope
from kling_relay.simulator.stats import Stats
from kling_relay.simulator.timers import Scheduler
from kling_relay.simulator.urls import UrlSigner


def normalize_prefix(prefix: str) -> str:
    """'' or '/kling' style: leading slash, no trailing slash."""
    prefix = prefix.strip().strip("/")
    return f"/{prefix}" if prefix else ""


class SimulatorApp:
    def __init__(self, *, auth: Authenticator, knobs: Knobs, public_url: str, data_dir: Path,
                 prefix: str = "", generation_workers: int = 2, callback_workers: int = 8,
                 webhook_secret: str | None = None) -> None:
        self.prefix = normalize_prefix(prefix)
        self.auth = auth
        self.faults = Faults(knobs)
        self.stats = Stats()
        self.signer = UrlSigner(public_url)
        self.stopping = threading.Event()
        self._scheduler = Scheduler()
        self._dispatcher = CallbackDispatcher(self._scheduler, self.faults, self.stats,
                                              workers=callback_workers, webhook_secret=webhook_secret)
        self.engine = Engine(faults=self.faults, stats=self.stats, scheduler=self._scheduler,
                             dispatcher=self._dispatcher, signer=self.signer, data_dir=data_dir,
                             generation_workers=generation_workers)

    def handle(self, req: Request) -> Reply:
        if req.path.startswith("/_sim/"):
            return control.handle(self, req)
        if self.prefix == "" or req.path.startswith(self.prefix + "/"):
            return api.handle(self, req, req.path[len(self.prefix):])
        self.stats.request(f"{req.method} (unknown)")
        self.stats.error_code(1202)
        return error_envelope(ApiError(1202, "unknown path"))

    def stats_snapshot(self) -> dict[str, Any]:
        snapshot = self.stats.snapshot()
        snapshot["videos"] = self.engine.video_stats()
        snapshot["tasks"] = {t.task_id: t.status for t in self.engine.store.all()}
        snapshot["in_flight"] = self.engine.store.in_flight()
        return snapshot

    def reset(self, *, restore_knobs: bool = True) -> None:
        self.engine.reset()
        self.stats.clear()
        self.faults.reset(restore_knobs=restore_knobs)

    def close(self) -> None:
        self.stopping.set()
        self.engine.shutdown()
