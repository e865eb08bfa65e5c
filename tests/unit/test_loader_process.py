"""``python -m cicada_loader`` sets OpenMP's spin before torch loads (OpenMP reads it then)."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = (
    "import sys; import cicada_loader; before = 'torch' in sys.modules; "
    "import cicada_loader.__main__, os; "
    "print(before, 'torch' in sys.modules, os.environ['GOMP_SPINCOUNT'])"
)


def probe(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_the_loader_sets_openmp_spin_before_torch_loads() -> None:
    assert probe() == "False True 10000"


def test_a_spin_already_in_the_environment_wins() -> None:
    assert probe(GOMP_SPINCOUNT="500") == "False True 500"
