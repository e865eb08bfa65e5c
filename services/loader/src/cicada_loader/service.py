"""The loader service: runs jobs, cold-starting models through the engine, keeping them warm.

Queues (all its own, removed with it):

- ``<ns>.loader.<id>``: ``RunJob``, prefetch = slots; a job is acked when its result is out.
- ``<ns>.loader.<id>.control``: ``PrepareModel``, ``CancelJob``.
- ``<ns>.loader.<id>.events``: the weights service's announcements for our cold starts.

Torch work runs in threads, so heartbeats (``LoaderStatus``, every ``loader_heartbeat_s``)
keep flowing while a model loads.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import structlog
import torch
from aio_pika.abc import AbstractIncomingMessage
from pydantic import Field

from cicada_loader.engine.arch import TEXT_COMPANIONS, flatten_outputs, input_limits, resolve
from cicada_loader.engine.describe import describe
from cicada_loader.engine.order import OrderBook
from cicada_loader.engine.pipeline import VARIANTS, PipelinedColdStart
from cicada_loader.remote import Announcements, RemoteFetch
from cicada_loader.residency import JobScope, Residency, Resident
from cicada_loader.tensors import DATATYPE_OF, from_torch, to_torch
from cicada_shared.bus import Bus, UnexpectedMessage
from cicada_shared.contracts import (
    CancelJob,
    ErrorInfo,
    FetchCancel,
    FetchFailedNotice,
    FetchFinished,
    FetchRequest,
    JobProgress,
    JobResult,
    JobState,
    LoaderStatus,
    ManifestAnnounced,
    Message,
    ModelPrepared,
    PieceAnnounced,
    PrepareModel,
    RunJob,
    TensorSpec,
    UnloadModel,
    check_payload,
)
from cicada_shared.errors import (
    CicadaError,
    DeadlineExceeded,
    InvalidInput,
    LoadCancelled,
)
from cicada_shared.service import InFlight
from cicada_shared.settings import MeshSettings
from cicada_weights.checkpoint import read_checkpoint
from cicada_weights.origins import open_origin

log = structlog.get_logger("cicada.loader")


def _loader_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class LoaderSettings(MeshSettings):
    loader_id: str = Field(default_factory=_loader_id, description="Unique name of this loader.")
    loader_slots: int = Field(1, description="Jobs run at once.")
    loader_heartbeat_s: float = Field(1.0, description="Seconds between status reports.")
    loader_device: str = Field("cpu", description="cpu or cuda[:n].")
    loader_timeout_s: float = Field(600.0, description="Longest a cold start may wait.")
    loader_keep_alive_s: float = Field(
        300.0, description="A model idle this long is unloaded (scale to zero)."
    )
    loader_memory_bytes: int = Field(
        0, description="Budget for resident models; 0: 60 % of this machine's memory."
    )
    loader_health_file: Path | None = Field(
        None, description="Touched at every heartbeat, for a container healthcheck."
    )
    loader_switch_interval_s: float = Field(
        0.0005, description="Python's GIL switch interval: fetch threads get it back quickly."
    )


class LoaderService:
    def __init__(self, settings: LoaderSettings) -> None:
        self.settings = settings
        self.id = settings.loader_id
        self.names = settings.names
        self.bus = Bus.for_settings(settings, client=f"loader {self.id}")
        self.orders = OrderBook(settings.cache_dir / "orders")
        self.announcements = Announcements()
        budget = settings.loader_memory_bytes or int(psutil.virtual_memory().total * 0.6)
        self.residency = Residency(budget_bytes=budget, keep_alive_s=settings.loader_keep_alive_s)
        self.scopes: dict[str, JobScope] = {}
        self.cancelled_early: set[str] = set()
        self.busy = 0
        self.inflight = InFlight()
        self.device = torch.device(settings.loader_device)
        # forward passes stay on the same threads: spread over the default executor's they
        # were ~30 % slower here (bert-base, 8 tokens: 45.7 against 35.5 ms)
        self.compute = ThreadPoolExecutor(settings.loader_slots, thread_name_prefix="compute")
        self._heartbeat: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._stopping = False

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        sys.setswitchinterval(self.settings.loader_switch_interval_s)
        await self.bus.connect()
        topo = self.bus.topology
        jobs = await topo.queue(
            await self.bus.open_channel(prefetch=self.settings.loader_slots),
            self.names.loader_queue(self.id),
            exclusive=True,
            priority=True,
        )
        control = await topo.queue(
            await self.bus.open_channel(prefetch=4),
            self.names.loader_control(self.id),
            exclusive=True,
        )
        events = await topo.queue(
            await self.bus.open_channel(prefetch=1000),
            self.names.loader_events(self.id),
            exclusive=True,
        )
        await self.bus.consume(events, self.on_announcement)
        await self.bus.consume(control, self.on_control)
        await self.bus.consume(jobs, self.on_job)
        self._heartbeat = asyncio.create_task(self._beat())

    async def stop(self) -> None:
        self._stopping = True
        await self.bus.stop_consuming()
        if not await self.inflight.drain(self.settings.drain_s):
            log.warning("drain_timeout", running=self.inflight.count)
            for scope in list(self.scopes.values()):
                scope.cancel(LoadCancelled("the loader is stopping"))
            await self.inflight.drain(self.settings.drain_s)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        with contextlib.suppress(Exception):
            await self._status()
        await self.bus.close()
        self.compute.shutdown(wait=False, cancel_futures=True)

    async def _beat(self) -> None:
        """Heartbeat; also scales idle models to zero."""
        while True:
            for name in self.residency.expire():
                log.info("model_unloaded", model=name, reason="keep-alive expired")
            with contextlib.suppress(Exception):
                await self._status()
                if self.settings.loader_health_file is not None:
                    self.settings.loader_health_file.touch()
            await asyncio.sleep(self.settings.loader_heartbeat_s)

    async def _status(self) -> None:
        status = LoaderStatus(
            loader_id=self.id,
            node=self.settings.node,
            resident=sorted(self.residency.models),
            slots=self.settings.loader_slots,
            busy=self.busy,
            at=time.time(),
            stopping=self._stopping,
            memory_bytes=self.residency.used_bytes,
            memory_budget_bytes=self.residency.budget_bytes,
            running=sorted(self.scopes),
        )
        await self.bus.publish(status, self.names.scheduler_inbox)

    # -- handlers ------------------------------------------------------------------------

    async def on_announcement(self, message: Message, _: AbstractIncomingMessage) -> None:
        if isinstance(
            message, ManifestAnnounced | PieceAnnounced | FetchFinished | FetchFailedNotice
        ):
            self.announcements.deliver(message)
        else:
            raise UnexpectedMessage(message)

    async def on_control(self, message: Message, incoming: AbstractIncomingMessage) -> None:
        if isinstance(message, PrepareModel):
            await self.bus.publish(await self.prepare(message), self.names.scheduler_inbox)
        elif isinstance(message, CancelJob):
            scope = self.scopes.get(message.job_id)
            if scope is not None:
                scope.cancel(LoadCancelled(f"job {message.job_id} cancelled"))
            else:
                self.cancelled_early.add(message.job_id)
        elif isinstance(message, UnloadModel):
            if self.residency.retire(message.model):
                log.info("model_unloaded", model=message.model, reason="unregistered")
                await self._status()
        else:
            raise UnexpectedMessage(message)

    async def on_job(self, message: Message, _: AbstractIncomingMessage) -> None:
        if not isinstance(message, RunJob):
            raise UnexpectedMessage(message)
        async with self.inflight.track():
            self.busy += 1
            try:
                result = await self.run(message)
            finally:
                self.busy -= 1
            try:
                await self._deliver(message, result)
            except Exception as exc:  # the job must not stay running: its failure goes instead
                log.exception("result_unsent", job_id=result.job_id)
                error = ErrorInfo(kind=ErrorInfo.of(exc).kind, message=f"result not sent: {exc}")
                failed = result.model_copy(
                    update={"state": "failed", "outputs": [], "error": error}
                )
                await self._deliver(message, failed)

    async def _deliver(self, message: RunJob, result: JobResult) -> None:
        # one channel writes these in this order (its publish lock is FIFO); the confirms
        # come back together. After a cold start (which may have evicted) or a failure,
        # the status and then the scheduler's copy go first, so that a client's next
        # request finds the model resident. After a warm job the client's copy goes
        # first (a broker hop sooner): the scheduler already knows the model is
        # resident, and its copy, written right after, reaches it about a millisecond
        # later, well before the client's next request can (docs/architecture.md).
        to_scheduler = self.bus.publish(result, self.names.scheduler_inbox)
        replies = (
            [self.bus.send_to(message.reply_to, result, correlation_id=result.job_id)]
            if message.reply_to
            else []
        )
        if not result.cold and result.state == "succeeded":
            await asyncio.gather(*replies, to_scheduler)
        else:
            await asyncio.gather(self._status(), to_scheduler, *replies)

    # -- work ----------------------------------------------------------------------------

    async def run(self, request: RunJob) -> JobResult:
        job = request.job
        started = time.time()
        bound = log.bind(job_id=job.job_id, model=job.model)
        base: dict[str, Any] = {
            "job_id": job.job_id,
            "model": job.model,
            "loader_id": self.id,
            "queue_s": max(0.0, started - job.submitted_at),
        }
        scope = self.scopes[job.job_id] = JobScope(job.job_id)
        timer = None
        if job.job_id in self.cancelled_early:
            self.cancelled_early.discard(job.job_id)
            scope.cancel(LoadCancelled(f"job {job.job_id} cancelled"))
        if job.deadline_s is not None:
            timer = asyncio.get_running_loop().call_later(
                max(0.0, job.deadline_s - time.time()),
                scope.cancel,
                DeadlineExceeded(f"job {job.job_id} passed its deadline"),
            )
        try:
            scope.check()
            inputs = {t.name: to_torch(t) for t in job.inputs}
            resident = self.residency.get(job.model)
            if resident is not None and resident.uri != request.uri:
                self.residency.retire(job.model)  # the name now means another checkpoint
                log.info("model_unloaded", model=job.model, reason="re-registered")
                resident = None
            cold = resident is None
            if resident is None:
                self._progress(job.job_id, "loading")
                resident, outputs, timeline = await self._cold(request, inputs, scope)
                compute_s = timeline.get("exec_busy_s")
            else:  # the scheduler marked it running when it sent it here
                resident.in_use += 1  # here, so that no unload can slip in before the thread
                resident.last_used = time.time()
                try:
                    outputs, compute_s = await asyncio.get_running_loop().run_in_executor(
                        self.compute, self._warm, resident, inputs, scope
                    )
                finally:
                    resident.in_use -= 1
                    resident.last_used = time.time()
                timeline = {}
            wire = [from_torch(k, v) for k, v in select(outputs, job.outputs).items()]
            advice = "; ask for fewer outputs or a smaller batch"
            check_payload(wire, self.settings.payload_limit, "outputs", advice)
            result = JobResult(
                state="succeeded",
                cold=cold,
                timeline=timeline,
                outputs=wire,
                compute_s=compute_s,
                **base,
            )
        except LoadCancelled as exc:
            bound.info("job_cancelled", reason=str(exc))
            return JobResult(state="cancelled", error=ErrorInfo.of(exc), **base)
        except Exception as exc:
            error = (
                ErrorInfo.of(exc)
                if isinstance(exc, CicadaError)
                else ErrorInfo(kind="InvalidInput", message=f"{type(exc).__name__}: {exc}")
            )
            bound.warning("job_failed", error=error.message, kind=error.kind)
            return JobResult(state="failed", error=error, **base)
        finally:
            self.scopes.pop(job.job_id, None)
            if timer is not None:
                timer.cancel()
        bound.info(
            "job_done",
            cold=result.cold,
            seconds=round(time.time() - started, 4),
            **{k: round(v, 4) for k, v in timeline.items() if isinstance(v, float)},
        )
        return result

    async def _cold(
        self, request: RunJob, inputs: dict[str, torch.Tensor], scope: JobScope
    ) -> tuple[Resident, dict[str, torch.Tensor], dict[str, Any]]:
        loop = asyncio.get_running_loop()
        fetch_id = request.fetch_id or await self._fetch_myself(request)

        def cancel() -> None:
            loop.call_soon_threadsafe(
                lambda: asyncio.ensure_future(
                    self.bus.publish(
                        FetchCancel(fetch_id=fetch_id), self.names.weights_queue(self.settings.node)
                    )
                )
            )

        def subscribe(fn: Callable[[], None]) -> None:
            loop.call_soon_threadsafe(fn)

        remote = RemoteFetch(self.announcements, fetch_id, subscribe=subscribe, cancel=cancel)
        run = PipelinedColdStart(
            request.uri,
            inputs,
            VARIANTS["cicada"],
            device=self.device,
            fetcher=remote,
            orders=self.orders,
            timeout_s=self.settings.loader_timeout_s,
            reuse_cache=True,
            priority=request.job.priority,
            before_build=self._make_room,
        )
        scope.on_cancel(run.cancel)
        try:
            result = await loop.run_in_executor(self.compute, run.run)
        finally:
            self.announcements.unsubscribe(fetch_id)
        resident = Resident(
            request.job.model,
            request.uri,
            result.model,
            result.manifest.nbytes,
            arch=result.arch,
            limits=input_limits(result.model),
        )
        self.residency.add(resident)
        return resident, result.outputs, result.timeline.summary()

    async def _fetch_myself(self, request: RunJob) -> str:
        """Placed here as warm, but the model is gone (evicted, or a scheduler that restarted
        knew an older status): start the fetch the scheduler would have started."""
        prepared = await self.prepare(PrepareModel(model=request.job.model, uri=request.uri))
        if prepared.error is not None:
            raise CicadaError(prepared.error.message)
        fetch = FetchRequest(
            fetch_id=uuid.uuid4().hex,
            model=request.job.model,
            uri=request.uri,
            order=prepared.order,
            priority=request.job.priority,
            announce_to=self.names.loader_events(self.id),
        )
        log.info("fetch_started_here", job_id=request.job.job_id, model=request.job.model)
        await self.bus.publish(
            fetch, self.names.weights_queue(self.settings.node), priority=request.job.priority
        )
        return fetch.fetch_id

    def _make_room(self, nbytes: int) -> None:
        """Before a skeleton is built: evict idle models until this one fits."""
        for name in self.residency.make_room(nbytes):
            log.info("model_unloaded", model=name, reason="memory budget")

    def _warm(
        self, resident: Resident, inputs: dict[str, torch.Tensor], scope: JobScope
    ) -> tuple[dict[str, torch.Tensor], float]:
        if resident.arch is not None:
            resident.arch.check_inputs(inputs, resident.limits)
        args = {k: v.to(self.device) for k, v in inputs.items()}
        start = time.perf_counter()
        with scope, torch.inference_mode():
            out = flatten_outputs(resident.model(**args))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        scope.check()  # cancelled after the last checked unit
        return out, time.perf_counter() - start

    def _progress(self, job_id: str, state: JobState) -> None:
        """Tell the scheduler, without making the job wait for the broker's confirm."""

        async def send() -> None:
            with contextlib.suppress(Exception):
                await self.bus.publish(
                    JobProgress(job_id=job_id, state=state, loader_id=self.id),
                    self.names.scheduler_inbox,
                )

        task = asyncio.create_task(send())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def prepare(self, request: PrepareModel) -> ModelPrepared:
        """Execution order and metadata of a model, from its config and headers only."""
        try:
            return await asyncio.to_thread(self._prepare, request)
        except Exception as exc:
            return ModelPrepared(model=request.model, uri=request.uri, error=ErrorInfo.of(exc))

    def _prepare(self, request: PrepareModel) -> ModelPrepared:
        origin = open_origin(request.uri)
        try:
            ckpt = read_checkpoint(origin)
        finally:
            origin.close()
        arch = resolve(ckpt.config)
        keys = [k for h in ckpt.headers.values() for k in h.tensors]
        order = self.orders.checkpoint_order(arch, ckpt.config, keys)
        inputs, outputs = describe(arch)
        accepted = inspect.signature(arch.build_meta().forward).parameters
        extras = [
            (n, inputs[0][1], inputs[0][2])
            for n in TEXT_COMPANIONS
            if n in accepted and arch.main_input == "input_ids"
        ]
        return ModelPrepared(
            model=request.model,
            uri=request.uri,
            order=order,
            inputs=[spec(*s) for s in inputs + extras],
            outputs=[spec(*s) for s in outputs],
        )


def spec(name: str, dtype: torch.dtype, shape: list[int]) -> TensorSpec:
    return TensorSpec(name=name, datatype=DATATYPE_OF[dtype], shape=shape)


def select(outputs: dict[str, torch.Tensor], wanted: list[str] | None) -> dict[str, torch.Tensor]:
    if not wanted:
        return outputs
    unknown = [n for n in wanted if n not in outputs]
    if unknown:
        raise InvalidInput(f"unknown output(s) {unknown}; the model returns {sorted(outputs)}")
    return {n: outputs[n] for n in wanted}
