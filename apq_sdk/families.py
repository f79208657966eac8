"""Model families: the one place a decoder family is described.

Each family is a small class registered by its transformers `model_type` through
`__init_subclass__` (as the weight formats in `quant/weights.py` are). It says how its linear layers
are named and fused, how its norms, RoPE, sliding windows and embeddings work, and how to make a
tiny random model of it for tests. Everything else reads it from here:

* `model_io` refuses a model whose family is not registered (the list comes from `FAMILIES`);
* `planning` fuses the layers a family's runtimes fuse (`FUSED_GROUPS`, by role);
* every target lowers a `DecoderSpec`, the runtime-neutral description of one model built by
  `decoder_spec(config)`;
* `testing.make_tiny_model` builds each family's tiny config.

Roles: q, k, v, o (attention), gate, up, down (MLP), and qkv / gate_up where a family stores the
fused projection as one linear layer (phi3).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from .errors import ModelLoadError

FAMILIES: dict[str, type["ModelFamily"]] = {}

#: role of a linear layer by the last part of its name (q_proj -> q, ...)
ROLE_BY_SUFFIX = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "qkv_proj": "qkv",
    "gate_proj": "gate", "up_proj": "up", "gate_up_proj": "gate_up", "down_proj": "down",
}
#: layers that read one input and that runtimes fuse into one matmul, by the fused group's name
FUSED_GROUPS = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}
FUSED_GROUP_OF_ROLE = {role: group for group, roles in FUSED_GROUPS.items() for role in roles}

#: the tiny test models' geometry (GQA with 2 query heads per KV head)
TINY_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                   vocab_size=384)


class UnsupportedModelError(ModelLoadError):
    """A model whose family, RoPE variant or activation apq-sdk does not describe."""


@dataclass
class DecoderSpec:
    """What a runtime needs to know to run one decoder-only model, independent of the runtime."""

    family: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    intermediate_size: int
    rms_eps: float
    hidden_act: str
    tie_word_embeddings: bool
    inv_freq: np.ndarray  # [rotary_dim / 2] float32
    rope_scaling: float  # cos/sin multiplier (1.0 for default RoPE)
    sliding_windows: list[int | None] = field(default_factory=list)
    norm_offset: bool = False  # gemma: weight applied as (1 + w)
    embed_scale: float | None = None  # gemma: embeddings times sqrt(hidden)
    stored_fused: bool = False  # qkv_proj / gate_up_proj are single layers (phi3)
    max_position_embeddings: int = 2048

    @property
    def rotary_dim(self) -> int:
        return 2 * int(self.inv_freq.shape[0])

    def linear_names(self, layer: int) -> dict[str, str]:
        return get_family(self.family).linear_names(layer)


class ModelFamily:
    """One decoder family. Subclasses register themselves by `model_type`."""

    model_type: ClassVar[str]
    config_class: ClassVar[str]  # the transformers config class of tiny test models
    stored_fused: ClassVar[bool] = False  # q/k/v and gate/up stored as one linear each
    norm_offset: ClassVar[bool] = False  # RMSNorm weight applied as (1 + w)
    scaled_embedding: ClassVar[bool] = False  # embeddings times sqrt(hidden_size)
    default_activation: ClassVar[str | None] = None  # when the config names none (or "gelu")
    windows: ClassVar[str] = "none"  # "none", "all" (every layer) or "layer_types"
    tiny_config_overrides: ClassVar[dict] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.model_type in FAMILIES:
            raise TypeError(f"model family {cls.model_type!r} registered twice")
        FAMILIES[cls.model_type] = cls

    # -- names --------------------------------------------------------------------------------------

    @classmethod
    def linear_names(cls, layer: int, prefix: str = "model.layers") -> dict[str, str]:
        """Role -> module name of every linear layer of decoder block `layer`."""
        p = f"{prefix}.{layer}"
        if cls.stored_fused:
            return {"qkv": f"{p}.self_attn.qkv_proj", "o": f"{p}.self_attn.o_proj",
                    "gate_up": f"{p}.mlp.gate_up_proj", "down": f"{p}.mlp.down_proj"}
        return {"q": f"{p}.self_attn.q_proj", "k": f"{p}.self_attn.k_proj",
                "v": f"{p}.self_attn.v_proj", "o": f"{p}.self_attn.o_proj",
                "gate": f"{p}.mlp.gate_proj", "up": f"{p}.mlp.up_proj", "down": f"{p}.mlp.down_proj"}

    # -- the runtime-neutral description ------------------------------------------------------------

    @classmethod
    def sliding_windows(cls, config) -> list[int | None]:
        window = getattr(config, "sliding_window", None)
        layers = config.num_hidden_layers
        if window is None or cls.windows == "none":
            return [None] * layers
        layer_types = getattr(config, "layer_types", None)
        if cls.windows == "all" or layer_types is None:
            return [int(window)] * layers
        return [int(window) if layer_types[i] == "sliding_attention" else None
                for i in range(layers)]

    @classmethod
    def hidden_activation(cls, config) -> str:
        act = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None)
        if cls.default_activation is not None and act in (None, "gelu"):
            act = cls.default_activation
        if act not in ("silu", "swish", "gelu", "gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
            raise UnsupportedModelError(f"hidden activation {act!r} of {cls.model_type!r} is not "
                                        f"supported (silu, gelu and tanh-approximated gelu are)")
        return act

    @classmethod
    def decoder_spec(cls, config) -> DecoderSpec:
        rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
                    or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "dynamic":
            raise UnsupportedModelError(
                "rope_type 'dynamic' changes frequencies with the sequence length; apq-sdk's "
                "device packages support static RoPE variants only")
        if rope_type == "longrope":
            original = getattr(config, "original_max_position_embeddings", None) or \
                rope.get("original_max_position_embeddings")
            if original is None or config.max_position_embeddings > original:
                raise UnsupportedModelError(
                    "rope_type 'longrope' switches frequencies past "
                    "original_max_position_embeddings; not supported in device packages")
        rotary = _rotary_module(config)
        heads = config.num_attention_heads
        return DecoderSpec(
            family=cls.model_type, num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size, num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab_size=config.vocab_size, intermediate_size=config.intermediate_size,
            rms_eps=float(config.rms_norm_eps), hidden_act=cls.hidden_activation(config),
            tie_word_embeddings=bool(config.tie_word_embeddings),
            inv_freq=rotary.inv_freq.detach().float().cpu().numpy().astype(np.float32),
            rope_scaling=float(getattr(rotary, "attention_scaling", 1.0)),
            sliding_windows=cls.sliding_windows(config), norm_offset=cls.norm_offset,
            embed_scale=float(config.hidden_size ** 0.5) if cls.scaled_embedding else None,
            stored_fused=cls.stored_fused,
            max_position_embeddings=int(config.max_position_embeddings))

    # -- tiny test models ---------------------------------------------------------------------------

    @classmethod
    def tiny_config(cls):
        import transformers

        config_class = getattr(transformers, cls.config_class)
        return config_class(**TINY_COMMON, **cls.tiny_config_overrides)


class Llama(ModelFamily):
    model_type = "llama"
    config_class = "LlamaConfig"
    tiny_config_overrides = dict(tie_word_embeddings=True)


class Mistral(ModelFamily):
    model_type = "mistral"
    config_class = "MistralConfig"
    windows = "all"
    tiny_config_overrides = dict(sliding_window=None, tie_word_embeddings=False)


class Qwen2(ModelFamily):
    model_type = "qwen2"
    config_class = "Qwen2Config"
    windows = "layer_types"
    tiny_config_overrides = dict(tie_word_embeddings=True)


class Phi3(ModelFamily):
    model_type = "phi3"
    config_class = "Phi3Config"
    stored_fused = True
    windows = "all"
    tiny_config_overrides = dict(pad_token_id=0, tie_word_embeddings=False)


class Gemma(ModelFamily):
    model_type = "gemma"
    config_class = "GemmaConfig"
    norm_offset = True
    scaled_embedding = True
    default_activation = "gelu_pytorch_tanh"
    tiny_config_overrides = dict(head_dim=16, tie_word_embeddings=True)


def family_names() -> tuple[str, ...]:
    return tuple(FAMILIES)


def get_family(model_type: str | None) -> type[ModelFamily]:
    """The registered family of `model_type`, or an error that lists the supported ones."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"architecture model_type={model_type!r} is not supported; supported: "
            f"{', '.join(FAMILIES)}") from None


def decoder_spec(config) -> DecoderSpec:
    """The runtime-neutral description of the model of `config`."""
    return get_family(config.model_type).decoder_spec(config)


def _rotary_module(config):
    model_type = config.model_type
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    classes = [getattr(module, n) for n in sorted(dir(module)) if n.endswith("RotaryEmbedding")
               and not n.startswith("_")]
    if not classes:
        raise UnsupportedModelError(f"transformers has no rotary embedding class for "
                                    f"{model_type!r}")
    return classes[0](config=config)
