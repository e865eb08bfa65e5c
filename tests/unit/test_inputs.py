"""Which text inputs a model refuses before its forward pass: only what its tables lack."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from cicada_loader.engine.arch import input_limits, resolve
from cicada_shared.errors import InvalidInput

TINY = {"vocab_size": 100, "hidden_size": 16, "num_attention_heads": 2, "num_hidden_layers": 1}

GPT2 = {
    "model_type": "gpt2",
    "architectures": ["GPT2Model"],
    "vocab_size": 100,
    "n_embd": 16,
    "n_head": 2,
    "n_layer": 1,
    "n_positions": 24,
}


def limits_of(config: dict[str, Any]) -> Any:
    arch = resolve(config)
    return arch, input_limits(arch.build_meta())


def test_learned_tables_give_the_limits() -> None:
    _, bert = limits_of(
        {
            "model_type": "bert",
            "architectures": ["BertModel"],
            **TINY,
            "intermediate_size": 32,
            "max_position_embeddings": 32,
            "type_vocab_size": 2,
        }
    )
    assert (bert.vocab, bert.token_types, bert.positions) == (100, 2, 32)
    _, gpt2 = limits_of({**GPT2, "architectures": ["GPT2LMHeadModel"]})
    assert (gpt2.vocab, gpt2.token_types, gpt2.positions) == (100, None, 24)


@pytest.mark.parametrize(
    "config",
    [
        {
            "model_type": "llama",
            "architectures": ["LlamaModel"],
            **TINY,
            "intermediate_size": 32,
            "max_position_embeddings": 8,
        },
        {
            "model_type": "xlnet",
            "architectures": ["XLNetModel"],
            "vocab_size": 100,
            "d_model": 16,
            "n_head": 2,
            "n_layer": 1,
            "d_inner": 32,
        },
    ],
)
def test_relative_or_rotary_positions_set_no_length_limit(config: dict[str, Any]) -> None:
    arch, limits = limits_of(config)
    assert limits.positions is None and limits.vocab == 100
    arch.check_inputs({"input_ids": torch.ones(1, 64, dtype=torch.long)}, limits)  # no error


def test_position_ids_may_be_shared_across_the_batch() -> None:
    arch, limits = limits_of(GPT2)
    ids = torch.ones(3, 5, dtype=torch.long)
    arch.check_inputs({"input_ids": ids, "position_ids": torch.arange(5)[None]}, limits)
    with pytest.raises(InvalidInput, match=r"position_ids has shape \[2, 5\]"):
        arch.check_inputs({"input_ids": ids, "position_ids": torch.zeros(2, 5, dtype=torch.long)})
