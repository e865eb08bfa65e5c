"""Planning pieces from an execution order."""

from __future__ import annotations

from cicada_weights.header import Header, TensorEntry
from cicada_weights.plan import PlanOptions, plan_pieces


def header(sizes: dict[str, int], file: str = "m.safetensors") -> Header:
    tensors, offset = {}, 100
    for name, size in sizes.items():  # laid out in this (file) order
        tensors[name] = TensorEntry(name, "U8", (size,), offset, offset + size)
        offset += size
    return Header(file, offset, 100, tensors, {})


def test_follows_the_order_not_the_file() -> None:
    h = header({"c": 10, "b": 10, "a": 10})
    pieces = plan_pieces({"m": h}, [["a"], ["b"], ["c"]], PlanOptions(piece_bytes=10))
    assert [p.tensors for p in pieces] == [("a",), ("b",), ("c",)]
    assert pieces[0].ranges == ((120, 130),)


def test_tensors_not_in_the_order_come_last_in_file_order() -> None:
    h = header({"x": 5, "a": 5, "y": 5})
    pieces = plan_pieces({"m": h}, [["a"]], PlanOptions(piece_bytes=5))
    assert [p.tensors for p in pieces] == [("a",), ("x",), ("y",)]


def test_large_tensor_is_split_into_ranges() -> None:
    h = header({"big": 100})
    (piece,) = plan_pieces({"m": h}, [["big"]], PlanOptions(range_bytes=30))
    assert piece.ranges == ((100, 130), (130, 160), (160, 190), (190, 200))
    assert piece.nbytes == 100


def test_small_tensors_share_a_piece_and_close_gaps() -> None:
    h = header({"a": 4, "gap": 2, "b": 4})
    (piece,) = plan_pieces({"m": h}, [["a", "b"]], PlanOptions(piece_bytes=100, gap_bytes=2))
    assert piece.tensors == ("a", "b", "gap")
    assert piece.ranges == ((100, 110),)  # one read across the 2-byte gap


def test_piece_per_group() -> None:
    h = header({"a": 1, "b": 1, "c": 1})
    pieces = plan_pieces({"m": h}, [["a", "b"], ["c"]], PlanOptions(piece_per_group=True))
    assert [p.tensors for p in pieces] == [("a", "b"), ("c",)]


def test_pieces_do_not_span_files() -> None:
    one, two = header({"a": 4}, "one"), header({"b": 4}, "two")
    pieces = plan_pieces({"one": one, "two": two}, [["b", "a"]], PlanOptions(piece_bytes=100))
    assert [(p.file, p.tensors) for p in pieces] == [("two", ("b",)), ("one", ("a",))]


def test_zero_byte_tensor_needs_no_range() -> None:
    h = header({"empty": 0})
    (piece,) = plan_pieces({"m": h}, [["empty"]])
    assert piece.ranges == ()
