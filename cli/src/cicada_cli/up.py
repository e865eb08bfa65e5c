"""``cicada up``: the four services as separate local processes, stopped together.

    scheduler · weights (one per node) · loader × N · gateway (uvicorn)

Every process gets the same ``CICADA_*`` environment, so they find one another on the same
broker under the same namespace. Ctrl-C (or SIGTERM) stops them all, gracefully first.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from cicada_shared.topology import Names, purge

SERVICES = ("cicada_scheduler", "cicada_weights", "cicada_loader", "cicada_gateway")


class BrokerUnreachable(RuntimeError):
    pass


def check_broker(url: str, timeout_s: float = 3.0) -> None:
    """Fail fast, with a clear message, when nothing listens at the broker's address."""
    parsed = urlparse(url)
    host, port = parsed.hostname or "localhost", parsed.port or 5672
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except OSError as exc:
        raise BrokerUnreachable(
            f"RabbitMQ is unreachable at {host}:{port} ({exc.strerror or exc}). Start it "
            "(`rabbitmq-server -detached`, or `docker compose up rabbitmq`) or point "
            "CICADA_AMQP_URL at it."
        ) from exc


@dataclass
class Mesh:
    """The local processes of one mesh."""

    loaders: int = 1
    port: int = 8000
    env: dict[str, str] = field(default_factory=dict)
    log_dir: Path | None = None
    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    _envs: dict[str, dict[str, str]] = field(default_factory=dict)
    _commands: dict[str, list[str]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, **self.env, "CICADA_GATEWAY_PORT": str(self.port)}
        check_broker(env.get("CICADA_AMQP_URL", "amqp://guest:guest@localhost:5672/"))
        node = env.get("CICADA_NODE", socket.gethostname())
        plan: list[tuple[str, str, dict[str, str]]] = [
            ("scheduler", "cicada_scheduler", {}),
            ("weights", "cicada_weights", {}),
        ]
        plan += [
            (f"loader-{i}", "cicada_loader", {"CICADA_LOADER_ID": f"{node}-loader-{i}"})
            for i in range(self.loaders)
        ]
        plan.append(("gateway", "cicada_gateway", {}))
        for name, module, extra in plan:
            self._envs[name] = {**env, **extra}
            self._commands[name] = [sys.executable, "-m", module]
            self.procs.append((name, self._spawn(name)))

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Until the gateway answers ready and at least one loader reports in."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=2) as resp:
                    if json.loads(resp.read()).get("loaders", 0) >= 1:
                        return
            except (urllib.error.URLError, OSError, ValueError):
                pass
            time.sleep(0.3)
        raise TimeoutError(f"the mesh was not ready within {timeout_s:g}s")

    def crash_and_restart(self, name: str) -> None:
        """SIGKILL one service, then start it again with the environment it had (a crash,
        for tests and benchmarks)."""
        index = next(i for i, (n, _) in enumerate(self.procs) if n == name)
        old = self.procs[index][1]
        old.kill()
        old.wait()
        self.procs[index] = (name, self._spawn(name))

    def _spawn(self, name: str) -> subprocess.Popen[bytes]:
        """Start one service, its output appended to its log file (if any)."""
        out = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = (self.log_dir / f"{name}.log").open("ab")
        try:
            return subprocess.Popen(
                self._commands[name],
                env=self._envs[name],
                stdout=out,
                stderr=subprocess.STDOUT if out else None,
            )
        finally:
            if out is not None:
                out.close()  # the child holds its own descriptor

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode}")

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM everyone (gateway first, scheduler last), then SIGKILL stragglers."""
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for _, proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def purge(self) -> None:
        """Remove this mesh's durable queues and exchanges from the broker."""
        env = {**os.environ, **self.env}
        names = Names(env.get("CICADA_NAMESPACE", "cicada"))
        url = env.get("CICADA_AMQP_URL", "amqp://guest:guest@localhost:5672/")
        asyncio.run(purge(url, names, [env.get("CICADA_NODE", socket.gethostname())]))

    def wait(self) -> int:
        """Block until a process exits or a signal arrives; then stop all."""
        stop = False

        def on_signal(*_: object) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        code = 0
        while not stop:
            for name, proc in self.procs:
                if proc.poll() is not None:
                    print(
                        f"cicada: {name} exited with code {proc.returncode}; stopping",
                        file=sys.stderr,
                    )
                    code = proc.returncode or 1
                    stop = True
            time.sleep(0.2)
        self.stop()
        return code
