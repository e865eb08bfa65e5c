"""The weights service, the scheduler and the gateway must not import torch."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "package", ["cicada_weights", "cicada_shared", "cicada_scheduler", "cicada_gateway"]
)
def test_imports_without_torch(package: str) -> None:
    code = (
        f"import sys, {package}, {package}.__init__\n"
        "import importlib, pkgutil\n"
        f"for m in pkgutil.walk_packages({package}.__path__, '{package}.'):\n"
        "    importlib.import_module(m.name)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
