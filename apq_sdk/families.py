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
class RopeTable:
    """One rotary embedding: cos/sin of position * inv_freq (over the first 2 * len(inv_freq)
    dimensions of a head: partial rotary when that is less than head_dim), times `scaling`."""

    inv_freq: np.ndarray  # [rotary_dim / 2] float32
    scaling: float = 1.0

    @property
    def rotary_dim(self) -> int:
        return 2 * int(self.inv_freq.shape[0])


@dataclass
class DecoderSpec:
    """What a runtime needs to know to run one decoder-only model, independent of the runtime.

    Per layer: its rotary table (`layer_rope`, a key of `rope_tables`, or None for a layer
    without RoPE) and its sliding window (None: global attention)."""

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
    rope_tables: dict[str, RopeTable] = field(default_factory=dict)
    layer_rope: list[str | None] = field(default_factory=list)
    sliding_windows: list[int | None] = field(default_factory=list)
    norm_offset: bool = False  # gemma: every RMSNorm weight applied as (1 + w)
    embed_scale: float | None = None  # gemma: embeddings times sqrt(hidden)
    stored_fused: bool = False  # qkv_proj / gate_up_proj are single layers (phi3)
    qk_norm: bool = False  # RMSNorm of every query and key head before RoPE (qwen3, gemma3)
    sandwich_norms: bool = False  # gemma2/3: norms after attention and around the MLP too
    attn_scale: float = 0.0  # scores multiplier (head_dim ** -0.5 unless the family says)
    attn_softcap: float | None = None  # gemma2: scores -> tanh(scores / c) * c
    final_softcap: float | None = None  # gemma2: logits -> tanh(logits / c) * c
    max_position_embeddings: int = 2048
    max_context: int = 2048  # the longest sequence a package may run (a static RoPE's limit)

    def linear_names(self, layer: int) -> dict[str, str]:
        return get_family(self.family).linear_names(layer)

    def norm_names(self, layer: int) -> dict[str, str]:
        return get_family(self.family).norm_names(layer)

    @property
    def embedding_name(self) -> str:
        return get_family(self.family).embedding_name

    @property
    def final_norm_name(self) -> str:
        return get_family(self.family).final_norm_name


class ModelFamily:
    """One decoder family. Subclasses register themselves by `model_type`."""

    model_type: ClassVar[str]
    config_class: ClassVar[str]  # the transformers config class of tiny test models
    stored_fused: ClassVar[bool] = False  # q/k/v and gate/up stored as one linear each
    norm_offset: ClassVar[bool] = False  # RMSNorm weight applied as (1 + w)
    scaled_embedding: ClassVar[bool] = False  # embeddings times sqrt(hidden_size)
    default_activation: ClassVar[str | None] = None  # when the config names none (or "gelu")
    windows: ClassVar[str] = "none"  # "none", "all" (every layer) or "layer_types"
    qk_norm: ClassVar[bool] = False  # RMSNorm per query and key head (q_norm, k_norm)
    sandwich_norms: ClassVar[bool] = False  # post-attention and pre/post-feedforward norms
    softcapping: ClassVar[bool] = False  # attention and final logit soft-capping from the config
    embedding_name: ClassVar[str] = "model.embed_tokens"
    final_norm_name: ClassVar[str] = "model.norm"
    tiny_config_overrides: ClassVar[dict] = {}
    # the tokenizer of its tiny test models: "bytelevel" (GPT-2 style) or a SentencePiece-style
    # BPE laid out as "gemma" or "llama" (Llama 2, Phi-3) lay theirs out
    tiny_tokenizer: ClassVar[str] = "bytelevel"
    modeling_module: ClassVar[str | None] = None  # where transformers implements it, if not
    #                                               transformers.models.<type>.modeling_<type>

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not cls.model_type:  # a shared base of several families
            return
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

    @classmethod
    def norm_names(cls, layer: int, prefix: str = "model.layers") -> dict[str, str]:
        """Role -> module name of every RMSNorm of decoder block `layer`: "attn_in" and "mlp_in"
        (before attention and the MLP), with sandwich norms "attn_out" and "mlp_out" (on their
        outputs), with q/k norms "q" and "k" (over each head, before RoPE)."""
        p = f"{prefix}.{layer}"
        if cls.sandwich_norms:
            names = {"attn_in": f"{p}.input_layernorm", "attn_out": f"{p}.post_attention_layernorm",
                     "mlp_in": f"{p}.pre_feedforward_layernorm",
                     "mlp_out": f"{p}.post_feedforward_layernorm"}
        else:
            names = {"attn_in": f"{p}.input_layernorm", "mlp_in": f"{p}.post_attention_layernorm"}
        if cls.qk_norm:
            names.update(q=f"{p}.self_attn.q_norm", k=f"{p}.self_attn.k_norm")
        return names

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
    def rope_tables(cls, config) -> tuple[dict[str, RopeTable], list[str | None], int]:
        """(tables, the table of each layer, the longest sequence the tables hold for).

        Static RoPE variants only: default, linear, llama3, yarn... give one table; longrope
        holds its short factors up to original_max_position_embeddings (packages are limited to
        that context); dynamic NTK scaling changes with the sequence and is refused."""
        rotary = _rotary_module(config, cls.modeling_module)
        layers = config.num_hidden_layers
        limit = int(config.max_position_embeddings)
        params = dict(getattr(config, "rope_parameters", None) or
                      getattr(config, "rope_scaling", None) or {})
        types = getattr(config, "layer_types", None) or ["full_attention"] * layers
        per_type = all(isinstance(params.get(t), dict) for t in set(types))
        names = sorted(set(types)) if per_type else ["default"]
        tables = {}
        for name in names:
            rope = params[name] if per_type else params
            kind = rope.get("rope_type", rope.get("type", "default"))
            if kind == "dynamic":
                raise UnsupportedModelError(
                    "rope_type 'dynamic' changes frequencies with the sequence length; apq-sdk's "
                    "device packages support static RoPE variants only")
            if kind == "longrope":
                original = rope.get("original_max_position_embeddings") or \
                    getattr(config, "original_max_position_embeddings", None)
                if original is None:
                    raise UnsupportedModelError("rope_type 'longrope' without "
                                                "original_max_position_embeddings")
                limit = min(limit, int(original))  # past it the frequencies switch
            prefix = f"{name}_" if per_type else ""
            inv_freq = getattr(rotary, f"{prefix}inv_freq")
            scaling = getattr(rotary, f"{prefix}attention_scaling", 1.0)
            tables[name] = RopeTable(inv_freq.detach().float().cpu().numpy().astype(np.float32),
                                     float(scaling))
        layer_rope = [t if per_type else "default" for t in types]
        return tables, cls.rope_layers(config, layer_rope), limit

    @classmethod
    def rope_layers(cls, config, layer_rope: list[str | None]) -> list[str | None]:
        """The rotary table of each layer; a family with layers without RoPE sets them None."""
        return layer_rope

    @classmethod
    def attention_scale(cls, config, head_dim: int) -> float:
        return head_dim ** -0.5

    @classmethod
    def decoder_spec(cls, config) -> DecoderSpec:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        tables, layer_rope, limit = cls.rope_tables(config)
        return DecoderSpec(
            family=cls.model_type, num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size, num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim, vocab_size=config.vocab_size,
            intermediate_size=config.intermediate_size,
            rms_eps=float(config.rms_norm_eps), hidden_act=cls.hidden_activation(config),
            tie_word_embeddings=bool(config.tie_word_embeddings),
            rope_tables=tables, layer_rope=layer_rope,
            sliding_windows=cls.sliding_windows(config), norm_offset=cls.norm_offset,
            embed_scale=float(config.hidden_size ** 0.5) if cls.scaled_embedding else None,
            stored_fused=cls.stored_fused, qk_norm=cls.qk_norm,
            sandwich_norms=cls.sandwich_norms, attn_scale=cls.attention_scale(config, head_dim),
            attn_softcap=_optional_float(getattr(config, "attn_logit_softcapping", None))
            if cls.softcapping else None,
            final_softcap=_optional_float(getattr(config, "final_logit_softcapping", None))
            if cls.softcapping else None,
            max_position_embeddings=int(config.max_position_embeddings), max_context=limit)

    # -- tiny test models ---------------------------------------------------------------------------

    @classmethod
    def tiny_config(cls):
        import transformers

        config_class = getattr(transformers, cls.config_class)
        return config_class(**{**TINY_COMMON, **cls.tiny_config_overrides})


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
    tiny_tokenizer = "llama"  # Phi-3's is Llama 2's (Phi-4-mini's is byte-level)
    tiny_config_overrides = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, vocab_size=512,
                                 tie_word_embeddings=False)


class Gemma(ModelFamily):
    model_type = "gemma"
    config_class = "GemmaConfig"
    norm_offset = True
    scaled_embedding = True
    default_activation = "gelu_pytorch_tanh"
    tiny_tokenizer = "gemma"
    tiny_config_overrides = dict(head_dim=16, tie_word_embeddings=True, vocab_size=512)


class Qwen3(ModelFamily):
    """Qwen3: RMSNorm on every query and key head before RoPE; optional sliding-window layers."""

    model_type = "qwen3"
    config_class = "Qwen3Config"
    qk_norm = True
    windows = "layer_types"
    tiny_config_overrides = dict(head_dim=24, tie_word_embeddings=True)  # head_dim != hidden/heads


class _GemmaSandwich(ModelFamily):
    """Gemma 2 and 3: (1 + w) norms before and after attention and the MLP, scaled embeddings,
    scores scaled by query_pre_attn_scalar ** -0.5, alternating sliding-window layers."""

    model_type = ""  # not a family itself
    norm_offset = True
    scaled_embedding = True
    sandwich_norms = True
    default_activation = "gelu_pytorch_tanh"
    windows = "layer_types"
    tiny_tokenizer = "gemma"

    @classmethod
    def attention_scale(cls, config, head_dim: int) -> float:
        scalar = getattr(config, "query_pre_attn_scalar", None)
        return float(scalar) ** -0.5 if scalar else head_dim ** -0.5


class Gemma2(_GemmaSandwich):
    model_type = "gemma2"
    config_class = "Gemma2Config"
    softcapping = True
    tiny_config_overrides = dict(head_dim=16, tie_word_embeddings=True, sliding_window=8,
                                 vocab_size=512, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                                 final_logit_softcapping=3.0,
                                 layer_types=["sliding_attention", "full_attention"])


class Gemma3Text(_GemmaSandwich):
    """Gemma 3 (text): q/k norms instead of soft-capping, and a RoPE base of its own for the
    sliding-window layers."""

    model_type = "gemma3_text"
    config_class = "Gemma3TextConfig"
    modeling_module = "transformers.models.gemma3.modeling_gemma3"
    qk_norm = True
    tiny_config_overrides = dict(
        head_dim=16, tie_word_embeddings=True, sliding_window=8, query_pre_attn_scalar=16,
        vocab_size=512,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                         "full_attention": {"rope_type": "linear", "rope_theta": 1_000_000.0,
                                            "factor": 8.0}})


class SmolLM3(ModelFamily):
    """SmolLM3: every fourth layer without RoPE (no_rope_layers[i] == 0)."""

    model_type = "smollm3"
    config_class = "SmolLM3Config"
    windows = "layer_types"
    tiny_config_overrides = dict(tie_word_embeddings=True, no_rope_layers=[1, 0], pad_token_id=0)

    @classmethod
    def rope_layers(cls, config, layer_rope):
        flags = getattr(config, "no_rope_layers", None) or [1] * len(layer_rope)
        return [table if flags[i] else None for i, table in enumerate(layer_rope)]


def _optional_float(value) -> float | None:
    return None if value is None else float(value)


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


def _rotary_module(config, modeling: str | None = None):
    model_type = config.model_type
    module = importlib.import_module(modeling or
                                     f"transformers.models.{model_type}.modeling_{model_type}")
    classes = [getattr(module, n) for n in sorted(dir(module)) if n.endswith("RotaryEmbedding")
               and not n.startswith("_")]
    if not classes:
        raise UnsupportedModelError(f"transformers has no rotary embedding class for "
                                    f"{model_type!r}")
    return classes[0](config=config)
