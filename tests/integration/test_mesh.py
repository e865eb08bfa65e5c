"""The mesh end to end: four services as processes, the real RabbitMQ, REST and AMQP."""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aio_pika
import msgpack
import pytest
import torch
from safetensors.torch import load_file, save_file

from cicada_shared.contracts import (
    CONTENT_TYPE,
    Health,
    InferJob,
    JobResult,
    Tensor,
    decode,
    encode,
)
from cicada_shared.topology import JOB_ROUTING_KEY
from tests.integration.mesh_fixtures import (
    AMQP_URL,
    RunningMesh,
    ids_tensor,
    infer_body,
    logits_of,
    logs,
    next_result,
    reference,
    wait_models_ready,
)

IDS = [[5, 17, 42, 7, 99, 3]]


def as_tensor(output: dict[str, Any]) -> torch.Tensor:
    assert output["datatype"] == "FP32"
    return torch.tensor(output["data"], dtype=torch.float32).reshape(output["shape"])


@pytest.mark.parametrize(
    ("model", "output"), [("tiny-gpt2", "logits"), ("tiny-bert", "last_hidden_state")]
)
def test_rest_infer_matches_transformers(mesh: RunningMesh, model: str, output: str) -> None:
    with mesh.client() as http:
        resp = http.post(f"/v2/models/{model}/infer", json=infer_body("input_ids", IDS, [1, 6]))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model_name"] == model
    got = {o["name"]: as_tensor(o) for o in body["outputs"]}
    want = reference(mesh.models_dir / model, input_ids=torch.tensor(IDS))
    assert torch.equal(got[output], want[output])


def test_cold_then_warm(mesh: RunningMesh) -> None:
    with mesh.client() as http:
        http.delete("/v2/repository/models/again")
        shutil.copytree(
            mesh.models_dir / "tiny-gpt2", mesh.models_dir / "again", dirs_exist_ok=True
        )
        registered = http.post(
            "/v2/repository/models/again", json={"uri": str(mesh.models_dir / "again")}
        )
        assert registered.status_code == 200, registered.text
        body = infer_body("input_ids", IDS, [1, 6])
        first = http.post("/v2/models/again/infer", json=body).json()
        second = http.post("/v2/models/again/versions/1/infer", json=body).json()
    assert first["parameters"]["cold_start"] is True
    assert first["parameters"]["e2e_s"] > 0 and 0 <= first["parameters"]["utilization"] <= 1
    assert second["parameters"]["cold_start"] is False
    assert first["outputs"] == second["outputs"]


def test_async_job(mesh: RunningMesh) -> None:
    with mesh.client() as http:
        resp = http.post("/v2/models/tiny-gpt2/jobs", json=infer_body("input_ids", IDS, [1, 6]))
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["id"]
        assert resp.headers["location"] == f"/v2/jobs/{job_id}"
        deadline = time.monotonic() + 60
        while (state := http.get(f"/v2/jobs/{job_id}").json())["state"] not in (
            "succeeded",
            "failed",
        ):
            assert time.monotonic() < deadline, state
            time.sleep(0.05)
        sync = http.post(
            "/v2/models/tiny-gpt2/infer", json=infer_body("input_ids", IDS, [1, 6])
        ).json()
    assert state["state"] == "succeeded", state
    assert state["outputs"] == sync["outputs"]
    assert http_status(mesh, "get", f"/v2/jobs/{uuid.uuid4().hex}") == 404


def http_status(mesh: RunningMesh, method: str, path: str, **kw: Any) -> int:
    with mesh.client() as http:
        return http.request(method, path, **kw).status_code


def test_job_published_over_amqp_with_reply_to(mesh: RunningMesh) -> None:
    """Any AMQP client: publish an InferJob, read the JobResult from its reply_to queue."""

    job_id = uuid.uuid4().hex

    async def roundtrip() -> JobResult:
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            replies = await channel.declare_queue(exclusive=True)
            exchange = await channel.get_exchange(mesh.names.jobs_exchange)
            job = InferJob(
                job_id=job_id,
                model="tiny-gpt2",
                submitted_at=time.time(),
                inputs=[ids_tensor(IDS)],
            )
            await exchange.publish(
                aio_pika.Message(
                    encode(job),
                    content_type=CONTENT_TYPE,
                    priority=5,
                    reply_to=replies.name,
                    correlation_id=job.job_id,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=JOB_ROUTING_KEY,
            )
            return await next_result(replies)

    result = asyncio.run(roundtrip())
    assert result.state == "succeeded", result.error
    assert result.job_id == job_id
    want = reference(mesh.models_dir / "tiny-gpt2", input_ids=torch.tensor(IDS))["logits"]
    assert torch.equal(logits_of(result), want)


def test_two_loaders_share_the_work(mesh: RunningMesh) -> None:
    body = infer_body("input_ids", IDS, [1, 6])
    with mesh.client() as http, ThreadPoolExecutor(8) as pool:
        futures = [
            pool.submit(http.post, f"/v2/models/{m}/infer", json=body)
            for m in ["tiny-gpt2", "tiny-bert"] * 6
        ]
        results = [f.result().json() for f in futures]
    loaders = {r["parameters"]["loader"] for r in results}
    assert len(loaders) == 2, loaders


# -- bad input at every edge -----------------------------------------------------------------

GOOD = infer_body("input_ids", [[1, 2]], [1, 2])


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "says"),
    [
        (
            "/v2/models/tiny-gpt2/infer",
            {"content": b'{"inputs": [', "headers": {"content-type": "application/json"}},
            400,
            "malformed JSON",
        ),
        (
            "/v2/models/tiny-gpt2/infer",
            {"json": infer_body("input_ids", [1, 2, 3], [1, 2])},
            400,
            "needs 2 values",
        ),
        (
            "/v2/models/tiny-gpt2/infer",
            {"json": infer_body("input_ids", [1, 2], [1, 2], "INT63")},
            400,
            "unknown datatype",
        ),
        (
            "/v2/models/tiny-gpt2/infer",
            {"json": infer_body("input_ids", [1, 2], [1, 2], "FP32")},
            400,
            "must be INT64",
        ),
        (
            "/v2/models/tiny-gpt2/infer",
            {"json": infer_body("nope", [1, 2], [1, 2])},
            400,
            "unknown input",
        ),
        ("/v2/models/tiny-gpt2/infer", {"json": {"inputs": []}}, 400, "inputs"),
        ("/v2/models/no-such-model/infer", {"json": GOOD}, 404, "not registered"),
        ("/v2/models/tiny-gpt2/versions/7/infer", {"json": GOOD}, 404, "no version"),
        (
            "/v2/models/tiny-gpt2/infer",
            {"json": {**GOOD, "parameters": {"priority": 10}}},
            400,
            "priority",
        ),
        (
            "/v2/models/tiny-gpt2/infer",
            {"json": {**GOOD, "parameters": {"priority": -1}}},
            400,
            "priority",
        ),
        (
            "/v2/models/tiny-gpt2/infer",
            {"json": infer_body("input_ids", [1.5, 2], [1, 2])},
            400,
            "integers",
        ),
        (
            "/v2/models/tiny-gpt2/infer",
            {"json": infer_body("input_ids", [0] * 600_000, [1, 600_000])},
            413,
            "limit",
        ),
        (
            "/v2/models/tiny-gpt2/infer",
            {
                "content": b'{"inputs": [{"name": "input_ids", "shape": [1, 1], '
                b'"datatype": "INT64", "data": [1]}], "parameters": {"timeout_s": NaN}}',
                "headers": {"content-type": "application/json"},
            },
            400,
            "timeout_s",
        ),
        (
            "/v2/models/tiny-gpt2/infer",
            {"json": infer_body("input_ids", [], [2**64, 0])},
            400,
            "holds no values",
        ),
        (
            "/v2/models/tiny-gpt2/infer",
            {"json": infer_body("input_ids", [[1, 1000]], [1, 2])},
            400,
            "holds 1000; this model has 1000 token ids",
        ),
        (
            "/v2/models/tiny-gpt2/infer",
            {"json": infer_body("input_ids", [[1] * 129], [1, 129])},
            400,
            "has 128 positions",
        ),
        (
            "/v2/models/tiny-bert/infer",
            {
                "json": {
                    "inputs": [
                        *GOOD["inputs"],
                        {
                            "name": "attention_mask",
                            "shape": [1, 3],
                            "datatype": "INT64",
                            "data": [1, 1, 1],
                        },
                    ]
                }
            },
            400,
            "attention_mask has shape [1, 3]",
        ),
        (
            "/v2/models/tiny-gpt2/infer",
            {"json": infer_body("input_ids", [[i % 1000 for i in range(128)]] * 5, [5, 128])},
            413,
            "the outputs take 2560000 bytes",
        ),
        ("/v2/repository/models/x", {"json": {"uri": "file:///etc"}}, 400, "outside the allowed"),
        ("/v2/repository/models/x", {"json": {"uri": "file:///tmp/../etc/passwd"}}, 400, "'..'"),
        ("/v2/repository/models/x", {"json": {"uri": "ftp://example.com/m"}}, 400, "scheme"),
        ("/v2/repository/models/bad%20name", {"json": {"uri": "file:///etc"}}, 400, "model name"),
        ("/v2/repository/models/x", {"json": {}}, 400, "uri"),
        ("/v2/models/no-such-model", {}, 404, "not registered"),
    ],
)
def test_bad_input_gets_a_clear_4xx(
    mesh: RunningMesh, path: str, kwargs: dict[str, Any], status: int, says: str
) -> None:
    method = "get" if path == "/v2/models/no-such-model" else "post"
    with mesh.client() as http:
        resp = http.request(method, path, **kwargs)
        assert resp.status_code == status, resp.text
        assert says in resp.json()["error"]
        assert http.get("/v2/health/ready").status_code == 200  # nothing crashed


def test_json_bodies_whatever_their_content_type_and_errors_always_json(
    mesh: RunningMesh,
) -> None:
    """``curl -d`` labels JSON as form data; unknown routes answer in the same error shape."""
    body = (
        b'{"inputs": [{"name": "input_ids", "shape": [1, 2], "datatype": "INT64", "data": [1, 2]}]}'
    )
    form = {"content-type": "application/x-www-form-urlencoded"}
    with mesh.client() as http:
        assert http.post("/v2/models/tiny-gpt2/infer", content=body, headers=form).is_success
        binary = {**form, "inference-header-content-length": "10"}
        refused = http.post("/v2/models/tiny-gpt2/infer", content=body, headers=binary)
        assert refused.status_code == 415 and "binary" in refused.json()["error"]
        missing = http.get("/v2/no-such-route")
        assert missing.status_code == 404 and missing.json() == {"error": "Not Found"}
        wrong = http.put("/v2/models/tiny-gpt2/infer", json=GOOD)
        assert wrong.status_code == 405 and "error" in wrong.json()


def test_a_result_too_large_for_the_broker_fails_only_its_job(mesh: RunningMesh) -> None:
    """The loader refuses to send it (the broker would close the channel), the job fails
    with the reason, and the loader serves the next request."""
    big = infer_body("input_ids", [[i % 1000 for i in range(128)]] * 5, [5, 128])
    with mesh.client() as http:
        job = http.post("/v2/models/tiny-gpt2/jobs", json=big).json()["id"]
        deadline = time.monotonic() + 60
        while (state := http.get(f"/v2/jobs/{job}").json())["state"] not in ("failed", "succeeded"):
            assert time.monotonic() < deadline, state
            time.sleep(0.05)
        assert state["state"] == "failed" and state["error"]["kind"] == "MessageTooLarge"
        for _ in range(4):  # both loaders are free again
            assert http.post("/v2/models/tiny-gpt2/infer", json=GOOD).status_code == 200


def test_reregistering_a_name_serves_the_new_checkpoint(mesh: RunningMesh) -> None:
    first, second = mesh.models_dir / "swap-a", mesh.models_dir / "swap-b"
    for target in (first, second):
        shutil.copytree(mesh.models_dir / "tiny-gpt2", target, dirs_exist_ok=True)
    weights = load_file(second / "model.safetensors")
    save_file(
        {k: v * 2 for k, v in weights.items()}, second / "model.safetensors", {"format": "pt"}
    )
    body = infer_body("input_ids", IDS, [1, 6])
    with mesh.client() as http:
        assert http.post("/v2/repository/models/swap", json={"uri": str(first)}).is_success
        for _ in range(2):  # resident on one or both loaders
            assert http.post("/v2/models/swap/infer", json=body).is_success
        assert http.post("/v2/repository/models/swap", json={"uri": str(second)}).is_success
        wait_models_ready(mesh.url, ["swap"])
        outputs = [http.post("/v2/models/swap/infer", json=body).json() for _ in range(3)]
    want = reference(second, input_ids=torch.tensor(IDS))["logits"]
    for out in outputs:
        got = {o["name"]: as_tensor(o) for o in out["outputs"]}
        assert torch.equal(got["logits"], want)


def test_a_missing_origin_is_the_request_s_fault_at_registration_the_origin_s_later(
    mesh: RunningMesh,
) -> None:
    gone = mesh.models_dir / "soon-gone"
    shutil.copytree(mesh.models_dir / "tiny-bert", gone, dirs_exist_ok=True)
    with mesh.client() as http:
        missing = http.post("/v2/repository/models/nope", json={"uri": str(gone) + "-never"})
        assert missing.status_code == 400 and "not a directory" in missing.json()["error"]
        assert http.post("/v2/repository/models/soon-gone", json={"uri": str(gone)}).is_success
        wait_models_ready(mesh.url, ["soon-gone"])
        (gone / "model.safetensors").unlink()
        failed = http.post("/v2/models/soon-gone/infer", json=GOOD)
        assert failed.status_code == 502 and "model.safetensors" in failed.json()["error"]
        assert http.post("/v2/models/tiny-bert/infer", json=GOOD).status_code == 200


def test_registering_a_broken_checkpoint(mesh: RunningMesh, tmp_path: Path) -> None:
    broken = mesh.models_dir / "broken"
    shutil.copytree(mesh.models_dir / "tiny-gpt2", broken, dirs_exist_ok=True)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[:-64])
    with mesh.client() as http:
        resp = http.post("/v2/repository/models/broken", json={"uri": str(broken)})
    assert resp.status_code == 422, resp.text
    assert "model.safetensors" in resp.json()["error"]


def test_undecodable_amqp_job_is_dead_lettered_and_failed(mesh: RunningMesh) -> None:
    job_id = uuid.uuid4().hex

    async def send_garbage() -> tuple[JobResult, int]:
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            replies = await channel.declare_queue(exclusive=True)
            dead = await channel.declare_queue(mesh.names.dead_queue, durable=True, passive=True)
            before = dead.declaration_result.message_count or 0
            exchange = await channel.get_exchange(mesh.names.jobs_exchange)
            body = msgpack.packb(
                {"kind": "infer_job", "job_id": job_id, "model": "tiny-gpt2", "inputs": "nonsense"}
            )
            await exchange.publish(
                aio_pika.Message(body, reply_to=replies.name, correlation_id=job_id),
                routing_key=JOB_ROUTING_KEY,
            )
            message = await replies.get(timeout=30, fail=False) or await _next(replies)
            result = decode(message.body)
            assert isinstance(result, JobResult)
            await asyncio.sleep(0.3)
            dead = await channel.declare_queue(mesh.names.dead_queue, durable=True, passive=True)
            return result, (dead.declaration_result.message_count or 0) - before

    result, dead_lettered = asyncio.run(send_garbage())
    assert result.job_id == job_id and result.state == "failed"
    assert result.error is not None and result.error.kind == "InvalidMessage"
    assert dead_lettered == 1
    with mesh.client() as http:
        status = http.get(f"/v2/jobs/{job_id}").json()
        assert status["state"] == "failed" and "undecodable" in status["error"]["message"]
        assert http.get("/v2/health/ready").status_code == 200


def test_a_message_of_the_wrong_kind_is_dead_lettered(mesh: RunningMesh) -> None:
    """It decodes, but has no business on the weights' or the scheduler's queue."""

    async def send() -> int:
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            dead = await channel.declare_queue(mesh.names.dead_queue, durable=True, passive=True)
            before = dead.declaration_result.message_count or 0
            for queue in (
                mesh.names.weights_queue(socket.gethostname()),
                mesh.names.scheduler_inbox,
            ):
                await channel.default_exchange.publish(
                    aio_pika.Message(encode(Health()), content_type=CONTENT_TYPE), routing_key=queue
                )
            await asyncio.sleep(0.5)
            dead = await channel.declare_queue(mesh.names.dead_queue, durable=True, passive=True)
            return (dead.declaration_result.message_count or 0) - before

    assert asyncio.run(send()) == 2
    with mesh.client() as http:
        assert http.post("/v2/models/tiny-gpt2/infer", json=GOOD).status_code == 200


def test_metrics_and_openapi(mesh: RunningMesh) -> None:
    with mesh.client() as http:
        http.post("/v2/models/tiny-gpt2/infer", json=GOOD)
        metrics = http.get("/metrics").text
        spec = http.get("/openapi.json").json()
    assert 'cicada_requests_total{route="/v2/models/{name}/infer",status="200"}' in metrics
    for name in (
        "cicada_cold_starts_total",
        "cicada_queue_seconds",
        "cicada_load_seconds",
        "cicada_compute_seconds",
        "cicada_failures_total",
    ):
        assert name in metrics
    assert "/v2/models/{name}/infer" in spec["paths"]
    assert "/v2/repository/models/{name}" in spec["paths"]


def test_health_and_server_metadata(mesh: RunningMesh) -> None:
    with mesh.client() as http:
        assert http.get("/v2/health/live").json() == {"live": True}
        ready = http.get("/v2/health/ready").json()
        assert ready["ready"] and ready["loaders"] == 2
        assert http.get("/v2").json()["name"] == "cicada-mesh"
        meta = http.get("/v2/models/tiny-bert").json()
        assert meta["inputs"][0] == {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]}
        assert {"name": "last_hidden_state", "datatype": "FP32", "shape": [-1, -1, 64]} in meta[
            "outputs"
        ]
        assert http.get("/v2/models/tiny-bert/ready").json()["ready"] is True


def test_unregister(mesh: RunningMesh) -> None:
    target = mesh.models_dir / "short-lived"
    shutil.copytree(mesh.models_dir / "tiny-bert", target, dirs_exist_ok=True)
    with mesh.client() as http:
        assert (
            http.post(
                "/v2/repository/models/short-lived", json={"uri": target.as_uri()}
            ).status_code
            == 200
        )
        assert any(m["name"] == "short-lived" for m in http.get("/v2/repository/index").json())
        assert http.delete("/v2/repository/models/short-lived").status_code == 200
        assert http.post("/v2/models/short-lived/infer", json=GOOD).status_code == 404
        assert http.delete("/v2/repository/models/short-lived").status_code == 404


def test_unregistering_a_model_deletes_its_cached_copy(mesh: RunningMesh) -> None:
    target = mesh.models_dir / "cached-then-gone"
    shutil.copytree(mesh.models_dir / "tiny-bert", target, dirs_exist_ok=True)
    copy = mesh.cache_dir / "files" / "cached-then-gone"
    with mesh.client() as http:
        uri = target.as_uri()
        assert http.post("/v2/repository/models/cached-then-gone", json={"uri": uri}).is_success
        assert http.post("/v2/models/cached-then-gone/infer", json=GOOD).is_success
        assert (copy / "model.safetensors").is_file()
        assert http.delete("/v2/repository/models/cached-then-gone").status_code == 200
    deadline = time.monotonic() + 15
    while copy.exists():
        assert time.monotonic() < deadline, "the cached copy outlived its model"
        time.sleep(0.05)


async def _next(queue: aio_pika.abc.AbstractQueue) -> aio_pika.abc.AbstractIncomingMessage:
    async with queue.iterator(timeout=30) as messages:
        async for message in messages:
            await message.ack()
            return message
    raise AssertionError("no message")


def test_a_vanished_reply_queue_does_not_lose_the_job(mesh: RunningMesh) -> None:
    """A client that publishes with reply_to and goes away: the job still completes."""
    job_id = uuid.uuid4().hex

    async def publish() -> int:
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            dead = await channel.declare_queue(mesh.names.dead_queue, durable=True, passive=True)
            exchange = await channel.get_exchange(mesh.names.jobs_exchange)
            job = InferJob(
                job_id=job_id,
                model="tiny-gpt2",
                submitted_at=time.time(),
                inputs=[
                    Tensor(
                        name="input_ids",
                        datatype="INT64",
                        shape=[1, 6],
                        data=torch.tensor(IDS).numpy().tobytes(),
                    )
                ],
            )
            await exchange.publish(
                aio_pika.Message(
                    encode(job),
                    content_type=CONTENT_TYPE,
                    reply_to=f"gone-{uuid.uuid4().hex}",
                    correlation_id=job_id,
                ),
                routing_key=JOB_ROUTING_KEY,
            )
            return dead.declaration_result.message_count or 0

    dead_before = asyncio.run(publish())
    with mesh.client() as http:
        deadline = time.monotonic() + 30
        while http.get(f"/v2/jobs/{job_id}").json().get("state") != "succeeded":
            assert time.monotonic() < deadline
            time.sleep(0.05)

    async def dead_count() -> int:
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            dead = await channel.declare_queue(mesh.names.dead_queue, durable=True, passive=True)
            return dead.declaration_result.message_count or 0

    assert asyncio.run(dead_count()) == dead_before


def test_two_cold_starts_of_one_model_share_one_download(
    mesh: RunningMesh, http_origin: Any, tmp_path: Path
) -> None:
    root = tmp_path / "origin"
    shutil.copytree(mesh.models_dir / "tiny-gpt2", root / "m")
    url = http_origin(root, bandwidth=1e6)  # ~0.7 s: both cold starts overlap
    name = f"shared-{uuid.uuid4().hex[:6]}"
    body = infer_body("input_ids", IDS, [1, 6])
    with mesh.client() as http:
        assert (
            http.post(f"/v2/repository/models/{name}", json={"uri": f"{url}/m"}).status_code == 200
        )
        deadline = time.monotonic() + 30
        while http.get(f"/v2/models/{name}/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with ThreadPoolExecutor(2) as pool:
            results = list(
                pool.map(
                    lambda _: http.post(f"/v2/models/{name}/infer", json=body).json(), range(2)
                )
            )
    assert [r["parameters"]["cold_start"] for r in results] == [True, True]
    assert len({r["parameters"]["loader"] for r in results}) == 2
    assert results[0]["outputs"] == results[1]["outputs"]
    events = [e for e in logs(mesh, "weights") if e.get("model") == name]
    assert [e["event"] for e in events].count("fetch_started") == 1
    assert [e["event"] for e in events].count("fetch_joined") == 1
