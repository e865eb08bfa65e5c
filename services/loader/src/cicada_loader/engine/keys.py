"""Match a model's tensor names to a checkpoint's.

Checkpoints of a task model sometimes omit or add the base model's prefix (GPT-2 on the Hub
stores ``h.0.attn…`` for ``transformer.h.0.attn…``), and tied tensors are stored once under
one of their names. A model tensor is an *alias group*: every name it answers to.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KeyMatch:
    """How each alias group of a model is filled from a checkpoint."""

    #: group index → checkpoint key that fills it
    filled: dict[int, str]
    #: groups no checkpoint key fills (by their first name)
    missing: list[str]
    #: checkpoint keys with no place in the model
    unexpected: list[str]
    #: checkpoint keys that fill a group another key already fills (a tie stored twice)
    redundant: list[str]


def candidates(name: str, prefix: str) -> list[str]:
    """Checkpoint names that may hold model tensor ``name``."""
    out = [name]
    if prefix:
        if name.startswith(prefix + "."):
            out.append(name[len(prefix) + 1 :])
        else:
            out.append(f"{prefix}.{name}")
    return out


def match_keys(
    groups: Sequence[Sequence[str]],
    checkpoint: Iterable[str] | Mapping[str, str],
    *,
    prefix: str = "",
    ignore_missing: Sequence[str] = (),
    ignore_unexpected: Sequence[str] = (),
) -> KeyMatch:
    """Fill each alias group of ``groups`` from the ``checkpoint`` keys.

    ``checkpoint`` maps each checkpoint key to its name in the model's terms (after the
    architecture's renamings), or is just the keys when no renaming applies.
    ``ignore_missing``/``ignore_unexpected`` are regular expressions (transformers'
    ``_keys_to_ignore_on_load_*``) for names a model tolerates lacking or finding.
    """
    renamed = dict(checkpoint) if isinstance(checkpoint, Mapping) else {k: k for k in checkpoint}
    by_name: dict[str, str] = {}
    for key, name in renamed.items():
        by_name.setdefault(name, key)
    filled: dict[int, str] = {}
    missing: list[str] = []
    used: set[str] = set()
    redundant: list[str] = []
    for index, names in enumerate(groups):
        found = list(
            dict.fromkeys(by_name[c] for n in names for c in candidates(n, prefix) if c in by_name)
        )
        if found:
            filled[index] = found[0]
            used.update(found)
            redundant.extend(found[1:])
        elif not _any_match(names, ignore_missing):
            missing.append(names[0])
    for key, name in renamed.items():  # two keys renamed to one name: the first one fills it
        if key not in used and by_name[name] in used:
            used.add(key)
            redundant.append(key)
    unexpected = [k for k in renamed if k not in used and not _any_match([k], ignore_unexpected)]
    return KeyMatch(filled, missing, unexpected, redundant)


def _any_match(names: Sequence[str], patterns: Sequence[str]) -> bool:
    return any(re.search(p, n) for p in patterns for n in names)
