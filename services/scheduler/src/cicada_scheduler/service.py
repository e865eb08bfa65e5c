"""The scheduler service's lifecycle: connect, declare, consume, tick, drain.

Queues it consumes:

- ``<ns>.jobs``: ``InferJob`` from the gateway or any AMQP client (priority queue). A job's
  message stays unacked while the job waits here, and is acked once the job is handed to a
  loader (or has failed): the broker keeps it until then.
- ``<ns>.scheduler``: ``JobResult``, ``JobProgress``, ``LoaderStatus``, ``ModelPrepared``.
- ``<ns>.scheduler.rpc``: model registry, job status and cancellation requests.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import structlog
from pydantic import Field

from cicada_scheduler.handlers import Handlers
from cicada_scheduler.state import State
from cicada_scheduler.store import Store
from cicada_shared.bus import Bus
from cicada_shared.settings import MeshSettings

log = structlog.get_logger("cicada.scheduler")


class SchedulerSettings(MeshSettings):
    scheduler_db: Path | None = Field(
        None, description="SQLite file for models and jobs; default: <cache_dir>/scheduler.db."
    )
    scheduler_priorities: bool = Field(
        True, description="Most urgent first (false: strict arrival order, for comparison)."
    )
    scheduler_aging_s: float = Field(
        5.0, description="A waiting job below 9 gains one priority level per this many seconds."
    )
    scheduler_loader_timeout_s: float = Field(5.0, description="A loader silent this long is gone.")
    scheduler_tick_s: float = Field(0.5, description="How often deadlines and loaders are checked.")
    scheduler_prefetch: int = Field(1000, description="Jobs the scheduler may hold waiting.")


class SchedulerService:
    def __init__(self, settings: SchedulerSettings) -> None:
        self.settings = settings
        self.bus = Bus.for_settings(settings, client="scheduler")
        self.state = State(
            loader_timeout_s=settings.scheduler_loader_timeout_s,
            priorities=settings.scheduler_priorities,
            aging_s=settings.scheduler_aging_s,
        )
        self.store = Store(settings.scheduler_db or settings.cache_dir / "scheduler.db")
        self.handlers = Handlers(self.bus, self.state, settings.roots, self.store)
        self._tick: asyncio.Task[None] | None = None

    async def start(self) -> None:
        for model in self.store.load_models():
            self.state.models[model.name] = model
        for job in self.store.load_jobs():
            self.state.restore(job)
        await self.bus.connect()
        names, topo = self.settings.names, self.bus.topology
        inbox = await topo.queue(
            await self.bus.open_channel(prefetch=200), names.scheduler_inbox, durable=True
        )
        rpc = await topo.queue(
            await self.bus.open_channel(prefetch=20), names.scheduler_rpc, durable=True
        )
        jobs_channel = await self.bus.open_channel(prefetch=self.settings.scheduler_prefetch)
        jobs = await jobs_channel.declare_queue(
            names.jobs_queue, durable=True, arguments=topo.queue_arguments(priority=True)
        )
        await self.bus.consume(inbox, self.handlers.on_inbox)
        await self.bus.consume(rpc, self.handlers.on_rpc)
        await self.handlers.register_directory(self.settings.models_dir)
        await self.bus.consume(
            jobs, self.handlers.on_job, on_poison=self.handlers.on_poison_job, manual=True
        )
        self._tick = asyncio.create_task(self._ticker())

    async def stop(self) -> None:
        await self.bus.stop_consuming()
        if self._tick is not None:
            self._tick.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tick
        await self.bus.close()  # unacked waiting jobs return to the queue for the next scheduler
        self.store.close()

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.settings.scheduler_tick_s)
            try:
                await self.handlers.tick()
            except Exception:
                log.exception("tick_failed")
