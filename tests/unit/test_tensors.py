"""Wire tensors to and from torch: bytes checked against shape and datatype."""

from __future__ import annotations

import pytest
import torch

from cicada_loader.tensors import from_torch, to_torch
from cicada_shared.contracts import Tensor
from cicada_shared.errors import InvalidInput


def test_round_trip_is_exact() -> None:
    value = torch.randn(2, 3)
    assert torch.equal(to_torch(from_torch("x", value)), value)


@pytest.mark.parametrize(
    ("shape", "data", "says"),
    [
        ([2, 3], b"\0" * 40, "needs 48 bytes, got 40"),
        ([0, 4], b"", "holds no values"),
        ([2**63, 0], b"", "holds no values"),
    ],
)
def test_bad_wire_tensors_are_refused_by_name(shape: list[int], data: bytes, says: str) -> None:
    with pytest.raises(InvalidInput, match=says):
        to_torch(Tensor(name="x", datatype="FP64", shape=shape, data=data))
