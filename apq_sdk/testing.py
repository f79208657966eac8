"""Tiny random-init models of every supported family, for tests and examples (no downloads).

`make_tiny_model(dir, family)` writes a Hugging Face directory (config.json, model.safetensors and a
byte-level BPE tokenizer trained on the built-in calibration text) that `apq-sdk` loads like any
other local model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .families import family_names, get_family

FAMILIES = family_names()


def _config(family: str):
    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {FAMILIES}, found {family!r}")
    return get_family(family).tiny_config()


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


def make_tiny_model(out_dir, family: str = "llama", seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = _config(family)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger-than-init weights so quantization error is visible
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.08)
    model.save_pretrained(out_dir, safe_serialization=True)
    make_tokenizer(config.vocab_size).save_pretrained(out_dir)
    return out_dir
