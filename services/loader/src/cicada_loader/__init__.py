"""Cicada loader: builds models without wasted init, applies weights as they land, runs
each layer as soon as its weights are in.

The engine's names are imported on first use, so that ``python -m cicada_loader`` can set
OpenMP's environment before torch loads.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cicada_loader.engine.api import cold_start, default_cache_dir, prepare
    from cicada_loader.engine.pipeline import VARIANTS, ColdStart, Variant

__all__ = ["VARIANTS", "ColdStart", "Variant", "cold_start", "default_cache_dir", "prepare"]

#: OpenMP workers spin this many rounds (not 300 000) after a parallel region, then give
#: their core back to the event loop, the broker and the gateway. Fewer slow the forward
#: pass itself (bert-base: 31.9 ms at 10 000, 41.0 at 1 000). A loader sets it unless the
#: environment already does; OpenMP reads it when torch loads.
GOMP_SPINCOUNT = "10000"

_HOME = {
    "cold_start": "cicada_loader.engine.api",
    "default_cache_dir": "cicada_loader.engine.api",
    "prepare": "cicada_loader.engine.api",
    "VARIANTS": "cicada_loader.engine.pipeline",
    "ColdStart": "cicada_loader.engine.pipeline",
    "Variant": "cicada_loader.engine.pipeline",
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'cicada_loader' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)
