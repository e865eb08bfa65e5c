"""Read and check a safetensors header without torch.

A safetensors file is 8 bytes of little-endian header length N, N bytes of JSON, then the
data section. Each JSON entry names a tensor: ``{"dtype", "shape", "data_offsets": [b, e]}``
with offsets relative to the data section. We check everything a loader relies on before a
single data byte is fetched, and name the file and tensor in every error.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
from dataclasses import dataclass
from typing import Any

from cicada_shared.errors import (
    DtypeShapeMismatch,
    HeaderError,
    OffsetsError,
    TruncatedCheckpoint,
)

#: Bytes per element of every dtype the safetensors format defines.
DTYPE_SIZES: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}

#: The reference implementation refuses headers above 100 MB; so do we.
MAX_HEADER_BYTES = 100_000_000
#: How many bytes to ask for first: the length and most headers (GPT-2's is 15 kB).
PREFIX_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor of a safetensors file; ``start``/``end`` are absolute file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class Header:
    """The parsed, checked header of one safetensors file."""

    file: str
    file_size: int
    data_start: int
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]

    @property
    def header_bytes(self) -> int:
        return self.data_start


def header_length(prefix: bytes, *, file: str, file_size: int) -> int:
    """Return N, the JSON length, from the first bytes of a file of ``file_size`` bytes."""
    if file_size < 8 or len(prefix) < 8:
        raise TruncatedCheckpoint(
            f"file is {file_size} bytes, too short for a safetensors header", file=file
        )
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > MAX_HEADER_BYTES:
        raise HeaderError(f"header length {length} exceeds {MAX_HEADER_BYTES} bytes", file=file)
    if 8 + length > file_size:
        raise HeaderError(
            f"header claims {length} bytes but the file has only {file_size - 8} after the "
            "length field",
            file=file,
        )
    return int(length)


def parse_header(raw: bytes, *, file: str, file_size: int) -> Header:
    """Parse the JSON header ``raw`` (without the 8-byte length) and check every entry."""
    doc = json_object(raw, file)
    data_start = 8 + len(raw)
    data_len = file_size - data_start
    metadata = _metadata(doc.pop("__metadata__", {}), file)
    tensors = {name: _entry(name, spec, file, data_start) for name, spec in doc.items()}
    _check_layout(tensors, file=file, data_start=data_start, data_len=data_len)
    return Header(file, file_size, data_start, tensors, metadata)


def _metadata(value: object, file: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise HeaderError("__metadata__ must map strings to strings", file=file)
    return dict(value)


def _entry(name: str, spec: object, file: str, data_start: int) -> TensorEntry:
    if not isinstance(spec, dict):
        raise HeaderError("entry is not an object", file=file, tensor=name)
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise HeaderError(f"unknown dtype {dtype!r}", file=file, tensor=name)
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise HeaderError(
            f"shape must be a list of non-negative ints, got {shape!r}", file=file, tensor=name
        )
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise HeaderError(
            f"data_offsets must be two non-negative ints, got {offsets!r}", file=file, tensor=name
        )
    begin, end = offsets
    if begin > end:
        raise OffsetsError(f"data_offsets [{begin}, {end}] run backwards", file=file, tensor=name)
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise DtypeShapeMismatch(
            f"{dtype} {shape} needs {expected} bytes but data_offsets [{begin}, {end}] hold "
            f"{end - begin}",
            file=file,
            tensor=name,
        )
    return TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_layout(
    tensors: dict[str, TensorEntry], *, file: str, data_start: int, data_len: int
) -> None:
    """Ranges must not overlap and must fit the data; a short file is reported as truncated."""
    ordered = sorted(tensors.values(), key=lambda t: (t.start, t.end))
    previous: TensorEntry | None = None
    for entry in ordered:
        if previous is not None and entry.start < previous.end:
            raise OffsetsError(
                f"bytes [{entry.start - data_start}, {entry.end - data_start}) overlap tensor "
                f"{previous.name!r}",
                file=file,
                tensor=entry.name,
            )
        previous = entry
    if previous is None or previous.end - data_start <= data_len:
        return
    contiguous = ordered[0].start == data_start and all(
        a.end == b.start for a, b in itertools.pairwise(ordered)
    )
    beyond = next(t for t in ordered if t.end - data_start > data_len)
    if contiguous:
        raise TruncatedCheckpoint(
            f"file ends {previous.end - data_start - data_len} bytes early: the data section "
            f"holds {data_len} bytes but tensors need {previous.end - data_start}",
            file=file,
            tensor=beyond.name,
        )
    raise OffsetsError(
        f"bytes [{beyond.start - data_start}, {beyond.end - data_start}) fall outside the "
        f"{data_len}-byte data section",
        file=file,
        tensor=beyond.name,
    )


def json_object(raw: bytes, file: str) -> dict[str, Any]:
    """Parse ``raw`` as a JSON object, or raise ``HeaderError`` naming ``file``."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HeaderError(f"not valid JSON: {exc}", file=file) from exc
    if not isinstance(doc, dict):
        raise HeaderError("not a JSON object", file=file)
    return doc
