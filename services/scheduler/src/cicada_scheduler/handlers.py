"""The scheduler's handlers: jobs in, placements out, results and status back, RPC.

On a cold start the fetch request goes to the node's weights service at the same moment
the job goes to the loader, so fetching and building overlap from the first millisecond.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from pathlib import Path
from typing import Any

import structlog
from aio_pika.abc import AbstractIncomingMessage

from cicada_scheduler.state import JobRecord, ModelRecord, Placement, State
from cicada_scheduler.store import Store
from cicada_shared.bus import Bus, UnexpectedMessage, field
from cicada_shared.contracts import (
    CancelJob,
    CancelRequest,
    ErrorInfo,
    FetchRequest,
    GetJob,
    GetModel,
    Health,
    InferJob,
    JobProgress,
    JobResult,
    ListModels,
    LoaderStatus,
    Message,
    ModelPrepared,
    PrepareModel,
    RegisterModel,
    Reply,
    RunJob,
    UnloadModel,
    UnregisterModel,
)
from cicada_shared.errors import CicadaError, MessageTooLarge, OriginError
from cicada_shared.uris import InvalidURI, check_uri
from cicada_weights.checkpoint import read_checkpoint
from cicada_weights.origins import open_origin

log = structlog.get_logger("cicada.scheduler")


class Handlers:
    def __init__(self, bus: Bus, state: State, roots: list[Path], store: Store) -> None:
        self.bus = bus
        self.state = state
        self.store = store
        self.roots = roots
        self.names = bus.names
        self._prepared_at: dict[str, float] = {}

    # -- jobs ------------------------------------------------------------------------------

    async def on_job(self, message: Message, incoming: AbstractIncomingMessage) -> None:
        """An ``InferJob``: refuse it now, or hold it (unacked) until a loader takes it."""
        if not isinstance(message, InferJob):
            log.warning("not_a_job", kind=message.kind)
            await incoming.reject(requeue=False)
            return
        job = message
        known = self.state.jobs.get(job.job_id)
        if known is not None and known.state != "queued":  # redelivered after a restart
            if known.result is not None and incoming.reply_to:
                await self.bus.send_to(incoming.reply_to, known.result, correlation_id=job.job_id)
            await incoming.ack()
            return
        refusal = self._refuse(job)
        if refusal is not None:
            await self._finish_now(job, incoming.reply_to, refusal)
            await incoming.ack()
            return
        # not stored yet: until dispatch its unacked message is the durable copy
        record = JobRecord(job, incoming.reply_to, settle=incoming)
        self.state.accept(record)
        log.info("job_accepted", job_id=job.job_id, model=job.model, priority=job.priority)
        await self.dispatch()

    async def on_poison_job(self, incoming: AbstractIncomingMessage, reason: str) -> None:
        """An undecodable job went to the dead-letter queue; fail it where it can be told."""
        job_id = field(incoming, "job_id") or incoming.correlation_id
        if not isinstance(job_id, str):
            return
        error = ErrorInfo(kind="InvalidMessage", message=reason)
        result = JobResult(
            job_id=job_id, model=str(field(incoming, "model") or "?"), state="failed", error=error
        )
        self.store.save_job(self.state.remember_failed(result))
        if incoming.reply_to:
            await self.bus.send_to(incoming.reply_to, result, correlation_id=job_id)

    def _refuse(self, job: InferJob) -> ErrorInfo | None:
        model = self.state.models.get(job.model)
        if model is None:
            return ErrorInfo(kind="UnknownModel", message=f"model {job.model!r} is not registered")
        if model.state == "failed":
            why = model.error.message if model.error else "preparation failed"
            return ErrorInfo(kind="ModelUnavailable", message=f"model {job.model!r}: {why}")
        if job.deadline_s is not None and job.deadline_s < time.time():
            return ErrorInfo(
                kind="DeadlineExceeded", message="the deadline passed before the job was scheduled"
            )
        problem = check_inputs(job, model)
        return ErrorInfo(kind="InvalidInput", message=problem) if problem else None

    async def _finish_now(self, job: InferJob, reply_to: str | None, error: ErrorInfo) -> None:
        result = JobResult(job_id=job.job_id, model=job.model, state="failed", error=error)
        self.store.save_job(self.state.remember_failed(result, job=job, reply_to=reply_to))
        log.info(
            "job_refused", job_id=job.job_id, model=job.model, kind=error.kind, reason=error.message
        )
        if reply_to:
            await self.bus.send_to(reply_to, result, correlation_id=job.job_id)

    async def dispatch(self) -> None:
        placements = self.state.place()
        if placements:
            await asyncio.gather(*(self._send(p) for p in placements))

    async def _send(self, placement: Placement) -> None:
        record, loader = placement.job, placement.loader
        job, loader_id = record.job, loader.status.loader_id
        model = self.state.models.get(job.model)
        if model is None:  # unregistered as it was placed
            await self._fail(record, "UnknownModel", f"model {job.model!r} was unregistered")
            return
        fetch_id = uuid.uuid4().hex if placement.cold else None
        run = RunJob(job=job, uri=model.uri, fetch_id=fetch_id, reply_to=record.reply_to)
        sends = [self.bus.publish(run, self.names.loader_queue(loader_id), priority=job.priority)]
        if fetch_id is not None:
            fetch = FetchRequest(
                fetch_id=fetch_id,
                model=job.model,
                uri=model.uri,
                order=model.order,
                priority=job.priority,
                announce_to=self.names.loader_events(loader_id),
            )
            sends.append(
                self.bus.publish(
                    fetch, self.names.weights_queue(loader.status.node), priority=job.priority
                )
            )
        try:
            await asyncio.gather(*sends)
        except MessageTooLarge as exc:  # no loader could take it: the job fails, not the loader
            await self._fail(record, "MessageTooLarge", str(exc))
            return
        except Exception as exc:
            log.warning("dispatch_failed", job_id=job.job_id, loader=loader_id, error=str(exc))
            self.state.requeue(record, loader)
            return
        self.store.save_job(record)
        log.info("job_dispatched", job_id=job.job_id, loader=loader_id, cold=placement.cold)
        await self._settle(record)

    @staticmethod
    async def _settle(record: JobRecord) -> None:
        message, record.settle = record.settle, None
        if isinstance(message, AbstractIncomingMessage):
            with contextlib.suppress(Exception):
                await message.ack()

    # -- results and status ----------------------------------------------------------------

    async def on_inbox(self, message: Message, _: AbstractIncomingMessage) -> None:
        if isinstance(message, JobResult):
            record = self.state.finish(message)
            if record is not None:
                self.store.save_job(record)
                log.info(
                    "job_finished",
                    job_id=message.job_id,
                    state=message.state,
                    cold=message.cold,
                    loader=message.loader_id,
                )
            await self.dispatch()
        elif isinstance(message, JobProgress):
            record = self.state.jobs.get(message.job_id)
            if record is not None and record.finished_at is None:
                record.state = message.state
        elif isinstance(message, LoaderStatus):
            if self.state.heartbeat(message):
                log.info("loader_joined", loader=message.loader_id, node=message.node)
                await self._prepare_waiting()
            for record in self.state.vanished(message.loader_id):
                why = (
                    f"loader {message.loader_id} no longer runs the job "
                    "(it lost its broker connection, or restarted)"
                )
                log.warning("job_lost", job_id=record.job.job_id, loader=message.loader_id)
                await self._fail(record, "LoaderLost", why)
            await self.dispatch()
        elif isinstance(message, ModelPrepared):
            self._prepared(message)
            await self._release(message.model)
        else:
            raise UnexpectedMessage(message)

    def _prepared(self, message: ModelPrepared) -> None:
        record = self.state.models.get(message.model)
        if record is None or record.state != "preparing":
            return
        if message.uri is not None and message.uri != record.uri:
            return  # prepared for the checkpoint this name had before it was registered again
        if message.error is not None:
            record.state, record.error = "failed", message.error
            self.store.save_model(record)
            log.warning("model_failed", model=message.model, error=message.error.message)
            return
        record.state, record.order = "ready", message.order
        record.inputs, record.outputs = message.inputs, message.outputs
        self.store.save_model(record)
        log.info("model_ready", model=message.model)

    async def _release(self, name: str) -> None:
        """A model's preparation ended, or it was unregistered: its waiting jobs go on, or
        fail with the reason (failed, unregistered, or inputs that do not fit)."""
        for record in self.state.pending():
            if record.job.model == name and (error := self._refuse(record.job)) is not None:
                await self._fail(record, error.kind, error.message)
        await self.dispatch()

    async def tick(self) -> None:
        """Loaders that went silent, jobs past their deadline, models still waiting."""
        for loader in self.state.expire():
            log.warning("loader_lost", loader=loader.status.loader_id)
            for job_id in list(loader.running):
                record = self.state.jobs.get(job_id)
                if record is not None and record.finished_at is None:
                    why = f"loader {loader.status.loader_id} stopped while running the job"
                    await self._fail(record, "LoaderLost", why)
        now = time.time()
        for record in self.state.pending():
            if record.job.deadline_s is not None and record.job.deadline_s < now:
                await self._fail(
                    record, "DeadlineExceeded", "the deadline passed while the job waited"
                )
        await self._prepare_waiting()
        await self.dispatch()
        if self.state.forgotten:  # the jobs retention dropped from memory
            self.store.delete_jobs(self.state.forgotten)
            self.state.forgotten.clear()

    async def _fail(self, record: JobRecord, kind: str, message: str) -> None:
        error = ErrorInfo(kind=kind, message=message)
        result = JobResult(
            job_id=record.job.job_id, model=record.job.model, state="failed", error=error
        )
        await self._deliver(record, result)

    async def _deliver(self, record: JobRecord, result: JobResult) -> None:
        """Finish a job here (not on a loader): store, tell the submitter, settle."""
        self.state.finish(result)
        self.store.save_job(record)
        if record.reply_to:
            await self.bus.send_to(record.reply_to, result, correlation_id=result.job_id)
        await self._settle(record)

    # -- models ----------------------------------------------------------------------------

    async def register_directory(self, directory: Path) -> None:
        """Register every checkpoint directory found in ``directory`` (the demo models)."""
        for path in await asyncio.to_thread(_checkpoint_dirs, directory):
            outcome = await self.register(path.name, str(path.resolve()))
            if isinstance(outcome, ErrorInfo):
                log.warning("register_failed", model=path.name, error=outcome.message)

    async def register(self, name: str, uri: str) -> ModelRecord | ErrorInfo:
        try:
            uri = check_uri(uri, self.roots)
            ckpt = await asyncio.to_thread(_read, uri)
        except (InvalidURI, OriginError) as exc:  # at registration, the URI is what is wrong
            return ErrorInfo(kind="InvalidURI", message=str(exc))
        except (CicadaError, OSError) as exc:
            return ErrorInfo.of(exc)
        old = self.state.models.get(name)
        if old is not None and old.uri == uri and old.state != "failed":
            return old
        if old is not None and old.uri != uri:  # the name now means another checkpoint
            await self._unload_everywhere(name, self.state.unload(name))
            self._prepared_at.pop(name, None)  # prepare the new one now
        config = ckpt.config
        record = ModelRecord(
            name,
            uri,
            nbytes=sum(h.file_size for h in ckpt.headers.values()),
            model_type=config.get("model_type") or config.get("cicada_zoo"),
        )
        self.state.models[name] = record
        self.store.save_model(record)
        log.info("model_registered", model=name, uri=uri, bytes=record.nbytes)
        await self._prepare_waiting()
        return record

    async def _prepare_waiting(self) -> None:
        """Ask a loader to prepare each model still preparing (again after 30 s)."""
        loaders = self.state.alive()
        if not loaders:
            return
        now = time.monotonic()
        for record in self.state.models.values():
            if record.state != "preparing" or now - self._prepared_at.get(record.name, -1e9) < 30:
                continue
            self._prepared_at[record.name] = now
            loader = min(loaders, key=lambda r: len(r.running))
            await self.bus.publish(
                PrepareModel(model=record.name, uri=record.uri),
                self.names.loader_control(loader.status.loader_id),
            )

    # -- RPC -------------------------------------------------------------------------------

    async def on_rpc(self, message: Message, incoming: AbstractIncomingMessage) -> None:
        try:
            reply = await self._answer(message)
        except Exception as exc:
            log.exception("rpc_failed", kind=message.kind)
            reply = Reply(ok=False, error=ErrorInfo.of(exc))
        await self.bus.reply(incoming, reply)

    async def _answer(self, message: Message) -> Reply:
        state = self.state
        if isinstance(message, RegisterModel):
            outcome = await self.register(message.model, message.uri)
            if isinstance(outcome, ErrorInfo):
                return Reply(ok=False, error=outcome)
            return Reply(ok=True, data=self._model_json(outcome))
        if isinstance(message, UnregisterModel):
            return await self._unregister(message.model)
        if isinstance(message, GetModel):
            record = state.models.get(message.model)
            return (
                Reply(ok=True, data=self._model_json(record))
                if record
                else _unknown_model(message.model)
            )
        if isinstance(message, ListModels):
            return Reply(
                ok=True, data={"models": [self._model_json(r) for r in state.models.values()]}
            )
        if isinstance(message, GetJob):
            job = state.jobs.get(message.job_id)
            return Reply(ok=True, data=self._job_json(job)) if job else _unknown_job(message.job_id)
        if isinstance(message, CancelRequest):
            return await self._cancel(message.job_id)
        if isinstance(message, Health):
            return Reply(
                ok=True,
                data={
                    "loaders": len(state.alive()),
                    "models": len(state.models),
                    "pending": len(state.pending()),
                },
            )
        return Reply(
            ok=False,
            error=ErrorInfo(kind="UnknownRequest", message=f"cannot answer {message.kind!r}"),
        )

    async def _unregister(self, name: str) -> Reply:
        record = self.state.models.pop(name, None)
        if record is None:
            return _unknown_model(name)
        self.store.delete_model(name)
        await self._release(name)  # its waiting jobs fail: the model is not registered
        doc = self._model_json(record)
        await self._unload_everywhere(name, self.state.resident_on(name))
        log.info("model_unregistered", model=name)
        return Reply(ok=True, data=doc)

    async def _unload_everywhere(self, name: str, loaders: list[str]) -> None:
        """Tell ``loaders`` to unload ``name``, and every node to delete its cached copy; a
        loader or node that is gone has nothing to unload."""
        targets = [self.names.loader_control(i) for i in loaders]
        targets += [self.names.weights_queue(node) for node in self.state.forget_cached(name)]
        for queue in targets:
            try:
                await self.bus.publish(UnloadModel(model=name), queue)
            except Exception as exc:
                log.info("unload_unsent", model=name, queue=queue, error=str(exc))

    async def _cancel(self, job_id: str) -> Reply:
        record = self.state.jobs.get(job_id)
        if record is None:
            return _unknown_job(job_id)
        if record.finished_at is not None:
            return Reply(
                ok=False,
                error=ErrorInfo(
                    kind="JobFinished", message=f"job {job_id!r} already {record.state}"
                ),
            )
        if record.state == "queued":
            await self._deliver(
                record, JobResult(job_id=job_id, model=record.job.model, state="cancelled")
            )
        elif record.loader_id is not None:
            await self.bus.publish(
                CancelJob(job_id=job_id), self.names.loader_control(record.loader_id)
            )
        return Reply(ok=True, data=self._job_json(record))

    def _model_json(self, record: ModelRecord) -> dict[str, Any]:
        return record.to_json(resident_on=self.state.resident_on(record.name))

    @staticmethod
    def _job_json(record: JobRecord) -> dict[str, Any]:
        doc = record.to_json()
        if record.result is not None:
            doc["outputs"] = [t.model_dump() for t in record.result.outputs]
        return doc


def _checkpoint_dirs(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if (p / "config.json").is_file())


def _read(uri: str) -> Any:
    origin = open_origin(uri)
    try:
        return read_checkpoint(origin)
    finally:
        origin.close()


def _unknown_model(name: str) -> Reply:
    return Reply(
        ok=False, error=ErrorInfo(kind="UnknownModel", message=f"model {name!r} is not registered")
    )


def _unknown_job(job_id: str) -> Reply:
    return Reply(ok=False, error=ErrorInfo(kind="UnknownJob", message=f"no job {job_id!r}"))


def check_inputs(job: InferJob, model: ModelRecord) -> str | None:
    """Why ``job``'s inputs do not fit ``model``'s metadata, or None (also when unknown yet)."""
    if model.state != "ready" or not model.inputs:
        return None
    specs = {s.name: s for s in model.inputs}
    unknown = [t.name for t in job.inputs if t.name not in specs]
    if unknown:
        return f"unknown input(s) {unknown}; the model takes {sorted(specs)}"
    main = model.inputs[0].name
    if main not in {t.name for t in job.inputs}:
        return f"input {main!r} is required"
    for tensor in job.inputs:
        spec = specs[tensor.name]
        if tensor.datatype != spec.datatype:
            return f"input {tensor.name!r} must be {spec.datatype}, got {tensor.datatype}"
        if len(tensor.shape) != len(spec.shape) or any(
            want not in (-1, got) for want, got in zip(spec.shape, tensor.shape, strict=True)
        ):
            return f"input {tensor.name!r} must have shape {spec.shape}, got {tensor.shape}"
    return None
