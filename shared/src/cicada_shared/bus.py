"""The RabbitMQ bus every service talks through.

- One robust connection; one publishing channel with publisher confirms; one channel per
  consumer, so each gets its own prefetch.
- ``consume`` decodes each message into a contract and hands it to the handler inside
  ``message.process()``: acked when the handler returns, dead-lettered when it raises. A
  message that does not decode is dead-lettered with one log line, and ``on_poison`` hears of
  it (to fail the job it belonged to, when that can be told).
- ``request`` is RPC: publish with ``reply_to`` and ``correlation_id``, await the ``Reply``.
- A message over the broker's size limit is refused here (``MessageTooLarge``) rather than
  sent: RabbitMQ would close the publishing channel over it.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import aio_pika
import msgpack
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from pydantic import ValidationError

from cicada_shared.contracts import CONTENT_TYPE, Contract, Message, Reply, decode, encode
from cicada_shared.errors import MessageTooLarge
from cicada_shared.topology import Names, Topology

if TYPE_CHECKING:
    from cicada_shared.settings import MeshSettings

log = structlog.get_logger("cicada.bus")

Handler = Callable[[Message, AbstractIncomingMessage], Awaitable[None]]
PoisonHandler = Callable[[AbstractIncomingMessage, str], Awaitable[None]]


class BrokerUnreachable(ConnectionError):
    """RabbitMQ could not be reached at the configured URL."""


class UnexpectedMessage(Exception):
    """A handler's answer to a message that decodes but has no business on its queue: it is
    dead-lettered with a warning, like an undecodable one."""

    def __init__(self, message: Message) -> None:
        super().__init__(f"unexpected {message.kind}")


class Bus:
    """A connection to the mesh's broker, with its topology declared."""

    def __init__(
        self, url: str, names: Names, *, client: str, max_message_bytes: int = 16 << 20
    ) -> None:
        self.url = url
        self.names = names
        self.client = client
        self.max_message_bytes = max_message_bytes
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._topology: Topology | None = None
        self._consumers: list[tuple[AbstractQueue, str]] = []
        self._pending: dict[str, asyncio.Future[Message]] = {}
        self._reply_queue: AbstractQueue | None = None

    @classmethod
    def for_settings(cls, settings: MeshSettings, *, client: str) -> Bus:
        """The bus a service's settings describe: broker URL, namespace, message limit."""
        return cls(
            settings.amqp_url,
            settings.names,
            client=client,
            max_message_bytes=settings.max_message_bytes,
        )

    @property
    def topology(self) -> Topology:
        assert self._topology is not None, "connect() first"
        return self._topology

    @property
    def channel(self) -> AbstractChannel:
        assert self._channel is not None, "connect() first"
        return self._channel

    async def connect(self, *, timeout_s: float = 10.0) -> None:
        try:
            self._connection = await asyncio.wait_for(
                aio_pika.connect_robust(
                    self.url, client_properties={"connection_name": self.client}
                ),
                timeout_s,
            )
        except (OSError, TimeoutError, aio_pika.exceptions.AMQPConnectionError) as exc:
            raise BrokerUnreachable(f"cannot reach RabbitMQ at {_redact(self.url)}: {exc}") from exc
        # unroutable messages (a loader that is gone) come back as errors, not silence
        self._channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        self._topology = await Topology.declare(self._channel, self.names)

    async def open_channel(self, *, prefetch: int) -> AbstractChannel:
        """A channel for one consumer, with its own prefetch."""
        assert self._connection is not None, "connect() first"
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        return channel

    # -- publishing ----------------------------------------------------------------------

    async def publish(
        self,
        message: Contract,
        routing_key: str,
        *,
        exchange: str = "direct",
        priority: int | None = None,
        reply_to: str | None = None,
        correlation_id: str | None = None,
        persistent: bool = False,
    ) -> None:
        """Publish and wait for the broker's confirm."""
        body = encode(message)
        if len(body) > self.max_message_bytes:
            raise MessageTooLarge(
                f"a {getattr(message, 'kind', 'message')} of {len(body)} bytes is over the "
                f"broker's {self.max_message_bytes}-byte message limit"
            )
        await self._exchange(exchange).publish(
            aio_pika.Message(
                body,
                content_type=CONTENT_TYPE,
                priority=priority,
                reply_to=reply_to,
                correlation_id=correlation_id,
                delivery_mode=(
                    aio_pika.DeliveryMode.PERSISTENT
                    if persistent
                    else aio_pika.DeliveryMode.NOT_PERSISTENT
                ),
                type=getattr(message, "kind", None),
            ),
            routing_key=routing_key,
        )

    def _exchange(self, name: str) -> AbstractExchange:
        if name == "direct":
            return self.topology.direct
        if name == "jobs":
            return self.topology.jobs
        return self.channel.default_exchange

    async def reply(self, to: AbstractIncomingMessage, message: Contract) -> None:
        """Answer ``to`` on its ``reply_to`` queue, with its ``correlation_id``."""
        if to.reply_to:
            await self.send_to(to.reply_to, message, correlation_id=to.correlation_id)

    async def send_to(self, queue: str, message: Contract, *, correlation_id: str | None) -> None:
        """Publish straight to a queue by name (the default exchange), e.g. a reply queue.

        A reply queue whose client has gone is normal, not an error: a log line.
        """
        try:
            await self.publish(message, queue, exchange="", correlation_id=correlation_id)
        except aio_pika.exceptions.DeliveryError:
            log.info("reply_undeliverable", queue=queue, correlation_id=correlation_id)

    # -- consuming -----------------------------------------------------------------------

    async def consume(
        self,
        queue: AbstractQueue,
        handler: Handler,
        *,
        on_poison: PoisonHandler | None = None,
        manual: bool = False,
    ) -> None:
        """Feed ``queue``'s messages to ``handler``; ack on return, dead-letter on error.

        ``manual``: the handler settles each message itself (ack when its work has left this
        service), except that a handler error still dead-letters it.
        """

        async def receive(incoming: AbstractIncomingMessage) -> None:
            try:
                message = decode(incoming.body)
            except (ValueError, ValidationError) as exc:
                reason = f"undecodable {incoming.type or 'message'}: {str(exc)[:300]}"
                log.warning(
                    "poison_message",
                    queue=queue.name,
                    reason=reason,
                    correlation_id=incoming.correlation_id,
                )
                await incoming.reject(requeue=False)
                if on_poison is not None:
                    with contextlib.suppress(Exception):
                        await on_poison(incoming, reason)
                return
            try:
                if manual:
                    await handler(message, incoming)
                else:
                    async with incoming.process(requeue=False, ignore_processed=True):
                        await handler(message, incoming)  # an error dead-letters it
            except UnexpectedMessage as exc:
                log.warning("poison_message", queue=queue.name, reason=str(exc))
                if manual:
                    with contextlib.suppress(Exception):
                        await incoming.reject(requeue=False)
            except Exception:
                log.exception("handler_failed", queue=queue.name, kind=message.kind)
                if manual:
                    with contextlib.suppress(Exception):
                        await incoming.reject(requeue=False)

        tag = await queue.consume(receive)
        self._consumers.append((queue, tag))

    async def stop_consuming(self) -> None:
        for queue, tag in self._consumers:
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
        self._consumers.clear()

    # -- RPC -----------------------------------------------------------------------------

    async def request(
        self,
        message: Contract,
        routing_key: str,
        *,
        exchange: str = "direct",
        timeout_s: float = 10.0,
        correlation_id: str | None = None,
        priority: int | None = None,
        persistent: bool = False,
    ) -> Message:
        """Publish ``message`` with a ``reply_to`` and wait for the answer (by correlation)."""
        if self._reply_queue is None:
            channel = await self.open_channel(prefetch=1000)
            self._reply_queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            await self._reply_queue.consume(self._on_reply, no_ack=True)
        correlation_id = correlation_id or uuid.uuid4().hex
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = future
        try:
            await self.publish(
                message,
                routing_key,
                exchange=exchange,
                priority=priority,
                reply_to=self._reply_queue.name,
                correlation_id=correlation_id,
                persistent=persistent,
            )
            return await asyncio.wait_for(future, timeout_s)
        finally:
            self._pending.pop(correlation_id, None)

    async def call(self, message: Contract, routing_key: str, *, timeout_s: float = 10.0) -> Reply:
        """RPC: a request whose answer is a ``Reply``."""
        answer = await self.request(message, routing_key, timeout_s=timeout_s)
        if not isinstance(answer, Reply):
            raise TypeError(f"expected a reply, got {answer.kind!r}")
        return answer

    async def _on_reply(self, incoming: AbstractIncomingMessage) -> None:
        future = self._pending.get(incoming.correlation_id or "")
        if future is None or future.done():
            return
        try:
            future.set_result(decode(incoming.body))
        except (ValueError, ValidationError) as exc:
            future.set_exception(exc)

    async def close(self) -> None:
        await self.stop_consuming()
        for future in self._pending.values():
            future.cancel()
        if self._connection is not None:
            await self._connection.close()
            self._connection = None


def _redact(url: str) -> str:
    """The URL without its password."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


def field(message: AbstractIncomingMessage, name: str) -> Any:
    """Best-effort read of one field of an undecodable msgpack body (e.g. its job_id)."""
    with contextlib.suppress(Exception):
        doc = msgpack.unpackb(message.body, raw=False)
        if isinstance(doc, dict):
            return doc.get(name)
    return None
