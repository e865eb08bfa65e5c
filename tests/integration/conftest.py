"""Fixtures of the integration tests that need a running mesh."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.mesh_fixtures import RunningMesh, start_mesh, stop_mesh


@pytest.fixture(scope="module")
def mesh(checkpoints: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    """Two loaders, a tiny GPT-2 and a tiny BERT; small body and message limits, to test
    413 and a result too large for the broker."""
    running = start_mesh(
        tmp_path_factory.mktemp("mesh"),
        {"tiny-gpt2": checkpoints("gpt2"), "tiny-bert": checkpoints("bert-base")},
        loaders=2,
        env={
            "CICADA_GATEWAY_MAX_BODY_BYTES": str(1 << 20),
            "CICADA_MAX_MESSAGE_BYTES": str(3 << 20),
        },
    )
    yield running
    stop_mesh(running)
