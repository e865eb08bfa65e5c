"""The safetensors header parser: every malformation gets its own typed error."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest

from cicada_shared.errors import (
    DtypeShapeMismatch,
    HeaderError,
    OffsetsError,
    TruncatedCheckpoint,
)
from cicada_weights.header import header_length, parse_header


def encode(header: dict[str, Any], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def parse(blob: bytes, file: str = "model.safetensors") -> Any:
    length = header_length(blob, file=file, file_size=len(blob))
    return parse_header(blob[8 : 8 + length], file=file, file_size=len(blob))


def good() -> dict[str, Any]:
    return {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "I64", "shape": [1], "data_offsets": [16, 24]},
    }


def test_parses_entries_with_absolute_offsets() -> None:
    blob = encode(good(), bytes(24))
    header = parse(blob)
    start = len(blob) - 24
    assert header.data_start == start
    assert header.metadata == {"format": "pt"}
    assert header.tensors["a"].shape == (2, 2)
    assert (header.tensors["a"].start, header.tensors["a"].end) == (start, start + 16)
    assert (header.tensors["b"].start, header.tensors["b"].end) == (start + 16, start + 24)


def test_file_shorter_than_length_field() -> None:
    with pytest.raises(TruncatedCheckpoint, match="too short"):
        header_length(b"\x01\x02", file="m.safetensors", file_size=2)


def test_header_longer_than_file() -> None:
    blob = struct.pack("<Q", 10_000) + b"{}"
    with pytest.raises(HeaderError, match="header claims 10000 bytes") as err:
        header_length(blob, file="m.safetensors", file_size=len(blob))
    assert err.value.file == "m.safetensors"


def test_header_not_json() -> None:
    blob = struct.pack("<Q", 5) + b"{nope"
    with pytest.raises(HeaderError, match="not valid JSON"):
        parse(blob)


def test_unknown_dtype_names_the_tensor() -> None:
    header = good()
    header["a"]["dtype"] = "F128"
    with pytest.raises(HeaderError, match="unknown dtype") as err:
        parse(encode(header, bytes(24)))
    assert err.value.tensor == "a"


def test_dtype_shape_disagree_with_byte_length() -> None:
    header = good()
    header["a"]["shape"] = [3, 2]
    with pytest.raises(DtypeShapeMismatch, match="needs 24 bytes") as err:
        parse(encode(header, bytes(24)))
    assert err.value.tensor == "a"


def test_overlapping_offsets() -> None:
    header = good()
    header["b"]["data_offsets"] = [8, 16]
    header["b"]["dtype"] = "F64"
    with pytest.raises(OffsetsError, match="overlap tensor 'a'") as err:
        parse(encode(header, bytes(24)))
    assert err.value.tensor == "b"


def test_offsets_outside_the_data() -> None:
    header = good()
    header["b"]["data_offsets"] = [40, 48]
    with pytest.raises(OffsetsError, match="fall outside") as err:
        parse(encode(header, bytes(24)))
    assert err.value.tensor == "b"


def test_truncated_data_section() -> None:
    blob = encode(good(), bytes(20))  # 4 bytes short of what the header describes
    with pytest.raises(TruncatedCheckpoint, match="4 bytes early") as err:
        parse(blob)
    assert err.value.tensor == "b"
    assert "model.safetensors" in str(err.value)


def test_backwards_offsets() -> None:
    header = good()
    header["a"]["data_offsets"] = [16, 0]
    with pytest.raises(OffsetsError, match="backwards"):
        parse(encode(header, bytes(24)))
