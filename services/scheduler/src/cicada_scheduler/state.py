"""The scheduler's view of the mesh, and its decisions — pure logic, no I/O.

- Jobs wait here until a loader has a free slot; then the most urgent goes first: highest
  *effective* priority, then oldest. Aging: a job below 9 gains one level for every
  ``aging_s`` seconds it has waited, up to 8 — so urgent (9) work always goes first, and
  nothing else waits forever behind a stream of higher-priority work. With priorities off,
  jobs go strictly in arrival order (the benchmark's FIFO baseline).
- Placement: a loader with the model resident; else one on a node whose cache holds the
  model; else the least loaded.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from cicada_shared.contracts import (
    PRIORITY_MAX,
    ErrorInfo,
    InferJob,
    JobResult,
    JobState,
    LoaderStatus,
    ModelState,
    TensorSpec,
)


@dataclass(eq=False)
class ModelRecord:
    name: str
    uri: str
    state: ModelState = "preparing"
    nbytes: int = 0
    model_type: str | None = None
    order: list[list[str]] = field(default_factory=list)
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    error: ErrorInfo | None = None
    registered_at: float = field(default_factory=time.time)

    def to_json(self, *, resident_on: list[str]) -> dict[str, object]:
        return {
            "name": self.name,
            "uri": self.uri,
            "state": self.state,
            "bytes": self.nbytes,
            "model_type": self.model_type,
            "resident_on": resident_on,
            "inputs": [s.model_dump() for s in self.inputs],
            "outputs": [s.model_dump() for s in self.outputs],
            "error": self.error.model_dump() if self.error else None,
        }


@dataclass(eq=False)
class JobRecord:
    job: InferJob
    reply_to: str | None
    state: JobState = "queued"
    accepted_at: float = field(default_factory=time.time)
    dispatched_at: float | None = None
    finished_at: float | None = None
    loader_id: str | None = None
    result: JobResult | None = None
    #: settles the job's broker message (ack) once the job has left the scheduler
    settle: object = None
    #: arrival order, for FIFO among equals
    seq: int = 0

    def to_json(self) -> dict[str, object]:
        r = self.result
        return {
            "id": self.job.job_id,
            "model": self.job.model,
            "state": self.state,
            "priority": self.job.priority,
            "loader": self.loader_id,
            "accepted_at": self.accepted_at,
            "dispatched_at": self.dispatched_at,
            "finished_at": self.finished_at,
            "cold_start": r.cold if r else None,
            "timeline": r.timeline if r else {},
            "queue_s": r.queue_s if r else None,
            "compute_s": r.compute_s if r else None,
            "error": r.error.model_dump() if r and r.error else None,
        }


@dataclass(eq=False)
class LoaderRecord:
    status: LoaderStatus
    seen: float = field(default_factory=time.monotonic)
    running: set[str] = field(default_factory=set)  # job ids we dispatched to it
    #: job ids among ``running`` that its reports have left out, and since when
    unreported: dict[str, float] = field(default_factory=dict)
    loading: set[str] = field(default_factory=set)  # models it is cold-starting for us

    @property
    def free(self) -> int:
        return self.status.slots - len(self.running)

    def holds(self, model: str) -> bool:
        return model in self.status.resident and model not in self.loading


@dataclass(frozen=True, slots=True)
class Placement:
    job: JobRecord
    loader: LoaderRecord
    cold: bool


class State:
    def __init__(
        self,
        *,
        loader_timeout_s: float = 5.0,
        keep_finished: int = 10_000,
        priorities: bool = True,
        aging_s: float = 5.0,
    ) -> None:
        self.priorities = priorities
        self.aging_s = aging_s
        self.loader_timeout_s = loader_timeout_s
        self.keep_finished = keep_finished
        self.models: dict[str, ModelRecord] = {}
        self.jobs: OrderedDict[str, JobRecord] = OrderedDict()
        self.loaders: dict[str, LoaderRecord] = {}
        self.node_cache: dict[str, set[str]] = {}  # node → models fetched there
        self._pending: set[str] = set()
        self._seq = itertools.count()
        self._finished: deque[str] = deque()  # finished job ids, oldest first
        self.forgotten: list[str] = []  # dropped from memory, still to drop from the store

    # -- jobs ------------------------------------------------------------------------------

    def accept(self, record: JobRecord) -> None:
        record.seq = next(self._seq)
        record.state = "queued"
        self.jobs[record.job.job_id] = record
        self._pending.add(record.job.job_id)

    def effective_priority(self, record: JobRecord, now: float) -> int:
        if not self.priorities:
            return 0
        priority = record.job.priority
        if priority >= PRIORITY_MAX:
            return priority
        aged = priority + int((now - record.accepted_at) // self.aging_s)
        return min(PRIORITY_MAX - 1, aged)

    def pending(self) -> list[JobRecord]:
        """Waiting jobs, most urgent first."""
        now = time.time()
        waiting = []
        for job_id in list(self._pending):
            record = self.jobs.get(job_id)
            if record is None or record.state != "queued":
                self._pending.discard(job_id)
            else:
                waiting.append(record)
        return sorted(waiting, key=lambda r: (-self.effective_priority(r, now), r.seq))

    def finish(self, result: JobResult) -> JobRecord | None:
        record = self.jobs.get(result.job_id)
        if record is None:
            return None
        self._pending.discard(result.job_id)
        self._mark_finished(record, result)
        loader = self.loaders.get(record.loader_id or "")
        if loader is not None:
            loader.running.discard(result.job_id)
            loader.loading.discard(record.job.model)
            if result.state == "succeeded" and record.job.model not in loader.status.resident:
                resident = [*loader.status.resident, record.job.model]
                loader.status = loader.status.model_copy(update={"resident": resident})
        self._forget_old()
        return record

    def remember_failed(
        self, result: JobResult, *, job: InferJob | None = None, reply_to: str | None = None
    ) -> JobRecord:
        """Record a job that ended without reaching a loader (refused, or undecodable)."""
        record = self.jobs.get(result.job_id)
        if record is None:
            job = job or InferJob(
                job_id=result.job_id, model=result.model, inputs=[], submitted_at=time.time()
            )
            record = self.jobs[result.job_id] = JobRecord(job, reply_to)
        self._mark_finished(record, result)
        self._forget_old()
        return record

    def requeue(self, record: JobRecord, loader: LoaderRecord) -> None:
        """A dispatch failed (the loader is gone): the job waits again, the loader is dropped."""
        self.loaders.pop(loader.status.loader_id, None)
        record.state, record.loader_id, record.dispatched_at = "queued", None, None
        self._pending.add(record.job.job_id)

    def restore(self, record: JobRecord) -> None:
        """A job known from before a restart. Waiting ones come back from the broker; those
        a loader was running wait for its result (or for it to be declared lost)."""
        record.seq = next(self._seq)
        self.jobs[record.job.job_id] = record
        if record.finished_at is not None:
            self._finished.append(record.job.job_id)
        if record.finished_at is None and record.loader_id and record.state != "queued":
            loader = self.loaders.get(record.loader_id)
            if loader is None:  # unknown until it reports; lost if it never does
                status = LoaderStatus(
                    loader_id=record.loader_id,
                    node="?",
                    resident=[],
                    slots=0,
                    busy=0,
                    at=time.time(),
                )
                loader = self.loaders[record.loader_id] = LoaderRecord(status)
            loader.running.add(record.job.job_id)

    def _mark_finished(self, record: JobRecord, result: JobResult) -> None:
        if record.finished_at is None:
            self._finished.append(record.job.job_id)
        record.state, record.result, record.finished_at = result.state, result, time.time()

    def _forget_old(self) -> None:
        """Keep the ``keep_finished`` most recently finished jobs."""
        while len(self._finished) > self.keep_finished:
            job_id = self._finished.popleft()
            self.jobs.pop(job_id, None)
            self.forgotten.append(job_id)

    # -- loaders ---------------------------------------------------------------------------

    def heartbeat(self, status: LoaderStatus) -> bool:
        """Record a loader's status; True when the loader is new to us."""
        record = self.loaders.get(status.loader_id)
        if record is None:
            self.loaders[status.loader_id] = LoaderRecord(status)
            return True
        new = record.status.node == "?"
        record.status, record.seen = status, time.monotonic()
        if status.running is not None:
            now, said = time.monotonic(), set(status.running)
            record.unreported = {
                j: record.unreported.get(j, now) for j in record.running if j not in said
            }
        return new

    def vanished(self, loader_id: str, *, now: float | None = None) -> list[JobRecord]:
        """Jobs placed on ``loader_id`` that its reports have left out for the loader timeout:
        it lost them (its connection dropped mid-job, or it restarted under the same id)."""
        record = self.loaders.get(loader_id)
        if record is None:
            return []
        now = time.monotonic() if now is None else now
        gone = [j for j, since in record.unreported.items() if now - since >= self.loader_timeout_s]
        return [self.jobs[j] for j in gone if j in self.jobs and self.jobs[j].finished_at is None]

    def alive(self) -> list[LoaderRecord]:
        now = time.monotonic()
        return [
            r
            for r in self.loaders.values()
            if now - r.seen < self.loader_timeout_s and not r.status.stopping
        ]

    def expire(self) -> list[LoaderRecord]:
        """Forget loaders that stopped reporting; returns them."""
        now = time.monotonic()
        gone = [
            r
            for r in self.loaders.values()
            if now - r.seen >= self.loader_timeout_s or r.status.stopping
        ]
        for r in gone:
            del self.loaders[r.status.loader_id]
        return gone

    def forget_cached(self, model: str) -> list[str]:
        """Nodes whose cache may hold ``model``: where we fetched it, and (we may have
        restarted since) every live loader's node. It is forgotten there."""
        nodes = {node for node, models in self.node_cache.items() if model in models}
        nodes |= {r.status.node for r in self.alive() if r.status.node != "?"}
        for models in self.node_cache.values():
            models.discard(model)
        return sorted(nodes)

    def unload(self, model: str) -> list[str]:
        """Forget ``model`` on every loader that holds it (it is being replaced); returns their
        ids, to be told to unload it."""
        holders = self.resident_on(model)
        for loader_id in holders:
            loader = self.loaders[loader_id]
            resident = [m for m in loader.status.resident if m != model]
            loader.status = loader.status.model_copy(update={"resident": resident})
        return holders

    def resident_on(self, model: str) -> list[str]:
        return sorted(i for i, r in self.loaders.items() if model in r.status.resident)

    # -- placement -------------------------------------------------------------------------

    def place(self) -> list[Placement]:
        """Take the most urgent waiting jobs that loaders can start now."""
        placements: list[Placement] = []
        if not any(r.free > 0 for r in self.alive()):
            return placements  # the usual case under load: no need to sort the backlog
        for record in self.pending():
            model = self.models.get(record.job.model)
            if model is not None and model.state == "preparing":
                continue  # no execution order yet, and a loader is busy finding it: wait
            choice = self._choose(record.job.model)
            if choice is None:
                break  # no free slot anywhere: the most urgent job waits, and so do the rest
            self._pending.discard(record.job.job_id)
            loader, cold = choice
            loader.running.add(record.job.job_id)
            if cold:
                loader.loading.add(record.job.model)
                self.node_cache.setdefault(loader.status.node, set()).add(record.job.model)
            record.state = "fetching" if cold else "running"
            record.loader_id = loader.status.loader_id
            record.dispatched_at = time.time()
            placements.append(Placement(record, loader, cold))
        return placements

    def _choose(self, model: str) -> tuple[LoaderRecord, bool] | None:
        """Placement: a loader with the model resident; else one on a node whose cache holds
        it; else the least loaded. None when no loader has a free slot."""
        free = [r for r in self.alive() if r.free > 0]
        if not free:
            return None
        warm = [r for r in free if r.holds(model)]
        if warm:
            return min(warm, key=lambda r: len(r.running)), False
        cached = [r for r in free if model in self.node_cache.get(r.status.node, ())]
        pool = cached or free
        return min(
            pool, key=lambda r: (len(r.running), len(r.status.resident), r.status.loader_id)
        ), True
