"""The benchmark harness end to end, on tiny checkpoints: real worker processes, real origins."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cicada_cli.bench.mesh import InProcess
from cicada_cli.main import app


def test_bench_coldstart_writes_the_documented_json(
    checkpoints: Callable[..., Path], tmp_path: Path
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(checkpoints("gpt2"), models / "gpt2")  # the zoo name, a tiny checkpoint
    out = tmp_path / "out.json"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "coldstart",
            "--model",
            "gpt2",
            "--origin",
            "file,http",
            "--bandwidth",
            "1gbit",
            "--repeat",
            "1",
            "--variants",
            "naive,cicada",
            "--json",
            str(out),
            "--models-dir",
            str(models),
            "--work-dir",
            str(tmp_path / "work"),
            "--seq-len",
            "8",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert [(r["model"], r["origin"]) for r in rows] == [("gpt2", "file"), ("gpt2", "http@1gbit")]
    for row in rows:
        assert row["bytes"] == (models / "gpt2" / "model.safetensors").stat().st_size
        assert row["lower_bound_s"] > 0
        assert set(row["variants"]) == {"naive", "cicada"}
        for figures in row["variants"].values():
            assert "errors" not in figures
            assert figures["e2e_s"] > 0 and 0 < figures["ttfl_s"] <= figures["e2e_s"]
            assert 0 <= figures["utilization"] <= 1
            assert figures["peak_rss_bytes"] is None or figures["peak_rss_bytes"] > 0
        assert row["outputs_identical"]
    assert "| gpt2 | file |" in result.output

    picture = tmp_path / "timeline.png"
    drawn = CliRunner().invoke(
        app, ["bench", "plot", str(out), "--out", str(picture), "--variants", "naive,cicada"]
    )
    assert drawn.exit_code == 0, drawn.output
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_priority_writes_the_documented_json(
    checkpoints: Callable[..., Path], tmp_path: Path
) -> None:
    models = tmp_path / "models"
    for name in ("gpt2", "bert-base"):
        shutil.copytree(checkpoints(name), models / name)
    out, picture = tmp_path / "prio.json", tmp_path / "prio.png"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "priority",
            "--low-models",
            "gpt2,bert-base",
            "--models-dir",
            str(models),
            "--duration",
            "3",
            "--rate",
            "20",
            "--interval",
            "0.5",
            "--seq-len",
            "4",
            "--json",
            str(out),
            "--plot",
            str(picture),
            "--work-dir",
            str(tmp_path / "work"),
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["idle_high_s"] > 0 and doc["service_time_s"] > 0
    for mode in ("priority", "fifo"):
        for cls in ("high", "low"):
            assert 0 < doc[mode][cls]["p50_s"] <= doc[mode][cls]["p99_s"]
        assert doc[mode]["low"]["failed"] == 0
    survived = doc["restart"]["low"]
    assert survived["lost"] == 0 and survived["n"] == survived["accepted"] > 0
    assert picture.read_bytes()[:4] == b"\x89PNG"


def test_up_says_clearly_when_rabbitmq_is_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CICADA_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/")
    result = CliRunner().invoke(app, ["up", "--no-demo"])
    assert result.exit_code == 2
    assert "RabbitMQ is unreachable at 127.0.0.1:1" in result.output


def test_the_in_process_reference_runs_one_forward_pass_per_request(
    checkpoints: Callable[..., Path], tmp_path: Path
) -> None:
    body = {
        "inputs": [
            {"name": "input_ids", "shape": [1, 4], "datatype": "INT64", "data": [1, 2, 3, 4]}
        ]
    }
    local = InProcess(checkpoints("gpt2"), tmp_path, body)
    try:
        seconds = [local.forward() for _ in range(3)]
    finally:
        local.close()
    assert all(0 < s < 10 for s in seconds)
    assert local.proc.returncode == 0
