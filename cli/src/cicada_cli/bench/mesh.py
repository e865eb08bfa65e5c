"""``cicada bench mesh``: what the mesh adds on top of the engine.

In one run, on one machine:

- **warm**: p50/p99 of a warm request through REST → gateway → RabbitMQ → scheduler →
  loader → back, against the same forward pass on the same inputs timed in-process (a
  worker process with the loader's threading settings), the two taking turns so that both
  see the machine in the same state;
- **cold**: a cold start through the mesh (a fresh registration each time, so the model is
  neither resident nor cached), timed by the client, against in-process ``cicada`` cold
  starts of the same checkpoint from the same origin, alternating;
- **scale from zero**: a model unloaded after its keep-alive, then called again: a cold
  start from the node cache, which the weights service reuses without reading it;
- **warm, tiny**: the same for a tiny GPT-2, where the forward pass is a millisecond or two;
- **throughput**: warm requests per second for a tiny model, from concurrent clients.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from cicada_cli.bench.coldstart import run_worker, worker_command
from cicada_cli.up import Mesh
from cicada_loader import GOMP_SPINCOUNT


def _request(model_dir: Path, seq_len: int) -> dict[str, Any]:
    config = json.loads((model_dir / "config.json").read_text())
    vocab = int(config.get("vocab_size", 1000))
    ids = [(i * 7919) % vocab for i in range(seq_len)]
    return {
        "inputs": [{"name": "input_ids", "shape": [1, seq_len], "datatype": "INT64", "data": ids}]
    }


KEEP_ALIVE_S = 2.0  # short, so that the scale-from-zero runs do not wait long


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _worker(mode: str, model_dir: Path, work: Path, seq_len: int) -> dict[str, Any]:
    result = run_worker(worker_command(mode, str(model_dir), model_dir, work, seq_len=seq_len))
    if "error" in result:
        raise RuntimeError(f"{mode} worker failed: {result['error']}")
    return result


def run_mesh_bench(
    *,
    model_dir: Path,
    tiny_dir: Path,
    work_dir: Path,
    warm: int,
    cold: int,
    seq_len: int,
    throughput_s: float,
    clients: int,
    loaders: int,
    console: Console,
) -> dict[str, Any]:
    work_dir.mkdir(parents=True, exist_ok=True)
    roots = f"{model_dir.parent.resolve()}:{tiny_dir.parent.resolve()}"
    mesh = Mesh(
        loaders=loaders,
        port=18000 + os.getpid() % 1000,
        log_dir=work_dir / "logs",
        env={
            "CICADA_NAMESPACE": f"bench-{uuid.uuid4().hex[:8]}",
            "CICADA_MODELS_DIR": str(work_dir / "none"),
            "CICADA_MODEL_ROOTS": roots,
            "CICADA_CACHE_DIR": str(work_dir / "mesh-cache"),
            "CICADA_LOG_JSON": "true",
            "CICADA_LOADER_KEEP_ALIVE_S": str(KEEP_ALIVE_S),
        },
    )
    mesh.start()
    out: dict[str, Any] = {"model": model_dir.name, "seq_len": seq_len, "loaders": loaders}
    try:
        mesh.wait_ready()
        with httpx.Client(base_url=mesh.url, timeout=600) as http:
            out["cold"] = _cold(http, model_dir, work_dir, cold, seq_len, console)
            out["warm"] = _warm(http, model_dir, work_dir, warm, seq_len, console)
            out["warm_tiny"] = _warm(http, tiny_dir, work_dir, warm, seq_len, console)
            out["from_zero"] = _from_zero(http, model_dir, cold, seq_len, console)
            out["throughput"] = _throughput(http, tiny_dir, throughput_s, clients, console)
    finally:
        mesh.stop()
        mesh.purge()
    return out


def _register(http: httpx.Client, name: str, path: Path) -> None:
    resp = http.post(f"/v2/repository/models/{name}", json={"uri": str(path.resolve())})
    resp.raise_for_status()
    deadline = time.monotonic() + 120
    while http.get(f"/v2/models/{name}/ready").status_code != 200:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} never became ready")
        time.sleep(0.1)


def _cold(
    http: httpx.Client, model_dir: Path, work: Path, reps: int, seq_len: int, console: Console
) -> dict[str, Any]:
    body = _request(model_dir, seq_len)
    mesh_s, server_s, local_s = [], [], []
    for i in range(reps):
        console.print(f"cold start {i + 1}/{reps}: in-process, then through the mesh")
        local_s.append(_worker("run", model_dir, work, seq_len)["summary"]["e2e_s"])
        name = f"{model_dir.name}-cold-{i}-{uuid.uuid4().hex[:6]}"
        _register(http, name, model_dir)
        os.sync()
        client, loader = _timed_cold(http, name, body)
        mesh_s.append(client)
        server_s.append(loader)
        # unloaded, so that the next in-process run meets a node with nothing resident, as
        # the next cold start through the mesh does (a resident model slows a fresh
        # process's page-cache writes on this VM, see docs/benchmarks.md)
        http.delete(f"/v2/repository/models/{name}").raise_for_status()
        _wait_gone(work / "mesh-cache" / "files" / name)
    mesh_p50, local_p50 = statistics.median(mesh_s), statistics.median(local_s)
    return {
        "mesh_s": mesh_s,
        "loader_e2e_s": server_s,
        "in_process_s": local_s,
        "mesh_p50_s": mesh_p50,
        "in_process_p50_s": local_p50,
        "target_s": 1.1 * local_p50 + 0.05,
        "met": mesh_p50 <= 1.1 * local_p50 + 0.05,
    }


class InProcess:
    """The same model in a worker process of its own, one forward pass on demand."""

    def __init__(self, model_dir: Path, work: Path, body: dict[str, Any]) -> None:
        env = {"GOMP_SPINCOUNT": GOMP_SPINCOUNT, **os.environ}  # as a loader sets it
        self.proc = subprocess.Popen(
            worker_command("serve", str(model_dir), model_dir, work),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            self._send(json.dumps(body))
        except BaseException:
            self.close()
            raise

    def forward(self) -> float:
        self._send("")
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            raise RuntimeError(f"the in-process worker exited ({self.proc.wait()})")
        return float(json.loads(line)["forward_s"])

    def _send(self, line: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise RuntimeError(f"the in-process worker exited ({self.proc.wait()})") from None

    def close(self) -> None:
        """Close its stdin (the worker ends); kill it if it has not ended within a minute."""
        try:
            self.proc.communicate(timeout=60)
        except (subprocess.TimeoutExpired, OSError):
            self.proc.kill()
            self.proc.wait()


def _warm(
    http: httpx.Client, model_dir: Path, work: Path, reps: int, seq_len: int, console: Console
) -> dict[str, Any]:
    console.print(f"{reps} warm requests through the mesh and in-process, in turn")
    name = f"{model_dir.name}-warm"
    _register(http, name, model_dir)
    body = _request(model_dir, seq_len)
    http.post(f"/v2/models/{name}/infer", json=body).raise_for_status()  # the cold start
    local = InProcess(model_dir, work, body)
    latencies, compute, queue, forwards, nulls = [], [], [], [], []
    try:
        for i in range(reps + 3):  # the first three of each are not timed
            if i % 2:  # each goes first half of the time
                forwards.append(local.forward())
            start = time.perf_counter()
            resp = http.post(f"/v2/models/{name}/infer", json=body)
            latencies.append(time.perf_counter() - start)
            resp.raise_for_status()
            if not i % 2:
                forwards.append(local.forward())
            params = resp.json()["parameters"]
            compute.append(params["compute_s"])
            queue.append(params["queue_s"])
            start = time.perf_counter()
            http.get("/v2/health/ready").raise_for_status()
            nulls.append(time.perf_counter() - start)
    finally:
        local.close()
    latencies, compute, queue, forwards, nulls = (
        x[3:] for x in (latencies, compute, queue, forwards, nulls)
    )
    p50, local_p50 = statistics.median(latencies), statistics.median(forwards)
    return {
        "mesh_p50_s": p50,
        "mesh_p99_s": _pct(latencies, 0.99),
        "loader_compute_p50_s": statistics.median(compute),
        # from the gateway's publish to the loader's start: gateway → scheduler → loader
        "queue_p50_s": statistics.median(queue),
        # no compute: HTTP, gateway → scheduler → gateway (a readiness probe), after a pass
        "null_path_p50_s": statistics.median(nulls),
        "in_process_p50_s": local_p50,
        "overhead_p50_s": p50 - local_p50,
        # each mesh request against the in-process pass next to it
        "paired_overhead_p50_s": statistics.median(
            m - f for m, f in zip(latencies, forwards, strict=True)
        ),
        "target_s": local_p50 + 0.005,
        "met": p50 <= local_p50 + 0.005,
    }


def _from_zero(
    http: httpx.Client, model_dir: Path, reps: int, seq_len: int, console: Console
) -> dict[str, Any]:
    console.print(f"{reps} cold starts from the node cache (after the keep-alive)")
    name = f"{model_dir.name}-from-zero"
    _register(http, name, model_dir)
    body = _request(model_dir, seq_len)
    http.post(f"/v2/models/{name}/infer", json=body).raise_for_status()  # fetched, cached
    mesh_s, server_s = [], []
    for _ in range(reps):
        time.sleep(KEEP_ALIVE_S + 2.5)  # unloaded at a heartbeat (1 s) after the keep-alive
        client, loader = _timed_cold(http, name, body)
        mesh_s.append(client)
        server_s.append(loader)
    http.delete(f"/v2/repository/models/{name}").raise_for_status()
    return {
        "mesh_s": mesh_s,
        "loader_e2e_s": server_s,
        "mesh_p50_s": statistics.median(mesh_s),
    }


def _timed_cold(http: httpx.Client, name: str, body: dict[str, Any]) -> tuple[float, float]:
    """One request that must be a cold start: seconds at the client, and the loader's E2E."""
    start = time.perf_counter()
    resp = http.post(f"/v2/models/{name}/infer", json=body)
    seconds = time.perf_counter() - start
    resp.raise_for_status()
    params = resp.json()["parameters"]
    assert params["cold_start"], params
    return seconds, params["e2e_s"]


def _wait_gone(path: Path, timeout_s: float = 30.0) -> None:
    """Until the weights service has deleted an unregistered model's copy."""
    deadline = time.monotonic() + timeout_s
    while path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} outlived its model")
        time.sleep(0.05)


def _throughput(
    http: httpx.Client, tiny_dir: Path, seconds: float, clients: int, console: Console
) -> dict[str, Any]:
    console.print(f"throughput: {clients} clients for {seconds:g}s on {tiny_dir.name}")
    name = "throughput-tiny"
    _register(http, name, tiny_dir)
    body = _request(tiny_dir, 8)
    http.post(f"/v2/models/{name}/infer", json=body).raise_for_status()
    stop = time.monotonic() + seconds

    def client() -> list[float]:
        done = []
        with httpx.Client(base_url=str(http.base_url), timeout=60) as own:
            while time.monotonic() < stop:
                start = time.perf_counter()
                own.post(f"/v2/models/{name}/infer", json=body).raise_for_status()
                done.append(time.perf_counter() - start)
        return done

    begin = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        per_client = list(pool.map(lambda _: client(), range(clients)))
    elapsed = time.monotonic() - begin
    latencies = [x for runs in per_client for x in runs]
    return {
        "clients": clients,
        "seconds": elapsed,
        "requests": len(latencies),
        "requests_per_s": len(latencies) / elapsed,
        "p50_s": statistics.median(latencies),
        "p99_s": _pct(latencies, 0.99),
    }
