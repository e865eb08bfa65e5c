"""The built-in zoo: plain PyTorch models transformers lacks, and the benchmark's model list.

A zoo checkpoint is an ordinary directory — ``config.json`` with a ``"cicada_zoo"`` key plus
``model.safetensors`` — so the loader treats it like any Hugging Face one. Keys follow
torchvision's, so torchvision's published weights load unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from cicada_shared.errors import UnsupportedArchitecture

# -- plain PyTorch architectures ------------------------------------------------------------

#: torchvision's VGG layer lists: numbers are 3×3 conv widths, "M" a 2×2 max-pool.
VGG_LAYERS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        "M",
    ],
    "vgg19": [
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        512,
        "M",
    ],
}


class VGG(nn.Module):
    """VGG (Simonyan & Zisserman, 2014) with torchvision's module names.

    Config keys: ``variant`` (vgg11/16/19), ``width`` (channel divisor, 1 for the real
    model), ``hidden`` (classifier width, 4096), ``num_classes``, ``batch_norm``.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        width = int(config.get("width", 1))
        layers: list[nn.Module] = []
        channels = int(config.get("num_channels", 3))
        for item in VGG_LAYERS[config.get("variant", "vgg19")]:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            out = int(item) // width
            layers.append(nn.Conv2d(channels, out, kernel_size=3, padding=1))
            if config.get("batch_norm", False):
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU(inplace=True))
            channels = out
        hidden = int(config.get("hidden", 4096))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(channels * 7 * 7, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(p=0.5),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(p=0.5),
            nn.Linear(hidden, int(config.get("num_classes", 1000))),
        )
        for module in self.modules():
            init_module(module)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(pixel_values))
        return self.classifier(torch.flatten(x, 1))  # type: ignore[no-any-return]


def init_module(module: nn.Module) -> None:
    """torchvision's VGG initialisation for one module."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            nn.init.constant_(module.bias, 0)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.constant_(module.weight, 1)
        nn.init.constant_(module.bias, 0)
    elif isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, 0, 0.01)
        nn.init.constant_(module.bias, 0)


@dataclass(frozen=True, slots=True)
class PlainModel:
    name: str
    cls: Callable[[dict[str, Any]], nn.Module]
    main_input: str


PLAIN: dict[str, PlainModel] = {"vgg": PlainModel("VGG", VGG, "pixel_values")}


def plain_model(config: dict[str, Any]) -> PlainModel:
    family = config.get("cicada_zoo")
    if family not in PLAIN:
        raise UnsupportedArchitecture(
            f"config.json names zoo model {family!r}; the zoo has {sorted(PLAIN)}"
        )
    return PLAIN[family]


# -- the benchmark's models -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ZooEntry:
    """A named model: its config at full size, and a tiny one of the same architecture."""

    name: str
    description: str
    full: dict[str, Any]
    tiny: dict[str, Any]


def _gpt2(**kw: Any) -> dict[str, Any]:
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], **kw}


def _bert(**kw: Any) -> dict[str, Any]:
    return {"model_type": "bert", "architectures": ["BertModel"], **kw}


_TINY_TEXT = {
    "n_layer": 2,
    "n_embd": 64,
    "n_head": 4,
    "vocab_size": 1000,
    "n_positions": 128,
    "bos_token_id": 0,
    "eos_token_id": 0,
}
_TINY_BERT = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "vocab_size": 1000,
    "max_position_embeddings": 128,
}

MODELS: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry("gpt2", "GPT-2 small, 124M", _gpt2(), _gpt2(**_TINY_TEXT)),
        ZooEntry(
            "gpt2-medium",
            "GPT-2 medium, 355M",
            _gpt2(n_layer=24, n_embd=1024, n_head=16),
            _gpt2(**{**_TINY_TEXT, "n_layer": 3}),
        ),
        ZooEntry("bert-base", "BERT base, 110M", _bert(), _bert(**_TINY_BERT)),
        ZooEntry(
            "labse",
            "LaBSE: BERT base with a 501k vocabulary, 471M",
            _bert(vocab_size=501153),
            _bert(**{**_TINY_BERT, "vocab_size": 5000}),
        ),
        ZooEntry(
            "vit-base",
            "ViT-B/16 classifier, 86M",
            {
                "model_type": "vit",
                "architectures": ["ViTForImageClassification"],
                "num_labels": 1000,
            },
            {
                "model_type": "vit",
                "architectures": ["ViTForImageClassification"],
                "image_size": 32,
                "patch_size": 8,
                "hidden_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "intermediate_size": 128,
                "num_labels": 10,
            },
        ),
        ZooEntry(
            "resnet50",
            "ResNet-50 classifier, 26M",
            {
                "model_type": "resnet",
                "architectures": ["ResNetForImageClassification"],
                "num_labels": 1000,
            },
            {
                "model_type": "resnet",
                "architectures": ["ResNetForImageClassification"],
                "embedding_size": 16,
                "hidden_sizes": [16, 32, 64, 128],
                "depths": [1, 1, 1, 1],
                "num_labels": 10,
                "cicada_image_size": 32,
            },
        ),
        ZooEntry(
            "vgg19",
            "VGG-19 classifier (plain PyTorch), 144M",
            {"cicada_zoo": "vgg", "variant": "vgg19", "num_classes": 1000},
            {
                "cicada_zoo": "vgg",
                "variant": "vgg19",
                "num_classes": 10,
                "width": 16,
                "hidden": 64,
                "cicada_image_size": 32,
            },
        ),
    ]
}


def entry(name: str) -> ZooEntry:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; the zoo has {', '.join(MODELS)}")
    return MODELS[name]


def write_checkpoint(
    name: str,
    out_dir: Path,
    *,
    tiny: bool = False,
    seed: int = 0,
    max_shard_size: str | None = None,
) -> Path:
    """Write a random-weight checkpoint of zoo model ``name`` (default initialisation)."""
    from cicada_loader.engine.arch import resolve  # arch imports this module

    e = entry(name)
    config = dict(e.tiny if tiny else e.full)
    torch.manual_seed(seed)
    arch = resolve(config)
    model = arch.build()
    out_dir.mkdir(parents=True, exist_ok=True)
    if arch.is_hf:
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(out_dir, **kwargs)  # type: ignore[operator]
    else:
        if max_shard_size:
            raise ValueError("sharding is only implemented for transformers models")
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()},
            str(out_dir / "model.safetensors"),
            metadata={"format": "pt"},
        )
        (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir
