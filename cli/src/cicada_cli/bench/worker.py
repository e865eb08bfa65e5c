"""One measurement in a fresh process, so that no run inherits another's memory or threads.

    python -m cicada_cli.bench.worker run --uri URI --variant cicada --cache DIR --orders DIR
    python -m cicada_cli.bench.worker bound --uri URI --origin-dir DIR --cache DIR --orders DIR
    python -m cicada_cli.bench.worker serve --uri URI ... < requests   (one forward per line)

Prints one JSON object on its last line. Imports, the execution order and the inputs are
ready before the clock starts: a loader process is warm, only the model is cold.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

#: The loader's setting: fetch threads get the GIL back within 0.5 ms of asking.
SWITCH_INTERVAL_S = 0.0005


def _status(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) * 1024 if match else 0


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS, where Linux allows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status("VmHWM") <= _status("VmRSS") + (4 << 20)


def drop_page_cache(directory: Path) -> None:
    """Evict ``directory``'s files from the page cache (a cold origin)."""
    for path in directory.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def digest(outputs: dict[str, Any]) -> str:
    """A hash of the output tensors' bytes: variants must agree to the bit."""
    import torch

    h = hashlib.sha256()
    for name in sorted(outputs):
        h.update(name.encode())
        h.update(outputs[name].contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from cicada_loader import VARIANTS, cold_start, prepare
    from cicada_loader.engine.arch import resolve
    from cicada_loader.engine.order import OrderBook
    from cicada_weights.checkpoint import read_checkpoint
    from cicada_weights.origins import open_origin

    orders = OrderBook(args.orders)
    prepare(args.uri, orders=orders)
    origin = open_origin(args.uri)
    config = read_checkpoint(origin).config
    origin.close()
    inputs = resolve(config).sample_inputs(seq_len=args.seq_len)
    if args.cold:
        drop_page_cache(args.origin_dir)
    peak_ok = reset_peak_rss()
    rss0 = _status("VmRSS")
    result = cold_start(
        args.uri,
        inputs,
        variant=args.variant,
        cache_dir=args.cache,
        orders=orders,
        reuse_cache=False,
        device=args.device,
    )
    peak = _status("VmHWM")
    out = {
        "summary": result.timeline.summary(),
        "peak_rss_bytes": peak if peak_ok else None,
        "rss_growth_bytes": peak - rss0 if peak_ok else None,
        "digest": digest(result.outputs),
        "apply": "views" if VARIANTS[args.variant].decoupler else "copies",
        "timeline": result.timeline.to_json(),
    }
    del result
    return out


def bound(args: argparse.Namespace) -> dict[str, Any]:
    """The lower bound's two halves: a plain fetch of every byte, and one warm forward."""
    import queue

    import torch

    from cicada_loader import cold_start
    from cicada_loader.engine.arch import flatten_outputs, resolve
    from cicada_loader.engine.order import OrderBook
    from cicada_weights.checkpoint import read_checkpoint
    from cicada_weights.fetcher import Fetcher, FetchOptions
    from cicada_weights.origins import open_origin

    origin = open_origin(args.uri)
    ckpt = read_checkpoint(origin)
    config = ckpt.config
    sizes = {f: h.file_size for f, h in ckpt.headers.items()}
    files = list(sizes)
    # 1. plain: each file start to end, one stream, into one reused buffer
    if args.cold:
        drop_page_cache(args.origin_dir)
    buf = bytearray(8 << 20)
    sink = os.open(os.devnull, os.O_WRONLY)
    start = time.perf_counter()
    for f in files:
        origin.copy_range(f, 0, sizes[f], sink, buf)
    plain = time.perf_counter() - start
    os.close(sink)
    origin.close()
    # 2. our fetcher alone, into a fresh cache
    if args.cold:
        drop_page_cache(args.origin_dir)
    events: queue.SimpleQueue[Any] = queue.SimpleQueue()
    with Fetcher(args.cache / "files") as fetcher:
        start = time.perf_counter()
        fetcher.fetch(args.uri, events.put, options=FetchOptions(reuse_cache=False)).wait()
        fetched = time.perf_counter() - start
    # 3. one warm forward pass on the loaded model (from the cache just filled)
    inputs = resolve(config).sample_inputs(seq_len=args.seq_len)
    model = cold_start(args.uri, inputs, cache_dir=args.cache, orders=OrderBook(args.orders)).model
    times = []
    with torch.inference_mode():
        for _ in range(3):
            start = time.perf_counter()
            flatten_outputs(model(**inputs))
            times.append(time.perf_counter() - start)
    return {
        "plain_fetch_s": plain,
        "fetcher_s": fetched,
        "forward_s": sorted(times)[1],
        "bytes": sum(sizes.values()),
    }


def serve(args: argparse.Namespace) -> dict[str, Any]:
    """Warm forward passes in-process, one per line on stdin: the reference for a warm request
    through the mesh, timed in turn with it. The first line holds the request's inputs (Open
    Inference Protocol JSON, integer tensors); each later line runs one forward pass and gets
    its seconds back on stdout."""
    import torch

    from cicada_loader import cold_start
    from cicada_loader.engine.arch import flatten_outputs
    from cicada_loader.engine.order import OrderBook

    result = cold_start(args.uri, cache_dir=args.cache, orders=OrderBook(args.orders))
    inputs = {
        i["name"]: torch.tensor(i["data"], dtype=torch.int64).reshape(i["shape"])
        for i in json.loads(sys.stdin.readline())["inputs"]
    }
    runs = 0
    with torch.inference_mode():
        for _ in sys.stdin:
            start = time.perf_counter()
            flatten_outputs(result.model(**inputs))
            print(json.dumps({"forward_s": time.perf_counter() - start}), flush=True)
            runs += 1
    return {"runs": runs}


def main(argv: list[str] | None = None) -> None:
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["run", "bound", "serve"])
    parser.add_argument("--uri", required=True)
    parser.add_argument("--origin-dir", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--orders", type=Path, required=True)
    parser.add_argument("--variant", default="cicada")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--cold", action="store_true", help="evict the origin from page cache")
    args = parser.parse_args(argv)
    try:
        out = {"run": run, "bound": bound, "serve": serve}[args.mode](args)
    finally:
        shutil.rmtree(args.cache, ignore_errors=True)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
