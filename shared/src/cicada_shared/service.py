"""The lifecycle every service shares: start, run until a signal, drain, stop.

main(): settings → logging → run(service): serve(service) on uvloop
service.start():  connect, declare, consume
service.stop():   stop consuming → let in-flight work finish (deadline) → cancel the rest
                  → close channel and connection
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from typing import Protocol

import structlog
import uvloop

from cicada_shared.bus import BrokerUnreachable

log = structlog.get_logger("cicada.service")


class Service(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class InFlight:
    """Counts work in progress so shutdown can wait for it."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.asynccontextmanager
    async def track(self) -> AsyncIterator[None]:
        self.count += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.count -= 1
            if self.count == 0:
                self._idle.set()

    async def drain(self, timeout_s: float) -> bool:
        """Wait until nothing is in flight; False if the deadline passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


def run(service: Service, name: str) -> int:
    """Serve ``service`` on uvloop: libuv's event loop, a fraction of asyncio's cost per
    message, which a warm request pays at every hop."""
    return uvloop.run(serve(service, name))


async def serve(service: Service, name: str) -> int:
    """Run ``service`` until SIGINT or SIGTERM; returns the process exit code."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await service.start()
    except BrokerUnreachable as exc:
        log.error("broker_unreachable", error=str(exc))
        return 2
    log.info("started")
    await stop.wait()
    log.info("stopping")
    await service.stop()
    log.info("stopped")
    return 0
