"""Open Inference Protocol v2 (KServe, Triton) request and response bodies, and the
conversion of their JSON tensors to and from the mesh's raw-byte tensors."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from cicada_shared.contracts import DATATYPES, PRIORITY_MAX, PRIORITY_MIN, Tensor

#: numpy's little-endian dtype for each datatype (BF16 travels as its 16 raw bits).
NUMPY_OF: dict[str, str] = {
    "BOOL": "|b1",
    "UINT8": "|u1",
    "INT8": "|i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "BF16": "<u2",
    "FP32": "<f4",
    "FP64": "<f8",
}


class BadRequest(ValueError):
    """A request the gateway refuses with 400; the message says what is wrong."""


class RequestInput(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    shape: list[int]
    datatype: str
    data: list[Any]
    parameters: dict[str, Any] | None = None


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    """``POST /v2/models/{name}/infer`` and ``…/jobs``.

    ``parameters.priority``: 0 (background, the default) to 9 (most urgent); higher runs
    first. ``parameters.timeout_s``: how long an ``infer`` call waits for its result.
    ``parameters.deadline_s``: seconds from now after which the job fails rather than runs.
    """

    model_config = ConfigDict(extra="allow")

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class RegisterBody(BaseModel):
    """``POST /v2/repository/models/{name}``."""

    uri: str = Field(description="file:///path below the allowed roots, or http(s)://host/dir")


def priority_of(request: InferenceRequest) -> int:
    value = (request.parameters or {}).get("priority", PRIORITY_MIN)
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not (PRIORITY_MIN <= value <= PRIORITY_MAX)
    ):
        raise BadRequest(
            f"parameters.priority must be an integer from {PRIORITY_MIN} "
            f"(background) to {PRIORITY_MAX} (most urgent), got {value!r}"
        )
    return value


def number_param(request: InferenceRequest, name: str) -> float | None:
    value = (request.parameters or {}).get(name)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise BadRequest(f"parameters.{name} must be a positive number, got {value!r}")
    return float(value)


def to_wire(item: RequestInput) -> Tensor:
    """A JSON input tensor as raw bytes; checks datatype, shape and data against each other."""
    if item.datatype not in DATATYPES:
        raise BadRequest(
            f"input {item.name!r}: unknown datatype {item.datatype!r}; use one of "
            f"{', '.join(DATATYPES)}"
        )
    if any(d < 0 for d in item.shape):
        raise BadRequest(f"input {item.name!r}: shape {item.shape} has a negative dimension")
    if 0 in item.shape:
        raise BadRequest(f"input {item.name!r}: shape {item.shape} holds no values")
    try:
        values = np.asarray(item.data)
    except ValueError as exc:  # ragged nesting
        raise BadRequest(f"input {item.name!r}: data is not a regular array: {exc}") from exc
    values = values.reshape(-1)
    expected = math.prod(item.shape)
    if values.size != expected:
        raise BadRequest(
            f"input {item.name!r}: shape {item.shape} needs {expected} values, "
            f"data has {values.size}"
        )
    want, noun = _KINDS.get(item.datatype[:3], ("iuf", "numbers"))
    if values.size and values.dtype.kind not in want:
        raise BadRequest(f"input {item.name!r}: {item.datatype} data must be {noun}")
    return Tensor(
        name=item.name,
        datatype=item.datatype,
        shape=item.shape,
        data=_encode(values, item.datatype),
    )


#: numpy kinds allowed in the JSON data of each family of datatypes
_KINDS = {"BOO": ("b", "booleans"), "INT": ("iu", "integers"), "UIN": ("iu", "integers")}


def _encode(values: np.ndarray[Any, Any], datatype: str) -> bytes:
    if datatype == "BF16":  # round to nearest even, keep the upper 16 bits
        bits = values.astype("<f4").view("<u4").astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return rounded.astype("<u2").tobytes()
    target = np.dtype(NUMPY_OF[datatype])
    if target.kind in "iu" and values.size:
        info = np.iinfo(target)
        if values.min() < info.min or values.max() > info.max:
            raise BadRequest(f"values out of range for {datatype} [{info.min}, {info.max}]")
    try:
        with np.errstate(over="raise", invalid="raise"):
            return values.astype(target).tobytes()
    except FloatingPointError as exc:
        raise BadRequest(f"values out of range for {datatype}: {exc}") from exc


def to_json(tensor: Tensor) -> dict[str, Any]:
    """A raw-byte tensor as an Open Inference Protocol output (flat, row-major data; a numpy
    array, which ``FastJSON`` writes without a Python object per element)."""
    values = np.frombuffer(tensor.data, dtype=NUMPY_OF[tensor.datatype])
    if tensor.datatype == "BF16":
        values = (values.astype("<u4") << 16).view("<f4")
    return {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape, "data": values}


class FastJSON(JSONResponse):
    """JSON responses by orjson: numpy arrays natively, floats ten times faster than json."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
