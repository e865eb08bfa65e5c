"""A small HTTP file server with Range support and a bandwidth cap: object storage in a box.

All connections share one token bucket, as they would share one link, so ``--bandwidth
1gbit`` caps the total at 125 MB/s however many ranges are read in parallel.

    python -m cicada_cli.origin --root models --port 8080 --bandwidth 1gbit
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import time
from email.utils import formatdate
from pathlib import Path

from aiohttp import web

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_UNITS = {"kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8, "kb": 1e3, "mb": 1e6, "gb": 1e9}


def parse_bandwidth(text: str) -> float | None:
    """``1gbit`` → 125e6 bytes/s; ``0``, ``none`` or ``unlimited`` → None (no cap)."""
    value = text.strip().lower()
    if value in ("", "0", "none", "unlimited"):
        return None
    match = re.fullmatch(r"([\d.]+)\s*([a-z]+)", value)
    if not match or match.group(2) not in _UNITS:
        raise ValueError(f"bandwidth {text!r}: use e.g. 1gbit, 10gbit, 500mbit, 200mb")
    return float(match.group(1)) * _UNITS[match.group(2)]


class TokenBucket:
    """Bytes per second shared by every transfer; ``take(n)`` waits until n bytes may go."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self, n: int) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
                self.stamp = now
                if self.tokens >= n:
                    self.tokens -= n
                    return
                await asyncio.sleep((n - self.tokens) / self.rate)


def make_app(root: Path, bandwidth: float | None) -> web.Application:
    """Serve the files below ``root`` with GET/HEAD and single ``Range`` requests."""
    root = root.resolve()
    chunk = 64 * 1024 if bandwidth is None else int(min(1 << 20, max(64 * 1024, bandwidth / 200)))
    bucket = None if bandwidth is None else TokenBucket(bandwidth, burst=max(chunk, bandwidth / 50))

    async def serve(request: web.Request) -> web.StreamResponse:
        path = (root / request.match_info["path"]).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise web.HTTPNotFound()
        size = path.stat().st_size
        start, end, status = 0, size, 200
        header = request.headers.get("Range")
        if header:
            span = _span(header, size)
            if span is None:
                raise web.HTTPRequestRangeNotSatisfiable(
                    headers={"Content-Range": f"bytes */{size}"}
                )
            start, end, status = span[0], span[1], 206
        resp = web.StreamResponse(status=status)
        resp.content_length = end - start
        resp.headers["Accept-Ranges"] = "bytes"
        stat = path.stat()  # validators, as a static file server or object store sends them
        resp.headers["ETag"] = f'"{stat.st_size:x}-{stat.st_mtime_ns:x}"'
        resp.headers["Last-Modified"] = formatdate(stat.st_mtime, usegmt=True)
        if status == 206:
            resp.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        fd = os.open(path, os.O_RDONLY)
        try:
            await resp.prepare(request)
            offset = start if request.method == "GET" else end
            while offset < end:
                n = min(chunk, end - offset)
                if bucket is not None:
                    await bucket.take(n)
                await resp.write(os.pread(fd, n, offset))
                offset += n
        except ConnectionError:  # the client went away (a cancelled fetch): nothing to do
            pass
        finally:
            os.close(fd)
        return resp

    app = web.Application()
    app.router.add_route("GET", "/{path:.+}", serve)
    app.router.add_route("HEAD", "/{path:.+}", serve)
    return app


def _span(header: str, size: int) -> tuple[int, int] | None:
    match = _RANGE.match(header.strip())
    if not match or not (match.group(1) or match.group(2)):
        return None
    first, last = match.group(1), match.group(2)
    if first:
        start = int(first)
        end = min(size, int(last) + 1) if last else size
    else:
        start, end = max(0, size - int(last)), size
    return (start, end) if start < end else None


async def _main(root: Path, host: str, port: int, bandwidth: float | None) -> None:
    runner = web.AppRunner(make_app(root, bandwidth), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    print(f"http://{host}:{bound}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="directory to serve")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--bandwidth", default="none", help="e.g. 1gbit, 10gbit; none: no cap")
    args = parser.parse_args(argv)
    try:
        asyncio.run(_main(args.root, args.host, args.port, parse_bandwidth(args.bandwidth)))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
