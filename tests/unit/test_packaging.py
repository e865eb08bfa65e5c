"""compose.yaml and the Dockerfiles: valid, and installing what the tested install does."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="docker-compose not installed (.ci/run installs Debian's)",
)
def test_compose_file_is_valid() -> None:
    proc = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "compose.yaml"), "config", "-q"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr


def test_compose_wires_the_mesh() -> None:
    text = (ROOT / "compose.yaml").read_text()
    for service in ("rabbitmq", "scheduler", "weights", "loader", "gateway", "demo-model"):
        assert f"\n  {service}:" in text
    assert "image: rabbitmq:4.1.4-management" in text  # pinned, with the management plugin
    assert text.count("condition: service_healthy") >= 5
    assert "condition: service_completed_successfully" in text
    assert '"8000:8000"' in text
    assert "cache:/cache" in text and "models:/models" in text


@pytest.mark.parametrize("service", ["gateway", "scheduler", "weights", "loader"])
def test_dockerfiles_install_like_the_tests(service: str) -> None:
    dockerfile = (ROOT / "services" / service / "Dockerfile").read_text()
    assert "pip install --no-cache-dir -c constraints.txt ./shared" in dockerfile
    assert f'CMD ["python", "-m", "cicada_{service}"]' in dockerfile
    if service == "loader":
        assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in dockerfile
    else:
        assert "torch" not in dockerfile and "services/loader" not in dockerfile
