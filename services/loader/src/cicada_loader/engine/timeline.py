"""The timeline of one cold start, and the figures derived from it.

Every unit (a module that owns checkpoint tensors) gets four intervals, each
``[start, end]`` in seconds after the request arrived (t0):

- ``construct``: its skeleton was built (or default-initialised, for the baselines);
- ``fetch``: the first byte of a piece holding its tensors was requested … the last landed;
- ``apply``: its tensors were attached (views) or copied;
- ``exec``: its forward ran (after any wait for its weights).

Derived figures (see docs/architecture.md for the reasoning):

- ``e2e_s``: t0 until the result is ready.
- ``ttfl_s``: t0 until the first unit finished executing.
- ``exec_busy_s``: the forward pass's wall time minus the time the executor spent waiting for
  weights at a gate.
- ``fetch_busy_s``: the length of the union of all piece intervals (something was in flight).
- ``utilization``: ``max(exec_busy_s, fetch_busy_s) / e2e_s`` — the share of the span in
  which the pipeline's bottleneck stage was working. 1.0 means the cold start took exactly as
  long as its busiest resource needed; a stage idling while the other waits lowers it.
- ``executor_utilization``: ``exec_busy_s / e2e_s``, the executor's own share.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

STAGES = ("construct", "fetch", "apply", "exec")


@dataclass(slots=True)
class UnitTimes:
    """Absolute ``perf_counter`` intervals of one unit, widened as events arrive."""

    name: str
    spans: dict[str, list[float]] = field(default_factory=dict)
    wait_s: float = 0.0

    def widen(self, stage: str, start: float, end: float) -> None:
        span = self.spans.get(stage)
        if span is None:
            self.spans[stage] = [start, end]
        else:
            span[0], span[1] = min(span[0], start), max(span[1], end)


class Timeline:
    """Collects events from every thread of a cold start; ``summary()`` derives the figures."""

    def __init__(self, *, variant: str, model: str, device: str) -> None:
        self.t0 = time.perf_counter()
        self.variant = variant
        self.model = model
        self.device = device
        self.nbytes = 0
        self.units: dict[str, UnitTimes] = {}
        self.phases: dict[str, list[float]] = {}
        self.pieces: list[tuple[float, float, int]] = []
        self.result_at: float | None = None
        self.loaded_at: float | None = None
        self._lock = threading.Lock()

    def unit(self, name: str) -> UnitTimes:
        with self._lock:
            if name not in self.units:
                self.units[name] = UnitTimes(name)
            return self.units[name]

    def phase(self, name: str, start: float, end: float) -> None:
        with self._lock:
            self.phases[name] = [start, end]

    def piece(self, started: float, landed: float, nbytes: int) -> None:
        with self._lock:
            self.pieces.append((started, landed, nbytes))

    # -- derived figures -----------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        end = self.result_at if self.result_at is not None else time.perf_counter()
        e2e = end - self.t0
        execs = [u.spans["exec"] for u in self.units.values() if "exec" in u.spans]
        forward = self.phases.get("forward")
        stall = sum(u.wait_s for u in self.units.values())
        exec_busy = max(0.0, (forward[1] - forward[0]) - stall) if forward else 0.0
        fetch_busy = _union([(s, e) for s, e, _ in self.pieces])
        return {
            "e2e_s": e2e,
            "ttfl_s": (min(e for _, e in execs) - self.t0) if execs else e2e,
            "loaded_s": (self.loaded_at - self.t0) if self.loaded_at else None,
            "exec_busy_s": exec_busy,
            "fetch_busy_s": fetch_busy,
            "stall_s": stall,
            "utilization": max(exec_busy, fetch_busy) / e2e if e2e > 0 else 0.0,
            "executor_utilization": exec_busy / e2e if e2e > 0 else 0.0,
            "bytes": self.nbytes,
        }

    def to_json(self) -> dict[str, Any]:
        """Everything, relative to t0, ready for ``json.dumps``."""

        def rel(span: list[float]) -> list[float]:
            return [round(span[0] - self.t0, 6), round(span[1] - self.t0, 6)]

        return {
            "model": self.model,
            "variant": self.variant,
            "device": self.device,
            "summary": self.summary(),
            "phases": {k: rel(v) for k, v in self.phases.items()},
            "units": [
                {
                    "name": u.name,
                    "wait_s": round(u.wait_s, 6),
                    **{s: rel(u.spans[s]) for s in STAGES if s in u.spans},
                }
                for u in self.units.values()
            ],
            "pieces": [[*rel([s, e]), n] for s, e, n in sorted(self.pieces)],
        }


def _union(spans: list[tuple[float, float]]) -> float:
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(spans):
        if cur_end is None or start > cur_end:
            if cur_end is not None and cur_start is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None and cur_start is not None:
        total += cur_end - cur_start
    return total
