"""The ordinary way, for comparison: fetch everything, build with init, load, run."""

from __future__ import annotations

import queue
import time
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import load_file

from cicada_loader.engine.arch import flatten_outputs, input_limits, resolve
from cicada_loader.engine.pipeline import ColdStart, gate_hooks
from cicada_loader.engine.skeleton import Skeleton
from cicada_loader.engine.timeline import Timeline
from cicada_weights.fetcher import Fetcher, FetchEvent, FetchOptions, PieceLanded
from cicada_weights.plan import MiB, PlanOptions


def naive_cold_start(
    uri: str,
    inputs: Mapping[str, Any] | None,
    *,
    device: torch.device,
    fetcher: Fetcher,
    timeout_s: float,
    reuse_cache: bool,
) -> ColdStart:
    """Fetch the whole checkpoint in file order, build with default init, load, then run."""
    tl = Timeline(variant="naive", model=uri, device=str(device))
    events: queue.SimpleQueue[FetchEvent] = queue.SimpleQueue()
    options = FetchOptions(
        plan=PlanOptions(piece_bytes=64 * MiB), concurrency=1, reuse_cache=reuse_cache
    )
    handle = fetcher.fetch(uri, events.put, options=options)
    handle.wait(timeout_s)
    manifest = handle.manifest
    assert manifest is not None
    while not events.empty():
        event = events.get()
        if isinstance(event, PieceLanded):
            tl.piece(event.started, event.landed, event.piece.nbytes)
    fetched = time.perf_counter()
    tl.phase("fetch", tl.t0, fetched)
    tl.nbytes = manifest.nbytes

    arch = resolve(manifest.config)
    with torch.device(device):
        model = arch.build()
    skeleton = Skeleton(arch, model, manifest.tensors, [], manifest.file_of)
    built = time.perf_counter()
    tl.phase("build", fetched, built)

    state: dict[str, torch.Tensor] = {}
    for file in manifest.headers:
        state.update(load_file(str(manifest.path(file)), device=str(device)))
    model.load_state_dict(
        {slot.names[0]: state[slot.ckpt] for slot in skeleton.by_ckpt.values() if slot.ckpt},
        strict=False,
    )
    del state
    loaded = time.perf_counter()
    tl.phase("load", built, loaded)
    tl.loaded_at = loaded
    for unit in skeleton.units:
        unit.ready.set()
        times = tl.unit(unit.name)
        times.widen("construct", fetched, built)
        times.widen("fetch", tl.t0, fetched)
        times.widen("apply", built, loaded)

    hooks = gate_hooks(skeleton.units, tl, timeout_s, lambda: None, device)
    try:
        inputs = arch.sample_inputs() if inputs is None else inputs
        arch.check_inputs(inputs, input_limits(model))
        args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        start = time.perf_counter()
        with torch.inference_mode():
            outputs = flatten_outputs(model(**args))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        end = time.perf_counter()
    finally:
        for h in hooks:
            h.remove()
    tl.phase("forward", start, end)
    tl.result_at = end
    return ColdStart(model, outputs, tl, arch, manifest)
