"""Models kept warm between requests, and the jobs running on them.

- A model stays resident after its cold start until it has been idle for ``keep_alive_s``
  (scale to zero) or until room is needed: before a cold start, the least recently used idle
  models are evicted until the new one fits the memory budget.
- Every running job has a ``JobScope``; cancelling it (a cancel request, or its deadline)
  makes the job stop soon: resident models carry a pre-hook on at most ``CHECKPOINTS`` units,
  evenly spread from the first to the last, that checks the scope of the job running on the
  current thread; the job checks once more after its forward pass. (A hook on
  every unit cost bert-base ~0.9 ms of a 37 ms forward pass: each hooked module leaves
  torch's fast call path.)
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from cicada_loader.engine.arch import Architecture, InputLimits
from cicada_loader.engine.skeleton import unit_modules
from cicada_shared.errors import CicadaError, InsufficientMemory

_current = threading.local()

#: units of a resident model that check for cancellation on the way in
CHECKPOINTS = 16


class JobScope:
    """Cancellation of one running job, from any thread."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.error: CicadaError | None = None
        self._callbacks: list[Callable[[CicadaError], None]] = []
        self._lock = threading.Lock()

    def on_cancel(self, callback: Callable[[CicadaError], None]) -> None:
        with self._lock:
            self._callbacks.append(callback)
            fired = self.error
        if fired is not None:
            callback(fired)

    def cancel(self, error: CicadaError) -> None:
        with self._lock:
            if self.error is not None:
                return
            self.error = error
            callbacks = list(self._callbacks)
        for callback in callbacks:
            callback(error)

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def __enter__(self) -> JobScope:
        _current.scope = self
        return self

    def __exit__(self, *exc: object) -> None:
        _current.scope = None


def spread(n: int, k: int = CHECKPOINTS) -> list[int]:
    """At most ``k`` of the indices ``0 … n-1``, evenly spaced, the first and the last among
    them."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def _check_scope(_module: nn.Module, _args: Any) -> None:
    scope: JobScope | None = getattr(_current, "scope", None)
    if scope is not None:
        scope.check()


@dataclass(eq=False)
class Resident:
    """A model loaded and ready for the next request."""

    name: str
    uri: str
    model: nn.Module
    nbytes: int
    last_used: float = field(default_factory=time.time)
    in_use: int = 0
    hooks: list[Any] = field(default_factory=list)
    #: how it was built, and its embedding tables' sizes (to check a request's inputs);
    #: None in tests that build by hand
    arch: Architecture | None = None
    limits: InputLimits | None = None

    def __post_init__(self) -> None:
        units = [m for _, m in unit_modules(self.model)]
        self.hooks = [units[i].register_forward_pre_hook(_check_scope) for i in spread(len(units))]


class Residency:
    """The resident models of one loader, within a memory budget and a keep-alive."""

    def __init__(self, *, budget_bytes: int, keep_alive_s: float) -> None:
        self.budget_bytes = budget_bytes
        self.keep_alive_s = keep_alive_s
        self.models: dict[str, Resident] = {}

    @property
    def used_bytes(self) -> int:
        return sum(r.nbytes for r in self.models.values())

    def get(self, name: str) -> Resident | None:
        return self.models.get(name)

    def add(self, resident: Resident) -> None:
        self.models[resident.name] = resident

    def make_room(self, nbytes: int) -> list[str]:
        """Evict idle models, least recently used first, until ``nbytes`` more fit."""
        if nbytes > self.budget_bytes:
            raise InsufficientMemory(
                f"the model needs {nbytes} bytes; this loader's whole budget is {self.budget_bytes}"
            )
        evicted = []
        for resident in sorted(self.models.values(), key=lambda r: r.last_used):
            if self.used_bytes + nbytes <= self.budget_bytes:
                break
            if resident.in_use == 0:
                self.drop(resident.name)
                evicted.append(resident.name)
        return evicted

    def expire(self, now: float | None = None) -> list[str]:
        """Unload the models idle for longer than the keep-alive (scale to zero)."""
        now = time.time() if now is None else now
        idle = [
            r.name
            for r in self.models.values()
            if r.in_use == 0 and now - r.last_used > self.keep_alive_s
        ]
        for name in idle:
            self.drop(name)
        return idle

    def retire(self, name: str) -> bool:
        """Unload ``name`` now, or, while a job still runs on it, take it out of service: no
        new job finds it, and it goes with that job's last reference."""
        resident = self.models.get(name)
        if resident is None:
            return False
        if resident.in_use == 0:
            return self.drop(name)
        del self.models[name]
        return True

    def drop(self, name: str) -> bool:
        resident = self.models.pop(name, None)
        if resident is None:
            return False
        for hook in resident.hooks:
            hook.remove()
        del resident
        gc.collect()  # the mapped weights go with the last reference
        return True
