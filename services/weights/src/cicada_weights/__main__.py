"""``python -m cicada_weights``: the weights service of this node."""

from __future__ import annotations

import sys

from cicada_shared.logs import configure_logging
from cicada_shared.service import run
from cicada_weights.service import WeightsService, WeightsSettings


def main() -> None:
    settings = WeightsSettings()
    configure_logging("weights", level=settings.log_level, json=settings.log_json)
    sys.exit(run(WeightsService(settings), "weights"))


if __name__ == "__main__":
    main()
