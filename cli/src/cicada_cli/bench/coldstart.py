"""``cicada bench coldstart``: the ablation, every variant through the same harness.

For each model and origin, ``repeat`` rounds; each round runs the lower bound and every
variant once, each in a fresh worker process, in an order rotated from round to round so
that drift on a shared machine spreads over all variants. Figures are medians over rounds.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cicada_cli.origin import parse_bandwidth

ALL_VARIANTS = ["naive", "pisel", "pisel+miniloader", "pisel+decoupler", "cicada"]
ALL_MODELS = ["gpt2", "gpt2-medium", "bert-base", "labse", "vit-base", "resnet50", "vgg19"]
FIGURES = ("e2e_s", "ttfl_s", "utilization", "executor_utilization", "stall_s")


@dataclass(frozen=True, slots=True)
class OriginSpec:
    """Where a run fetches from: ``file``, ``file-cold`` or ``http@<bandwidth>``."""

    label: str
    http: bool
    cold: bool = False
    bandwidth: str = "none"


def origins_for(names: list[str], bandwidths: list[str]) -> list[OriginSpec]:
    out: list[OriginSpec] = []
    for name in names:
        if name == "file":
            out.append(OriginSpec("file", http=False))
        elif name == "file-cold":
            out.append(OriginSpec("file-cold", http=False, cold=True))
        elif name == "http":
            for bw in bandwidths:
                parse_bandwidth(bw)  # fail early on a typo
                out.append(OriginSpec(f"http@{bw}", http=True, bandwidth=bw))
        else:
            raise ValueError(f"unknown origin {name!r}: use file, file-cold, http")
    return out


@contextmanager
def http_origins(specs: list[OriginSpec], root: Path) -> Iterator[dict[str, str]]:
    """Start one capped file server per HTTP origin; yields label → base URL."""
    procs: list[subprocess.Popen[str]] = []
    urls: dict[str, str] = {}
    try:
        for spec in specs:
            if not spec.http:
                continue
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cicada_cli.origin",
                    "--root",
                    str(root),
                    "--bandwidth",
                    spec.bandwidth,
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            procs.append(proc)
            assert proc.stdout is not None
            urls[spec.label] = proc.stdout.readline().strip()
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()


def ensure_checkpoints(models: list[str], models_dir: Path, console: Console) -> None:
    for name in models:
        if (models_dir / name / "config.json").exists():
            continue
        console.print(f"writing random-weight checkpoint [bold]{name}[/] → {models_dir / name}")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "cicada_cli.main",
                "checkpoints",
                "--models",
                name,
                "--dir",
                str(models_dir),
            ],
            check=True,
        )


def run_worker(cmd: list[str]) -> dict[str, Any]:
    """One measurement in a fresh worker process (``worker_command``); ``{"error": ...}`` if
    it failed."""
    os.sync()  # every run starts with no dirty pages from the last one
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"error": tail[0]}
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def worker_command(
    mode: str,
    uri: str,
    origin_dir: Path,
    work: Path,
    *,
    variant: str = "cicada",
    seq_len: int = 64,
    device: str = "cpu",
    cold: bool = False,
) -> list[str]:
    """The command line of a worker process (``cicada_cli.bench.worker``)."""
    cmd = [
        sys.executable,
        "-m",
        "cicada_cli.bench.worker",
        mode,
        "--uri",
        uri,
        "--origin-dir",
        str(origin_dir),
        "--cache",
        str(work / f"cache-{uuid.uuid4().hex}"),
        "--orders",
        str(work / "orders"),
        "--variant",
        variant,
        "--seq-len",
        str(seq_len),
        "--device",
        device,
    ]
    if cold:
        cmd.append("--cold")
    return cmd


def run_coldstart(
    *,
    models: list[str],
    origins: list[OriginSpec],
    variants: list[str],
    repeat: int,
    models_dir: Path,
    work_dir: Path,
    seq_len: int = 64,
    device: str = "cpu",
    console: Console | None = None,
) -> list[dict[str, Any]]:
    console = console or Console(stderr=True)
    ensure_checkpoints(models, models_dir, console)
    work_dir.mkdir(parents=True, exist_ok=True)
    steps = len(models) * len(origins) * repeat * (len(variants) + 1)
    results = []
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    ]
    with http_origins(origins, models_dir) as urls, Progress(*columns, console=console) as bar:
        task = bar.add_task("cold starts", total=steps)
        for model in models:
            origin_dir = (models_dir / model).resolve()
            for spec in origins:
                uri = f"{urls[spec.label]}/{model}" if spec.http else str(origin_dir)
                runs: dict[str, list[dict[str, Any]]] = {v: [] for v in ["bound", *variants]}
                for rnd in range(repeat):
                    order = ["bound", *variants]
                    shift = rnd % len(order)
                    for name in order[shift:] + order[:shift]:
                        bar.update(
                            task,
                            description=f"{model} · {spec.label} · {name} "
                            f"(round {rnd + 1}/{repeat})",
                        )
                        cmd = worker_command(
                            "bound" if name == "bound" else "run",
                            uri,
                            origin_dir,
                            work_dir,
                            variant=name,
                            seq_len=seq_len,
                            device=device,
                            cold=spec.cold,
                        )
                        runs[name].append(run_worker(cmd))
                        bar.advance(task)
                results.append(summarise(model, spec.label, runs, variants))
    return results


def summarise(
    model: str, origin: str, runs: dict[str, list[dict[str, Any]]], variants: list[str]
) -> dict[str, Any]:
    """Medians over rounds, in the benchmark's JSON shape."""
    bounds = [b for b in runs["bound"] if "error" not in b]
    fetch_lb = _median([min(b["plain_fetch_s"], b["fetcher_s"]) for b in bounds])
    forward = _median([b["forward_s"] for b in bounds])
    nbytes = bounds[0]["bytes"] if bounds else 0
    out: dict[str, Any] = {
        "model": model,
        "origin": origin,
        "bytes": nbytes,
        "lower_bound_s": max(fetch_lb, forward),
        "fetch_lb_s": fetch_lb,
        "plain_fetch_s": _median([b["plain_fetch_s"] for b in bounds]),
        "fetcher_s": _median([b["fetcher_s"] for b in bounds]),
        "forward_s": forward,
        "rounds": len(bounds),
        "variants": {},
    }
    digests: dict[str, set[str]] = {"views": set(), "copies": set()}
    for v in variants:
        ok = [r for r in runs[v] if "error" not in r]
        errors = [r["error"] for r in runs[v] if "error" in r]
        entry: dict[str, Any] = {f: _median([r["summary"][f] for r in ok]) for f in FIGURES}
        entry["e2e_runs_s"] = [round(r["summary"]["e2e_s"], 4) for r in ok]
        peaks = [r["peak_rss_bytes"] for r in ok if r["peak_rss_bytes"] is not None]
        growth = [r["rss_growth_bytes"] for r in ok if r["rss_growth_bytes"] is not None]
        entry["peak_rss_bytes"] = int(_median(peaks)) if peaks else None
        entry["rss_growth_bytes"] = int(_median(growth)) if growth else None
        entry["rss_growth_ratio"] = (
            entry["rss_growth_bytes"] / nbytes if growth and nbytes else None
        )
        if errors:
            entry["errors"] = errors
        if ok:
            by_e2e = sorted(ok, key=lambda r: r["summary"]["e2e_s"])
            entry["timeline"] = by_e2e[len(ok) // 2]["timeline"]  # the median run's
            entry["digest"] = ok[0]["digest"]
            for r in ok:
                digests[r["apply"]].add(r["digest"])
        out["variants"][v] = entry
    # Variants that apply views of the file agree bit for bit with each other (and with
    # from_pretrained); copying variants agree with each other. The two groups may differ in
    # the last bit on convolutions, whose kernels depend on the weights' alignment.
    out["outputs_identical"] = all(len(d) <= 1 for d in digests.values())
    out["views_equal_copies"] = len(digests["views"] | digests["copies"]) == 1
    return out


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def markdown_table(results: list[dict[str, Any]]) -> str:
    """One row per model and origin: medians, cuts against the baselines, lower bound."""
    variants = list(results[0]["variants"]) if results else []
    head = ["model", "origin", "MB", "LB s", *[f"{v} s" for v in variants]]
    extra = ["cicada/LB", "cut vs pisel", "cut vs naive", "util.", "RSS growth/ckpt", "same out"]
    lines = ["| " + " | ".join(head + extra) + " |", "|" + "---|" * (len(head) + len(extra))]
    for r in results:
        e2e = {v: r["variants"][v]["e2e_s"] for v in variants}
        cic = r["variants"].get("cicada", {})
        cells = [
            r["model"],
            r["origin"],
            f"{r['bytes'] / 1e6:.0f}",
            f"{r['lower_bound_s']:.3f}",
            *[f"{e2e[v]:.3f}" for v in variants],
        ]
        ratio = cic.get("rss_growth_ratio")
        cells += [
            _ratio(e2e.get("cicada"), r["lower_bound_s"]),
            _cut(e2e.get("cicada"), e2e.get("pisel")),
            _cut(e2e.get("cicada"), e2e.get("naive")),
            f"{cic['utilization']:.2f}" if cic else "–",
            f"{ratio:.2f}" if ratio is not None else "–",
            ("yes" if r["views_equal_copies"] else "yes¹") if r["outputs_identical"] else "NO",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if any(r["outputs_identical"] and not r["views_equal_copies"] for r in results):
        lines.append(
            "\n¹ variants that apply views of the file agree bit for bit, and so do the "
            "copying ones; the two groups differ in the last bit (convolution kernels "
            "depend on the weights' alignment)."
        )
    return "\n".join(lines)


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a and b else "–"


def _cut(a: float | None, b: float | None) -> str:
    return f"{(1 - a / b) * 100:.1f} %" if a and b else "–"
