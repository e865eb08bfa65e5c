"""The WeightDecoupler's applying half: attach tensors to the skeleton as they land.

Three modes:

- ``view`` (Cicada): the parameter's data becomes a view of the cache file, mapped
  copy-on-write. No copy is made; the page cache holds the only copy of the weights.
  A tensor whose dtype differs from the model's, or whose offset is not aligned for its
  dtype, is the exception and is copied once.
- ``copy`` (the baselines, like ``load_state_dict``): the bytes are read straight from the
  cache file into the parameter's own memory.
- ``cuda``: the bytes are staged through pinned memory and copied on a side stream; the
  unit's forward waits on a CUDA event, not on the host (see ``staging``).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import time
from typing import Literal

import torch

from cicada_loader.engine.skeleton import Skeleton, Slot
from cicada_loader.engine.staging import PinnedStaging
from cicada_loader.engine.timeline import Timeline
from cicada_weights.fetcher import Manifest
from cicada_weights.header import TensorEntry

Mode = Literal["view", "copy", "cuda"]

TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CacheViews:
    """Read-side access to the cache files of one fetch.

    Each file is mapped once, privately (copy-on-write), as a flat ``uint8`` tensor; tensors
    are views into it. Pages the fetcher has not written yet read as zeros and are never
    touched before their piece is announced. The mapping lives as long as any view does.
    """

    def __init__(self, manifest: Manifest) -> None:
        self._bases: dict[str, torch.Tensor] = {}
        self._fds: dict[str, int] = {}
        for file in manifest.headers:
            path = manifest.path(file)
            with path.open("r+b") as f:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self._bases[file] = torch.frombuffer(mapped, dtype=torch.uint8)
            self._fds[file] = os.open(path, os.O_RDONLY)

    def tensor(self, file: str, entry: TensorEntry) -> torch.Tensor:
        """``entry`` as a tensor over the cache (a copy only when misaligned)."""
        raw = self._bases[file][entry.start : entry.end]
        dtype = TORCH_DTYPES[entry.dtype]
        if entry.start % dtype.itemsize:
            raw = raw.clone()
        return raw.view(dtype).view(entry.shape)

    def read_into(self, file: str, entry: TensorEntry, dst: torch.Tensor) -> None:
        """Copy ``entry``'s bytes from the cache file straight into ``dst``'s memory."""
        if (
            dst.device.type != "cpu"
            or not dst.is_contiguous()
            or dst.dtype != TORCH_DTYPES[entry.dtype]
        ):
            dst.copy_(self.tensor(file, entry))
            return
        n = entry.nbytes
        if n == 0:
            return
        buf = memoryview((ctypes.c_char * n).from_address(dst.data_ptr())).cast("B")
        offset, fd = 0, self._fds[file]
        while offset < n:
            got = os.preadv(fd, [buf[offset:]], entry.start + offset)
            if got == 0:
                raise OSError(f"{file}: cache file ended at {entry.start + offset}")
            offset += got

    def close(self) -> None:
        """Close the file descriptors; mapped views stay valid."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class Applier:
    """Fills slots and opens the gates of units whose slots are all filled."""

    def __init__(
        self,
        skeleton: Skeleton,
        views: CacheViews,
        timeline: Timeline,
        mode: Mode,
        staging: PinnedStaging | None = None,
    ) -> None:
        self.skeleton = skeleton
        self.views = views
        self.timeline = timeline
        self.mode = mode
        self.staging = staging
        self.remaining = sum(not s.filled for s in skeleton.slots)

    def fill(self, slot: Slot, file: str, entry: TensorEntry) -> None:
        start = time.perf_counter()
        target = slot.tensor
        with torch.no_grad():
            if self.mode == "view":
                src = self.views.tensor(file, entry)
                target.data = src if src.dtype == target.dtype else src.to(target.dtype)
            elif self.mode == "copy":
                self.views.read_into(file, entry, target)
            else:
                assert self.staging is not None
                self.staging.upload(target, self.views.tensor(file, entry))
        end = time.perf_counter()
        slot.filled = True
        self.remaining -= 1
        for unit in slot.users:
            self.timeline.unit(unit.name).widen("apply", start, end)
            unit.pending -= 1
            if unit.pending == 0:
                if self.staging is not None:
                    unit.cuda_event = self.staging.fence()
                unit.ready.set()
