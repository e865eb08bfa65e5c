"""Fetches run by the node's weights service, seen by the engine as if they ran here.

The scheduler asks the weights service to fetch at the moment it hands the job to us; the
announcements reach our events queue, sometimes before the job does. ``Announcements``
routes each one, converted back into the engine's events, to the cold start that waits for
it, holding early ones until that cold start subscribes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cicada_shared.contracts import (
    FetchFailedNotice,
    FetchFinished,
    ManifestAnnounced,
    PieceAnnounced,
)
from cicada_shared.errors import CicadaError
from cicada_weights.checkpoint import read_checkpoint
from cicada_weights.fetcher import (
    FetchDone,
    FetchEvent,
    FetchFailed,
    FetchOptions,
    Listener,
    Manifest,
    ManifestReady,
    OrderSource,
    PieceLanded,
)
from cicada_weights.origins import FileOrigin
from cicada_weights.plan import Piece

Announcement = ManifestAnnounced | PieceAnnounced | FetchFinished | FetchFailedNotice


class RemoteFailure(CicadaError):
    """A failure reported by another service; ``kind`` is the original error's."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self._kind = kind

    @property
    def kind(self) -> str:
        return self._kind


def local_time(wall: float) -> float:
    """Another process's wall-clock instant on our ``perf_counter`` scale."""
    return time.perf_counter() - (time.time() - wall)


@dataclass(eq=False)
class _Route:
    uri: str
    listener: Listener | None = None
    early: list[Announcement] = field(default_factory=list)


class Announcements:
    """Routes announcements by fetch id (used from the event loop only)."""

    def __init__(self, *, keep_early: int = 10_000) -> None:
        self._routes: dict[str, _Route] = {}
        self._keep_early = keep_early

    def subscribe(self, fetch_id: str, uri: str, listener: Listener) -> None:
        route = self._routes.setdefault(fetch_id, _Route(uri))
        route.uri, route.listener = uri, listener
        early, route.early = route.early, []
        for message in early:
            self._deliver(route, message)

    def unsubscribe(self, fetch_id: str) -> None:
        self._routes.pop(fetch_id, None)

    def deliver(self, message: Announcement) -> None:
        route = self._routes.get(message.fetch_id)
        if route is None:
            if len(self._routes) >= self._keep_early:  # drop the oldest unclaimed fetch
                self._routes.pop(next(iter(self._routes)))
            route = self._routes[message.fetch_id] = _Route("")
        if route.listener is None:
            route.early.append(message)
        else:
            self._deliver(route, message)

    def _deliver(self, route: _Route, message: Announcement) -> None:
        assert route.listener is not None
        route.listener(self._event(route, message))

    @staticmethod
    def _event(route: _Route, message: Announcement) -> FetchEvent:
        if isinstance(message, ManifestAnnounced):
            cache = Path(message.cache_dir)
            origin = FileOrigin(cache)
            try:
                ckpt = read_checkpoint(origin)
            except CicadaError as exc:
                return FetchFailed(exc, time.perf_counter())
            finally:
                origin.close()
            manifest = Manifest(route.uri, cache, ckpt.config, ckpt.headers)
            return ManifestReady(manifest, local_time(message.at))
        if isinstance(message, PieceAnnounced):
            piece = Piece(
                message.index, message.file, tuple(message.tensors), tuple(message.ranges)
            )
            return PieceLanded(piece, local_time(message.started), local_time(message.landed))
        if isinstance(message, FetchFinished):
            return FetchDone(message.nbytes, local_time(message.at))
        return FetchFailed(
            RemoteFailure(message.error.kind, message.error.message), local_time(message.at)
        )


class RemoteFetch:
    """One fetch the weights service runs for a cold start here (a ``FetchSource`` whose
    ``fetch`` only subscribes: the request went out with the job)."""

    def __init__(
        self,
        announcements: Announcements,
        fetch_id: str,
        *,
        subscribe: Callable[[Callable[[], None]], None],
        cancel: Callable[[], None],
    ) -> None:
        self.announcements = announcements
        self.fetch_id = fetch_id
        self._subscribe = subscribe
        self._cancel = cancel

    def fetch(
        self,
        uri: str,
        listener: Listener,
        *,
        order: OrderSource = None,
        options: FetchOptions | None = None,
        key: str | None = None,
    ) -> RemoteFetch:
        # the engine calls this from its thread; routes live on the event loop
        self._subscribe(lambda: self.announcements.subscribe(self.fetch_id, uri, listener))
        return self

    def cancel(self) -> None:
        self._cancel()

    def join(self, timeout: float | None = None) -> bool:
        return True
