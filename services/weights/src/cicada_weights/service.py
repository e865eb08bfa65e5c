"""The weights service: one per node; fetches checkpoints into the node cache on request and
announces every piece to the loader that waits for it.

Consumes ``FetchRequest`` and ``FetchCancel`` from ``<ns>.weights.<node>``; publishes
``ManifestAnnounced``, ``PieceAnnounced``, ``FetchFinished`` or ``FetchFailedNotice`` to the
request's ``announce_to`` queue, in order, through one publisher task.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import structlog
from aio_pika.abc import AbstractIncomingMessage
from pydantic import Field as SettingField

from cicada_shared.bus import Bus, UnexpectedMessage
from cicada_shared.contracts import (
    Contract,
    ErrorInfo,
    FetchCancel,
    FetchFailedNotice,
    FetchFinished,
    FetchRequest,
    ManifestAnnounced,
    Message,
    PieceAnnounced,
    UnloadModel,
)
from cicada_shared.settings import MeshSettings
from cicada_weights import cache
from cicada_weights.fetcher import (
    FetchDone,
    Fetcher,
    FetchEvent,
    FetchFailed,
    FetchHandle,
    FetchOptions,
    ManifestReady,
    PieceLanded,
)

log = structlog.get_logger("cicada.weights")


class WeightsSettings(MeshSettings):
    weights_cache_bytes: int = SettingField(
        20 << 30, description="Byte budget of the node cache; least recently used copies go."
    )
    weights_verify: bool = SettingField(
        True,
        description="Record each file's digest (chunked BLAKE3) after a fetch, and check it "
        "each time a cached copy is reused, while the loader starts on it: the fetch ends, "
        "and the job's result is released, only if it matches. Without it a copy is reused "
        "when its origin's version and its files' sizes and modification times match.",
    )
    weights_workers: int = SettingField(4, description="Threads copying byte ranges.")
    weights_timeout_s: float = SettingField(30.0, description="An origin silent this long fails.")
    weights_retries: int = SettingField(2, description="Attempts per request on transient errors.")


def wall(perf: float) -> float:
    """A ``perf_counter`` instant as wall-clock time, for other processes to read."""
    return time.time() - (time.perf_counter() - perf)


@dataclass(eq=False)
class SharedFetch:
    """One download, announced to every loader waiting for it (two cold starts of one model
    on one node share it); late subscribers get the events so far replayed. A request for
    another URI under the same name (registered again) waits until this one has ended: both
    would write the name's cache directory."""

    uri: str
    handle: FetchHandle | None = None
    subscribers: dict[str, FetchRequest] = field(default_factory=dict)
    waiting: list[FetchRequest] = field(default_factory=list)
    history: list[FetchEvent] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)


class WeightsService:
    def __init__(self, settings: WeightsSettings) -> None:
        self.settings = settings
        self.bus = Bus.for_settings(settings, client=f"weights@{settings.node}")
        self.fetcher = Fetcher(
            settings.cache_dir / "files",
            workers=settings.weights_workers,
            timeout_s=settings.weights_timeout_s,
            retries=settings.weights_retries,
            digests=settings.weights_verify,
        )
        self.active: dict[str, SharedFetch] = {}  # by model (the cache key)
        self._deleting: dict[str, asyncio.Future[None]] = {}  # copies being deleted, by model
        self._background: set[asyncio.Task[None]] = set()
        self._outbox: asyncio.Queue[tuple[str, Contract] | None] = asyncio.Queue()
        self._publisher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.bus.connect()
        self._publisher = asyncio.create_task(self._publish_loop())
        channel = await self.bus.open_channel(prefetch=16)
        queue = await self.bus.topology.queue(
            channel,
            self.settings.names.weights_queue(self.settings.node),
            durable=True,
            priority=True,
        )
        await self.bus.consume(queue, self.handle)

    async def stop(self) -> None:
        await self.bus.stop_consuming()
        for shared in list(self.active.values()):
            if shared.handle is not None:
                shared.handle.cancel()
        await asyncio.to_thread(self.fetcher.close)
        await self._outbox.put(None)
        if self._publisher is not None:
            await asyncio.wait_for(self._publisher, self.settings.drain_s)
        await self.bus.close()

    async def handle(self, message: Message, _incoming: AbstractIncomingMessage) -> None:
        if isinstance(message, FetchRequest):
            # an unregistered copy of this name goes first
            while (deleting := self._deleting.get(message.model)) is not None:
                await asyncio.shield(deleting)
            self._subscribe(message)
        elif isinstance(message, FetchCancel):
            self._unsubscribe(message.fetch_id)
        elif isinstance(message, UnloadModel):
            await self._drop(message.model)
        else:
            raise UnexpectedMessage(message)

    def _subscribe(self, request: FetchRequest) -> None:
        shared = self.active.get(request.model)
        if shared is not None and shared.uri != request.uri:
            shared.waiting.append(request)
            log.info("fetch_waits", fetch_id=request.fetch_id, model=request.model)
            return
        if shared is not None:
            shared.subscribers[request.fetch_id] = request
            for event in shared.history:
                self._announce(request, event, shared.started)
            log.info("fetch_joined", fetch_id=request.fetch_id, model=request.model)
            return
        shared = self.active[request.model] = SharedFetch(request.uri)
        shared.subscribers[request.fetch_id] = request
        loop = asyncio.get_running_loop()

        def listener(event: FetchEvent) -> None:  # called from fetcher threads
            loop.call_soon_threadsafe(self._on_event, request.model, shared, event)

        shared.handle = self.fetcher.fetch(
            request.uri,
            listener,
            order=request.order,
            options=FetchOptions(priority=request.priority),
            key=request.model,
        )
        log.info(
            "fetch_started",
            fetch_id=request.fetch_id,
            model=request.model,
            uri=request.uri,
            priority=request.priority,
        )

    def _unsubscribe(self, fetch_id: str) -> None:
        for model, shared in list(self.active.items()):
            shared.waiting = [r for r in shared.waiting if r.fetch_id != fetch_id]
            if shared.subscribers.pop(fetch_id, None) is not None and not shared.subscribers:
                if shared.handle is not None:
                    shared.handle.cancel()
                if not shared.waiting:  # else it stays until it has ended, then they start
                    self.active.pop(model, None)
                log.info(
                    "fetch_dropped",
                    model=model,
                    fetch_id=fetch_id,
                    reason="cancelled, and no other loader waits for it",
                )

    def _on_event(self, model: str, shared: SharedFetch, event: FetchEvent) -> None:
        shared.history.append(event)
        for request in list(shared.subscribers.values()):
            self._announce(request, event, shared.started)
        if isinstance(event, FetchDone | FetchFailed) and self.active.get(model) is shared:
            if shared.waiting:  # another URI under this name: once no thread writes any more
                task = asyncio.get_running_loop().create_task(self._start_waiting(model, shared))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
            else:
                del self.active[model]
            keep = {model, *self.active}  # read on the loop, which changes it
            asyncio.get_running_loop().run_in_executor(None, self._evict, keep)
            outcome = "done" if isinstance(event, FetchDone) else f"failed: {event.error}"
            log.info(
                "fetch_ended",
                model=model,
                outcome=outcome,
                seconds=round(event.at - shared.started, 4),
                bytes=getattr(event, "nbytes", None),
            )

    async def _start_waiting(self, model: str, shared: SharedFetch) -> None:
        if shared.handle is not None:
            await asyncio.to_thread(shared.handle.join, self.settings.drain_s)
        if self.active.get(model) is shared:
            del self.active[model]
        for request in shared.waiting:
            self._subscribe(request)

    async def _drop(self, model: str) -> None:
        """An unregistered model's copy goes (one being fetched stays: a loader waits on it).
        A fetch of the same name that arrives meanwhile waits for the deletion."""
        if model in self.active:
            log.info("cache_kept", model=model, reason="a fetch is in flight")
            return
        if model in self._deleting:
            await asyncio.shield(self._deleting[model])
            return
        done = self._deleting[model] = asyncio.get_running_loop().create_future()
        try:
            if await asyncio.shield(asyncio.to_thread(cache.drop, self.fetcher.cache_root, model)):
                log.info("cache_dropped", model=model, reason="unregistered")
        finally:
            del self._deleting[model]
            done.set_result(None)

    def _evict(self, keep: set[str]) -> None:
        """Bring the cache within its budget, sparing ``keep`` (in use, or just used)."""
        for name in cache.evict(
            self.fetcher.cache_root, self.settings.weights_cache_bytes, keep=keep
        ):
            log.info("cache_evicted", model=name, budget=self.settings.weights_cache_bytes)

    def _announce(self, request: FetchRequest, event: FetchEvent, started: float) -> None:
        fetch_id = request.fetch_id
        message: Contract
        if isinstance(event, ManifestReady):
            message = ManifestAnnounced(
                fetch_id=fetch_id, cache_dir=str(event.manifest.cache_dir), at=wall(event.at)
            )
        elif isinstance(event, PieceLanded):
            p = event.piece
            message = PieceAnnounced(
                fetch_id=fetch_id,
                index=p.index,
                file=p.file,
                tensors=list(p.tensors),
                ranges=list(p.ranges),
                started=wall(event.started),
                landed=wall(event.landed),
            )
        elif isinstance(event, FetchDone):
            message = FetchFinished(fetch_id=fetch_id, nbytes=event.nbytes, at=wall(event.at))
        else:
            message = FetchFailedNotice(
                fetch_id=fetch_id, error=ErrorInfo.of(event.error), at=wall(event.at)
            )
        self._outbox.put_nowait((request.announce_to, message))

    async def _publish_loop(self) -> None:
        while (item := await self._outbox.get()) is not None:
            to, message = item
            try:
                await self.bus.publish(message, to)
            except Exception:
                log.exception("announce_failed", to=to, kind=type(message).__name__)
