"""The model skeleton as the pipeline sees it: slots to fill and units to gate.

- A *slot* is one model tensor (parameter or persistent buffer) with every name it answers
  to; tied weights are one slot under two names, so filling it once fills both.
- A *unit* is a module that directly owns slots. Its forward waits at a gate until all its
  slots are filled; nothing else in the model waits.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cicada_loader.engine.arch import Architecture
from cicada_loader.engine.keys import match_keys
from cicada_shared.errors import MissingTensors, ShapeMismatch, UnexpectedTensors
from cicada_weights.header import TensorEntry


@dataclass(eq=False)
class Slot:
    """One model tensor and the checkpoint key that fills it."""

    index: int
    names: list[str]
    tensor: torch.Tensor
    ckpt: str | None = None
    users: list[Unit] = field(default_factory=list)
    constructed: bool = False
    filled: bool = False


@dataclass(eq=False)
class Unit:
    """A module that owns slots; its forward is gated on them."""

    name: str
    module: nn.Module
    slots: list[Slot]
    pending: int = 0
    ready: threading.Event = field(default_factory=threading.Event)
    #: set on CUDA: the side-stream event after the unit's last upload
    cuda_event: Any = None


def tensor_groups(model: nn.Module) -> list[tuple[list[str], torch.Tensor]]:
    """Parameters and persistent buffers, each with all the names it answers to."""
    by_id: dict[int, tuple[list[str], torch.Tensor]] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for name, tensor in direct_tensors(module):
            key = f"{prefix}.{name}" if prefix else name
            names = by_id.setdefault(id(tensor), ([], tensor))[0]
            if key not in names:
                names.append(key)
    return list(by_id.values())


def unit_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that directly own parameters or persistent buffers, in registration order."""
    return [(name, m) for name, m in model.named_modules() if any(True for _ in direct_tensors(m))]


def direct_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    out: list[tuple[str, torch.Tensor]] = [
        (n, p) for n, p in module._parameters.items() if p is not None
    ]
    skip = module._non_persistent_buffers_set
    out += [(n, b) for n, b in module._buffers.items() if b is not None and n not in skip]
    return out


class Skeleton:
    """A built model bound to a checkpoint's tensors: which slot each key fills, in order."""

    def __init__(
        self,
        arch: Architecture,
        model: nn.Module,
        tensors: dict[str, TensorEntry],
        unit_order: list[str],
        file_of: dict[str, str],
        renamed: dict[str, str] | None = None,
    ) -> None:
        self.model = model
        groups = tensor_groups(model)
        match = match_keys(
            [names for names, _ in groups],
            renamed if renamed is not None else arch.rename_table(model, tensors),
            prefix=arch.prefix,
            ignore_missing=list(getattr(model, "_keys_to_ignore_on_load_missing", None) or ()),
            ignore_unexpected=list(
                getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()
            ),
        )
        file = ", ".join(sorted(set(file_of.values()))) or "checkpoint"
        if match.missing:
            raise MissingTensors(match.missing, file=file)
        if match.unexpected:
            raise UnexpectedTensors(match.unexpected, file=file)
        self.slots = [Slot(i, names, t, match.filled.get(i)) for i, (names, t) in enumerate(groups)]
        self.by_ckpt = {s.ckpt: s for s in self.slots if s.ckpt is not None}
        for slot in self.by_ckpt.values():
            key = slot.ckpt or ""
            _check_shape(slot, tensors[key], file_of.get(key, file))
        by_tensor = {id(s.tensor): s for s in self.slots}
        rank = {name: i for i, name in enumerate(unit_order)}
        mods = sorted(unit_modules(model), key=lambda nm: rank.get(nm[0], len(rank)))
        self.units = []
        for name, module in mods:
            slots = [by_tensor[id(t)] for _, t in direct_tensors(module)]
            unit = Unit(name, module, list(dict.fromkeys(slots)))
            self.units.append(unit)
            for slot in unit.slots:
                slot.users.append(unit)
        for slot in self.slots:
            if slot.ckpt is None:  # tolerated as missing: the model's own init fills it
                slot.filled = True
        for unit in self.units:
            unit.pending = sum(not s.filled for s in unit.slots)
            if unit.pending == 0:
                unit.ready.set()

    @property
    def covered(self) -> set[int]:
        """Ids of the tensors the checkpoint fills."""
        return {id(s.tensor) for s in self.by_ckpt.values()}


def _check_shape(slot: Slot, entry: TensorEntry, file: str) -> None:
    if tuple(slot.tensor.shape) != entry.shape:
        raise ShapeMismatch(
            f"checkpoint shape {list(entry.shape)} does not fit model tensor {slot.names[0]!r} "
            f"of shape {list(slot.tensor.shape)}",
            file=file,
            tensor=entry.name,
        )
