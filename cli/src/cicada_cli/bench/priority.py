"""``cicada bench priority``: interactive requests under a flood of background work.

A steady, saturating stream of low-priority jobs (several models, so that some are cold
starts: the loader's memory budget holds only some of them) runs through the mesh, while a
high-priority request arrives every ``--interval`` seconds. The same run is repeated with
priorities disabled in the scheduler (strict arrival order) as the baseline.

Reported: the high-priority latency on an idle system, the service time of one job (p99 of
the time low jobs spend on the loader), p50/p99 latency of each class with and without
priorities, and a picture of latency over time for both. A third, shorter run kills the
scheduler in the middle of the load and starts it again: every accepted job must finish.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from cicada_cli.bench.mesh import _pct, _register, _request
from cicada_cli.up import Mesh


def run_priority_bench(
    *,
    high_model: Path,
    low_models: list[Path],
    work_dir: Path,
    duration_s: float,
    rate: float,
    interval_s: float,
    seq_len: int,
    memory_bytes: int,
    restart: bool,
    console: Console,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "duration_s": duration_s,
        "low_rate_per_s": rate,
        "high_interval_s": interval_s,
        "memory_bytes": memory_bytes,
    }
    for mode in ("priority", "fifo", "restart") if restart else ("priority", "fifo"):
        seconds = duration_s / 2 if mode == "restart" else duration_s
        note = ", the scheduler killed and restarted midway" if mode == "restart" else ""
        console.print(f"[bold]{mode}[/]: {seconds:g}s of load{note}")
        out[mode] = _one_run(
            mode,
            high_model,
            low_models,
            work_dir,
            seconds,
            rate,
            interval_s,
            seq_len,
            memory_bytes,
            console,
        )
    out["idle_high_s"] = out["priority"]["idle_high_s"]
    out["service_time_s"] = out["priority"]["service_time_s"]
    out["target_s"] = 1.5 * out["idle_high_s"] + out["service_time_s"]
    out["met"] = out["priority"]["high"]["p99_s"] <= out["target_s"]
    return out


def _one_run(
    mode: str,
    high_model: Path,
    low_models: list[Path],
    work: Path,
    duration_s: float,
    rate: float,
    interval_s: float,
    seq_len: int,
    memory_bytes: int,
    console: Console,
) -> dict[str, Any]:
    roots = ":".join(sorted({str(p.parent.resolve()) for p in [high_model, *low_models]}))
    mesh = Mesh(
        loaders=1,
        port={"priority": 19100, "fifo": 19200}.get(mode, 19300),
        log_dir=work / f"logs-{mode}",
        env={
            "CICADA_NAMESPACE": f"prio-{uuid.uuid4().hex[:8]}",
            "CICADA_MODELS_DIR": str(work / "none"),
            "CICADA_MODEL_ROOTS": roots,
            "CICADA_CACHE_DIR": str(work / f"cache-{mode}"),
            "CICADA_LOADER_MEMORY_BYTES": str(memory_bytes),
            "CICADA_LOG_JSON": "true",
            "CICADA_SCHEDULER_PRIORITIES": "false" if mode == "fifo" else "true",
        },
    )
    mesh.start()
    try:
        mesh.wait_ready()
        with httpx.Client(base_url=mesh.url, timeout=600) as http:
            names = {}
            for path in {high_model, *low_models}:
                names[path] = f"{path.name}-{mode}"
                _register(http, names[path], path)
            bodies = {p: _request(p, seq_len) for p in names}
            for p in names:  # every model loaded once (the budget may evict some again)
                http.post(f"/v2/models/{names[p]}/infer", json=bodies[p]).raise_for_status()
            high, urgent_body = (
                names[high_model],
                {**bodies[high_model], "parameters": {"priority": 9}},
            )
            http.post(f"/v2/models/{high}/infer", json=urgent_body).raise_for_status()
            idle = []
            for _ in range(20):
                start = time.perf_counter()
                http.post(f"/v2/models/{high}/infer", json=urgent_body).raise_for_status()
                idle.append(time.perf_counter() - start)
            result = _load(
                http,
                mesh.url,
                names,
                bodies,
                high_model,
                low_models,
                duration_s,
                rate,
                interval_s,
                console,
                midway=(lambda: mesh.crash_and_restart("scheduler")) if mode == "restart" else None,
            )
            result["idle_high_s"] = statistics.median(idle)
            return result
    finally:
        mesh.stop()
        mesh.purge()


def _load(
    http: httpx.Client,
    url: str,
    names: dict[Path, str],
    bodies: dict[Path, Any],
    high_model: Path,
    low_models: list[Path],
    duration_s: float,
    rate: float,
    interval_s: float,
    console: Console,
    midway: Callable[[], None] | None = None,
) -> dict[str, Any]:
    t0 = time.monotonic()
    stop = t0 + duration_s
    lows: list[str] = []
    highs: list[tuple[float, float]] = []
    rng = random.Random(0)

    def background() -> None:  # open loop: Poisson arrivals, whatever the backlog
        with httpx.Client(base_url=url, timeout=60) as own:
            next_at = time.monotonic()
            while (now := time.monotonic()) < stop:
                if now < next_at:
                    time.sleep(next_at - now)
                model = rng.choice(low_models)
                resp = own.post(
                    f"/v2/models/{names[model]}/jobs",
                    json={**bodies[model], "parameters": {"priority": 0}},
                )
                lows.append(resp.json()["id"])
                next_at += rng.expovariate(rate)

    def urgent() -> None:
        body = {**bodies[high_model], "parameters": {"priority": 9}}
        with httpx.Client(base_url=url, timeout=600) as own:
            while time.monotonic() + interval_s < stop:
                time.sleep(interval_s)
                sent = time.monotonic()
                own.post(f"/v2/models/{names[high_model]}/infer", json=body).raise_for_status()
                highs.append((sent - t0, time.monotonic() - sent))

    threads = [threading.Thread(target=background), threading.Thread(target=urgent)]
    if midway is not None:  # e.g. a scheduler crash in the middle of the load
        threads.append(threading.Timer(duration_s / 2, midway))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    console.print(f"  {len(lows)} background jobs, {len(highs)} urgent requests; draining")
    rows, unfinished = _drain(http, lows)
    latency = [r["finished_at"] - r["accepted_at"] for r in rows]
    service = [r["finished_at"] - r["dispatched_at"] for r in rows if r["dispatched_at"]]
    first = min((r["accepted_at"] for r in rows), default=0.0)
    return {
        "high": {
            "p50_s": statistics.median(h for _, h in highs),
            "p99_s": _pct([h for _, h in highs], 0.99),
            "n": len(highs),
        },
        "low": {
            "p50_s": statistics.median(latency),
            "p99_s": _pct(latency, 0.99),
            "n": len(latency),
            "accepted": len(lows),
            "failed": sum(r["state"] == "failed" for r in rows),
            "lost": len(unfinished),
            "cold_starts": sum(bool(r.get("cold_start")) for r in rows),
        },
        "service_time_s": _pct(service, 0.99),
        "service_time_p50_s": statistics.median(service),
        "series": {
            "high": [[round(t, 3), round(v, 4)] for t, v in highs],
            "low": [
                [round(r["accepted_at"] - first, 3), round(r["finished_at"] - r["accepted_at"], 4)]
                for r in rows
            ],
        },
    }


def _drain(
    http: httpx.Client, job_ids: list[str], patience_s: float = 120
) -> tuple[list[Any], list[str]]:
    """Wait for every background job to finish; return their records and the ids of those
    that did not finish while others still were (given up after ``patience_s`` of no
    progress: a job the mesh lost)."""
    done: list[Any] = []
    pending = list(job_ids)
    last_progress = time.monotonic()
    transport = httpx.HTTPTransport(retries=3)
    with (
        ThreadPoolExecutor(8) as pool,
        httpx.Client(base_url=http.base_url, timeout=60, transport=transport) as http,
    ):
        while pending and time.monotonic() - last_progress < patience_s:
            docs = dict(zip(pending, pool.map(lambda j: _job(http, j), pending), strict=True))
            finished = [d for d in docs.values() if d.get("state") in ("succeeded", "failed")]
            if finished:
                last_progress = time.monotonic()
            done += finished
            pending = [j for j, d in docs.items() if d not in finished]
            if pending:
                time.sleep(1.0)
    return done, pending


def _job(http: httpx.Client, job_id: str) -> Any:
    resp = http.get(f"/v2/jobs/{job_id}")
    return resp.json() if resp.status_code == 200 else {}  # 503 while a scheduler restarts


def plot_priority(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    for ax, mode in zip(axes, ("priority", "fifo"), strict=True):
        series = result[mode]["series"]
        for cls, colour in (("low", "#9e9e9e"), ("high", "#d62728")):
            pts = series[cls]
            ax.scatter(
                [p[0] for p in pts],
                [p[1] for p in pts],
                s=8 if cls == "low" else 22,
                color=colour,
                label=f"{cls} priority",
                alpha=0.7,
            )
        ax.axhline(
            result["target_s"],
            color="black",
            linestyle="--",
            linewidth=1,
            label="target for high p99",
        )
        high = result[mode]["high"]
        ax.set_title(
            f"{mode}: high p50 {high['p50_s'] * 1e3:.0f} ms, p99 {high['p99_s'] * 1e3:.0f} ms",
            fontsize=10,
        )
        ax.set_yscale("log")
        ax.set_xlabel("seconds into the run (submission time)")
    axes[0].set_ylabel("latency, seconds (log)")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
