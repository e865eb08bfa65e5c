"""A real mesh for the tests: the four services as processes on the real RabbitMQ, under a
namespace of their own, with tiny real checkpoints; removed from the broker afterwards."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest
import torch
import transformers

from cicada_cli.up import Mesh, check_broker
from cicada_shared.contracts import JobResult, Tensor, decode
from cicada_shared.topology import Names, purge

AMQP_URL = os.environ.get("CICADA_AMQP_URL", "amqp://guest:guest@localhost:5672/")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningMesh:
    mesh: Mesh
    names: Names
    models_dir: Path
    cache_dir: Path

    @property
    def url(self) -> str:
        return self.mesh.url

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120)


def start_mesh(
    tmp: Path, models: dict[str, Path], *, loaders: int, env: dict[str, str] | None = None
) -> RunningMesh:
    try:
        check_broker(AMQP_URL)
    except Exception as exc:
        pytest.fail(f"the mesh tests need RabbitMQ: {exc}")
    names = Names(f"test-{uuid.uuid4().hex[:10]}")
    models_dir = tmp / "models"
    models_dir.mkdir(parents=True)
    for name, src in models.items():
        shutil.copytree(src, models_dir / name)
    cache_dir = tmp / "cache"
    mesh = Mesh(
        loaders=loaders,
        port=free_port(),
        log_dir=tmp / "logs",
        env={
            "CICADA_AMQP_URL": AMQP_URL,
            "CICADA_NAMESPACE": names.namespace,
            "CICADA_MODELS_DIR": str(models_dir),
            "CICADA_CACHE_DIR": str(cache_dir),
            "CICADA_LOG_JSON": "true",
            **(env or {}),
        },
    )
    mesh.start()
    try:
        mesh.wait_ready(120)
        wait_models_ready(mesh.url, list(models))
    except BaseException:
        mesh.stop()
        raise
    return RunningMesh(mesh, names, models_dir, cache_dir)


def wait_models_ready(url: str, models: list[str], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=url, timeout=10) as client:
        while time.monotonic() < deadline:
            index = client.get("/v2/repository/index").json()
            states = {m["name"]: m["state"] for m in index}
            if all(states.get(m) == "ready" for m in models):
                return
            time.sleep(0.2)
    raise TimeoutError(f"models not ready: {states}")


def stop_mesh(running: RunningMesh) -> None:
    running.mesh.stop()
    asyncio.run(purge(AMQP_URL, running.names, [socket.gethostname()]))


def infer_body(
    name: str, values: Any, shape: list[int], datatype: str = "INT64", **parameters: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": values}]
    }
    if parameters:
        body["parameters"] = parameters
    return body


def logs(running: RunningMesh, service: str) -> list[dict[str, Any]]:
    path = running.mesh.log_dir / f"{service}.log" if running.mesh.log_dir else None
    if path is None or not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def reference(model_dir: Path, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """The transformers model's own outputs, loaded the ordinary way."""
    config = json.loads((model_dir / "config.json").read_text())
    cls = getattr(transformers, config["architectures"][0])
    model = cls.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        out = model(**inputs)
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def ids_tensor(ids: list[list[int]]) -> Tensor:
    """Token ids as a message tensor."""
    data = torch.tensor(ids).numpy().tobytes()
    return Tensor(name="input_ids", datatype="INT64", shape=[len(ids), len(ids[0])], data=data)


async def next_result(replies: aio_pika.abc.AbstractQueue) -> JobResult:
    """The first JobResult on a reply queue (acked)."""
    async with replies.iterator(timeout=60) as messages:
        async for message in messages:
            await message.ack()
            result = decode(message.body)
            assert isinstance(result, JobResult)
            assert message.correlation_id in (None, result.job_id)
            return result
    raise AssertionError("no reply")


def logits_of(result: JobResult) -> torch.Tensor:
    (logits,) = [t for t in result.outputs if t.name == "logits"]
    return torch.frombuffer(bytearray(logits.data), dtype=torch.float32).reshape(logits.shape)
