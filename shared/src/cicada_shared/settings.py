"""Settings every service shares, read from ``CICADA_*`` environment variables.

Each service subclasses ``MeshSettings`` with its own fields, named after the service
(``loader_slots`` is ``CICADA_LOADER_SLOTS``). Built once in ``main()`` and passed down.
"""

from __future__ import annotations

import socket
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from cicada_shared.topology import Names
from cicada_shared.uris import parse_roots


def _default_cache() -> Path:
    return Path.home() / ".cache" / "cicada"


def _default_models() -> Path:
    return Path("models").resolve()


class MeshSettings(BaseSettings):
    """What every service needs to find the mesh."""

    model_config = SettingsConfigDict(env_prefix="CICADA_", extra="ignore")

    amqp_url: str = Field("amqp://guest:guest@localhost:5672/", description="RabbitMQ URL.")
    namespace: str = Field("cicada", description="Prefix of every exchange and queue name.")
    node: str = Field(
        default_factory=socket.gethostname,
        description="This machine's name; weights and loaders of a node share its cache.",
    )
    cache_dir: Path = Field(
        default_factory=_default_cache,
        description="Node-local cache shared by weights and loaders.",
    )
    log_level: str = Field("info", description="debug, info, warning or error.")
    log_json: bool | None = Field(None, description="JSON logs; default: when not on a terminal.")
    drain_s: float = Field(10.0, description="On shutdown, how long in-flight work may finish.")
    models_dir: Path = Field(
        default_factory=_default_models,
        description="Checkpoint directories registered at start (by the scheduler); also the "
        "default model root.",
    )
    model_roots: str = Field(
        "",
        description="Colon-separated directories file:// models may come from; default: "
        "models_dir.",
    )

    max_message_bytes: int = Field(
        16 << 20,
        description="The broker's largest message (RabbitMQ's max_message_size: 16 MiB by "
        "default since 4.0, 128 MiB before); a larger job is refused with 413, a larger "
        "result fails its job. Raise both together.",
    )

    @property
    def payload_limit(self) -> int:
        """Tensor bytes one message may carry, leaving 1 MiB for everything else in it."""
        return self.max_message_bytes - (1 << 20)

    @property
    def names(self) -> Names:
        return Names(self.namespace)

    @property
    def roots(self) -> list[Path]:
        """Where ``file://`` models may live."""
        return parse_roots(self.model_roots) if self.model_roots else [self.models_dir.resolve()]
