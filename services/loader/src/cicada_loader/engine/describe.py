"""A model's inputs and outputs, with their shapes, found on the meta device.

Two meta forward passes with different batch and sequence sizes tell which dimensions are
fixed and which follow the input (-1), as model metadata in the Open Inference Protocol
reports them.
"""

from __future__ import annotations

from typing import Any

import torch

from cicada_loader.engine.arch import Architecture, flatten_outputs

Spec = tuple[str, torch.dtype, list[int]]


def describe(arch: Architecture) -> tuple[list[Spec], list[Spec]]:
    """``(inputs, outputs)`` as (name, dtype, shape with -1 for variable dimensions)."""
    runs = [_run(arch, batch, seq) for batch, seq in ((1, 8), (2, 9))]
    return _merge(runs[0][0], runs[1][0]), _merge(runs[0][1], runs[1][1])


def _run(arch: Architecture, batch: int, seq: int) -> tuple[dict[str, Any], dict[str, Any]]:
    model = arch.build_meta()
    inputs = {k: v.to("meta") for k, v in arch.sample_inputs(batch=batch, seq_len=seq).items()}
    with torch.inference_mode():
        outputs = flatten_outputs(model(**inputs))
    return inputs, outputs


def _merge(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[Spec]:
    specs = []
    for name, tensor in a.items():
        other = b.get(name)
        shape = [
            d if other is not None and other.dim() == tensor.dim() and other.shape[i] == d else -1
            for i, d in enumerate(tensor.shape)
        ]
        specs.append((name, tensor.dtype, shape))
    return specs
