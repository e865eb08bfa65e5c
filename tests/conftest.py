"""Fixtures shared by every test: tiny real checkpoints and a real HTTP origin."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from cicada_cli.origin import make_app


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Write (once per session) a random-weight checkpoint of a zoo model; returns its dir."""
    from cicada_loader.engine.zoo import write_checkpoint

    root = tmp_path_factory.mktemp("models")
    made: dict[tuple[str, bool, str | None], Path] = {}

    def make(name: str, *, tiny: bool = True, shard: str | None = None) -> Path:
        key = (name, tiny, shard)
        if key not in made:
            folder = f"{name}{'-tiny' if tiny else ''}{'-sharded' if shard else ''}"
            made[key] = write_checkpoint(name, root / folder, tiny=tiny, max_shard_size=shard)
        return made[key]

    return make


class ServedApp:
    """An aiohttp application served from a background thread with its own event loop."""

    def __init__(self, app: web.Application) -> None:
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        started = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.runner.setup())
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            self.loop.run_until_complete(site.start())
            self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        started.wait(10)

    def close(self) -> None:
        async def shutdown() -> None:
            await self.runner.cleanup()
            pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def serve_app() -> Iterator[Callable[[web.Application], str]]:
    """Serve an aiohttp app for the test; returns its base URL."""
    served: list[ServedApp] = []

    def start(app: web.Application) -> str:
        served.append(ServedApp(app))
        return served[-1].url

    yield start
    for s in served:
        s.close()


@pytest.fixture
def http_origin(serve_app: Callable[[web.Application], str]) -> Callable[..., str]:
    """Serve a directory over HTTP with Range support (and an optional bandwidth cap)."""

    def start(root: Path, bandwidth: float | None = None) -> str:
        return serve_app(make_app(root, bandwidth))

    return start
