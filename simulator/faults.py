"""Holds the live knobs and decides, thread-safely, when a fault fires.

`hit("rate_limit")` looks at the knobs `rate_limit_every_n` and `rate_limit_probability` (and, for faults
that have one, `<fault>_first_n`): it fires on every Nth call or on each of the first N calls (counting calls
since the knob was last set or the simulator reset) or with the given probability, drawn from one RNG seeded
by the `seed` knob. The RNG is only drawn from when a probability is above 0, so enabling one probabilistic
fault does not shift another's sequence.
"""

from __future__ import annotations

import random
import threading
from typing import Any

from kling_relay.simulator.knobs import Knobs


class Faults:
    def __init__(self, knobs: Knobs) -> None:
        self._initial = knobs
        self._knobs = knobs
        self._lock = threading.Lock()
        self._counters: dict[str, int] = {}
        self._rng = random.Random(knobs.seed)

    @property
    def knobs(self) -> Knobs:
        """The current knobs (an immutable snapshot: read it once per decision)."""
        return self._knobs

    def update(self, changes: dict[str, Any]) -> Knobs:
        """Apply runtime changes; restarts the counters of every `*_every_n` and `*_first_n` knob that was set."""
        with self._lock:
            self._knobs = self._knobs.updated(changes)
            for name in changes:
                if name.endswith("_every_n"):
                    self._counters.pop(name.removesuffix("_every_n"), None)
                if name.endswith("_first_n"):
                    self._counters.pop(name, None)
            if "seed" in changes:
                self._rng = random.Random(self._knobs.seed)
            return self._knobs

    def reset(self, *, restore_knobs: bool = True) -> None:
        """Clear counters and reseed; by default also go back to the knobs given at startup."""
        with self._lock:
            if restore_knobs:
                self._knobs = self._initial
            self._counters.clear()
            self._rng = random.Random(self._knobs.seed)

    def hit(self, fault: str) -> bool:
        """Whether the fault named `fault` fires for this call (see module docstring)."""
        with self._lock:
            every_n = int(getattr(self._knobs, f"{fault}_every_n"))
            first_n = int(getattr(self._knobs, f"{fault}_first_n", 0))
            probability = float(getattr(self._knobs, f"{fault}_probability"))
            fired = False
            if first_n > 0:
                seen = self._counters.get(f"{fault}_first_n", 0) + 1
                self._counters[f"{fault}_first_n"] = seen
                fired = seen <= first_n
            if every_n > 0:
                count = self._counters.get(fault, 0) + 1
                self._counters[fault] = count
                fired = fired or count % every_n == 0
            if not fired and probability > 0:
                fired = self._rng.random() < probability
            return fired
