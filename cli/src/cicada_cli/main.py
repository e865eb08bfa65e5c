"""The ``cicada`` command."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Cicada mesh: cold starts without wasted initialisation.",
)
bench = typer.Typer(no_args_is_help=True, help="Benchmarks.")
app.add_typer(bench, name="bench")
console = Console(stderr=True)

ModelsDir = Annotated[Path, typer.Option("--dir", help="Directory holding one folder per model.")]
CheckpointsDir = Annotated[Path, typer.Option(help="Checkpoints; missing ones are written.")]
JsonOut = Annotated[Path, typer.Option("--json", help="Where to write results.")]
WorkDir = Annotated[Path, typer.Option(help="Scratch space.")]


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


@app.command()
def up(
    loaders: Annotated[int, typer.Option(min=1, help="Loader processes.")] = 1,
    port: Annotated[int, typer.Option(help="Gateway port.", envvar="CICADA_GATEWAY_PORT")] = 8000,
    models_dir: Annotated[
        Path, typer.Option(help="Models registered at start.", envvar="CICADA_MODELS_DIR")
    ] = Path("models"),
    demo: Annotated[bool, typer.Option(help="Write a tiny GPT-2 'demo' model if missing.")] = True,
    logs: Annotated[Path | None, typer.Option(help="Write each service's log here.")] = None,
) -> None:
    """Start scheduler, weights, loader(s) and gateway as local processes (Ctrl-C stops all).

    RabbitMQ comes from CICADA_AMQP_URL (default amqp://guest:guest@localhost:5672/).
    """
    from cicada_cli.up import BrokerUnreachable, Mesh, check_broker

    url = os.environ.get("CICADA_AMQP_URL", "amqp://guest:guest@localhost:5672/")
    try:
        check_broker(url)
    except BrokerUnreachable as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from exc
    if demo:
        from cicada_loader.demo import ensure_demo

        if ensure_demo(models_dir / "demo"):
            console.print(f"wrote the demo model (tiny random GPT-2) to {models_dir / 'demo'}")
    mesh = Mesh(
        loaders=loaders,
        port=port,
        log_dir=logs,
        env={"CICADA_MODELS_DIR": str(models_dir.resolve())},
    )
    mesh.start()
    try:
        mesh.wait_ready()
    except (TimeoutError, RuntimeError) as exc:
        console.print(f"[red]{exc}[/]")
        mesh.stop()
        raise typer.Exit(1) from exc
    console.print(f"[green]Cicada mesh is up[/]: {mesh.url}  ({loaders} loader(s); Ctrl-C stops)")
    raise typer.Exit(mesh.wait())


@app.command()
def checkpoints(
    models: Annotated[str, typer.Option(help="Comma-separated zoo names, or 'all'.")] = "all",
    dir: ModelsDir = Path("models"),
    tiny: Annotated[bool, typer.Option(help="Small configs of the same architectures.")] = False,
) -> None:
    """Write random-weight checkpoints of the zoo's models (no weights can be downloaded)."""
    from cicada_loader.engine.zoo import MODELS, write_checkpoint

    names = list(MODELS) if models == "all" else _split(models)
    for name in names:
        out = write_checkpoint(name, dir / name, tiny=tiny)
        size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        console.print(f"{name}: {out} ({size / 1e6:.0f} MB)")


@app.command()
def coldstart(
    model: Annotated[str, typer.Argument(help="Checkpoint directory, file:// or http(s):// URL.")],
    variant: Annotated[
        str, typer.Option(help="cicada, naive, pisel, pisel+miniloader, pisel+decoupler")
    ] = "cicada",
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    timeline: Annotated[
        Path | None, typer.Option(help="Write the full timeline JSON here.")
    ] = None,
) -> None:
    """Cold-start one model with sample inputs and print its timeline summary."""
    from cicada_loader import cold_start

    result = cold_start(model, variant=variant, device=device, reuse_cache=False)
    print(
        json.dumps(
            {
                "model": model,
                "variant": variant,
                **result.timeline.summary(),
                "outputs": {k: list(v.shape) for k, v in result.outputs.items()},
            },
            indent=2,
        )
    )
    if timeline:
        timeline.write_text(json.dumps(result.timeline.to_json(), indent=1))


@bench.command("coldstart")
def bench_coldstart(
    model: Annotated[str, typer.Option(help="Comma-separated zoo names.")] = ",".join(
        ["gpt2", "gpt2-medium", "bert-base", "labse", "vit-base", "resnet50", "vgg19"]
    ),
    origin: Annotated[str, typer.Option(help="Comma-separated: file, file-cold, http.")] = (
        "file,file-cold,http"
    ),
    bandwidth: Annotated[str, typer.Option(help="HTTP origin caps, comma-separated.")] = "1gbit",
    repeat: Annotated[int, typer.Option(min=1, help="Rounds; figures are medians.")] = 5,
    variants: Annotated[str, typer.Option(help="Comma-separated variants.")] = (
        "naive,pisel,pisel+miniloader,pisel+decoupler,cicada"
    ),
    json_path: JsonOut = Path("bench-coldstart.json"),
    models_dir: CheckpointsDir = Path("models"),
    work_dir: Annotated[Path, typer.Option(help="Scratch space for caches.")] = Path("bench-out"),
    seq_len: Annotated[int, typer.Option(help="Tokens per text input.")] = 64,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
) -> None:
    """Cold-start every model from every origin with every variant; medians over rounds."""
    from cicada_cli.bench.coldstart import markdown_table, origins_for, run_coldstart

    results = run_coldstart(
        models=_split(model),
        origins=origins_for(_split(origin), _split(bandwidth)),
        variants=_split(variants),
        repeat=repeat,
        models_dir=models_dir,
        work_dir=work_dir,
        seq_len=seq_len,
        device=device,
        console=console,
    )
    json_path.write_text(json.dumps(results, indent=1))
    print(markdown_table(results))
    console.print(f"results: {json_path}")


@bench.command("mesh")
def bench_mesh(
    model: Annotated[str, typer.Option(help="Zoo model for warm and cold requests.")] = "bert-base",
    models_dir: CheckpointsDir = Path("models"),
    warm: Annotated[int, typer.Option(help="Warm requests timed.")] = 200,
    cold: Annotated[int, typer.Option(help="Cold starts timed (each way).")] = 5,
    seq_len: Annotated[int, typer.Option(help="Tokens per request.")] = 8,
    throughput_s: Annotated[float, typer.Option(help="Seconds of the throughput test.")] = 10.0,
    clients: Annotated[int, typer.Option(help="Concurrent clients for throughput.")] = 8,
    loaders: Annotated[int, typer.Option(help="Loader processes.")] = 1,
    json_path: JsonOut = Path("bench-mesh.json"),
    work_dir: WorkDir = Path("bench-out/mesh"),
) -> None:
    """Warm latency, cold start and throughput through the mesh, against the engine alone."""
    from cicada_cli.bench.coldstart import ensure_checkpoints
    from cicada_cli.bench.mesh import run_mesh_bench
    from cicada_loader.demo import ensure_demo

    ensure_checkpoints([model], models_dir, console)
    tiny = work_dir / "tiny" / "tiny-gpt2"
    ensure_demo(tiny)
    result = run_mesh_bench(
        model_dir=models_dir / model,
        tiny_dir=tiny,
        work_dir=work_dir,
        warm=warm,
        cold=cold,
        seq_len=seq_len,
        throughput_s=throughput_s,
        clients=clients,
        loaders=loaders,
        console=console,
    )
    json_path.write_text(json.dumps(result, indent=1))
    w, c, t = result["warm"], result["cold"], result["throughput"]
    print(
        f"warm p50 {w['mesh_p50_s'] * 1e3:.1f} ms through the mesh vs "
        f"{w['in_process_p50_s'] * 1e3:.1f} ms in-process (+{w['overhead_p50_s'] * 1e3:.1f} ms, "
        f"paired +{w['paired_overhead_p50_s'] * 1e3:.1f} ms); p99 {w['mesh_p99_s'] * 1e3:.1f} ms"
        f"; gateway → scheduler → loader {w['queue_p50_s'] * 1e3:.1f} ms"
        f"; readiness probe (HTTP + 2 broker hops) {w['null_path_p50_s'] * 1e3:.1f} ms"
    )
    tiny = result["warm_tiny"]
    print(
        f"warm p50, tiny GPT-2: {tiny['mesh_p50_s'] * 1e3:.1f} ms through the mesh vs "
        f"{tiny['in_process_p50_s'] * 1e3:.1f} ms in-process "
        f"(+{tiny['overhead_p50_s'] * 1e3:.1f} ms)"
    )
    print(
        f"cold p50 {c['mesh_p50_s']:.3f} s through the mesh vs {c['in_process_p50_s']:.3f} s "
        f"in-process (target ≤ {c['target_s']:.3f} s); from the node cache after the "
        f"keep-alive {result['from_zero']['mesh_p50_s']:.3f} s"
    )
    print(
        f"throughput {t['requests_per_s']:.0f} req/s ({t['clients']} clients, tiny GPT-2), "
        f"p50 {t['p50_s'] * 1e3:.1f} ms"
    )


@bench.command("priority")
def bench_priority(
    low_models: Annotated[str, typer.Option(help="Zoo models of the background stream.")] = (
        "gpt2,bert-base,gpt2-medium"
    ),
    models_dir: CheckpointsDir = Path("models"),
    duration: Annotated[float, typer.Option(help="Seconds of load per run.")] = 30.0,
    rate: Annotated[float, typer.Option(help="Background jobs per second (Poisson).")] = 6.0,
    interval: Annotated[float, typer.Option(help="Seconds between urgent requests.")] = 1.0,
    seq_len: Annotated[int, typer.Option(help="Tokens per request.")] = 32,
    memory_bytes: Annotated[
        int, typer.Option(help="Loader memory budget (forces evictions, hence cold starts).")
    ] = 2_200_000_000,
    json_path: JsonOut = Path("bench-priority.json"),
    plot: Annotated[Path | None, typer.Option(help="Latency-over-time picture.")] = None,
    work_dir: WorkDir = Path("bench-out/priority"),
    restart: Annotated[
        bool, typer.Option(help="Also a half-length run with the scheduler killed midway.")
    ] = True,
) -> None:
    """Urgent requests (priority 9, a tiny model) under saturating background load (priority 0),
    with priorities and with strict arrival order."""
    from cicada_cli.bench.coldstart import ensure_checkpoints
    from cicada_cli.bench.priority import plot_priority, run_priority_bench
    from cicada_loader.demo import ensure_demo

    lows = _split(low_models)
    ensure_checkpoints(lows, models_dir, console)
    urgent = work_dir / "tiny" / "tiny-gpt2"
    ensure_demo(urgent)
    result = run_priority_bench(
        high_model=urgent,
        low_models=[models_dir / m for m in lows],
        work_dir=work_dir,
        duration_s=duration,
        rate=rate,
        interval_s=interval,
        seq_len=seq_len,
        memory_bytes=memory_bytes,
        restart=restart,
        console=console,
    )
    json_path.write_text(json.dumps(result, indent=1))
    if plot is not None:
        plot_priority(result, plot)
    for mode in ("priority", "fifo"):
        h, lo = result[mode]["high"], result[mode]["low"]
        print(
            f"{mode:8s} high p50 {h['p50_s']:.3f} s p99 {h['p99_s']:.3f} s | low p50 "
            f"{lo['p50_s']:.2f} s p99 {lo['p99_s']:.2f} s ({lo['n']} jobs, "
            f"{lo['cold_starts']} cold)"
        )
    if restart:
        lo = result["restart"]["low"]
        print(
            f"restart  {lo['accepted']} background jobs accepted, {lo['n']} finished "
            f"({lo['failed']} failed), {lo['lost']} lost across the scheduler restart"
        )
    print(
        f"idle high {result['idle_high_s']:.3f} s, service time (p99) "
        f"{result['service_time_s']:.3f} s → target high p99 ≤ {result['target_s']:.3f} s: "
        f"{'met' if result['met'] else 'MISSED'}"
    )


@bench.command("table")
def bench_table(json_path: Annotated[Path, typer.Argument(help="A bench coldstart JSON.")]) -> None:
    """Print the markdown table of a cold-start benchmark's results."""
    from cicada_cli.bench.coldstart import markdown_table

    print(markdown_table(json.loads(json_path.read_text())))


@bench.command("plot")
def bench_plot(
    json_path: Annotated[Path, typer.Argument(help="A bench coldstart JSON.")],
    out: Annotated[Path, typer.Option(help="PNG to write.")] = Path("docs/img/timeline.png"),
    model: Annotated[str, typer.Option()] = "gpt2",
    origin: Annotated[str, typer.Option()] = "file",
    variants: Annotated[str, typer.Option()] = "pisel,cicada",
) -> None:
    """Draw one cold start's timeline per variant, side by side."""
    from cicada_cli.bench.plot import plot_timelines

    results = json.loads(json_path.read_text())
    row = next((r for r in results if r["model"] == model and r["origin"] == origin), None)
    if row is None:
        raise typer.BadParameter(f"no results for {model} from {origin} in {json_path}")
    plot_timelines(row, _split(variants), out)
    console.print(f"wrote {out}")


if __name__ == "__main__":
    app()
