"""``python -m cicada_scheduler``: the mesh's scheduler (one per mesh)."""

from __future__ import annotations

import sys

from cicada_scheduler.service import SchedulerService, SchedulerSettings
from cicada_shared.logs import configure_logging
from cicada_shared.service import run


def main() -> None:
    settings = SchedulerSettings()
    configure_logging("scheduler", level=settings.log_level, json=settings.log_json)
    sys.exit(run(SchedulerService(settings), "scheduler"))


if __name__ == "__main__":
    main()
