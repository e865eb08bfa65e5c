"""``python -m cicada_loader.demo DIR``: write the demo model (a tiny random-weight GPT-2)
into ``DIR`` unless one is already there."""

from __future__ import annotations

import sys
from pathlib import Path

from cicada_loader.engine.zoo import write_checkpoint


def ensure_demo(target: Path) -> bool:
    """Write the demo checkpoint if missing; True when it was written."""
    if (target / "config.json").exists():
        return False
    write_checkpoint("gpt2", target, tiny=True)
    return True


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "models/demo")
    print(f"{'wrote' if ensure_demo(path) else 'kept'} the demo model at {path}")
