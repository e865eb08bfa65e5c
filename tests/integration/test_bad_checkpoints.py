"""Broken checkpoints and failing origins: a typed error naming file and tensor, never a hang,
never a half-loaded model."""

from __future__ import annotations

import asyncio
import json
import shutil
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from cicada_loader import cold_start
from cicada_shared.errors import (
    CicadaError,
    DtypeShapeMismatch,
    HeaderError,
    MissingTensors,
    OffsetsError,
    OriginError,
    OriginTimeout,
    ShapeMismatch,
    TruncatedCheckpoint,
    UnexpectedTensors,
    UnsupportedArchitecture,
)
from cicada_weights import Fetcher

VARIANTS = ["cicada", "pisel", "naive"]
FILE = "model.safetensors"


def split(blob: bytes) -> tuple[dict[str, Any], bytes]:
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + length]), blob[8 + length :]


def join(header: dict[str, Any], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def broken_copy(src: Path, dst: Path, edit: Callable[[dict[str, Any], bytes], bytes]) -> Path:
    shutil.copytree(src, dst)
    header, data = split((src / FILE).read_bytes())
    (dst / FILE).write_bytes(edit(header, data))
    return dst


def no_threads_left() -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if not [t for t in threading.enumerate() if t.name.startswith("cicada")]:
            return True
        time.sleep(0.05)
    return False


def load(model: Path | str, variant: str, tmp_path: Path, **kw: Any) -> None:
    result = cold_start(
        model, variant=variant, cache_dir=tmp_path / "cache", reuse_cache=False, **kw
    )
    raise AssertionError(f"loaded a broken checkpoint: {result.model.__class__.__name__}")


def tensor_of(header: dict[str, Any], name: str) -> dict[str, Any]:
    return header[name]  # type: ignore[no-any-return]


WTE = "transformer.wte.weight"


def truncated(header: dict[str, Any], data: bytes) -> bytes:
    return join(header, data[:-100])


def header_too_long(header: dict[str, Any], data: bytes) -> bytes:
    blob = join(header, data)
    return struct.pack("<Q", len(blob) * 2) + blob[8:]


def overlapping(header: dict[str, Any], data: bytes) -> bytes:
    wpe, wte = header["transformer.wpe.weight"], tensor_of(header, WTE)
    wte["data_offsets"] = [
        wpe["data_offsets"][0] + 4,
        wpe["data_offsets"][0] + 4 + wte["data_offsets"][1] - wte["data_offsets"][0],
    ]
    return join(header, data)


def outside(header: dict[str, Any], data: bytes) -> bytes:
    wte = tensor_of(header, WTE)
    size = wte["data_offsets"][1] - wte["data_offsets"][0]
    wte["data_offsets"] = [len(data) + 64, len(data) + 64 + size]
    return join(header, data)


def wrong_dtype(header: dict[str, Any], data: bytes) -> bytes:
    tensor_of(header, WTE)["dtype"] = "F16"
    return join(header, data)


def missing(header: dict[str, Any], data: bytes) -> bytes:
    del header["transformer.h.1.mlp.c_fc.bias"]
    return join(header, data)


def unexpected(header: dict[str, Any], data: bytes) -> bytes:
    header["transformer.extra.weight"] = {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}
    return join(header, data)


def wrong_shape(header: dict[str, Any], data: bytes) -> bytes:
    wte = tensor_of(header, WTE)
    wte["shape"] = [wte["shape"][1], wte["shape"][0]]
    return join(header, data)


CASES = [
    (truncated, TruncatedCheckpoint, None),
    (header_too_long, HeaderError, None),
    (overlapping, OffsetsError, WTE),
    (outside, OffsetsError, WTE),
    (wrong_dtype, DtypeShapeMismatch, WTE),
    (missing, MissingTensors, "transformer.h.1.mlp.c_fc.bias"),
    (unexpected, UnexpectedTensors, "transformer.extra.weight"),
    (wrong_shape, ShapeMismatch, WTE),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("edit", "error", "tensor"), CASES, ids=[c[0].__name__ for c in CASES])
def test_broken_checkpoint(
    edit: Callable[[dict[str, Any], bytes], bytes],
    error: type[CicadaError],
    tensor: str | None,
    variant: str,
    checkpoints: Callable[..., Path],
    tmp_path: Path,
) -> None:
    model = broken_copy(checkpoints("gpt2"), tmp_path / "broken", edit)
    with pytest.raises(error) as caught:
        load(model, variant, tmp_path)
    assert FILE in str(caught.value)
    if tensor is not None:
        assert caught.value.tensor == tensor  # type: ignore[attr-defined]
    assert no_threads_left()


@pytest.mark.parametrize("variant", VARIANTS)
def test_architecture_we_cannot_build(
    variant: str, checkpoints: Callable[..., Path], tmp_path: Path
) -> None:
    model = tmp_path / "odd"
    shutil.copytree(checkpoints("gpt2"), model)
    (model / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    with pytest.raises(UnsupportedArchitecture, match="no-such-model"):
        load(model, variant, tmp_path)
    (model / "config.json").write_text(json.dumps({"cicada_zoo": "alexnet"}))
    with pytest.raises(UnsupportedArchitecture, match="alexnet"):
        load(model, variant, tmp_path)
    assert no_threads_left()


def test_origin_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(OriginError, match="not a directory"):
        load(tmp_path / "nowhere", "cicada", tmp_path)


def _flaky_app(src: Path, *, stall: bool) -> web.Application:
    """Serves config and headers; every bulk read fails (HTTP 500) or stalls."""
    data = (src / FILE).read_bytes()

    async def handle(request: web.Request) -> web.StreamResponse:
        name = request.match_info["path"]
        if name != FILE:
            path = src / name
            return (
                web.Response(body=path.read_bytes()) if path.is_file() else web.Response(status=404)
            )
        if request.method == "HEAD":
            return web.Response(headers={"Content-Length": str(len(data))})
        first, last = request.headers["Range"].removeprefix("bytes=").split("-")
        start, end = int(first), int(last) + 1
        if start > 0 and not stall:
            return web.Response(status=500, text="disk on fire")
        resp = web.StreamResponse(
            status=206, headers={"Content-Range": f"bytes {start}-{end - 1}/{len(data)}"}
        )
        resp.content_length = end - start
        await resp.prepare(request)
        if start == 0:
            await resp.write(data[start:end])
        else:
            await asyncio.sleep(3600)
        return resp

    app = web.Application()
    app.router.add_route("*", "/m/{path:.+}", handle)
    return app


@pytest.mark.parametrize("variant", ["cicada", "pisel"])
@pytest.mark.parametrize(("stall", "error"), [(False, OriginError), (True, OriginTimeout)])
def test_failing_origin(
    stall: bool,
    error: type[Exception],
    variant: str,
    checkpoints: Callable[..., Path],
    serve_app: Callable[[web.Application], str],
    tmp_path: Path,
) -> None:
    url = serve_app(_flaky_app(checkpoints("gpt2"), stall=stall))
    with Fetcher(tmp_path / "files", timeout_s=0.5, retries=1) as fetcher:
        with pytest.raises(error) as caught:
            load(f"{url}/m", variant, tmp_path, fetcher=fetcher, timeout_s=30)
        assert url in str(caught.value)
    assert no_threads_left()
