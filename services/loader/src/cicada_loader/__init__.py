"""Cicada loader: builds models without wasted init, applies weights as they land, runs
each layer as soon as its weights are in."""

from cicada_loader.engine.api import cold_start, default_cache_dir, prepare
from cicada_loader.engine.pipeline import VARIANTS, ColdStart, Variant

__all__ = ["VARIANTS", "ColdStart", "Variant", "cold_start", "default_cache_dir", "prepare"]
