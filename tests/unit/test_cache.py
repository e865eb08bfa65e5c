"""The node cache: markers, digests, verification, least-recently-used eviction."""

from __future__ import annotations

import os
import time
from pathlib import Path

from cicada_weights import cache


def copy(root: Path, name: str, size: int, used: float) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(os.urandom(size))
    cache.write_marker(d, f"file:///{name}", {"model.safetensors": {"size": size}})
    os.utime(d / cache.COMPLETE, (used, used))
    return d


def test_digest_is_chunked_sha256(tmp_path: Path) -> None:
    import hashlib

    f = tmp_path / "f"
    f.write_bytes(b"x" * (cache.CHUNK + 10))
    parts = hashlib.sha256(b"x" * cache.CHUNK).digest() + hashlib.sha256(b"x" * 10).digest()
    assert cache.digest(f) == hashlib.sha256(parts).hexdigest()


def test_verify_checks_uri_sizes_and_digests(tmp_path: Path) -> None:
    d = copy(tmp_path, "m", 1000, time.time())
    sizes = {"model.safetensors": 1000}
    assert cache.verify(d, "file:///m", sizes, digests=False)
    assert not cache.verify(d, "file:///other", sizes, digests=False)
    assert not cache.verify(d, "file:///m", {"model.safetensors": 999}, digests=False)
    assert not cache.verify(d, "file:///m", sizes, digests=True)  # no digest recorded yet
    cache.add_digests(d)
    assert cache.verify(d, "file:///m", sizes, digests=True)
    data = bytearray((d / "model.safetensors").read_bytes())
    data[500] ^= 0xFF  # one flipped bit in the middle
    (d / "model.safetensors").write_bytes(bytes(data))
    assert not cache.verify(d, "file:///m", sizes, digests=True)


def test_evict_least_recently_used_beyond_budget(tmp_path: Path) -> None:
    now = time.time()
    copy(tmp_path, "oldest", 100, now - 30)
    copy(tmp_path, "in-use", 100, now - 20)
    copy(tmp_path, "newest", 100, now - 10)
    evicted = cache.evict(tmp_path, 150, keep={"in-use"})
    assert evicted == ["oldest", "newest"]
    assert [p.name for p in tmp_path.iterdir()] == ["in-use"]
