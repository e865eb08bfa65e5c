"""The scheduler's view of the mesh, and its decisions — pure logic, no I/O.

- Jobs wait in ``pending`` until a loader has a free slot; the most urgent (highest priority,
  then oldest) goes first.
- Placement: a loader with the model resident; else one on a node whose cache holds the
  model; else the least loaded.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from cicada_shared.contracts import (
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
    def __init__(self, *, loader_timeout_s: float = 5.0, keep_finished: int = 10_000) -> None:
        self.models: dict[str, ModelRecord] = {}
        self.jobs: OrderedDict[str, JobRecord] = OrderedDict()
        self.loaders: dict[str, LoaderRecord] = {}
        self.node_cache: dict[str, set[str]] = {}  # node → models fetched there
        self.loader_timeout_s = loader_timeout_s
        self.keep_finished = keep_finished
        self._pending: list[tuple[int, int, str]] = []  # (-priority, seq, job id)
        self._seq = itertools.count()

    # -- jobs ------------------------------------------------------------------------------

    def accept(self, record: JobRecord) -> None:
        self.jobs[record.job.job_id] = record
        heapq.heappush(self._pending, (-record.job.priority, next(self._seq), record.job.job_id))

    def pending(self) -> list[JobRecord]:
        return [
            self.jobs[i]
            for _, _, i in sorted(self._pending)
            if i in self.jobs and self.jobs[i].state == "queued"
        ]

    def finish(self, result: JobResult) -> JobRecord | None:
        record = self.jobs.get(result.job_id)
        if record is None:
            return None
        record.state, record.result, record.finished_at = result.state, result, time.time()
        loader = self.loaders.get(record.loader_id or "")
        if loader is not None:
            loader.running.discard(result.job_id)
            loader.loading.discard(record.job.model)
            if result.state == "succeeded" and record.job.model not in loader.status.resident:
                loader.status = loader.status.model_copy(
                    update={"resident": [*loader.status.resident, record.job.model]}
                )
        self._forget_old()
        return record

    def remember_failed(
        self, result: JobResult, *, job: InferJob | None = None, reply_to: str | None = None
    ) -> None:
        """Record a job that ended without reaching a loader (refused, or undecodable)."""
        record = self.jobs.get(result.job_id)
        if record is None:
            job = job or InferJob(
                job_id=result.job_id, model=result.model, inputs=[], submitted_at=time.time()
            )
            record = self.jobs[result.job_id] = JobRecord(job, reply_to)
        record.state, record.result, record.finished_at = result.state, result, time.time()
        self._forget_old()

    def requeue(self, record: JobRecord, loader: LoaderRecord) -> None:
        """A dispatch failed (the loader is gone): the job waits again, the loader is dropped."""
        self.loaders.pop(loader.status.loader_id, None)
        record.state, record.loader_id, record.dispatched_at = "queued", None, None
        heapq.heappush(self._pending, (-record.job.priority, next(self._seq), record.job.job_id))

    def _forget_old(self) -> None:
        finished = [i for i, r in self.jobs.items() if r.finished_at is not None]
        for job_id in finished[: max(0, len(finished) - self.keep_finished)]:
            del self.jobs[job_id]

    # -- loaders ---------------------------------------------------------------------------

    def heartbeat(self, status: LoaderStatus) -> bool:
        """Record a loader's status; True when the loader is new to us."""
        record = self.loaders.get(status.loader_id)
        if record is None:
            self.loaders[status.loader_id] = LoaderRecord(status)
            return True
        record.status, record.seen = status, time.monotonic()
        return False

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

    def resident_on(self, model: str) -> list[str]:
        return sorted(i for i, r in self.loaders.items() if model in r.status.resident)

    # -- placement -------------------------------------------------------------------------

    def place(self) -> list[Placement]:
        """Pop every pending job that a loader can take now, most urgent first."""
        placements: list[Placement] = []
        while self._pending:
            _, _, job_id = self._pending[0]
            record = self.jobs.get(job_id)
            if record is None or record.state != "queued":
                heapq.heappop(self._pending)
                continue
            choice = self._choose(record.job.model)
            if choice is None:
                break  # no free slot anywhere: the most urgent job waits, and so do the rest
            heapq.heappop(self._pending)
            loader, cold = choice
            loader.running.add(job_id)
            if cold:
                loader.loading.add(record.job.model)
                self.node_cache.setdefault(loader.status.node, set()).add(record.job.model)
            record.state, record.loader_id = (
                "fetching" if cold else "running",
                loader.status.loader_id,
            )
            record.dispatched_at = time.time()
            placements.append(Placement(record, loader, cold))
        return placements

    def _choose(self, model: str) -> tuple[LoaderRecord, bool] | None:
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
