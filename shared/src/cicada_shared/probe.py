"""``python -m cicada_shared.probe QUEUE``: exit 0 when QUEUE has a consumer (a container
healthcheck for services without an HTTP port). The namespace prefix is added to QUEUE."""

from __future__ import annotations

import asyncio
import sys

import aio_pika

from cicada_shared.settings import MeshSettings


async def has_consumer(url: str, queue: str) -> bool:
    connection = await aio_pika.connect(url, timeout=5)
    async with connection:
        channel = await connection.channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
        except aio_pika.exceptions.ChannelClosed:
            return False
        return bool(declared.declaration_result.consumer_count)


def main() -> None:
    settings = MeshSettings()
    queue = f"{settings.namespace}.{sys.argv[1]}"
    try:
        ok = asyncio.run(has_consumer(settings.amqp_url, queue))
    except Exception as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        sys.exit(1)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
