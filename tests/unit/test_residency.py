"""Resident models: memory budget, least recently used eviction, keep-alive, cancellation."""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import pytest
import torch
from torch import nn

from cicada_loader.residency import CHECKPOINTS, JobScope, Residency, Resident, spread
from cicada_shared.errors import InsufficientMemory, LoadCancelled


def resident(name: str, nbytes: int, last_used: float = 0.0) -> Resident:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    r = Resident(name, f"file:///{name}", model, nbytes)
    r.last_used = last_used
    return r


def test_make_room_evicts_least_recently_used_idle_models() -> None:
    residency = Residency(budget_bytes=100, keep_alive_s=60)
    for name, used in [("old", 1.0), ("busy", 2.0), ("new", 3.0)]:
        residency.add(resident(name, 30, used))
    residency.models["busy"].in_use = 1
    assert residency.make_room(30) == ["old"]  # 90 - 30 + 30 fits
    assert residency.make_room(60) == ["new"]  # busy stays, even over budget
    assert set(residency.models) == {"busy"}


def test_a_model_larger_than_the_budget_is_refused() -> None:
    with pytest.raises(InsufficientMemory, match="whole budget"):
        Residency(budget_bytes=10, keep_alive_s=60).make_room(11)


def test_keep_alive_scales_idle_models_to_zero() -> None:
    residency = Residency(budget_bytes=1000, keep_alive_s=5)
    residency.add(resident("idle", 1, last_used=time.time() - 10))
    residency.add(resident("recent", 1, last_used=time.time()))
    busy = resident("busy-but-old", 1, last_used=time.time() - 10)
    busy.in_use = 1
    residency.add(busy)
    assert residency.expire() == ["idle"]
    assert set(residency.models) == {"recent", "busy-but-old"}


def test_cancelling_a_scope_stops_the_forward_between_layers() -> None:
    r = resident("m", 1)
    layers: Any = r.model
    entered: list[int] = []
    layers[1].register_forward_pre_hook(lambda *_: entered.append(1))
    scope = JobScope("job")
    layers[0].register_forward_hook(lambda *_: scope.cancel(LoadCancelled("cancelled mid-way")))
    with scope, pytest.raises(LoadCancelled, match="mid-way"), torch.inference_mode():
        r.model(torch.ones(1, 2))
    assert entered == []  # the second layer never ran
    r.model(torch.ones(1, 2))  # outside the scope, the model runs


def test_a_deep_model_checks_at_a_few_evenly_spread_units() -> None:
    layers = [nn.Linear(2, 2) for _ in range(40)]
    r = Resident("deep", "file:///deep", nn.Sequential(*layers), 1)
    assert len(r.hooks) <= CHECKPOINTS
    ran: list[int] = []
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda *_, i=i: ran.append(i))
    scope = JobScope("job")
    layers[20].register_forward_hook(lambda *_: scope.cancel(LoadCancelled("half-way")))
    with scope, pytest.raises(LoadCancelled), torch.inference_mode():
        r.model(torch.ones(1, 2))
    assert 20 < len(ran) <= 20 + -(-40 // CHECKPOINTS)  # stopped within one stride


def test_checked_units_are_spread_from_the_first_to_the_last() -> None:
    assert spread(5) == [0, 1, 2, 3, 4]
    for n in (17, 40, 101):
        picked = spread(n)
        assert len(picked) == CHECKPOINTS and picked[0] == 0 and picked[-1] == n - 1
        gaps = [b - a for a, b in itertools.pairwise(picked)]
        assert max(gaps) - min(gaps) <= 1


def test_scope_callbacks_fire_once_even_when_registered_late() -> None:
    scope = JobScope("job")
    seen: list[str] = []
    scope.cancel(LoadCancelled("first"))
    scope.cancel(LoadCancelled("second"))
    scope.on_cancel(lambda e: seen.append(str(e)))
    threading.Thread(target=scope.cancel, args=(LoadCancelled("third"),)).start()
    assert seen == ["first"]
