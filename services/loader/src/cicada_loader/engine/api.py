"""The engine's public face: one call loads a checkpoint through the pipeline and runs it.

    >>> from cicada_loader import cold_start
    >>> result = cold_start("models/gpt2", {"input_ids": ids})
    >>> result.outputs["logits"], result.timeline.summary()["e2e_s"]
    >>> result.model(input_ids=more_ids)          # warm from here on

The benchmark and the loader service call the same code.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cicada_loader.engine.arch import resolve
from cicada_loader.engine.naive import naive_cold_start
from cicada_loader.engine.order import ExecOrder, OrderBook, dry_run
from cicada_loader.engine.pipeline import VARIANTS, ColdStart, PipelinedColdStart, Variant
from cicada_weights.checkpoint import read_checkpoint
from cicada_weights.fetcher import Fetcher
from cicada_weights.origins import open_origin
from cicada_weights.plan import PlanOptions


def default_cache_dir() -> Path:
    """``$CICADA_CACHE_DIR``, else ``~/.cache/cicada``."""
    return Path(os.environ.get("CICADA_CACHE_DIR") or Path.home() / ".cache" / "cicada")


def cold_start(
    model: str | os.PathLike[str],
    inputs: Mapping[str, Any] | None = None,
    *,
    variant: str | Variant = "cicada",
    device: str | torch.device = "cpu",
    cache_dir: Path | None = None,
    fetcher: Fetcher | None = None,
    orders: OrderBook | None = None,
    timeout_s: float = 600.0,
    reuse_cache: bool = True,
    priority: int = 0,
    plan: PlanOptions | None = None,
) -> ColdStart:
    """Load ``model`` (a checkpoint directory: path, ``file://`` or ``http(s)://`` URL) and run
    ``inputs`` (forward keyword arguments; sample inputs when ``None``) on it.

    Returns the loaded model, the outputs as named tensors, and the cold start's timeline.
    Raises a ``cicada_shared.errors.CicadaError`` subclass naming the file and tensor when the
    checkpoint is broken or does not fit; the model is never returned half-loaded.

    Args:
        variant: ``cicada`` (default) or one of the ablation baselines in ``VARIANTS``.
        device: ``cpu`` or ``cuda[:n]``.
        cache_dir: node-local cache for fetched files and remembered execution orders.
        fetcher: a shared ``Fetcher`` (one is made and closed for this call otherwise).
        reuse_cache: serve a complete cached copy instead of fetching again.
    """
    uri = os.fspath(model)
    chosen = VARIANTS[variant] if isinstance(variant, str) else variant
    dev = torch.device(device)
    root = cache_dir or default_cache_dir()
    book = orders or OrderBook(root / "orders")
    own = fetcher is None
    fetch = fetcher or Fetcher(root / "files")
    try:
        if not chosen.pipelined:
            return naive_cold_start(
                uri, inputs, device=dev, fetcher=fetch, timeout_s=timeout_s, reuse_cache=reuse_cache
            )
        run = PipelinedColdStart(
            uri,
            inputs,
            chosen,
            device=dev,
            fetcher=fetch,
            orders=book,
            timeout_s=timeout_s,
            reuse_cache=reuse_cache,
            priority=priority,
            plan=plan,
        )
        return run.run()
    finally:
        if own:
            fetch.close()


def prepare(
    model: str | os.PathLike[str], *, orders: OrderBook | None = None, cache_dir: Path | None = None
) -> ExecOrder:
    """Find and remember ``model``'s execution order (a meta-device dry run, once per config).

    Also warms the model's code — imports, first construction, first forward, all on the meta
    device — as a loader that has served this architecture before would be warm.
    """
    origin = open_origin(os.fspath(model))
    try:
        ckpt = read_checkpoint(origin)
    finally:
        origin.close()
    book = orders or OrderBook((cache_dir or default_cache_dir()) / "orders")
    arch = resolve(ckpt.config)
    order = book.get(arch, ckpt.config)
    dry_run(arch)  # a remembered order skips the dry run; run it anyway, to warm the code
    book.renamed(arch, ckpt.config, [k for h in ckpt.headers.values() for k in h.tensors])
    return order
