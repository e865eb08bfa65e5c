"""Execution order, found by a dry run on the meta device and remembered per config.

The weights service fetches in the order the forward pass needs tensors, not in file order
(GPT-2's embedding, needed first, sits at the end of its file). The order is found once per
model config by running the forward pass on the meta device — no memory, no compute — and
recording which units it enters, in what order. It is stored as JSON so the next cold
start, or another process, plans its fetch without a dry run.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from cicada_loader.engine.arch import Architecture
from cicada_loader.engine.keys import candidates
from cicada_loader.engine.skeleton import direct_tensors, tensor_groups, unit_modules


@dataclass(frozen=True, slots=True)
class ExecOrder:
    """Units in the order the forward pass enters them, each with its tensors' alias names."""

    units: list[tuple[str, list[list[str]]]]
    #: "dry-run" when the meta forward pass succeeded, else "registration" (module order)
    source: str

    def unit_names(self) -> list[str]:
        return [name for name, _ in self.units]

    def checkpoint_order(self, renamed: dict[str, str], prefix: str) -> list[list[str]]:
        """The order as groups of checkpoint keys (one group per unit), for the fetcher.

        ``renamed`` maps each checkpoint key to the model's name for it.
        """
        by_name: dict[str, str] = {}
        for key, name in renamed.items():
            by_name.setdefault(name, key)
        taken: set[str] = set()
        out: list[list[str]] = []
        for _, groups in self.units:
            names = []
            for aliases in groups:
                found = next(
                    (by_name[c] for n in aliases for c in candidates(n, prefix) if c in by_name),
                    None,
                )
                if found is not None and found not in taken:
                    taken.add(found)
                    names.append(found)
            out.append(names)
        return out

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "units": [[n, g] for n, g in self.units]}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ExecOrder:
        return cls([(str(n), [list(a) for a in g]) for n, g in doc["units"]], str(doc["source"]))


def dry_run(arch: Architecture) -> ExecOrder:
    """Run the forward pass on the meta device and record the order units are entered."""
    model = arch.build_meta()
    groups = {id(t): names for names, t in tensor_groups(model)}
    units = unit_modules(model)
    entered: list[str] = []
    handles = [
        module.register_forward_pre_hook(lambda *_, n=name: entered.append(n))
        for name, module in units
    ]
    source = "dry-run"
    try:
        inputs = {k: v.to("meta") for k, v in arch.sample_inputs(seq_len=8).items()}
        with torch.inference_mode():
            model(**inputs)
    except Exception:
        source = "registration"
    finally:
        for h in handles:
            h.remove()
    first = list(dict.fromkeys(entered))
    rank = {n: i for i, n in enumerate(first)}
    ordered = sorted(units, key=lambda nm: rank.get(nm[0], len(rank)))
    return ExecOrder(
        [(name, [groups[id(t)] for _, t in direct_tensors(module)]) for name, module in ordered],
        source,
    )


class OrderBook:
    """Remembers execution orders by config, in memory and (optionally) on disk."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory
        self._memo: dict[str, ExecOrder] = {}
        self._renamed: dict[tuple[str, str], dict[str, str]] = {}
        self._lock = threading.Lock()

    def get(self, arch: Architecture, config: dict[str, Any]) -> ExecOrder:
        key = config_key(config)
        with self._lock:  # one dry run per config, however many threads ask
            if key not in self._memo:
                order = self._load(key)
                if order is None:
                    order = dry_run(arch)
                    self._store(key, order)
                self._memo[key] = order
            return self._memo[key]

    def renamed(
        self, arch: Architecture, config: dict[str, Any], keys: Iterable[str]
    ) -> dict[str, str]:
        """Checkpoint key → model name (``Architecture.rename_table``), remembered in memory."""
        names = list(keys)
        memo = (config_key(config), hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest())
        with self._lock:
            if memo not in self._renamed:
                self._renamed[memo] = arch.rename_table(arch.build_meta(), names)
            return self._renamed[memo]

    def checkpoint_order(
        self, arch: Architecture, config: dict[str, Any], keys: Iterable[str]
    ) -> list[list[str]]:
        """The fetch order for a checkpoint with ``keys``: groups of keys, unit by unit."""
        names = list(keys)
        return self.get(arch, config).checkpoint_order(
            self.renamed(arch, config, names), arch.prefix
        )

    def _path(self, key: str) -> Path | None:
        return self.directory / f"{key}.json" if self.directory else None

    def _load(self, key: str) -> ExecOrder | None:
        path = self._path(key)
        try:
            return ExecOrder.from_json(json.loads(path.read_text())) if path else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _store(self, key: str, order: ExecOrder) -> None:
        path = self._path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(order.to_json()))
        tmp.replace(path)


def config_key(config: dict[str, Any]) -> str:
    """Stable key of a config under this torch and transformers."""
    text = json.dumps(config, sort_keys=True) + transformers.__version__ + torch.__version__
    return hashlib.sha256(text.encode()).hexdigest()[:20]
