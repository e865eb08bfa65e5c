"""What a checkpoint directory holds, read with small requests before any bulk byte moves.

A Hugging Face-format directory: ``config.json``, then either ``model.safetensors`` or a
``model.safetensors.index.json`` naming the shards. Reading it costs one request for the
config, one for the index and one or two per shard header.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cicada_shared.errors import CheckpointError, HeaderError
from cicada_weights.header import (
    PREFIX_BYTES,
    Header,
    header_length,
    json_object,
    parse_header,
)
from cicada_weights.origins import Origin

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The small files of a checkpoint, raw and parsed, and each shard's checked header."""

    raw_config: bytes
    config: dict[str, Any]
    raw_index: bytes | None
    headers: dict[str, Header]
    #: each shard's first bytes: the length field and the header JSON
    prefixes: dict[str, bytes]


def read_checkpoint(origin: Origin) -> Checkpoint:
    """Read config, index and every shard header of the checkpoint at ``origin``."""
    raw_config = origin.read_file(CONFIG)
    if raw_config is None:
        raise CheckpointError("config.json not found", file=CONFIG)
    config = json_object(raw_config, CONFIG)
    raw_index = origin.read_file(INDEX)
    headers, prefixes = {}, {}
    for file in shard_files(raw_index):
        headers[file], prefixes[file] = read_header(origin, file)
    if raw_index is not None:
        _check_index(json_object(raw_index, INDEX)["weight_map"], headers)
    return Checkpoint(raw_config, config, raw_index, headers, prefixes)


def read_header(origin: Origin, file: str) -> tuple[Header, bytes]:
    """Parse and check the header of shard ``file``; also return its raw bytes."""
    size = origin.size(file)
    prefix = origin.read(file, 0, min(size, PREFIX_BYTES)) if size else b""
    length = header_length(prefix, file=file, file_size=size)
    if 8 + length > len(prefix):
        prefix += origin.read(file, len(prefix), 8 + length - len(prefix))
    prefix = prefix[: 8 + length]
    return parse_header(prefix[8:], file=file, file_size=size), prefix


def shard_files(raw_index: bytes | None) -> list[str]:
    """The safetensors files of a checkpoint: from its index, or the single default file."""
    if raw_index is None:
        return [SINGLE]
    weight_map = json_object(raw_index, INDEX).get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise HeaderError("weight_map must map tensor names to file names", file=INDEX)
    files = sorted(set(weight_map.values()))
    for f in files:
        if "/" in f or "\\" in f or f in ("", ".", "..") or not f.endswith(".safetensors"):
            raise HeaderError(f"shard name {f!r} is not a plain .safetensors file name", file=INDEX)
    return files


def _check_index(weight_map: dict[str, str], headers: dict[str, Header]) -> None:
    for tensor, file in weight_map.items():
        if tensor not in headers[file].tensors:
            raise HeaderError(
                f"index places tensor {tensor!r} in {file}, which lacks it",
                file=INDEX,
                tensor=tensor,
            )
