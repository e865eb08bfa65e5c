"""Matching model tensor names to checkpoint names."""

from __future__ import annotations

from cicada_loader.engine.keys import match_keys


def test_exact_and_prefix_forms() -> None:
    groups = [["transformer.h.0.w"], ["transformer.wte.weight", "lm_head.weight"]]
    match = match_keys(groups, ["h.0.w", "transformer.wte.weight"], prefix="transformer")
    assert match.filled == {0: "h.0.w", 1: "transformer.wte.weight"}
    assert match.missing == match.unexpected == match.redundant == []


def test_tie_stored_under_the_other_name() -> None:
    groups = [["transformer.wte.weight", "lm_head.weight"]]
    match = match_keys(groups, ["lm_head.weight"], prefix="transformer")
    assert match.filled == {0: "lm_head.weight"}


def test_tie_stored_twice_is_redundant_not_unexpected() -> None:
    groups = [["wte.weight", "lm_head.weight"]]
    match = match_keys(groups, ["wte.weight", "lm_head.weight"])
    assert match.filled == {0: "wte.weight"}
    assert match.redundant == ["lm_head.weight"]
    assert match.unexpected == []


def test_missing_and_unexpected() -> None:
    match = match_keys([["a"], ["b"]], ["a", "zzz"])
    assert match.missing == ["b"]
    assert match.unexpected == ["zzz"]


def test_ignore_patterns() -> None:
    match = match_keys(
        [["a"], ["pooler.w"]],
        ["a", "h.0.attn.bias"],
        ignore_missing=[r"pooler"],
        ignore_unexpected=[r"attn\.bias"],
    )
    assert match.missing == [] and match.unexpected == []
