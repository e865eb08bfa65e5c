"""One cold start through the layer-wise pipeline, for every variant of the ablation.

Threads of one cold start:

    fetch workers ──PieceLanded──▶ applier ──gate opens──▶ executor (the caller's thread)
                                      ▲
    constructor (default init only) ──┘ slots constructed

- The fetch starts first, at t0; the skeleton is built as soon as the manifest (config and
  headers) is in, while the first pieces are still on their way.
- MiniLoader builds the whole skeleton without initialisation; the baselines default-
  initialise one unit at a time, in execution order, on the constructor thread.
- With the WeightDecoupler, the fetch runs independently and in parallel, and every tensor
  is attached (as a view) the moment it lands and its slot exists. Without it, each unit's
  bytes are fetched only once the unit is constructed, one range at a time, and copied in.
- The executor runs the forward pass at once; each unit waits at its gate for its own slots.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.initialization import guard_torch_init_functions

from cicada_loader.engine.apply import Applier, CacheViews, Mode
from cicada_loader.engine.arch import Architecture, flatten_outputs, input_limits, resolve
from cicada_loader.engine.order import OrderBook
from cicada_loader.engine.skeleton import Skeleton, Slot, Unit
from cicada_loader.engine.staging import PinnedStaging
from cicada_loader.engine.timeline import Timeline, UnitTimes
from cicada_shared.errors import LoadTimeout
from cicada_weights.fetcher import (
    FetchControl,
    FetchDone,
    FetchEvent,
    FetchFailed,
    FetchOptions,
    FetchSource,
    Manifest,
    ManifestReady,
    PieceLanded,
)
from cicada_weights.plan import Piece, PlanOptions


@dataclass(frozen=True, slots=True)
class Variant:
    """Which of Cicada's mechanisms a cold start uses."""

    name: str
    miniloader: bool
    decoupler: bool
    pipelined: bool = True


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        Variant("naive", miniloader=False, decoupler=False, pipelined=False),
        Variant("pisel", miniloader=False, decoupler=False),
        Variant("pisel+miniloader", miniloader=True, decoupler=False),
        Variant("pisel+decoupler", miniloader=False, decoupler=True),
        Variant("cicada", miniloader=True, decoupler=True),
    ]
}


@dataclass(slots=True)
class ColdStart:
    """A finished cold start: the loaded model, the first request's outputs, the timeline."""

    model: nn.Module
    outputs: dict[str, torch.Tensor]
    timeline: Timeline
    arch: Architecture
    manifest: Manifest


@dataclass(frozen=True, slots=True)
class _Built:
    """Constructor → applier: these slots now exist and may be filled."""

    slots: list[Slot]


_Event = FetchEvent | _Built | None


class PipelinedColdStart:
    """Runs one pipelined cold start (every variant but ``naive``)."""

    def __init__(
        self,
        uri: str,
        inputs: Mapping[str, Any] | None,
        variant: Variant,
        *,
        device: torch.device,
        fetcher: FetchSource,
        orders: OrderBook,
        timeout_s: float,
        reuse_cache: bool,
        priority: int = 0,
        plan: PlanOptions | None = None,
        before_build: Callable[[int], None] | None = None,
    ) -> None:
        self.uri = uri
        self.inputs = inputs
        self.variant = variant
        self.device = device
        self.fetcher = fetcher
        self.orders = orders
        self.timeout_s = timeout_s
        self.reuse_cache = reuse_cache
        self.priority = priority
        self.plan = plan or PlanOptions()
        self.before_build = before_build  # told the checkpoint's size before memory is taken
        self.timeline = Timeline(variant=variant.name, model=uri, device=str(device))
        self.events: queue.SimpleQueue[_Event] = queue.SimpleQueue()
        self.failure: BaseException | None = None
        self.skeleton: Skeleton | None = None
        self._ready = threading.Event()  # the skeleton exists
        self._built = threading.Condition()
        self._handle: FetchControl | None = None
        self._workers: list[threading.Thread] = []

    # -- the caller's thread: skeleton, then the forward pass -----------------------------

    def run(self) -> ColdStart:
        self._handle = self.fetcher.fetch(
            self.uri, self.events.put, order=self._checkpoint_order, options=self._fetch_options()
        )
        hooks: list[Any] = []
        try:
            manifest = self._await_manifest()
            arch, skeleton = self._build(manifest)
            if self.inputs is not None:
                arch.check_inputs(self.inputs, input_limits(skeleton.model))
            applier = self._applier(skeleton, manifest)
            self._start_workers(arch, skeleton, applier, manifest)
            hooks = self._hook(skeleton)
            inputs = arch.sample_inputs() if self.inputs is None else self.inputs
            outputs = self._forward(skeleton.model, inputs)
            for worker in self._workers:
                worker.join(self.timeout_s)
            self._raise_failure()
            if applier.remaining:
                raise LoadTimeout(
                    f"{applier.remaining} tensor(s) not applied in {self.timeout_s:g}s"
                )
            self.timeline.loaded_at = time.perf_counter()
            return ColdStart(skeleton.model, outputs, self.timeline, arch, manifest)
        except BaseException as exc:
            self._fail(exc)
            self._settle()
            if self.failure is None or self.failure is exc:
                raise
            raise self.failure from exc
        finally:
            for h in hooks:
                h.remove()

    def _build(self, manifest: Manifest) -> tuple[Architecture, Skeleton]:
        """MiniLoader: the skeleton, bound to the checkpoint; uncovered tensors initialised."""
        start = time.perf_counter()
        if self.before_build is not None:
            self.before_build(manifest.nbytes)
        arch = resolve(manifest.config)
        model = arch.skeleton(self.device)
        order = self.orders.get(arch, manifest.config)
        renamed = self.orders.renamed(arch, manifest.config, manifest.tensors)
        skeleton = Skeleton(
            arch, model, manifest.tensors, order.unit_names(), manifest.file_of, renamed
        )
        arch.init_uncovered(model, skeleton.covered)
        self.skeleton = skeleton
        self._raise_failure()  # cancelled while building
        end = time.perf_counter()
        self.timeline.phase("skeleton", start, end)
        self.timeline.nbytes = manifest.nbytes
        if self.variant.miniloader:
            for slot in skeleton.slots:
                slot.constructed = True
            for unit in skeleton.units:
                self.timeline.unit(unit.name).widen("construct", start, end)
        return arch, skeleton

    def _start_workers(
        self, arch: Architecture, skeleton: Skeleton, applier: Applier, manifest: Manifest
    ) -> None:
        self._workers = [
            threading.Thread(
                target=self._guard, daemon=True, args=(self._apply_loop, applier, manifest)
            )
        ]
        if not self.variant.miniloader:
            self._workers.append(
                threading.Thread(
                    target=self._guard, daemon=True, args=(self._construct_loop, arch, skeleton)
                )
            )
        self._ready.set()
        for worker in self._workers:
            worker.start()

    def _fetch_options(self) -> FetchOptions:
        if self.variant.decoupler:
            return FetchOptions(
                plan=self.plan, priority=self.priority, reuse_cache=self.reuse_cache
            )
        # coupled: a unit's bytes are fetched once the unit exists, one range at a time
        coupled = PlanOptions(
            piece_per_group=True, range_bytes=self.plan.range_bytes, gap_bytes=self.plan.gap_bytes
        )
        return FetchOptions(
            plan=coupled,
            concurrency=1,
            priority=self.priority,
            reuse_cache=self.reuse_cache,
            gate=self._gate,
        )

    def _checkpoint_order(self, manifest: Manifest) -> list[list[str]]:
        arch = resolve(manifest.config)
        return self.orders.checkpoint_order(arch, manifest.config, manifest.tensors)

    def _await_manifest(self) -> Manifest:
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                event = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise LoadTimeout(
                    f"no manifest from {self.uri} within {self.timeout_s:g}s"
                ) from None
            if isinstance(event, ManifestReady):
                self.timeline.phase("manifest", self.timeline.t0, event.at)
                return event.manifest
            if isinstance(event, FetchFailed):
                raise event.error
            self._raise_failure()  # cancelled while waiting

    def _applier(self, skeleton: Skeleton, manifest: Manifest) -> Applier:
        views = CacheViews(manifest)
        if self.device.type == "cuda":
            return Applier(skeleton, views, self.timeline, "cuda", PinnedStaging(self.device))
        mode: Mode = "view" if self.variant.decoupler else "copy"
        return Applier(skeleton, views, self.timeline, mode)

    def _forward(self, model: nn.Module, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        args = {
            k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()
        }
        with torch.inference_mode():
            out = flatten_outputs(model(**args))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        end = time.perf_counter()
        self.timeline.phase("forward", start, end)
        self.timeline.result_at = end
        return out

    # -- gates -----------------------------------------------------------------------------

    def _hook(self, skeleton: Skeleton) -> list[Any]:
        return gate_hooks(
            skeleton.units, self.timeline, self.timeout_s, self._raise_failure, self.device
        )

    def _gate(self, piece: Piece) -> None:
        """Coupled fetch: a piece is fetched only once its slots are constructed."""
        if not self._ready.wait(self.timeout_s):
            raise LoadTimeout("skeleton not built in time")
        skeleton = self.skeleton
        assert skeleton is not None
        slots = [skeleton.by_ckpt[n] for n in piece.tensors if n in skeleton.by_ckpt]
        with self._built:
            ok = self._built.wait_for(
                lambda: self.failure is not None or all(s.constructed for s in slots),
                self.timeout_s,
            )
        self._raise_failure()
        if not ok:
            raise LoadTimeout(f"slots of piece {piece.index} not constructed in time")

    # -- worker threads --------------------------------------------------------------------

    def _guard(self, target: Any, *args: Any) -> None:
        try:
            target(*args)
        except BaseException as exc:
            self._fail(exc)

    def _apply_loop(self, applier: Applier, manifest: Manifest) -> None:
        try:
            self._drain(applier, manifest)
        finally:
            applier.views.close()

    def _drain(self, applier: Applier, manifest: Manifest) -> None:
        """Fill slots as pieces land; a slot not yet constructed waits for its ``_Built``."""
        skeleton = applier.skeleton
        tensors, file_of = manifest.tensors, manifest.file_of
        waiting: dict[int, tuple[Slot, str]] = {}
        fetched = False
        while not (fetched and applier.remaining == 0):
            try:
                event = self.events.get(timeout=self.timeout_s)
            except queue.Empty:
                raise LoadTimeout(f"no weights arrived for {self.timeout_s:g}s") from None
            if event is None or self.failure is not None:
                return
            if isinstance(event, PieceLanded):
                self.timeline.piece(event.started, event.landed, event.piece.nbytes)
                for name in event.piece.tensors:
                    slot = skeleton.by_ckpt.get(name)
                    if slot is None or slot.filled:
                        continue
                    for unit in slot.users:
                        self.timeline.unit(unit.name).widen("fetch", event.started, event.landed)
                    if slot.constructed:
                        applier.fill(slot, file_of[name], tensors[name])
                    else:
                        waiting[slot.index] = (slot, name)
            elif isinstance(event, _Built):
                for slot in event.slots:
                    if slot.index in waiting:
                        _, name = waiting.pop(slot.index)
                        applier.fill(slot, file_of[name], tensors[name])
            elif isinstance(event, FetchDone):
                fetched = True
            elif isinstance(event, FetchFailed):
                raise event.error

    def _construct_loop(self, arch: Architecture, skeleton: Skeleton) -> None:
        """Default-initialise unit by unit; a slot shared with an earlier unit is kept."""
        for unit in skeleton.units:
            if self.failure is not None:
                return
            start = time.perf_counter()
            fresh = [s for s in unit.slots if not s.constructed]
            kept = [s.tensor for s in unit.slots if s.constructed]
            with guard_torch_init_functions():
                for t in kept:
                    t._is_hf_initialized = True  # type: ignore[attr-defined]
                try:
                    arch.default_init(skeleton.model, unit.module)
                finally:
                    for t in kept:
                        del t._is_hf_initialized  # type: ignore[attr-defined]
            with self._built:
                for slot in fresh:
                    slot.constructed = True
                self._built.notify_all()
            self.timeline.unit(unit.name).widen("construct", start, time.perf_counter())
            self.events.put(_Built(fresh))

    # -- failure ---------------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc
        if self._handle is not None:
            self._handle.cancel()
        self._ready.set()
        with self._built:
            self._built.notify_all()
        if self.skeleton is not None:
            for unit in self.skeleton.units:
                unit.ready.set()
        self.events.put(None)

    def cancel(self, error: BaseException) -> None:
        """Stop the cold start (from any thread): the forward pass raises ``error`` at the
        next unit, the fetch is dropped."""
        self._fail(error)

    def _settle(self, timeout_s: float = 10.0) -> None:
        """After a failure: let the fetch's and our own threads finish before returning."""
        if self._handle is not None:
            self._handle.join(timeout_s)
        for worker in self._workers:
            worker.join(timeout_s)

    def _raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure


def gate_hooks(
    units: list[Unit],
    timeline: Timeline,
    timeout_s: float,
    check: Callable[[], None],
    device: torch.device,
) -> list[Any]:
    """Hooks that hold each unit's forward until its slots are filled, and time it.

    ``check`` raises the cold start's failure, if any, once a gate opens.
    """
    handles = []
    for unit in units:
        times = timeline.unit(unit.name)
        started = [0.0]

        def pre(
            _m: nn.Module,
            _a: Any,
            unit: Unit = unit,
            times: UnitTimes = times,
            started: list[float] = started,
        ) -> None:
            if not unit.ready.is_set():
                waited = time.perf_counter()
                while not unit.ready.wait(0.05):  # wake now and then: a failure may be waiting
                    check()
                    if time.perf_counter() - waited > timeout_s:
                        raise LoadTimeout(
                            f"unit {unit.name!r} waited {timeout_s:g}s for its weights"
                        )
                times.wait_s += time.perf_counter() - waited
            check()
            if unit.cuda_event is not None:
                torch.cuda.current_stream(device).wait_event(unit.cuda_event)
            started[0] = time.perf_counter()

        def post(
            _m: nn.Module,
            _a: Any,
            _o: Any,
            times: UnitTimes = times,
            started: list[float] = started,
        ) -> None:
            times.widen("exec", started[0], time.perf_counter())

        handles += [
            unit.module.register_forward_pre_hook(pre),
            unit.module.register_forward_hook(post),
        ]
    return handles
