"""``python -m cicada_loader``: one loader."""

from __future__ import annotations

import os
import sys

from cicada_loader import GOMP_SPINCOUNT

os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPINCOUNT)  # before torch loads, below

from cicada_loader.service import LoaderService, LoaderSettings
from cicada_shared.logs import configure_logging
from cicada_shared.service import run


def main() -> None:
    settings = LoaderSettings()
    configure_logging(
        f"loader {settings.loader_id}", level=settings.log_level, json=settings.log_json
    )
    sys.exit(run(LoaderService(settings), "loader"))


if __name__ == "__main__":
    main()
