"""Figures derived from a timeline."""

from __future__ import annotations

import json

import pytest

from cicada_loader.engine.timeline import Timeline, _union


def test_union_merges_overlaps() -> None:
    assert _union([(0.0, 1.0), (0.5, 2.0), (3.0, 4.0)]) == pytest.approx(3.0)
    assert _union([]) == 0.0


def test_summary_figures() -> None:
    tl = Timeline(variant="cicada", model="m", device="cpu")
    t0 = tl.t0
    tl.piece(t0 + 0.0, t0 + 1.0, 10)
    tl.piece(t0 + 0.5, t0 + 1.5, 10)
    tl.phase("forward", t0 + 0.2, t0 + 2.0)
    unit = tl.unit("a")
    unit.widen("exec", t0 + 1.0, t0 + 1.2)
    unit.wait_s = 0.8
    tl.result_at = t0 + 2.0
    s = tl.summary()
    assert s["e2e_s"] == pytest.approx(2.0)
    assert s["ttfl_s"] == pytest.approx(1.2)
    assert s["exec_busy_s"] == pytest.approx(1.0)  # 1.8 s forward − 0.8 s waiting
    assert s["fetch_busy_s"] == pytest.approx(1.5)
    assert s["utilization"] == pytest.approx(0.75)  # fetch, the bottleneck: 1.5 of 2.0 s
    assert s["executor_utilization"] == pytest.approx(0.5)
    doc = tl.to_json()
    json.dumps(doc)
    assert doc["units"][0]["exec"] == [pytest.approx(1.0), pytest.approx(1.2)]
