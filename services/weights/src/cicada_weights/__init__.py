"""Cicada weights: fetch safetensors bytes in execution order into the node-local cache."""

from cicada_weights.fetcher import (
    FetchDone,
    Fetcher,
    FetchEvent,
    FetchFailed,
    FetchHandle,
    FetchOptions,
    Manifest,
    ManifestReady,
    PieceLanded,
)
from cicada_weights.header import Header, TensorEntry
from cicada_weights.plan import Piece, PlanOptions

__all__ = [
    "FetchDone",
    "FetchEvent",
    "FetchFailed",
    "FetchHandle",
    "FetchOptions",
    "Fetcher",
    "Header",
    "Manifest",
    "ManifestReady",
    "Piece",
    "PieceLanded",
    "PlanOptions",
    "TensorEntry",
]
