"""Exchange and queue names, and their declaration, in one place.

    jobs exchange (direct) ──"job"──▶ jobs queue (priority 0–9, durable) ──▶ scheduler
    direct exchange ──<queue name>──▶ scheduler inbox, scheduler rpc, loader.<id>,
                                      loader.<id>.events, weights.<node>
    dead-letter exchange (fanout) ──▶ dead queue   (every queue dead-letters here)

Every name carries a namespace (``CICADA_NAMESPACE``, default ``cicada``), so several meshes,
or test runs, can share one broker without meeting.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

#: RabbitMQ's advice is at most 10 priority levels; jobs use 0–9.
MAX_PRIORITY = 10
JOB_ROUTING_KEY = "job"


@dataclass(frozen=True, slots=True)
class Names:
    """All names of one mesh."""

    namespace: str = "cicada"

    @property
    def jobs_exchange(self) -> str:
        return f"{self.namespace}.jobs"

    @property
    def jobs_queue(self) -> str:
        return f"{self.namespace}.jobs"

    @property
    def direct_exchange(self) -> str:
        return f"{self.namespace}.direct"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.namespace}.dlx"

    @property
    def dead_queue(self) -> str:
        return f"{self.namespace}.dead"

    @property
    def scheduler_inbox(self) -> str:
        return f"{self.namespace}.scheduler"

    @property
    def scheduler_rpc(self) -> str:
        return f"{self.namespace}.scheduler.rpc"

    def loader_queue(self, loader_id: str) -> str:
        return f"{self.namespace}.loader.{loader_id}"

    def loader_control(self, loader_id: str) -> str:
        return f"{self.namespace}.loader.{loader_id}.control"

    def loader_events(self, loader_id: str) -> str:
        return f"{self.namespace}.loader.{loader_id}.events"

    def weights_queue(self, node: str) -> str:
        return f"{self.namespace}.weights.{node}"


@dataclass(slots=True)
class Topology:
    """The exchanges every service uses, declared (idempotently) on one channel."""

    names: Names
    jobs: AbstractExchange
    direct: AbstractExchange
    dead: AbstractExchange

    @classmethod
    async def declare(cls, channel: AbstractChannel, names: Names) -> Topology:
        dead = await channel.declare_exchange(
            names.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        dead_queue = await channel.declare_queue(names.dead_queue, durable=True)
        await dead_queue.bind(dead)
        jobs = await channel.declare_exchange(
            names.jobs_exchange, aio_pika.ExchangeType.DIRECT, durable=True
        )
        direct = await channel.declare_exchange(
            names.direct_exchange, aio_pika.ExchangeType.DIRECT, durable=True
        )
        topo = cls(names, jobs, direct, dead)
        jobs_queue = await topo.queue(channel, names.jobs_queue, durable=True, priority=True)
        await jobs_queue.bind(jobs, JOB_ROUTING_KEY)
        return topo

    def queue_arguments(self, *, priority: bool) -> dict[str, Any]:
        args: dict[str, Any] = {"x-dead-letter-exchange": self.names.dead_letter_exchange}
        if priority:
            args["x-max-priority"] = MAX_PRIORITY
        return args

    async def queue(
        self,
        channel: AbstractChannel,
        name: str,
        *,
        durable: bool = False,
        exclusive: bool = False,
        auto_delete: bool = False,
        priority: bool = False,
    ) -> AbstractQueue:
        """Declare a queue that dead-letters to the mesh's dead queue; bind it to the direct
        exchange under its own name."""
        queue = await channel.declare_queue(
            name,
            durable=durable,
            exclusive=exclusive,
            auto_delete=auto_delete,
            arguments=self.queue_arguments(priority=priority),
        )
        await queue.bind(self.direct, name)
        return queue


async def purge(url: str, names: Names, nodes: list[str]) -> None:
    """Delete a mesh's durable queues and exchanges (a test or benchmark namespace)."""
    connection = await aio_pika.connect(url)
    async with connection:
        queues = [names.jobs_queue, names.scheduler_inbox, names.scheduler_rpc, names.dead_queue]
        queues += [names.weights_queue(node) for node in nodes]
        for queue in queues:
            channel = await connection.channel()
            with contextlib.suppress(aio_pika.exceptions.AMQPError):
                await channel.queue_delete(queue)
        for exchange in (names.jobs_exchange, names.direct_exchange, names.dead_letter_exchange):
            channel = await connection.channel()
            with contextlib.suppress(aio_pika.exceptions.AMQPError):
                await channel.exchange_delete(exchange)
