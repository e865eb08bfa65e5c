"""``python -m cicada_gateway``: the REST gateway, served by uvicorn."""

from __future__ import annotations

import uvicorn

from cicada_gateway.app import GatewaySettings, create_app
from cicada_shared.logs import configure_logging


def main() -> None:
    settings = GatewaySettings()
    configure_logging("gateway", level=settings.log_level, json=settings.log_json)
    uvicorn.run(
        create_app(settings),
        host=settings.gateway_host,
        port=settings.gateway_port,
        log_level="warning",
        access_log=False,
        timeout_keep_alive=30,
        loop="uvloop",  # libuv, and a C HTTP parser: less overhead per request
        http="httptools",
    )


if __name__ == "__main__":
    main()
