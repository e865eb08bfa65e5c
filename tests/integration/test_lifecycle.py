"""The serverless lifecycle over the real RabbitMQ: priorities, cancellation, deadlines,
eviction, scale to zero, and a scheduler restart that loses no accepted job."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest
import torch
from safetensors.torch import save_file

from cicada_shared.contracts import (
    CONTENT_TYPE,
    FetchFinished,
    FetchRequest,
    InferJob,
    JobResult,
    PieceAnnounced,
    RunJob,
    decode,
    encode,
)
from tests.integration.mesh_fixtures import (
    AMQP_URL,
    RunningMesh,
    ids_tensor,
    infer_body,
    logits_of,
    logs,
    next_result,
    reference,
    start_mesh,
    stop_mesh,
)

BODY = infer_body("input_ids", [[1, 2, 3]], [1, 3])


@pytest.fixture(scope="module")
def life(checkpoints: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    """One loader with a small memory budget and a short keep-alive."""
    running = start_mesh(
        tmp_path_factory.mktemp("life"),
        {
            "tiny-gpt2": checkpoints("gpt2"),
            "tiny-bert": checkpoints("bert-base"),
            "tiny-vit": checkpoints("vit-base"),
        },
        loaders=1,
        env={
            "CICADA_LOADER_KEEP_ALIVE_S": "3",
            "CICADA_LOADER_HEARTBEAT_S": "0.3",
            "CICADA_LOADER_MEMORY_BYTES": "1400000",
            "CICADA_MODEL_ROOTS": "/",
            "CICADA_SCHEDULER_AGING_S": "0.25",
        },
    )
    yield running
    stop_mesh(running)


@pytest.fixture
def slow_model(
    life: RunningMesh, checkpoints: Any, http_origin: Callable[..., str], tmp_path: Path
) -> Callable[[float], str]:
    """Register a copy of the tiny GPT-2 behind an HTTP origin of the given bandwidth."""

    def make(bandwidth: float) -> str:
        name = f"slow-{uuid.uuid4().hex[:8]}"
        root = tmp_path / name
        shutil.copytree(checkpoints("gpt2"), root / "m")
        url = http_origin(root, bandwidth=bandwidth)
        with life.client() as http:
            resp = http.post(f"/v2/repository/models/{name}", json={"uri": f"{url}/m"})
            assert resp.status_code == 200, resp.text
            wait(lambda: http.get(f"/v2/models/{name}/ready").status_code == 200)
        return name

    return make


def wait(condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def submit(http: httpx.Client, model: str, priority: int = 0) -> str:
    resp = http.post(
        f"/v2/models/{model}/jobs", json={**BODY, "parameters": {"priority": priority}}
    )
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def finished(http: httpx.Client, job_id: str) -> dict[str, Any]:
    state: dict[str, Any] = {}

    def done() -> bool:
        nonlocal state
        state = http.get(f"/v2/jobs/{job_id}").json()
        return state["state"] in ("succeeded", "failed", "cancelled")

    wait(done)
    return state


def test_urgent_job_overtakes_waiting_background_jobs(
    life: RunningMesh, slow_model: Callable[[float], str]
) -> None:
    blocker = slow_model(1e6)  # a ~0.7 s cold start holds the only loader slot
    with life.client() as http:
        first = submit(http, blocker)
        lows = [submit(http, "tiny-gpt2", 0) for _ in range(4)]
        high = submit(http, "tiny-gpt2", 9)
        states = {j: finished(http, j) for j in [first, *lows, high]}
    assert all(s["state"] == "succeeded" for s in states.values()), states
    assert states[high]["dispatched_at"] < min(states[j]["dispatched_at"] for j in lows)


def test_aging_lets_a_long_waiting_low_job_go_before_fresher_higher_ones(
    life: RunningMesh, slow_model: Callable[[float], str]
) -> None:
    """Aging (one level per 0.25 s here): a priority-0 job that has waited 2 s ranks 8, above
    priority-5 jobs that arrive later; without aging they would overtake it."""
    blocker = slow_model(2e5)  # a ~3.5 s cold start holds the only loader slot
    with life.client() as http:
        first = submit(http, blocker)
        old = submit(http, "tiny-gpt2", 0)
        time.sleep(2.0)
        fresher = [submit(http, "tiny-gpt2", 5) for _ in range(3)]
        states = {j: finished(http, j) for j in [first, old, *fresher]}
    assert all(s["state"] == "succeeded" for s in states.values()), states
    assert states[first]["finished_at"] > states[fresher[-1]]["accepted_at"]  # all waited
    assert states[old]["dispatched_at"] < min(states[j]["dispatched_at"] for j in fresher)


def test_weights_service_lets_an_urgent_fetch_overtake_a_large_one(
    life: RunningMesh, checkpoints: Any, http_origin: Callable[..., str], tmp_path: Path
) -> None:
    """Over the broker: a 192 MiB background fetch (12 pieces of two 8 MiB ranges) is under
    way when an urgent fetch arrives; the urgent one takes the next free worker and finishes
    first, and most of the background fetch lands after it. (At equal priority the urgent
    range would queue behind every background range: at most the ranges in flight then
    would land after it.)"""
    root = tmp_path / "origin"
    (root / "big").mkdir(parents=True)
    (root / "big" / "config.json").write_text('{"model_type": "synthetic"}')
    tensors = {f"w{i:02d}": torch.full((2 * 1024 * 1024,), float(i)) for i in range(24)}
    save_file(tensors, root / "big" / "model.safetensors")
    shutil.copytree(checkpoints("gpt2"), root / "small")
    url = http_origin(root, bandwidth=100e6)
    node = os.environ.get("CICADA_NODE", socket.gethostname())  # as `cicada up` names it

    async def run() -> list[Any]:
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            events = await channel.declare_queue(exclusive=True)
            direct = await channel.get_exchange(life.names.direct_exchange)
            await events.bind(direct, events.name)

            async def fetch(name: str, priority: int) -> None:
                request = FetchRequest(
                    fetch_id=name,
                    model=f"{name}-{uuid.uuid4().hex[:6]}",
                    uri=f"{url}/{name}",
                    priority=priority,
                    announce_to=events.name,
                )
                await direct.publish(
                    aio_pika.Message(encode(request), content_type=CONTENT_TYPE),
                    routing_key=life.names.weights_queue(node),
                )

            seen: list[Any] = []
            await fetch("big", 0)
            async with events.iterator(timeout=60) as messages:
                async for incoming in messages:
                    await incoming.ack()
                    seen.append(decode(incoming.body))
                    if [m.fetch_id for m in seen if isinstance(m, PieceAnnounced)] == ["big"]:
                        await fetch("small", 9)
                    if sum(isinstance(m, FetchFinished) for m in seen) == 2:
                        return seen
        raise AssertionError("no events")

    seen = asyncio.run(run())
    done = [m.fetch_id for m in seen if isinstance(m, FetchFinished)]
    assert done == ["small", "big"], done
    small_done = next(i for i, m in enumerate(seen) if isinstance(m, FetchFinished))
    resumed = [m for m in seen[small_done:] if isinstance(m, PieceAnnounced)]
    assert {m.fetch_id for m in resumed} == {"big"} and len(resumed) >= 6, len(resumed)


def test_cancel_stops_a_cold_start_and_drops_its_fetch(
    life: RunningMesh, slow_model: Callable[[float], str]
) -> None:
    model = slow_model(2e5)  # ~3.5 s to fetch
    with life.client() as http:
        job = submit(http, model)
        wait(lambda: http.get(f"/v2/jobs/{job}").json()["state"] in ("fetching", "loading"))
        time.sleep(0.3)
        started = time.monotonic()
        assert http.delete(f"/v2/jobs/{job}").status_code == 200
        state = finished(http, job)
        assert state["state"] == "cancelled"
        assert time.monotonic() - started < 2.0  # well before the fetch would have ended
        after = http.post("/v2/models/tiny-gpt2/infer", json=BODY)  # the slot is free again
        assert after.status_code == 200
    wait(
        lambda: any(
            e.get("event") == "fetch_dropped" and e.get("model") == model
            for e in logs(life, "weights")
        )
    )


def test_deadline_fails_a_job_that_cannot_make_it(
    life: RunningMesh, slow_model: Callable[[float], str]
) -> None:
    model = slow_model(2e5)
    with life.client() as http:
        resp = http.post(
            f"/v2/models/{model}/infer", json={**BODY, "parameters": {"deadline_s": 0.5}}
        )
    assert resp.status_code == 504, resp.text
    assert "deadline" in resp.json()["error"]


def resident(http: httpx.Client, model: str) -> list[str]:
    return list(http.get(f"/v2/models/{model}").json()["parameters"]["resident_on"])


def test_memory_budget_evicts_the_least_recently_used(life: RunningMesh) -> None:
    with life.client() as http:
        for model in ("tiny-gpt2", "tiny-bert"):
            assert http.post(f"/v2/models/{model}/infer", json=BODY).status_code == 200
        body = {
            "inputs": [
                {
                    "name": "pixel_values",
                    "shape": [1, 3, 32, 32],
                    "datatype": "FP32",
                    "data": [0.5] * (3 * 32 * 32),
                }
            ]
        }
        assert http.post("/v2/models/tiny-vit/infer", json=body).status_code == 200
        time.sleep(1.0)  # two heartbeats
        assert resident(http, "tiny-vit")
        assert resident(http, "tiny-bert")
        assert not resident(http, "tiny-gpt2")  # the least recently used made room


def test_idle_models_scale_to_zero(life: RunningMesh) -> None:
    with life.client() as http:
        http.post("/v2/models/tiny-bert/infer", json=BODY)
        assert (
            http.post("/v2/models/tiny-bert/infer", json=BODY).json()["parameters"]["cold_start"]
            is False
        )
        wait(lambda: not resident(http, "tiny-bert"), timeout_s=15)
        again = http.post("/v2/models/tiny-bert/infer", json=BODY).json()
        assert again["parameters"]["cold_start"] is True


def test_a_job_placed_warm_on_a_loader_that_lost_the_model_fetches_it(life: RunningMesh) -> None:
    """Placement raced an eviction, or a restarted scheduler knew an older status: the loader
    is sent a job as warm (no fetch started) for a model it does not hold. It starts the
    fetch itself, and the job succeeds as a cold start."""
    with life.client() as http:
        loader = http.post("/v2/models/tiny-bert/infer", json=BODY).json()["parameters"]["loader"]
    model_dir = life.models_dir / "tiny-gpt2"
    job = InferJob(
        job_id=uuid.uuid4().hex,
        model=f"never-loaded-{uuid.uuid4().hex[:6]}",
        submitted_at=time.time(),
        inputs=[ids_tensor([[1, 2, 3]])],
    )

    async def run() -> JobResult:
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            replies = await channel.declare_queue(exclusive=True)
            message = RunJob(job=job, uri=model_dir.as_uri(), reply_to=replies.name)
            await channel.default_exchange.publish(
                aio_pika.Message(encode(message), content_type=CONTENT_TYPE),
                routing_key=life.names.loader_queue(loader),
            )
            return await next_result(replies)

    result = asyncio.run(run())
    assert result.state == "succeeded", result.error
    assert result.cold
    want = reference(model_dir, input_ids=torch.tensor([[1, 2, 3]]))["logits"]
    assert torch.equal(logits_of(result), want)
    assert any(e["event"] == "fetch_started_here" for e in logs(life, "loader-0"))


def test_scheduler_restart_loses_no_accepted_job(
    checkpoints: Any, tmp_path: Path, http_origin: Callable[..., str]
) -> None:
    root = tmp_path / "origin"
    shutil.copytree(checkpoints("gpt2"), root / "m")
    url = http_origin(root, bandwidth=1e6)
    running = start_mesh(
        tmp_path / "mesh",
        {"tiny-gpt2": checkpoints("gpt2")},
        loaders=1,
        env={"CICADA_MODEL_ROOTS": "/"},
    )
    try:
        with running.client() as http:
            assert (
                http.post("/v2/repository/models/slow", json={"uri": f"{url}/m"}).status_code == 200
            )
            wait(lambda: http.get("/v2/models/slow/ready").status_code == 200)
            jobs = [submit(http, "slow")] + [submit(http, "tiny-gpt2", p) for p in (0, 5, 9, 0)]
            time.sleep(0.3)  # the first is running on the loader, the rest wait
            running.mesh.crash_and_restart("scheduler")
            states = {j: finished(http, j) for j in jobs}
            # the registry survived too: the model registered over REST is still there
            assert http.get("/v2/models/slow/ready").status_code == 200
            again = http.post("/v2/models/slow/infer", json=BODY)
        assert {s["state"] for s in states.values()} == {"succeeded"}, states
        assert again.status_code == 200, again.text
    finally:
        stop_mesh(running)
