"""The weights side against real files and a real HTTP server."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from cicada_shared.errors import CheckpointError, OriginError, OriginTimeout, TruncatedCheckpoint
from cicada_weights import (
    FetchDone,
    Fetcher,
    FetchFailed,
    FetchOptions,
    ManifestReady,
    PieceLanded,
    PlanOptions,
)


def fetch(uri: str, cache: Path, **kw: Any) -> list[Any]:
    events: queue.SimpleQueue[Any] = queue.SimpleQueue()
    opts = kw.pop("options", FetchOptions(reuse_cache=False))
    digests = kw.pop("digests", False)
    timeout_s, retries = kw.pop("timeout_s", 10.0), kw.pop("retries", 1)
    with Fetcher(cache, timeout_s=timeout_s, retries=retries, digests=digests) as f:
        handle = f.fetch(uri, events.put, options=opts, **kw)
        handle._ended.wait(30)  # the last event is out
    out = []
    while not events.empty():
        out.append(events.get())
    return out


def fetch_with(fetcher: Fetcher, uri: str) -> list[Any]:
    events: queue.SimpleQueue[Any] = queue.SimpleQueue()
    fetcher.fetch(uri, events.put, options=FetchOptions(reuse_cache=False)).wait(30)
    out = []
    while not events.empty():
        out.append(events.get())
    return out


def cached_file(events: list[Any], name: str = "model.safetensors") -> Path:
    manifest = next(e for e in events if isinstance(e, ManifestReady)).manifest
    return manifest.path(name)


def test_file_origin_replicates_the_file(checkpoints: Callable[..., Path], tmp_path: Path) -> None:
    src = checkpoints("gpt2")
    order = [["transformer.wte.weight"], ["transformer.wpe.weight"]]
    events = fetch(
        str(src),
        tmp_path,
        order=order,
        options=FetchOptions(plan=PlanOptions(piece_bytes=1, range_bytes=4096), reuse_cache=False),
    )
    assert isinstance(events[0], ManifestReady)
    assert isinstance(events[-1], FetchDone)
    pieces = [e.piece for e in events if isinstance(e, PieceLanded)]
    first = min(pieces, key=lambda p: p.index)
    assert first.tensors == ("transformer.wte.weight",)  # needed first, stored last
    assert sum(len(p.tensors) for p in pieces) == len(events[0].manifest.tensors)
    assert cached_file(events).read_bytes() == (src / "model.safetensors").read_bytes()
    assert (tmp_path.joinpath(*cached_file(events).parent.parts[-1:]) / ".complete").exists()


def test_http_origin_with_ranges(
    checkpoints: Callable[..., Path], http_origin: Callable[..., str], tmp_path: Path
) -> None:
    src = checkpoints("bert-base")
    url = http_origin(src.parent)
    events = fetch(
        f"{url}/{src.name}",
        tmp_path,
        options=FetchOptions(plan=PlanOptions(range_bytes=8192), reuse_cache=False),
    )
    assert isinstance(events[-1], FetchDone), events[-1]
    assert cached_file(events).read_bytes() == (src / "model.safetensors").read_bytes()


def test_sharded_checkpoint(checkpoints: Callable[..., Path], tmp_path: Path) -> None:
    src = checkpoints("gpt2", shard="200KB")
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert len(shards) > 1
    events = fetch(str(src), tmp_path)
    assert isinstance(events[-1], FetchDone)
    for name in shards:
        assert cached_file(events, name).read_bytes() == (src / name).read_bytes()


def test_complete_cache_is_reused(checkpoints: Callable[..., Path], tmp_path: Path) -> None:
    src = checkpoints("gpt2")
    fetch(str(src), tmp_path)
    again = fetch(str(src), tmp_path, options=FetchOptions(reuse_cache=True))
    assert isinstance(again[-1], FetchDone) and again[-1].nbytes == 0


def test_a_copy_of_an_origin_that_changed_is_not_reused(
    checkpoints: Callable[..., Path], http_origin: Callable[..., str], tmp_path: Path
) -> None:
    for kind in ("file", "http"):
        src = tmp_path / f"origin-{kind}"
        shutil.copytree(checkpoints("gpt2"), src)
        uri = str(src) if kind == "file" else http_origin(src)
        cache = tmp_path / f"cache-{kind}"
        fetch(uri, cache)
        reused = fetch(uri, cache, options=FetchOptions(reuse_cache=True))
        assert reused[-1].nbytes == 0, kind
        weights = src / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF  # the same size, other bytes, a later modification time
        weights.write_bytes(bytes(data))
        again = fetch(uri, cache, options=FetchOptions(reuse_cache=True))
        assert isinstance(again[-1], FetchDone) and again[-1].nbytes > 0, kind
        assert cached_file(again).read_bytes() == bytes(data), kind
        config = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**config, "note": "edited"}))
        edited = fetch(uri, cache, options=FetchOptions(reuse_cache=True))
        assert edited[-1].nbytes > 0, kind  # the weights are the same; the config is not
        assert "edited" in (cached_file(edited).parent / "config.json").read_text(), kind


def test_a_corrupt_cached_copy_fails_its_fetch_and_is_fetched_again(
    checkpoints: Callable[..., Path], tmp_path: Path
) -> None:
    from cicada_weights import cache as node_cache

    src = str(checkpoints("gpt2"))
    copy = cached_file(fetch(src, tmp_path))
    node_cache.add_digests(copy.parent)
    st = copy.stat()
    with copy.open("r+b") as f:  # bit rot: the same size and time, one byte different
        f.seek(st.st_size // 2)
        byte = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
    reused = fetch(src, tmp_path, options=FetchOptions(reuse_cache=True), digests=True)
    assert isinstance(reused[-1], FetchFailed) and "corrupt" in str(reused[-1].error)
    assert any(isinstance(e, PieceLanded) for e in reused)  # announced before the check
    again = fetch(src, tmp_path, options=FetchOptions(reuse_cache=True), digests=True)
    assert isinstance(again[-1], FetchDone) and again[-1].nbytes > 0


def test_a_copy_deleted_as_it_completes_fails_its_fetch_not_the_fetcher(
    checkpoints: Callable[..., Path], tmp_path: Path
) -> None:
    src = checkpoints("gpt2")
    events: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def delete_the_copy(event: Any) -> None:
        events.put(event)
        if isinstance(event, ManifestReady):
            shutil.rmtree(event.manifest.cache_dir)  # e.g. the model was unregistered

    with Fetcher(tmp_path, workers=2) as fetcher:
        fetcher.fetch(str(src), delete_the_copy, options=FetchOptions(reuse_cache=False))
        while not isinstance(last := events.get(timeout=30), FetchDone | FetchFailed):
            pass
        assert isinstance(last, FetchFailed)
        after = fetch_with(fetcher, str(src))  # the same workers fetch the next one
        assert isinstance(after[-1], FetchDone) and after[-1].nbytes > 0


def test_truncated_origin_fails_before_fetching(
    checkpoints: Callable[..., Path], tmp_path: Path
) -> None:
    src = tmp_path / "broken"
    shutil.copytree(checkpoints("gpt2"), src)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) - 100])
    events = fetch(str(src), tmp_path / "cache")
    assert len(events) == 1 and isinstance(events[0], FetchFailed)
    assert isinstance(events[0].error, TruncatedCheckpoint)


def test_missing_config(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (event,) = fetch(str(tmp_path / "empty"), tmp_path / "cache")
    assert isinstance(event, FetchFailed) and isinstance(event.error, CheckpointError)
    assert "config.json" in str(event.error)


def test_origin_error_status(serve_app: Callable[[web.Application], str], tmp_path: Path) -> None:
    async def broken(_: web.Request) -> web.Response:
        return web.Response(status=503, text="down")

    app = web.Application()
    app.router.add_get("/{path:.+}", broken)
    url = serve_app(app)
    (event,) = fetch(f"{url}/m", tmp_path, retries=1)
    assert isinstance(event, FetchFailed) and isinstance(event.error, OriginError)
    assert "503" in str(event.error) and url in str(event.error)


def test_origin_ignoring_range(
    checkpoints: Callable[..., Path], serve_app: Callable[[web.Application], str], tmp_path: Path
) -> None:
    src = checkpoints("gpt2")

    async def whole_file(request: web.Request) -> web.Response:
        path = src / request.match_info["path"]
        if not path.is_file():
            return web.Response(status=404)
        return web.Response(body=path.read_bytes())  # 200 with everything, Range or not

    app = web.Application()
    app.router.add_route("*", "/m/{path:.+}", whole_file)
    url = serve_app(app)
    (event,) = fetch(f"{url}/m", tmp_path)
    assert isinstance(event, FetchFailed) and isinstance(event.error, OriginError)
    assert "ignores Range" in str(event.error)


def test_stalled_origin_times_out(
    checkpoints: Callable[..., Path], serve_app: Callable[[web.Application], str], tmp_path: Path
) -> None:
    src = checkpoints("gpt2")
    data = (src / "model.safetensors").read_bytes()

    async def stall(request: web.Request) -> web.StreamResponse:
        name = request.match_info["path"]
        if name == "config.json":
            return web.Response(body=(src / "config.json").read_bytes())
        if name != "model.safetensors":
            return web.Response(status=404)
        if request.method == "HEAD":
            return web.Response(headers={"Content-Length": str(len(data))})
        first, last = request.headers["Range"].removeprefix("bytes=").split("-")
        start, end = int(first), int(last) + 1
        resp = web.StreamResponse(
            status=206, headers={"Content-Range": f"bytes {start}-{end - 1}/{len(data)}"}
        )
        resp.content_length = end - start
        await resp.prepare(request)
        if start == 0:  # the header read succeeds; bulk reads stall after 1 KiB
            await resp.write(data[start:end])
            return resp
        await resp.write(data[start : start + 1024])
        await asyncio.sleep(60)
        return resp

    app = web.Application()
    app.router.add_route("*", "/m/{path:.+}", stall)
    url = serve_app(app)
    events = fetch(f"{url}/m", tmp_path, timeout_s=0.5, retries=1)
    failed = [e for e in events if isinstance(e, FetchFailed)]
    assert len(failed) == 1 and isinstance(failed[0].error, OriginTimeout)
    assert not any(isinstance(e, FetchDone) for e in events)


def test_urgent_fetch_overtakes_a_running_one_at_the_next_range(
    checkpoints: Callable[..., Path], http_origin: Callable[..., str], tmp_path: Path
) -> None:
    """A large background fetch yields, range by range, to an urgent one; then resumes."""
    root = tmp_path / "origin"
    shutil.copytree(checkpoints("gpt2"), root / "background")
    shutil.copytree(checkpoints("bert-base"), root / "urgent")
    url = http_origin(root, bandwidth=2e6)
    plan = PlanOptions(piece_bytes=32 * 1024, range_bytes=32 * 1024)
    log: list[tuple[str, Any]] = []
    first_pieces = threading.Event()

    def listener(tag: str) -> Callable[[Any], None]:
        def on(event: Any) -> None:
            log.append((tag, event))
            if (
                tag == "background"
                and sum(1 for t, e in log if t == tag and isinstance(e, PieceLanded)) >= 3
            ):
                first_pieces.set()

        return on

    with Fetcher(tmp_path / "cache", workers=2) as fetcher:
        background = fetcher.fetch(
            f"{url}/background",
            listener("background"),
            options=FetchOptions(plan=plan, priority=0, reuse_cache=False),
        )
        assert first_pieces.wait(30)
        urgent = fetcher.fetch(
            f"{url}/urgent",
            listener("urgent"),
            options=FetchOptions(plan=plan, priority=9, reuse_cache=False),
        )
        urgent.wait(60)
        background.wait(60)
    # its ranges are queued once its headers are read (ManifestReady); count from there
    urgent_start = next(
        i for i, (t, e) in enumerate(log) if t == "urgent" and isinstance(e, ManifestReady)
    )
    urgent_end = next(
        i for i, (t, e) in enumerate(log) if t == "urgent" and isinstance(e, FetchDone)
    )
    during = [
        e
        for t, e in log[urgent_start:urgent_end]
        if t == "background" and isinstance(e, PieceLanded)
    ]
    after = [e for t, e in log[urgent_end:] if t == "background" and isinstance(e, PieceLanded)]
    assert len(during) <= 2  # only the ranges already in flight when it arrived
    assert after  # the background fetch resumed, and finished last
    assert isinstance(log[-1][1], FetchDone) and log[-1][0] == "background"


async def test_a_fetch_of_another_uri_under_one_name_waits_for_the_first(
    checkpoints: Callable[..., Path], tmp_path: Path
) -> None:
    """A name registered again under another URI: the node's second fetch writes the name's
    cache directory only after the first has ended, and gets the second checkpoint."""
    from cicada_shared.contracts import FetchFinished, FetchRequest
    from cicada_weights.service import WeightsService, WeightsSettings

    first, second = tmp_path / "first", tmp_path / "second"
    shutil.copytree(checkpoints("bert-base"), first)
    shutil.copytree(checkpoints("gpt2"), second)
    service = WeightsService(WeightsSettings(cache_dir=tmp_path / "cache", weights_verify=False))
    try:
        for fetch_id, origin in (("a", first), ("b", second)):
            service._subscribe(
                FetchRequest(fetch_id=fetch_id, model="m", uri=str(origin), announce_to="x")
            )
        assert [r.fetch_id for r in service.active["m"].waiting] == ["b"]
        seen: list[Any] = []
        while not any(isinstance(m, FetchFinished) and m.fetch_id == "b" for m in seen):
            item = await asyncio.wait_for(service._outbox.get(), 30)
            assert item is not None
            seen.append(item[1])
    finally:
        service.fetcher.close()
    finished_a = next(i for i, m in enumerate(seen) if isinstance(m, FetchFinished))
    assert seen[finished_a].fetch_id == "a"
    assert all(m.fetch_id == "a" for m in seen[:finished_a])
    assert all(m.fetch_id == "b" for m in seen[finished_a + 1 :])
    cached = tmp_path / "cache" / "files" / "m" / "model.safetensors"
    assert cached.read_bytes() == (second / "model.safetensors").read_bytes()
