"""Where checkpoints come from: a local directory or an HTTP(S) server with Range support.

An origin is a directory of files (``config.json``, ``model.safetensors`` …) addressed by
name. Bulk reads stream a byte range into a caller's buffer and hand each filled slice to a
sink, so bytes go from the socket or page cache straight to the node cache with one copy.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol
from urllib.parse import quote, unquote, urlparse

import urllib3
from urllib3.exceptions import HTTPError, ProtocolError, ReadTimeoutError
from urllib3.util import Retry, Timeout

from cicada_shared.errors import LoadCancelled, OriginError, OriginTimeout

#: Receives ``(absolute offset, bytes)`` for each slice of a range as it arrives.
Sink = Callable[[int, memoryview], None]


#: Largest single socket read: readinto waits until it is full, and a stop request is only
#: noticed between reads.
HTTP_CHUNK = 256 * 1024

#: Asked between chunks of a copy; True abandons it.
Stop = Callable[[], bool] | None


def _check(stop: Stop) -> None:
    if stop is not None and stop():
        raise LoadCancelled("copy abandoned: the fetch ended")


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset``."""
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


class Origin(Protocol):
    """A directory of checkpoint files that can be read by byte range."""

    url: str

    def size(self, name: str) -> int:
        """Size in bytes of file ``name``."""
        ...

    def version(self, name: str) -> str | None:
        """What changes when file ``name`` changes, cheaply: size and modification time of a
        file; length and ETag (or Last-Modified) over HTTP. None: the origin cannot tell."""
        ...

    def read(self, name: str, start: int, length: int) -> bytes:
        """Read ``length`` bytes at ``start`` (for headers: small reads)."""
        ...

    def read_file(self, name: str) -> bytes | None:
        """Read a whole small file, or None when it does not exist."""
        ...

    def copy_range(
        self, name: str, start: int, end: int, dst: int, buf: bytearray, stop: Stop = None
    ) -> None:
        """Copy bytes ``[start, end)`` of ``name`` to the same offsets of file ``dst``.

        ``buf`` is scratch space; ``stop``, checked between chunks, abandons the copy (raising
        ``LoadCancelled``) when it returns True.
        """
        ...

    def close(self) -> None: ...


def open_origin(uri: str, *, timeout_s: float = 30.0, retries: int = 2, pool: int = 8) -> Origin:
    """Open the origin of ``uri``: ``file://…``, a plain path, or ``http(s)://…``."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        return HttpOrigin(uri, timeout_s=timeout_s, retries=retries, pool=pool)
    if parsed.scheme in ("", "file"):
        path = Path(unquote(parsed.path) if parsed.scheme == "file" else uri)
        if not path.is_dir():
            raise OriginError("not a directory", url=uri)
        return FileOrigin(path)
    raise OriginError(f"unsupported scheme {parsed.scheme!r} (use file:// or http(s)://)", url=uri)


class FileOrigin:
    """A checkpoint directory on a local or mounted file system."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.url = self.root.as_uri()
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _fd(self, name: str) -> int:
        with self._lock:
            if name not in self._fds:
                try:
                    self._fds[name] = os.open(self.root / name, os.O_RDONLY)
                except OSError as exc:
                    raise OriginError(f"cannot open {name}: {exc.strerror}", url=self.url) from exc
            return self._fds[name]

    def size(self, name: str) -> int:
        return os.fstat(self._fd(name)).st_size

    def version(self, name: str) -> str | None:
        st = os.fstat(self._fd(name))  # the file this origin reads, even if since replaced
        return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"

    def read(self, name: str, start: int, length: int) -> bytes:
        data = os.pread(self._fd(name), length, start)
        if len(data) != length:
            raise OriginError(f"{name}: short read at {start}", url=self.url)
        return data

    def read_file(self, name: str) -> bytes | None:
        path = self.root / name
        return path.read_bytes() if path.is_file() else None

    def copy_range(
        self, name: str, start: int, end: int, dst: int, buf: bytearray, stop: Stop = None
    ) -> None:
        # read + write through one buffer: measured faster here than copy_file_range,
        # for the copy itself and for the cold start around it
        src, offset = self._fd(name), start
        while offset < end:
            _check(stop)
            view = memoryview(buf)[: min(len(buf), end - offset)]
            n = os.preadv(src, [view], offset)
            pwrite_all(dst, view[:n], offset)
            if n == 0:
                raise OriginError(f"{name}: file ended at {offset}, expected {end}", url=self.url)
            offset += n

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


class HttpOrigin:
    """A checkpoint directory behind an HTTP(S) server that honours ``Range`` requests."""

    def __init__(self, url: str, *, timeout_s: float, retries: int, pool: int) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.retries = retries
        retry = Retry(
            total=retries,
            backoff_factor=0.05,
            status_forcelist=(500, 502, 503, 504),
            allowed_methods=("GET", "HEAD"),
            raise_on_status=False,
        )
        self._http = urllib3.PoolManager(
            maxsize=pool,
            block=False,
            retries=retry,
            timeout=Timeout(connect=timeout_s, read=timeout_s),
            headers={"Accept-Encoding": "identity"},
        )
        self._heads: dict[str, urllib3.BaseHTTPResponse] = {}

    def _file_url(self, name: str) -> str:
        return f"{self.url}/{quote(name)}"

    def _request(
        self, method: str, name: str, headers: dict[str, str] | None = None
    ) -> urllib3.BaseHTTPResponse:
        url = self._file_url(name)
        try:
            return self._http.request(method, url, headers=headers, preload_content=False)
        except ReadTimeoutError as exc:
            raise OriginTimeout(f"no response within {self.timeout_s:g}s", url=url) from exc
        except HTTPError as exc:
            raise OriginError(f"request failed: {exc}", url=url) from exc

    def _ranged(self, name: str, start: int, end: int) -> urllib3.BaseHTTPResponse:
        resp = self._request("GET", name, {"Range": f"bytes={start}-{end - 1}"})
        if resp.status == 206:
            return resp
        resp.drain_conn()
        resp.release_conn()
        url = self._file_url(name)
        if resp.status == 200:
            raise OriginError("origin ignores Range requests", url=url)
        raise OriginError(f"HTTP {resp.status} for bytes {start}-{end - 1}", url=url)

    def size(self, name: str) -> int:
        return int(self._head(name).headers["Content-Length"])

    def version(self, name: str) -> str | None:
        headers = self._head(name).headers
        validator = headers.get("ETag") or headers.get("Last-Modified")
        return f"{headers['Content-Length']}:{validator}" if validator else None

    def _head(self, name: str) -> urllib3.BaseHTTPResponse:
        """One HEAD per file and fetch: size and version come from the same answer."""
        if name not in self._heads:
            resp = self._request("HEAD", name)
            resp.release_conn()
            if resp.status != 200 or resp.headers.get("Content-Length") is None:
                raise OriginError(f"HTTP {resp.status} for HEAD", url=self._file_url(name))
            self._heads[name] = resp
        return self._heads[name]

    def read(self, name: str, start: int, length: int) -> bytes:
        out = bytearray(length)

        def put(offset: int, data: memoryview) -> None:
            out[offset - start : offset - start + len(data)] = data

        if length:
            self._stream(name, start, start + length, put, bytearray(min(length, 1 << 20)))
        return bytes(out)

    def read_file(self, name: str) -> bytes | None:
        resp = self._request("GET", name)
        try:
            if resp.status == 404:
                return None
            if resp.status != 200:
                raise OriginError(f"HTTP {resp.status}", url=self._file_url(name))
            return self._read_all(resp, name)
        finally:
            resp.release_conn()

    def _read_all(self, resp: urllib3.BaseHTTPResponse, name: str) -> bytes:
        try:
            return resp.read()
        except ReadTimeoutError as exc:
            raise OriginTimeout(
                f"stalled for {self.timeout_s:g}s", url=self._file_url(name)
            ) from exc
        except (ProtocolError, HTTPError) as exc:
            raise OriginError(f"transfer failed: {exc}", url=self._file_url(name)) from exc

    def copy_range(
        self, name: str, start: int, end: int, dst: int, buf: bytearray, stop: Stop = None
    ) -> None:
        def sink(offset: int, data: memoryview) -> None:
            _check(stop)
            pwrite_all(dst, data, offset)

        self._stream(name, start, end, sink, buf)

    def _stream(self, name: str, start: int, end: int, sink: Sink, buf: bytearray) -> None:
        """GET ``[start, end)``, handing each slice to ``sink``; resumes after a dropped read."""
        offset, view, attempts = start, memoryview(buf), 0
        while offset < end:
            resp, done = self._ranged(name, offset, end), False
            try:
                while offset < end:
                    n = resp.readinto(view[: min(len(buf), end - offset, HTTP_CHUNK)])
                    if n == 0:
                        raise ProtocolError(f"connection closed at byte {offset} of {end}")
                    sink(offset, view[:n])
                    offset += n
                done = True
            except ReadTimeoutError as exc:
                attempts += 1
                if attempts > self.retries:
                    raise OriginTimeout(
                        f"stalled for {self.timeout_s:g}s at byte {offset}",
                        url=self._file_url(name),
                    ) from exc
            except (ProtocolError, HTTPError) as exc:
                attempts += 1
                if attempts > self.retries:
                    raise OriginError(f"transfer failed: {exc}", url=self._file_url(name)) from exc
            finally:
                if not done:
                    resp.close()  # a half-read body must not go back to the pool
                resp.release_conn()

    def close(self) -> None:
        self._http.clear()
