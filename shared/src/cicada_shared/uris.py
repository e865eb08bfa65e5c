"""Which model URIs the mesh accepts: ``file://`` below the allowed roots, or ``http(s)://``."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse


class InvalidURI(ValueError):
    """A model URI the mesh refuses; the message says why."""


def parse_roots(text: str) -> list[Path]:
    """``CICADA_MODEL_ROOTS``: a colon-separated list of directories."""
    return [Path(p).resolve() for p in text.split(":") if p]


def check_uri(uri: str, roots: list[Path]) -> str:
    """Return ``uri`` normalised (a plain path becomes ``file://``) or raise ``InvalidURI``."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        if not parsed.netloc:
            raise InvalidURI(f"{uri!r} has no host")
        if ".." in unquote(parsed.path).split("/"):
            raise InvalidURI(f"{uri!r} contains '..'")
        return uri.rstrip("/")
    if parsed.scheme not in ("", "file"):
        raise InvalidURI(f"unsupported scheme {parsed.scheme!r}: use file:// or http(s)://")
    raw = unquote(parsed.path) if parsed.scheme == "file" else uri
    if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
        raise InvalidURI(f"{uri!r}: file URIs must be local (file:///path)")
    if ".." in Path(raw).parts:
        raise InvalidURI(f"{uri!r} contains '..'")
    path = Path(raw)
    if not path.is_absolute():
        raise InvalidURI(f"{uri!r} is not an absolute path")
    resolved = path.resolve()
    if not any(resolved.is_relative_to(root) for root in roots):
        allowed = ", ".join(str(r) for r in roots) or "none"
        raise InvalidURI(f"{uri!r} is outside the allowed model roots ({allowed})")
    return resolved.as_uri()
