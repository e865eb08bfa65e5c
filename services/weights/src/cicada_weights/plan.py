"""Turn an execution order into pieces to fetch: the first-needed bytes first.

A *piece* is a set of tensors announced together once all its bytes have landed. Its bytes
are fetched as *ranges* of at most ``range_bytes``, so one large tensor is read by several
workers at once. Tensors the order does not name come last, in file order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cicada_weights.header import Header, TensorEntry

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class PlanOptions:
    """How to cut an order into pieces and ranges."""

    #: Close a piece once it holds this many bytes (a larger tensor is a piece of its own).
    piece_bytes: int = 16 * MiB
    #: Largest single read; larger spans are split so several workers share them.
    range_bytes: int = 8 * MiB
    #: Read across a gap this small between two tensors of a piece instead of issuing two reads.
    gap_bytes: int = 64 * 1024
    #: One piece per group of the order (layer-by-layer loading, as PISeL does).
    piece_per_group: bool = False


@dataclass(frozen=True, slots=True)
class Piece:
    """Tensors of one file that are announced together; ``ranges`` are absolute offsets."""

    index: int
    file: str
    tensors: tuple[str, ...]
    ranges: tuple[tuple[int, int], ...]

    @property
    def nbytes(self) -> int:
        return sum(end - start for start, end in self.ranges)


def plan_pieces(
    headers: Mapping[str, Header],
    order: Sequence[Sequence[str]],
    options: PlanOptions = PlanOptions(),
) -> list[Piece]:
    """Cut the tensors of ``headers`` into pieces following ``order`` (groups of names)."""
    where = {name: entry for h in headers.values() for name, entry in h.tensors.items()}
    file_of = {name: h.file for h in headers.values() for name in h.tensors}
    groups = [[n for n in group if n in where] for group in order]
    listed = {n for group in groups for n in group}
    rest = [
        name
        for h in headers.values()
        for name in sorted(h.tensors, key=lambda n: h.tensors[n].start)
        if name not in listed
    ]
    groups = [g for g in groups if g] + [[n] for n in rest]

    pieces: list[Piece] = []
    current: list[TensorEntry] = []

    def flush() -> None:
        if current:
            file = file_of[current[0].name]
            ranges = _ranges(current, options)
            pieces.append(Piece(len(pieces), file, tuple(t.name for t in current), ranges))
            current.clear()

    seen: set[str] = set()
    for group in groups:
        for name in group:
            if name in seen:
                continue
            seen.add(name)
            entry = where[name]
            size = sum(t.nbytes for t in current)
            if current and (
                file_of[name] != file_of[current[0].name]
                or (not options.piece_per_group and size + entry.nbytes > options.piece_bytes)
            ):
                flush()
            current.append(entry)
        if options.piece_per_group:
            flush()
    flush()
    return pieces


def _ranges(tensors: list[TensorEntry], options: PlanOptions) -> tuple[tuple[int, int], ...]:
    spans: list[list[int]] = []
    for t in sorted(tensors, key=lambda t: t.start):
        if t.nbytes == 0:
            continue
        if spans and t.start - spans[-1][1] <= options.gap_bytes:
            spans[-1][1] = max(spans[-1][1], t.end)
        else:
            spans.append([t.start, t.end])
    out: list[tuple[int, int]] = []
    for start, end in spans:
        for lo in range(start, end, options.range_bytes):
            out.append((lo, min(end, lo + options.range_bytes)))
    return tuple(out)
