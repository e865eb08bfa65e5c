"""The node cache: markers, versions, digests, verification, least-recently-used eviction."""

from __future__ import annotations

import os
import time
from pathlib import Path

from cicada_weights import cache

V1 = {"model.safetensors": "v1"}


def copy(root: Path, name: str, size: int, used: float) -> Path:
    d = root / name
    d.mkdir(parents=True)
    f = d / "model.safetensors"
    f.write_bytes(os.urandom(size))
    cache.write_marker(d, f"file:///{name}", {f.name: cache.file_record(f, size, "v1")})
    os.utime(d / cache.COMPLETE, (used, used))
    return d


def rewrite_in_place(f: Path, offset: int) -> None:
    """Flip one byte and put the modification time back: what only a digest can see."""
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[offset] ^= 0xFF
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_digest_is_blake3_of_the_chunks_blake3(tmp_path: Path) -> None:
    from blake3 import blake3

    f = tmp_path / "f"
    data = os.urandom(cache.CHUNK + 10)
    f.write_bytes(data)
    parts = blake3(data[: cache.CHUNK]).digest() + blake3(data[cache.CHUNK :]).digest()
    assert cache.digest(f) == cache.digest(f, threads=1) == blake3(parts).hexdigest()


def test_verify_checks_uri_sizes_origin_version_and_modification(tmp_path: Path) -> None:
    d = copy(tmp_path, "m", 1000, time.time())
    sizes = {"model.safetensors": 1000}
    assert cache.verify(d, "file:///m", sizes, versions=V1)
    assert not cache.verify(d, "file:///other", sizes, versions=V1)
    assert not cache.verify(d, "file:///m", {"model.safetensors": 999}, versions=V1)
    changed = {"model.safetensors": "v2"}  # the origin's file changed since the copy
    assert not cache.verify(d, "file:///m", sizes, versions=changed)
    unknown = {"model.safetensors": None}  # an origin that cannot tell
    assert not cache.verify(d, "file:///m", sizes, versions=unknown)
    f = d / "model.safetensors"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 1))  # written since
    assert not cache.verify(d, "file:///m", sizes, versions=V1)


def test_digests_catch_what_sizes_and_times_cannot(tmp_path: Path) -> None:
    d = copy(tmp_path, "m", 1000, time.time())
    assert cache.digests_match(d)  # none recorded yet: a copy that young is trusted
    cache.add_digests(d)
    assert cache.digests_match(d)
    rewrite_in_place(d / "model.safetensors", 500)
    assert cache.verify(d, "file:///m", {"model.safetensors": 1000}, versions=V1)
    assert not cache.digests_match(d)


def test_evict_least_recently_used_beyond_budget(tmp_path: Path) -> None:
    now = time.time()
    copy(tmp_path, "oldest", 100, now - 30)
    copy(tmp_path, "in-use", 100, now - 20)
    copy(tmp_path, "newest", 100, now - 10)
    evicted = cache.evict(tmp_path, 150, keep={"in-use"})
    assert evicted == ["oldest", "newest"]
    assert [p.name for p in tmp_path.iterdir()] == ["in-use"]
