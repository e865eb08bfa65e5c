"""The WeightDecoupler's fetching half: bytes in execution order, into the node cache.

One ``Fetcher`` per node owns a pool of worker threads and one priority queue of byte
ranges shared by every fetch in flight, so a more urgent fetch overtakes a running one at
the next range. A fetch:

1. reads ``config.json``, the shard index if any, and each shard's header; allocates each
   cache file at full size (a byte-for-byte replica of the origin file) and announces the
   ``Manifest``;
2. plans pieces from the execution order (given, or asked of ``order`` once the manifest
   is known);
3. copies ranges into the cache files out of order, several at a time, and announces each
   piece the moment its last range lands; then writes a ``.complete`` marker.

Listeners are called from worker threads and must return quickly.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cicada_shared.errors import CicadaError, LoadCancelled, OriginError
from cicada_weights import cache
from cicada_weights.checkpoint import CONFIG, INDEX, read_checkpoint
from cicada_weights.header import Header, TensorEntry
from cicada_weights.origins import FileOrigin, Origin, open_origin
from cicada_weights.plan import Piece, PlanOptions, plan_pieces


@dataclass(frozen=True, slots=True)
class Manifest:
    """What a fetch delivers: the model's config and its shard files in the cache."""

    uri: str
    cache_dir: Path
    config: dict[str, Any]
    headers: dict[str, Header]

    def path(self, file: str) -> Path:
        return self.cache_dir / file

    @property
    def tensors(self) -> dict[str, TensorEntry]:
        return {n: e for h in self.headers.values() for n, e in h.tensors.items()}

    @property
    def file_of(self) -> dict[str, str]:
        return {n: h.file for h in self.headers.values() for n in h.tensors}

    @property
    def nbytes(self) -> int:
        return sum(h.file_size for h in self.headers.values())


@dataclass(frozen=True, slots=True)
class ManifestReady:
    manifest: Manifest
    at: float


@dataclass(frozen=True, slots=True)
class PieceLanded:
    piece: Piece
    started: float
    landed: float


@dataclass(frozen=True, slots=True)
class FetchDone:
    nbytes: int
    at: float


@dataclass(frozen=True, slots=True)
class FetchFailed:
    error: BaseException
    at: float


FetchEvent = ManifestReady | PieceLanded | FetchDone | FetchFailed
Listener = Callable[[FetchEvent], None]
Order = Sequence[Sequence[str]]
OrderSource = Order | Callable[[Manifest], Order] | None


class FetchControl(Protocol):
    """What a cold start needs of a fetch in flight."""

    def cancel(self) -> None: ...

    def join(self, timeout: float | None = None) -> bool: ...


class FetchSource(Protocol):
    """Something that fetches checkpoints: a ``Fetcher`` here, or the weights service of the
    node, reached over RabbitMQ."""

    def fetch(
        self,
        uri: str,
        listener: Listener,
        *,
        order: OrderSource = None,
        options: FetchOptions = ...,
        key: str | None = None,
    ) -> FetchControl: ...


@dataclass(frozen=True, slots=True)
class FetchOptions:
    """Per-fetch knobs; the defaults are the WeightDecoupler's."""

    plan: PlanOptions = field(default_factory=PlanOptions)
    #: Most ranges of this fetch in flight at once (``None``: as many as there are workers).
    concurrency: int | None = None
    #: Larger is more urgent; ranges of a more urgent fetch are taken first.
    priority: int = 0
    #: Reuse a complete cache directory instead of fetching again.
    reuse_cache: bool = True
    #: Called (from a worker) before a piece's first range is read; may block.
    gate: Callable[[Piece], None] | None = None


class Fetcher:
    """Fetches checkpoints from origins into ``cache_root``, announcing pieces as they land.

    Args:
        cache_root: node-local cache; each model gets a sub-directory.
        workers: threads copying ranges; also the parallelism of one fetch.
        buffer_bytes: per-worker transfer buffer (the only memory the fetcher holds).
        timeout_s: an origin that sends nothing for this long fails the fetch.
        retries: attempts per request on transient origin errors.
        digests: after each fetch, record the files' digests (in the background), and reuse
            a cached copy only if its digests still match.
    """

    def __init__(
        self,
        cache_root: Path,
        *,
        workers: int = 4,
        buffer_bytes: int = 1 << 20,
        timeout_s: float = 30.0,
        retries: int = 2,
        digests: bool = False,
    ) -> None:
        self.cache_root = cache_root
        self.digests = digests
        self.timeout_s = timeout_s
        self.retries = retries
        self.workers = workers
        self._queue: queue.PriorityQueue[tuple[tuple[int, int, int, int], _RangeTask | None]] = (
            queue.PriorityQueue()
        )
        self._seq = itertools.count()
        self._threads = [
            threading.Thread(
                target=self._work, args=(buffer_bytes,), daemon=True, name=f"cicada-fetch-{i}"
            )
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def fetch(
        self,
        uri: str,
        listener: Listener,
        *,
        order: OrderSource = None,
        options: FetchOptions = FetchOptions(),
        key: str | None = None,
    ) -> FetchHandle:
        """Start fetching ``uri``; events go to ``listener``; returns at once."""
        cache_dir = self.cache_root / (key or cache_key(uri))
        handle = FetchHandle(self, uri, cache_dir, listener, order, options, next(self._seq))
        threading.Thread(target=handle._start, daemon=True, name="cicada-fetch-setup").start()
        return handle

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(((-(1 << 62), 0, 0, 0), None))
        for t in self._threads:
            t.join(timeout=5)

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _submit(self, task: _RangeTask) -> None:
        h = task.handle
        self._queue.put(((-h.options.priority, h.seq, task.piece.index, task.index), task))

    def _work(self, buffer_bytes: int) -> None:
        buf = bytearray(buffer_bytes)
        while True:
            _, task = self._queue.get()
            if task is None:
                return
            task.handle._run_range(task, buf)


def origin_versions(origin: Origin, files: Iterable[str], *, index: bool) -> dict[str, str | None]:
    """Each weight file's version at the origin, joined with those of ``config.json`` and of
    the shard index: a change to any of them makes a cached copy stale."""
    meta = [origin.version(CONFIG), *([origin.version(INDEX)] if index else [])]
    if None in meta:
        return dict.fromkeys(files)
    return {
        f: None if (v := origin.version(f)) is None else "|".join([v, *map(str, meta)])
        for f in files
    }


def cache_key(uri: str) -> str:
    """A readable, collision-safe directory name for ``uri``."""
    base = uri.rstrip("/").rsplit("/", 1)[-1] or "model"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in base)[:40]
    return f"{safe}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}"


@dataclass(slots=True)
class _RangeTask:
    handle: FetchHandle
    piece: Piece
    index: int
    start: int
    end: int


@dataclass(slots=True)
class _PieceState:
    remaining: int
    started: float | None = None


@dataclass(eq=False)
class FetchHandle:
    """One fetch in flight. ``wait()`` blocks until it ends; ``cancel()`` stops it."""

    fetcher: Fetcher
    uri: str
    cache_dir: Path
    listener: Listener
    order: OrderSource
    options: FetchOptions
    seq: int
    manifest: Manifest | None = None
    error: BaseException | None = None
    nbytes: int = 0
    _done: threading.Event = field(default_factory=threading.Event)  # no more work
    _ended: threading.Event = field(default_factory=threading.Event)  # last event emitted
    _lock: threading.Condition = field(default_factory=threading.Condition)
    _origin: Origin | None = None
    _fds: dict[str, int] = field(default_factory=dict)
    _versions: dict[str, str | None] = field(default_factory=dict)  # the origin's, as fetched
    _pieces: dict[int, _PieceState] = field(default_factory=dict)
    _backlog: list[_RangeTask] = field(default_factory=list)
    _in_flight: int = 0
    #: threads working on this fetch (setup, or a worker copying a range); files and the
    #: origin are closed only once this drops to zero after the fetch ended
    _active: int = 0
    _closed: bool = False

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> None:
        """Block until the fetch ends; raise its error if it failed."""
        if not self._ended.wait(timeout):
            raise TimeoutError(f"fetch of {self.uri} still running after {timeout}s")
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        self._fail(LoadCancelled(f"fetch of {self.uri} cancelled"))

    def join(self, timeout: float | None = None) -> bool:
        """After the fetch ended, wait until no thread still works on it."""
        with self._lock:
            return self._lock.wait_for(lambda: self._active == 0, timeout)

    def _enter(self) -> bool:
        with self._lock:
            if self.error is not None or self._done.is_set():
                return False
            self._active += 1
            return True

    def _exit(self) -> None:
        with self._lock:
            self._active -= 1
            idle = self._active == 0 and (self.error is not None or self._done.is_set())
            self._lock.notify_all()
        if idle:
            self._close()

    # -- setup ---------------------------------------------------------------------------

    def _start(self) -> None:
        if not self._enter():
            return
        try:
            self._setup()
        finally:
            self._exit()

    def _setup(self) -> None:
        try:
            self._origin = open_origin(
                self.uri,
                timeout_s=self.fetcher.timeout_s,
                retries=self.fetcher.retries,
                pool=self.fetcher.workers + 1,
            )
            manifest = self._reuse(self._origin) if self.options.reuse_cache else None
            if manifest is not None:
                self._announce_cached(manifest)
                return
            manifest = self._prepare(self._origin)
            if self.error is not None:  # cancelled while preparing
                return
            self.manifest = manifest
            self._emit(ManifestReady(manifest, time.perf_counter()))
            order = self.order(manifest) if callable(self.order) else (self.order or ())
            self._schedule(plan_pieces(manifest.headers, order, self.options.plan))
        except BaseException as exc:
            self._fail(exc)

    def _prepare(self, origin: Origin) -> Manifest:
        """Read the small files and headers; allocate each cache file at full size."""
        (self.cache_dir / cache.COMPLETE).unlink(missing_ok=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        ckpt = read_checkpoint(origin)
        try:
            self._versions = origin_versions(origin, ckpt.headers, index=ckpt.raw_index is not None)
        except (OriginError, OSError):  # the copy works; it will not be reused
            self._versions = dict.fromkeys(ckpt.headers)
        (self.cache_dir / CONFIG).write_bytes(ckpt.raw_config)
        if ckpt.raw_index is not None:
            (self.cache_dir / INDEX).write_bytes(ckpt.raw_index)
        for file, header in ckpt.headers.items():
            # a fresh inode: a loader may still map the old file, and must keep seeing it
            (self.cache_dir / file).unlink(missing_ok=True)
            fd = os.open(self.cache_dir / file, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            self._fds[file] = fd
            os.ftruncate(fd, header.file_size)
            os.pwrite(fd, ckpt.prefixes[file], 0)
        return Manifest(self.uri, self.cache_dir, ckpt.config, ckpt.headers)

    def _schedule(self, pieces: list[Piece]) -> None:
        tasks: list[_RangeTask] = []
        with self._lock:
            for piece in pieces:
                self._pieces[piece.index] = _PieceState(len(piece.ranges))
                tasks += [_RangeTask(self, piece, i, s, e) for i, (s, e) in enumerate(piece.ranges)]
            self._backlog = tasks[::-1]
        for piece in pieces:
            if not piece.ranges:
                self._landed(piece)
        self._release()
        self._maybe_finish()

    def _release(self) -> None:
        """Hand ranges to the shared queue, keeping at most ``concurrency`` in flight."""
        limit = self.options.concurrency or len(self._backlog) or 1
        ready: list[_RangeTask] = []
        with self._lock:
            while self._backlog and self._in_flight < limit and self.error is None:
                ready.append(self._backlog.pop())
                self._in_flight += 1
        for task in ready:
            self.fetcher._submit(task)

    # -- ranges --------------------------------------------------------------------------

    def _run_range(self, task: _RangeTask, buf: bytearray) -> None:
        if not self._enter():
            return
        try:
            self._copy(task, buf)
        finally:
            self._exit()

    def _copy(self, task: _RangeTask, buf: bytearray) -> None:
        state = self._pieces[task.piece.index]
        try:
            if task.index == 0 and self.options.gate is not None:
                self.options.gate(task.piece)
            if state.started is None:
                state.started = time.perf_counter()
            fd = self._fds[task.piece.file]
            assert self._origin is not None
            self._origin.copy_range(
                task.piece.file, task.start, task.end, fd, buf, stop=lambda: self.error is not None
            )
        except BaseException as exc:
            self._fail(exc)
            return
        with self._lock:
            self._in_flight -= 1
            self.nbytes += task.end - task.start
            state.remaining -= 1
            finished = state.remaining == 0
        if finished:
            self._landed(task.piece)
        self._release()
        self._maybe_finish()

    def _landed(self, piece: Piece) -> None:
        state = self._pieces[piece.index]
        now = time.perf_counter()
        self._emit(PieceLanded(piece, state.started or now, now))

    def _maybe_finish(self) -> None:
        with self._lock:
            if self.error is not None or self._done.is_set():
                return
            if any(s.remaining for s in self._pieces.values()) or self._backlog:
                return
            self._done.set()
        assert self.manifest is not None
        try:
            files = {
                f: cache.file_record(self.cache_dir / f, h.file_size, self._versions[f])
                for f, h in self.manifest.headers.items()
            }
            cache.write_marker(self.cache_dir, self.uri, files)
        except OSError as exc:  # the copy was deleted under us: the fetch fails, not a worker
            self.error = CicadaError(f"the cached copy went away as it completed: {exc}")
            self._emit(FetchFailed(self.error, time.perf_counter()))
            self._ended.set()
            return
        self._emit(FetchDone(self.nbytes, time.perf_counter()))
        self._ended.set()
        if self.fetcher.digests:  # after the announcement: nobody waits for this
            threading.Thread(
                target=cache.add_digests, args=(self.cache_dir,), daemon=True, name="cicada-digest"
            ).start()

    # -- cache reuse ---------------------------------------------------------------------

    def _reuse(self, origin: Origin) -> Manifest | None:
        """The cached copy, if a complete, intact one of this URI as it is now is there."""
        marker = cache.read_marker(self.cache_dir)
        if marker is None:
            return None
        cached = FileOrigin(self.cache_dir)
        try:
            ckpt = read_checkpoint(cached)
        except (OSError, CicadaError):
            return None
        finally:
            cached.close()
        sizes = {f: h.file_size for f, h in ckpt.headers.items()}
        try:
            index = (self.cache_dir / INDEX).exists()
            versions = origin_versions(origin, marker.get("files", {}), index=index)
        except (OriginError, OSError):  # the origin cannot say: a fresh fetch will say why
            return None
        if not cache.verify(self.cache_dir, self.uri, sizes, versions=versions):
            return None
        return Manifest(self.uri, self.cache_dir, ckpt.config, ckpt.headers)

    def _announce_cached(self, manifest: Manifest) -> None:
        """Every piece at once; then, while the loader builds and runs on them, the bytes
        against their digests. The fetch ends only after that check: a copy that fails it
        is deleted and the fetch fails, so no result computed on it is returned."""
        self.manifest = manifest
        now = time.perf_counter()
        self._emit(ManifestReady(manifest, now))
        order = self.order(manifest) if callable(self.order) else (self.order or ())
        for piece in plan_pieces(manifest.headers, order, self.options.plan):
            self._emit(PieceLanded(piece, now, now))
        if self.fetcher.digests and not cache.digests_match(self.cache_dir):
            cache.drop(self.cache_dir.parent, self.cache_dir.name)
            self._fail(CicadaError(f"the cached copy of {self.uri} is corrupt; it was deleted"))
            return
        self._done.set()
        self._emit(FetchDone(0, time.perf_counter()))
        self._ended.set()

    # -- endings -------------------------------------------------------------------------

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            if self.error is not None or self._done.is_set():
                return
            self.error = error
            self._backlog.clear()
            self._done.set()
            idle = self._active == 0
        if idle:
            self._close()
        self._emit(FetchFailed(error, time.perf_counter()))
        self._ended.set()

    def _close(self) -> None:
        """Close the cache files and the origin (once no thread can still use them)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)
        if self._origin is not None:
            self._origin.close()

    def _emit(self, event: FetchEvent) -> None:
        with contextlib.suppress(Exception):
            self.listener(event)
