"""Tiny random-init models of every supported family, for tests and examples (no downloads).

`make_tiny_model(dir, family)` writes a Hugging Face directory (config.json, model.safetensors and a
byte-level BPE tokenizer trained on the built-in calibration text) that `apq-sdk` loads like any
other local model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import torch

from .families import family_names, get_family

FAMILIES = family_names()
#: tiny models of the RoPE and window variants a family can have, beside each family's own
VARIANTS = {
    # Llama 3.2: llama3 RoPE scaling (frequencies rescaled by band)
    "llama3-rope": ("llama", dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    # Phi-4-mini: partial rotary (3/4 of each head) and longrope, whose short factors hold up to
    # original_max_position_embeddings (packages are limited to that context)
    "phi3-longrope": ("phi3", dict(partial_rotary_factor=0.75, original_max_position_embeddings=128,
                                   vocab_size=384,
                                   rope_parameters={
        "rope_type": "longrope", "rope_theta": 10_000.0, "original_max_position_embeddings": 128,
        "short_factor": [1.0 + 0.1 * i for i in range(6)],
        "long_factor": [2.0 + 0.5 * i for i in range(6)]})),
    # a sliding window shorter than the test sequences, on every layer
    "mistral-window": ("mistral", dict(sliding_window=8)),
}
TINY_MODELS = FAMILIES + tuple(VARIANTS)
#: tiny models whose tokenizer is not their family's (Phi-4-mini's is byte-level, Phi-3's not)
VARIANT_TOKENIZERS = {"phi3-longrope": "bytelevel"}
#: causal LMs of transformers that the registry does not describe: the core runs them with
#: allow_unknown (--allow-unknown-arch), targets refuse them
UNREGISTERED = {
    # q/k norms over the whole projection, norms after attention and the MLP only
    "olmo2": "Olmo2Config",
    # embedding, residual, attention and logit multipliers
    "granite": dict(config_class="GraniteConfig", embedding_multiplier=4.0,
                    residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=2.0),
}


def _config(name: str):
    if name in VARIANTS:
        family, overrides = VARIANTS[name]
        config = get_family(family).tiny_config()
        for key, value in overrides.items():
            setattr(config, key, value)
        if "rope_parameters" in overrides and hasattr(config, "standardize_rope_params"):
            config.standardize_rope_params()
        return config
    if name in UNREGISTERED:
        import transformers

        from .families import TINY_COMMON

        spec = UNREGISTERED[name]
        spec = dict(spec) if isinstance(spec, dict) else {"config_class": spec}
        config_class = getattr(transformers, spec.pop("config_class"))
        return config_class(**TINY_COMMON, tie_word_embeddings=True, **spec)
    if name not in FAMILIES:
        raise ValueError(f"tiny model: expected one of {TINY_MODELS + tuple(UNREGISTERED)}, "
                         f"found {name!r}")
    return get_family(name).tiny_config()


def make_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .calibration import builtin_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([builtin_text()[:200_000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def make_sentencepiece_tokenizer(vocab_size: int, style: str = "gemma"):
    """A SentencePiece-style BPE tokenizer (spaces as U+2581, byte fallback to <0xXX> tokens),
    laid out as Gemma's (`style="gemma"`: <pad> <eos> <bos> <unk>, a Replace normalizer) or
    Llama 2's (`"llama"`: <unk> <s> </s>, a Metaspace pre-tokenizer that prepends U+2581 to the
    first piece and a decoder that strips the space it becomes). The alphabet is limited, so
    that byte fallback is exercised."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, \
        trainers
    from transformers import PreTrainedTokenizerFast

    from .calibration import builtin_text

    if style == "gemma":
        specials, bos, eos, unk, pad = ["<pad>", "<eos>", "<bos>", "<unk>"], "<bos>", "<eos>", \
            "<unk>", "<pad>"
    elif style == "llama":
        specials, bos, eos, unk, pad = ["<unk>", "<s>", "</s>"], "<s>", "</s>", "<unk>", None
    else:
        raise ValueError(f"style: expected 'gemma' or 'llama', found {style!r}")
    base = Tokenizer(models.BPE(unk_token=unk))
    base.normalizer = normalizers.Replace(" ", "\u2581")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=specials,
                                  limit_alphabet=70)
    base.train_from_iterator([builtin_text()[:200_000]], trainer)
    trained = json.loads(base.to_str())["model"]
    vocab = {t: i for i, t in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for token, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                               byte_fallback=True))
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if style == "gemma":
        tok.normalizer = normalizers.Replace(" ", "\u2581")
        tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first",
                                                     split=False)
        steps.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(steps)
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                       special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                   unk_token=unk, pad_token=pad)


def make_tiny_model(out_dir, family: str = "llama", seed: int = 0,
                    overrides: dict | None = None) -> Path:
    """A tiny random model of a family (or of VARIANTS or UNREGISTERED) saved as a HF directory.

    Every weight is random, norms and biases too, so that a norm read under the wrong name or
    applied the wrong way changes the logits."""
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = _config(family)
    for key, value in (overrides or {}).items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger-than-init weights so quantization error is visible
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.08)
            else:  # norm weights (1 + w for Gemma's) and biases
                param.add_(torch.randn_like(param), alpha=0.1)
    model.save_pretrained(out_dir, safe_serialization=True)
    tiny_tokenizer(family, config.vocab_size).save_pretrained(out_dir)
    return out_dir


def tiny_tokenizer(name: str, vocab_size: int):
    """The tokenizer of a tiny model: its family's kind (ModelFamily.tiny_tokenizer)."""
    base = VARIANTS[name][0] if name in VARIANTS else name
    style = VARIANT_TOKENIZERS.get(name) or (get_family(base).tiny_tokenizer if base in FAMILIES
                                             else "bytelevel")
    if style == "bytelevel":
        return make_tokenizer(vocab_size)
    return make_sentencepiece_tokenizer(vocab_size, style)


#: model_type -> the GGUF architecture llama.cpp writes it as (those transformers reads back)
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
                      "phi3": "phi3", "gemma2": "gemma2", "gemma3_text": "gemma3"}


def write_tiny_gguf(model_dir, path) -> Path:
    """Write a tiny model directory (make_tiny_model) as a float32 GGUF file the way llama.cpp's
    converter writes its architecture: tensor names from gguf-py's map, q/k rows permuted for
    llama, Gemma's norms stored as 1 + w, the hyperparameters llama.cpp records (head size, RoPE
    dimensions and scaling, windows, soft-caps), and the tokenizer as a GPT-2 style BPE."""
    import gguf
    from safetensors.numpy import load_file
    from transformers import AutoConfig

    from .families import decoder_spec

    model_dir, path = Path(model_dir), Path(path)
    config = AutoConfig.from_pretrained(model_dir)
    spec = decoder_spec(config)
    arch = GGUF_ARCHITECTURES[config.model_type]
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny {config.model_type}")  # transformers reads "llama" + "mistral" as mistral
    writer.add_block_count(spec.num_layers)
    writer.add_context_length(spec.max_position_embeddings)
    writer.add_embedding_length(spec.hidden_size)
    writer.add_feed_forward_length(spec.intermediate_size)
    writer.add_head_count(spec.num_heads)
    writer.add_head_count_kv(spec.num_kv_heads)
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    writer.add_layer_norm_rms_eps(spec.rms_eps)
    writer.add_vocab_size(spec.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    rope = dict(config.rope_parameters or {})
    per_type = isinstance(rope.get("full_attention"), dict)
    full = rope["full_attention"] if per_type else rope
    writer.add_rope_freq_base(float(full["rope_theta"]))
    table = next(t for t in spec.rope_tables.values())
    writer.add_rope_dimension_count(table.rotary_dim)
    if per_type and "sliding_attention" in rope:
        writer.add_rope_freq_base_swa(float(rope["sliding_attention"]["rope_theta"]))
    if full.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(full["factor"]))
    extra: dict[str, np.ndarray] = {}
    if full.get("rope_type") == "llama3":  # llama.cpp stores the per-frequency divisors
        base = 1.0 / (full["rope_theta"] ** (np.arange(0, spec.head_dim, 2) / spec.head_dim))
        extra["rope_freqs.weight"] = (base / spec.rope_tables["default"].inv_freq).astype(np.float32)
    if full.get("rope_type") == "longrope":
        extra["rope_factors_long.weight"] = np.asarray(full["long_factor"], dtype=np.float32)
        extra["rope_factors_short.weight"] = np.asarray(full["short_factor"], dtype=np.float32)
        writer.add_rope_scaling_orig_ctx_len(int(full["original_max_position_embeddings"]))
        writer.add_rope_scaling_attn_factors(float(table.scaling))
    windows = [w for w in spec.sliding_windows if w is not None]
    if windows:
        writer.add_sliding_window(windows[0])
        if arch == "gemma3":
            writer.add_sliding_window_pattern([w is not None for w in spec.sliding_windows])
    if spec.attn_softcap is not None:
        writer.add_attn_logit_softcapping(spec.attn_softcap)
    if spec.final_softcap is not None:
        writer.add_final_logit_softcapping(spec.final_softcap)

    tok = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    vocab = tok["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    special = {t["content"] for t in tok.get("added_tokens", []) if t.get("special")}
    spm = bool(tok["model"].get("byte_fallback"))

    def token_type(token: str) -> int:
        if token == tok_config.get("unk_token"):
            return gguf.TokenType.UNKNOWN
        if token in special:
            return gguf.TokenType.CONTROL
        if spm and len(token) == 6 and token.startswith("<0x"):
            return gguf.TokenType.BYTE
        return gguf.TokenType.NORMAL

    # SentencePiece-style vocabularies as llama.cpp writes them ("llama", scores by position)
    writer.add_tokenizer_model("llama" if spm else "gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([token_type(t) for t in tokens])
    if spm:
        writer.add_token_scores([-float(i) for i in range(len(tokens))])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m
                             for m in tok["model"]["merges"]])
    for name, add in (("unk_token", writer.add_unk_token_id), ("bos_token", writer.add_bos_token_id),
                      ("eos_token", writer.add_eos_token_id)):
        if tok_config.get(name) in vocab:
            add(vocab[tok_config[name]])
    pad = getattr(config, "pad_token_id", None)
    writer.add_pad_token_id(pad if isinstance(pad, int) and 0 <= pad < len(tokens) else
                            vocab[tok_config["eos_token"]])

    names = gguf.get_tensor_name_map(arch_enum, spec.num_layers)
    for name, array in sorted(load_file(model_dir / "model.safetensors").items()):
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ValueError(f"no GGUF name for {name} in {arch}")
        array = array.astype(np.float32)
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = spec.num_heads if name.endswith("q_proj.weight") else spec.num_kv_heads
            array = array.reshape(heads, 2, array.shape[0] // heads // 2, *array.shape[1:]) \
                .swapaxes(1, 2).reshape(array.shape)
        if spec.norm_offset and name.endswith("norm.weight"):
            array = array + 1.0
        writer.add_tensor(target, np.ascontiguousarray(array))
    for name, array in extra.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
