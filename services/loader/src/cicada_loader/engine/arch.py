"""Which model a ``config.json`` describes, and how to build, initialise and feed it.

Two families: any Hugging Face transformers architecture named by the config, and the small
built-in zoo of plain PyTorch models (``"cicada_zoo"`` in the config) for families that
transformers lacks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch import nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

from cicada_loader.engine import zoo
from cicada_shared.errors import InvalidInput, UnsupportedArchitecture


@dataclass(frozen=True, slots=True)
class Architecture:
    """How to build one model class from its config."""

    name: str
    config: Any
    cls: Callable[..., nn.Module]
    is_hf: bool
    #: Key prefix of the base model (``"transformer"`` for GPT-2) that checkpoints may omit.
    prefix: str
    #: Name of the main forward argument: ``input_ids`` or ``pixel_values``.
    main_input: str

    def build(self) -> nn.Module:
        """Build the ordinary way, with default initialisation, on the default device."""
        return self._construct().eval().requires_grad_(False)

    def build_meta(self) -> nn.Module:
        """Build on the meta device: no memory, and initialisers have nothing to do."""
        with torch.device("meta"):
            return self._construct().eval().requires_grad_(False)

    def skeleton(self, device: torch.device) -> nn.Module:
        """MiniLoader's build: real but uninitialised memory for every tensor, ties kept.

        Thread-safe (no global patching): the model is built on the meta device, then each
        tensor gets ``torch.empty`` storage on ``device``. Whatever the checkpoint will not
        fill must then be initialised by ``init_uncovered``.
        """
        model = self.build_meta()
        materialize(model, device)
        return model

    def _construct(self) -> nn.Module:
        if self.is_hf:
            return self.cls._from_config(self.config)  # type: ignore[attr-defined,no-any-return]
        return self.cls(self.config)

    def rename_table(self, model: nn.Module, keys: Iterable[str]) -> dict[str, str]:
        """Checkpoint key → the model's name for it, after transformers' renamings.

        transformers 5 stores some models under legacy names (ViT's ``attention.query``
        is the model's ``attention.q_proj``) and renames on load; we apply the same
        renamings. Keys that need a tensor conversion (fused or split weights) cannot be
        applied as views and are refused.
        """
        if not self.is_hf:
            return {k: k for k in keys}
        transforms = get_model_conversion_mapping(model)  # type: ignore[arg-type]
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        table = {}
        for key in keys:
            name, converter = rename_source_key(key, renamings, converters)
            if converter is not None:
                raise UnsupportedArchitecture(
                    f"{self.name}: checkpoint tensor {key!r} needs a tensor conversion "
                    f"({converter}), which the pipelined loader does not apply"
                )
            table[key] = name
        return table

    def default_init(self, model: nn.Module, module: nn.Module) -> None:
        """Initialise ``module`` the way a plain build would (for the baseline variants)."""
        with torch.no_grad():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
            if self.is_hf:
                model._init_weights(module)  # type: ignore[operator]
            else:
                zoo.init_module(module)

    def init_uncovered(self, model: nn.Module, covered: set[int]) -> None:
        """Initialise what the checkpoint does not provide (MiniLoader's opportunistic part).

        ``covered`` holds the ids of tensors a checkpoint will fill; everything else, such as
        non-persistent buffers, gets the model's own initialisation.
        """
        if not self.is_hf:
            left = [
                n
                for n, t in [*model.named_parameters(), *model.named_buffers()]
                if id(t) not in covered
            ]
            if left:
                raise UnsupportedArchitecture(f"{self.name}: cannot initialise {left[:4]}")
            return
        flagged = []
        for tensor in [*model.parameters(), *model.buffers()]:
            if id(tensor) in covered:
                tensor._is_hf_initialized = True  # type: ignore[attr-defined]
                flagged.append(tensor)
        try:
            model.initialize_weights()  # type: ignore[operator]
        finally:
            for tensor in flagged:
                del tensor._is_hf_initialized  # type: ignore[attr-defined]

    def check_inputs(self, inputs: Mapping[str, Any], limits: InputLimits | None = None) -> None:
        """Refuse, naming the problem, text inputs that would fail deep inside the forward
        pass: companion inputs (``attention_mask`` …) shaped unlike ``input_ids``, and, with
        the built model's ``limits``, ids its embedding tables do not have."""
        ids = inputs.get("input_ids")
        if self.main_input != "input_ids" or not isinstance(ids, torch.Tensor):
            return
        shape = list(ids.shape)
        if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise InvalidInput(
                f"input_ids must be integers of shape [batch, sequence], got {shape}"
            )
        for name in TEXT_COMPANIONS:
            other = inputs.get(name)
            if not isinstance(other, torch.Tensor):
                continue
            fits = [shape, [1, shape[1]]] if name == "position_ids" else [shape]
            if list(other.shape) not in fits:
                raise InvalidInput(f"{name} has shape {list(other.shape)}; input_ids has {shape}")
        if limits is None:
            return
        _check_range("input_ids", ids, limits.vocab, "token ids")
        _check_range(
            "token_type_ids", inputs.get("token_type_ids"), limits.token_types, "token types"
        )
        _check_range("position_ids", inputs.get("position_ids"), limits.positions, "positions")
        if limits.positions and "position_ids" not in inputs and shape[1] > limits.positions:
            raise InvalidInput(
                f"the sequence has {shape[1]} tokens; this model has {limits.positions} positions"
            )

    def sample_inputs(self, *, batch: int = 1, seq_len: int = 64, seed: int = 0) -> dict[str, Any]:
        """Deterministic inputs of the right kind and shape for this model."""
        gen = torch.Generator().manual_seed(seed)
        if self.main_input == "input_ids":
            vocab = int(_cfg(self.config, "vocab_size", 1000))
            limit = _cfg(self.config, "max_position_embeddings", None) or _cfg(
                self.config, "n_positions", seq_len
            )
            length = min(seq_len, int(limit))
            return {"input_ids": torch.randint(0, vocab, (batch, length), generator=gen)}
        if self.main_input == "pixel_values":
            size = int(
                _cfg(self.config, "image_size", None) or _cfg(self.config, "cicada_image_size", 224)
            )
            channels = int(_cfg(self.config, "num_channels", 3))
            return {"pixel_values": torch.randn(batch, channels, size, size, generator=gen)}
        raise UnsupportedArchitecture(
            f"{self.name}: no sample inputs for main input {self.main_input!r}; pass inputs"
        )


def resolve(config: dict[str, Any]) -> Architecture:
    """The architecture ``config`` (a parsed ``config.json``) describes."""
    if "cicada_zoo" in config:
        spec = zoo.plain_model(config)
        return Architecture(spec.name, config, spec.cls, False, "", spec.main_input)
    model_type = config.get("model_type")
    mapping = transformers.models.auto.configuration_auto.CONFIG_MAPPING
    if not isinstance(model_type, str) or model_type not in mapping:
        raise UnsupportedArchitecture(
            f"config.json names model_type {model_type!r}, which transformers "
            f"{transformers.__version__} does not know"
        )
    try:
        hf_config = mapping[model_type].from_dict(dict(config))
    except Exception as exc:
        raise UnsupportedArchitecture(
            f"config.json is not a valid {model_type} config: {exc}"
        ) from exc
    cls = _hf_class(hf_config)
    prefix = getattr(cls, "base_model_prefix", "") or ""
    main_input = getattr(cls, "main_input_name", "input_ids")
    return Architecture(cls.__name__, hf_config, cls, True, prefix, main_input)


def _hf_class(config: Any) -> Any:
    names = getattr(config, "architectures", None) or []
    for name in names:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    try:
        return transformers.AutoModel._model_mapping[type(config)]
    except KeyError as exc:
        raise UnsupportedArchitecture(
            f"no transformers class for architectures {names!r} (model_type {config.model_type!r})"
        ) from exc


#: Integer inputs a text model may take beside ``input_ids``, each of its shape.
TEXT_COMPANIONS = ("attention_mask", "token_type_ids", "position_ids")


@dataclass(frozen=True, slots=True)
class InputLimits:
    """Sizes of a text model's embedding tables, where it has them (None: no table)."""

    vocab: int | None = None
    token_types: int | None = None
    positions: int | None = None


def input_limits(model: nn.Module) -> InputLimits:
    """The built model's token table, and its learned token-type and position tables (a
    model with relative or rotary positions has none, and no length limit from here)."""
    vocab = None
    with contextlib.suppress(AttributeError, NotImplementedError):
        table = model.get_input_embeddings()  # type: ignore[operator]
        vocab = table.num_embeddings if isinstance(table, nn.Embedding) else None
    tables = [
        (name.rsplit(".", 1)[-1], m.num_embeddings)
        for name, m in model.named_modules()
        if isinstance(m, nn.Embedding)
    ]
    types = [n for last, n in tables if last == "token_type_embeddings"]
    positions = [n for last, n in tables if last == "wpe" or "position" in last]
    return InputLimits(vocab, min(types, default=None), min(positions, default=None))


def _check_range(name: str, values: Any, size: Any, noun: str) -> None:
    if not isinstance(values, torch.Tensor) or not size or values.numel() == 0:
        return
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= int(size):
        bad = low if low < 0 else high
        raise InvalidInput(f"{name} holds {bad}; this model has {size} {noun} (0 to {size - 1})")


def _cfg(config: Any, key: str, default: Any) -> Any:
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def materialize(model: nn.Module, device: torch.device) -> None:
    """Replace meta parameters and buffers by uninitialised ones on ``device``, keeping ties."""
    done: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table, as_param in ((module._parameters, True), (module._buffers, False)):
            for name, tensor in list(table.items()):
                if tensor is None or not tensor.is_meta:
                    continue
                if id(tensor) not in done:
                    empty = torch.empty_like(tensor, device=device)
                    done[id(tensor)] = (
                        nn.Parameter(empty, requires_grad=False) if as_param else empty
                    )
                table[name] = done[id(tensor)]  # type: ignore[assignment]


def flatten_outputs(output: Any) -> dict[str, torch.Tensor]:
    """A model's output as named tensors: ``logits``, ``last_hidden_state`` …"""
    if isinstance(output, torch.Tensor):
        return {"output": output}
    if isinstance(output, dict):  # transformers ModelOutput is an OrderedDict
        return {k: v for k, v in output.items() if isinstance(v, torch.Tensor)}
    if isinstance(output, tuple | list):
        return {f"output_{i}": v for i, v in enumerate(output) if isinstance(v, torch.Tensor)}
    raise TypeError(f"cannot name the tensors of a {type(output).__name__} output")
