"""GPU uploads through pinned memory on a side stream.

A ring of pinned host buffers: each tensor is copied (host memcpy) from the cache mapping
into a free buffer, then to the GPU with a non-blocking copy on the side stream. A buffer is
reused once the event recorded after its copy has completed, so at most ``slots`` copies
are in flight. ``fence()`` returns an event after everything queued so far; a unit's forward
makes the compute stream wait on it, so the host never blocks on a transfer.
"""

from __future__ import annotations

from typing import Any

import torch

MiB = 1024 * 1024


class PinnedStaging:
    def __init__(self, device: torch.device, *, slot_bytes: int = 8 * MiB, slots: int = 4) -> None:
        self.device = device
        self.stream: Any = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        self.slot_bytes = slot_bytes
        self._buffers = [
            torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(slots)
        ]
        self._events: list[Any] = [None] * slots
        self._next = 0

    def upload(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Queue ``src`` (host) → ``dst`` (GPU); converts dtype on the host if they differ."""
        if src.dtype != dst.dtype:
            src = src.to(dst.dtype)
        src_bytes = src.contiguous().reshape(-1).view(torch.uint8)
        dst_bytes = dst.reshape(-1).view(torch.uint8)
        # anything queued on the default stream for dst (a baseline's init) must come first
        self.stream.wait_stream(torch.cuda.default_stream(self.device))
        for lo in range(0, src_bytes.numel(), self.slot_bytes):
            hi = min(src_bytes.numel(), lo + self.slot_bytes)
            i = self._next
            self._next = (i + 1) % len(self._buffers)
            if self._events[i] is not None:
                self._events[i].synchronize()
            staged = self._buffers[i][: hi - lo]
            staged.copy_(src_bytes[lo:hi])
            with torch.cuda.stream(self.stream):
                dst_bytes[lo:hi].copy_(staged, non_blocking=True)
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                event.record(self.stream)
            self._events[i] = event

    def fence(self) -> Any:
        """An event that completes when every upload queued so far has landed."""
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(self.stream)
        return event
