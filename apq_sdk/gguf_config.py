"""What transformers' GGUF reader leaves out of a model's config, put back from the GGUF file.

transformers maps a fixed list of GGUF keys per architecture to config fields and takes every
other field from the config class's defaults. For the families apq-sdk describes, several keys
that change the numbers are not on its list, so a GGUF file loads as a different model than the
one llama.cpp runs from the same file, without a warning:

* the head size (`attention.key_length`: Qwen3 with other than 128, Gemma 2 and 3);
* partial rotary (`rope.dimension_count`: Phi-3 and Phi-4-mini rotate part of each head);
* RoPE scaling: llama3 (`rope_freqs` tensor: Llama 3.1 and 3.2), long-RoPE (`rope_factors_long`
  and `rope_factors_short` tensors, `rope.scaling.original_context_length`: Phi-3.5, Phi-4-mini),
  linear (`rope.scaling.type`/`factor`: Gemma 3's global layers), the sliding layers' own base
  (`rope.freq_base_swa`: Gemma 3);
* soft-capping of attention scores and logits (Gemma 2), the sliding window and which layers use
  it (`attention.sliding_window`, `attention.sliding_window_pattern`);
* the attention score scale of Gemma 2 and 3, which llama.cpp derives from the head size.

`restore_config` reads those keys (after apq_sdk.gguf_check has vouched for the header) and sets
the fields they determine; what it cannot express it refuses, naming the key, rather than let a
different model through. The result is checked by loading: the caller compares nothing else.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .errors import ModelLoadError

# llama.cpp's rule for the score scale of Gemma 2 and 3: 1/sqrt(head size), except the 27B models
# (46 and 62 layers), which scale by 1/sqrt(hidden / heads)
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


class GGUFConfigError(ModelLoadError):
    """A GGUF file whose model transformers' reader would change, in a way apq-sdk cannot undo."""


def restore_config(config, path: Path) -> list[str]:
    """Set the fields of `config` (as transformers read it from the GGUF file at `path`) that the
    file determines and transformers left at defaults. Returns one line per field changed."""
    import gguf

    reader = gguf.GGUFReader(str(path), "r")
    arch = _field(reader, "general.architecture")

    def key(name):
        return _field(reader, f"{arch}.{name}")

    tensors = {t.name: t for t in reader.tensors}
    changes: list[str] = []

    def set_field(name: str, value) -> None:
        old = getattr(config, name, None)
        if old != value:
            setattr(config, name, value)
            changes.append(f"{name}: {old!r} -> {value!r}")

    heads = config.num_attention_heads
    key_length, value_length = key("attention.key_length"), key("attention.value_length")
    if key_length is not None:
        if value_length is not None and value_length != key_length:
            raise GGUFConfigError(f"{path}: keys of {key_length} and values of {value_length} "
                                  f"dimensions per head; transformers' {config.model_type} has one "
                                  f"head size")
        if (getattr(config, "head_dim", None) or config.hidden_size // heads) != key_length:
            set_field("head_dim", int(key_length))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads

    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        value = key(name)
        if value is not None:
            if not hasattr(config, name):
                raise GGUFConfigError(f"{path}: {arch}.{name} = {value}, which transformers' "
                                      f"{config.model_type} does not apply")
            set_field(name, float(value))

    window = key("attention.sliding_window")
    if window is not None:
        if not hasattr(config, "sliding_window"):
            raise GGUFConfigError(f"{path}: a sliding window of {window} tokens "
                                  f"({arch}.attention.sliding_window), which transformers' "
                                  f"{config.model_type} does not apply; load the model's Hugging "
                                  f"Face directory instead")
        set_field("sliding_window", int(window))
    pattern = key("attention.sliding_window_pattern")
    if isinstance(pattern, list) and hasattr(config, "layer_types"):
        if len(pattern) != config.num_hidden_layers:
            raise GGUFConfigError(f"{path}: {arch}.attention.sliding_window_pattern has "
                                  f"{len(pattern)} entries for {config.num_hidden_layers} layers")
        set_field("layer_types", ["sliding_attention" if bool(p) else "full_attention"
                                  for p in pattern])

    if arch in _GEMMA_27B_LAYERS and key_length is not None:
        scalar = (config.hidden_size // heads if config.num_hidden_layers == _GEMMA_27B_LAYERS[arch]
                  else int(key_length))
        set_field("query_pre_attn_scalar", scalar)

    _restore_rope(config, path, arch, key, tensors, head_dim, set_field)
    return changes


def _restore_rope(config, path, arch, key, tensors, head_dim, set_field) -> None:
    params = dict(getattr(config, "rope_parameters", None) or {})
    per_type = isinstance(params.get("full_attention"), dict)
    full = dict(params["full_attention"]) if per_type else dict(params)
    theta = key("rope.freq_base")
    if theta is not None:
        full["rope_theta"] = float(theta)
    rotary = key("rope.dimension_count")
    if rotary is not None and rotary != round(head_dim * full.get("partial_rotary_factor", 1.0)):
        # transformers keeps partial rotary in rope_parameters where the model has it (Phi-3)
        if "partial_rotary_factor" not in full and not hasattr(config, "partial_rotary_factor"):
            raise GGUFConfigError(f"{path}: RoPE over {rotary} of {head_dim} dimensions per head, "
                                  f"which transformers' {config.model_type} cannot express")
        full["partial_rotary_factor"] = rotary / head_dim
    kind = key("rope.scaling.type")
    if kind not in (None, "none"):
        if kind != "linear":  # yarn and others: not in the families apq-sdk describes
            raise GGUFConfigError(f"{path}: RoPE scaling {kind!r} ({arch}.rope.scaling.type) is "
                                  f"not read back by transformers; load the model's Hugging Face "
                                  f"directory instead")
        full.update(rope_type="linear", factor=float(key("rope.scaling.factor") or 1.0))
    if "rope_freqs.weight" in tensors:  # llama3 scaling, stored as one divisor per frequency
        full.update(_llama3_parameters(path, np.asarray(tensors["rope_freqs.weight"].data,
                                                        dtype=np.float64).reshape(-1),
                                       full["rope_theta"], head_dim))
    long_, short = tensors.get("rope_factors_long.weight"), tensors.get("rope_factors_short.weight")
    if long_ is not None or short is not None:
        original = key("rope.scaling.original_context_length")
        if long_ is None or short is None or original is None:
            raise GGUFConfigError(
                f"{path}: long-RoPE needs rope_factors_long, rope_factors_short and "
                f"{arch}.rope.scaling.original_context_length; the file has "
                f"{', '.join(n for n in ('rope_factors_long', 'rope_factors_short') if n + '.weight' in tensors) or 'neither tensor'}"
                f"{'' if original is None else ' and the context length'}")
        full.update(rope_type="longrope",
                    long_factor=[float(v) for v in np.asarray(long_.data).reshape(-1)],
                    short_factor=[float(v) for v in np.asarray(short.data).reshape(-1)],
                    original_max_position_embeddings=int(original))
        attention = key("rope.scaling.attn_factor")
        if attention is not None:
            full["attention_factor"] = float(attention)
        set_field("original_max_position_embeddings", int(original))
    if per_type:
        new = {**params, "full_attention": full}
        base_swa = key("rope.freq_base_swa")
        if base_swa is not None and "sliding_attention" in params:
            new["sliding_attention"] = {**params["sliding_attention"], "rope_theta": float(base_swa)}
    else:
        new = full
    if new != params:
        set_field("rope_parameters", new)
        if hasattr(config, "standardize_rope_params"):
            config.standardize_rope_params()


def _llama3_parameters(path, divisors: np.ndarray, theta: float, head_dim: int) -> dict:
    """The llama3 RoPE parameters whose per-frequency divisors are `divisors` (what llama.cpp's
    converter stores as rope_freqs), found among the values Llama 3.x models use and checked to
    reproduce every divisor."""
    wavelength = 2 * math.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    if divisors.shape != wavelength.shape:
        raise GGUFConfigError(f"{path}: rope_freqs has {divisors.size} values for a head of "
                              f"{head_dim} dimensions (expected {wavelength.size})")
    factor = round(float(divisors.max()), 3)  # stored in float32: 8.000001 for 8
    for original in (2 ** p for p in range(6, 18)):
        for low in (1.0, 2.0, 0.5):
            for high in (4.0, 2.0, 8.0):
                if _llama3_divisors(wavelength, factor, low, high, original) is not None and \
                        np.allclose(_llama3_divisors(wavelength, factor, low, high, original),
                                    divisors, rtol=1e-5, atol=1e-6):
                    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                            "high_freq_factor": high, "original_max_position_embeddings": original}
    raise GGUFConfigError(f"{path}: its rope_freqs (RoPE scaling divisors between "
                          f"{divisors.min():.4g} and {factor:.4g}) match no llama3 scaling; "
                          f"transformers would drop them: load the Hugging Face directory instead")


def _llama3_divisors(wavelength, factor, low, high, original):
    if high <= low:
        return None
    low_wavelength, high_wavelength = original / low, original / high
    smooth = (original / wavelength - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelength < high_wavelength, 1.0,
                    np.where(wavelength > low_wavelength, factor, mid))


def _field(reader, name: str):
    field = reader.fields.get(name)
    if field is None:
        return None
    value = field.contents()
    return value.tolist() if isinstance(value, np.ndarray) else value
