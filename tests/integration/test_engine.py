"""The cold-start engine: every zoo model, every variant, equal to the ordinary load."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from cicada_loader import VARIANTS, cold_start, prepare
from cicada_loader.engine.arch import flatten_outputs, resolve
from cicada_loader.engine.order import OrderBook
from cicada_loader.engine.zoo import MODELS, VGG
from cicada_shared.errors import InvalidInput
from cicada_weights.origins import open_origin

ZOO = list(MODELS)


def reference(model_dir: Path, *, views: bool = True) -> nn.Module:
    """The checkpoint loaded the ordinary way.

    transformers' ``from_pretrained`` (for plain PyTorch, ``load_state_dict(...,
    assign=True)``) leaves the parameters as views of the memory-mapped file, as Cicada's
    are. With ``views=False`` every tensor is then copied into fresh (64-byte aligned) memory,
    as ``load_state_dict`` into a built model does and as the copying baselines do. The two
    can differ in the last bit on convolutions: oneDNN picks its kernel by the weights'
    alignment.
    """
    config = json.loads((model_dir / "config.json").read_text())
    if "cicada_zoo" in config:
        model: nn.Module = VGG(config)
        model.load_state_dict(load_file(str(model_dir / "model.safetensors")), assign=True)
    else:
        model = getattr(transformers, config["architectures"][0]).from_pretrained(model_dir)
    if not views:
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()
    return model.eval()


def run_reference(model_dir: Path, inputs: dict[str, Any], *, views: bool = True) -> dict[str, Any]:
    with torch.inference_mode():
        return flatten_outputs(reference(model_dir, views=views)(**inputs))


def sample(model_dir: Path) -> dict[str, Any]:
    config = json.loads((model_dir / "config.json").read_text())
    return resolve(config).sample_inputs(seq_len=16)


def assert_same_model(got: nn.Module, want: nn.Module) -> None:
    """Every parameter and every buffer (non-persistent ones too) equal, to the bit."""
    got_p, want_p = dict(got.named_parameters()), dict(want.named_parameters())
    assert got_p.keys() == want_p.keys()
    for name, tensor in want_p.items():
        assert torch.equal(got_p[name], tensor), name
    got_b, want_b = dict(got.named_buffers()), dict(want.named_buffers())
    assert got_b.keys() == want_b.keys()
    for key, buffer in want_b.items():
        assert torch.equal(got_b[key], buffer), key


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", ZOO)
def test_every_zoo_model_and_variant_matches_the_reference(
    name: str, variant: str, checkpoints: Callable[..., Path], tmp_path: Path
) -> None:
    model_dir = checkpoints(name)
    inputs = sample(model_dir)
    result = cold_start(model_dir, inputs, variant=variant, cache_dir=tmp_path, reuse_cache=False)
    views = VARIANTS[variant].decoupler  # zero-copy views, or copies like load_state_dict
    want = run_reference(model_dir, inputs, views=views)
    assert result.outputs.keys() == want.keys()
    for key in want:
        assert torch.equal(result.outputs[key], want[key]), key
    assert_same_model(result.model, reference(model_dir, views=views))
    # the warm model serves the next request the same way
    with torch.inference_mode():
        again = flatten_outputs(result.model(**inputs))
    assert all(torch.equal(again[k], want[k]) for k in want)


@pytest.mark.slow
def test_full_size_gpt2(checkpoints: Callable[..., Path], tmp_path: Path) -> None:
    model_dir = checkpoints("gpt2", tiny=False)
    inputs = sample(model_dir)
    result = cold_start(model_dir, inputs, cache_dir=tmp_path, reuse_cache=False)
    want = run_reference(model_dir, inputs)
    assert torch.equal(result.outputs["logits"], want["logits"])
    assert result.timeline.summary()["bytes"] == (model_dir / "model.safetensors").stat().st_size


def test_tied_weights_stay_tied(checkpoints: Callable[..., Path], tmp_path: Path) -> None:
    result = cold_start(checkpoints("gpt2"), cache_dir=tmp_path, reuse_cache=False)
    model: Any = result.model
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize("variant", ["cicada", "naive"])
@pytest.mark.parametrize(
    ("inputs", "says"),
    [
        ({"input_ids": [[1, 1000]]}, "input_ids holds 1000; this model has 1000 token ids"),
        ({"input_ids": [[-1, 2]]}, "input_ids holds -1"),
        ({"input_ids": [[1] * 129]}, "the sequence has 129 tokens; this model has 128 positions"),
        ({"input_ids": [[1, 2]], "position_ids": [[0, 128]]}, "position_ids holds 128"),
        ({"input_ids": [[1, 2]], "token_type_ids": [[0, 2]]}, "token_type_ids holds 2"),
        ({"input_ids": [[1, 2]], "attention_mask": [[1]]}, "attention_mask has shape [1, 1]"),
        ({"input_ids": [1, 2]}, "shape [batch, sequence], got [2]"),
    ],
)
def test_text_inputs_the_model_cannot_take_are_refused_by_name(
    checkpoints: Callable[..., Path],
    tmp_path: Path,
    variant: str,
    inputs: dict[str, Any],
    says: str,
) -> None:
    tensors = {k: torch.tensor(v) for k, v in inputs.items()}
    with pytest.raises(InvalidInput, match=re.escape(says)):
        cold_start(checkpoints("bert-base"), tensors, variant=variant, cache_dir=tmp_path)


def test_cicada_applies_zero_copy_views(checkpoints: Callable[..., Path], tmp_path: Path) -> None:
    model_dir = checkpoints("bert-base")
    cicada = cold_start(model_dir, cache_dir=tmp_path, reuse_cache=False).model
    storages = {p.untyped_storage().data_ptr() for p in cicada.parameters()}
    assert len(storages) == 1  # every parameter is a view of the one mapped cache file
    pisel = cold_start(model_dir, variant="pisel", cache_dir=tmp_path, reuse_cache=False).model
    assert len({p.untyped_storage().data_ptr() for p in pisel.parameters()}) > 1


def test_sharded_checkpoint(checkpoints: Callable[..., Path], tmp_path: Path) -> None:
    model_dir = checkpoints("gpt2", shard="200KB")
    inputs = sample(model_dir)
    result = cold_start(model_dir, inputs, cache_dir=tmp_path, reuse_cache=False)
    assert len(result.manifest.headers) > 1
    assert torch.equal(result.outputs["logits"], run_reference(model_dir, inputs)["logits"])


def test_http_origin(
    checkpoints: Callable[..., Path], http_origin: Callable[..., str], tmp_path: Path
) -> None:
    model_dir = checkpoints("vit-base")
    url = http_origin(model_dir.parent, bandwidth=50e6)
    inputs = sample(model_dir)
    result = cold_start(f"{url}/{model_dir.name}", inputs, cache_dir=tmp_path, reuse_cache=False)
    assert torch.equal(result.outputs["logits"], run_reference(model_dir, inputs)["logits"])


def test_checkpoint_without_base_prefix(checkpoints: Callable[..., Path], tmp_path: Path) -> None:
    """GPT-2 on the Hub stores ``h.0…`` where GPT2LMHeadModel says ``transformer.h.0…``."""
    src = checkpoints("gpt2")
    dst = tmp_path / "hub-style"
    dst.mkdir()
    (dst / "config.json").write_bytes((src / "config.json").read_bytes())
    tensors = load_file(str(src / "model.safetensors"))
    save_file(
        {k.removeprefix("transformer."): v for k, v in tensors.items()},
        str(dst / "model.safetensors"),
        metadata={"format": "pt"},
    )
    inputs = sample(src)
    result = cold_start(dst, inputs, cache_dir=tmp_path, reuse_cache=False)
    assert torch.equal(result.outputs["logits"], run_reference(src, inputs)["logits"])


def test_execution_order_is_found_and_remembered(
    checkpoints: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    order = prepare(checkpoints("gpt2"), orders=OrderBook(tmp_path))
    assert order.source == "dry-run"
    assert order.unit_names()[:4] == [
        "transformer.wte",
        "transformer.wpe",
        "transformer.h.0.ln_1",
        "transformer.h.0.attn.c_attn",
    ]
    assert order.unit_names()[-1] == "lm_head"
    assert len(list(tmp_path.glob("*.json"))) == 1

    def no_dry_run(*_: Any) -> None:
        raise AssertionError("the order should have been remembered")

    monkeypatch.setattr("cicada_loader.engine.order.dry_run", no_dry_run)
    assert prepare(checkpoints("gpt2"), orders=OrderBook(tmp_path)) == order


def test_timeline(checkpoints: Callable[..., Path], tmp_path: Path) -> None:
    result = cold_start(checkpoints("gpt2"), cache_dir=tmp_path, reuse_cache=False)
    doc = result.timeline.to_json()
    json.dumps(doc)
    assert doc["units"][0]["name"] == "transformer.wte"
    for unit in doc["units"]:
        for stage in ("construct", "fetch", "apply", "exec"):
            start, end = unit[stage]
            assert 0 <= start <= end
        assert unit["fetch"][1] <= unit["apply"][0] + 1e-6  # applied only once landed
        assert unit["apply"][1] <= unit["exec"][0] + 1e-6  # run only once applied
    summary = doc["summary"]
    assert 0 < summary["ttfl_s"] <= summary["e2e_s"]
    assert 0 <= summary["utilization"] <= 1
    assert summary["bytes"] > 0


def test_origin_reads_config_over_http(
    checkpoints: Callable[..., Path], http_origin: Callable[..., str]
) -> None:
    model_dir = checkpoints("gpt2")
    origin = open_origin(f"{http_origin(model_dir.parent)}/{model_dir.name}")
    try:
        assert origin.read_file("config.json") == (model_dir / "config.json").read_bytes()
        assert origin.read_file("absent.json") is None
    finally:
        origin.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_path_matches_cpu_reference(checkpoints: Callable[..., Path], tmp_path: Path) -> None:
    model_dir = checkpoints("gpt2")
    inputs = sample(model_dir)
    result = cold_start(model_dir, inputs, device="cuda", cache_dir=tmp_path, reuse_cache=False)
    ref = reference(model_dir).to("cuda")
    with torch.inference_mode():
        want = flatten_outputs(ref(**{k: v.cuda() for k, v in inputs.items()}))
    assert torch.equal(result.outputs["logits"], want["logits"])
