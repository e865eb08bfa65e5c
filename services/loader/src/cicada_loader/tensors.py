"""Wire tensors (raw bytes + Open Inference Protocol datatype) to and from torch."""

from __future__ import annotations

import math

import torch

from cicada_shared.contracts import DATATYPES, Tensor
from cicada_shared.errors import InvalidInput

TORCH_OF: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "FP16": torch.float16,
    "BF16": torch.bfloat16,
    "FP32": torch.float32,
    "FP64": torch.float64,
}
DATATYPE_OF = {dtype: name for name, dtype in TORCH_OF.items()}


def to_torch(tensor: Tensor) -> torch.Tensor:
    expected = math.prod(tensor.shape) * DATATYPES[tensor.datatype]
    if len(tensor.data) != expected:
        raise InvalidInput(
            f"input {tensor.name!r}: {tensor.datatype} {tensor.shape} needs {expected} bytes, "
            f"got {len(tensor.data)}"
        )
    if expected == 0:
        raise InvalidInput(f"input {tensor.name!r}: shape {tensor.shape} holds no values")
    flat = torch.frombuffer(bytearray(tensor.data), dtype=TORCH_OF[tensor.datatype])
    return flat.reshape(tensor.shape)


def from_torch(name: str, value: torch.Tensor) -> Tensor:
    value = value.detach().to("cpu").contiguous()
    if value.dtype not in DATATYPE_OF:
        raise InvalidInput(f"output {name!r} has dtype {value.dtype}, which has no datatype")
    raw = value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b""
    return Tensor(name=name, datatype=DATATYPE_OF[value.dtype], shape=list(value.shape), data=raw)
