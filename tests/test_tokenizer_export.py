"""apq_sdk.tokenizer_export: Hugging Face byte-level BPE tokenizers to the plain-text files the
C++ runner reads (the C++ side is tested against transformers in tests/templates)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from apq_sdk.tokenizer_export import TOKENIZER_FILES, TokenizerExportError, export_tokenizer


@pytest.fixture(scope="module")
def tiny_tokenizer_json(tmp_path_factory):
    from apq_sdk.testing import make_tokenizer

    out = tmp_path_factory.mktemp("tok")
    make_tokenizer(384).save_pretrained(out)
    return out / "tokenizer.json"


def test_export_tokenizer_files_and_determinism(tiny_tokenizer_json, tmp_path):
    a = export_tokenizer(tiny_tokenizer_json, tmp_path / "a")
    b = export_tokenizer(tiny_tokenizer_json, tmp_path / "b")
    assert [p.name for p in a] == list(TOKENIZER_FILES)
    for x, y in zip(a, b):
        assert x.read_bytes() == y.read_bytes()
    vocab = (tmp_path / "a/vocab.txt").read_text().splitlines()
    assert vocab[0] == "apq-vocab 1 384" and len(vocab) == 385
    spec = json.loads(tiny_tokenizer_json.read_text())
    space_id = spec["model"]["vocab"]["Ġ"]
    assert vocab[1 + space_id] == "x20"  # the byte-level 'Ġ' is the space byte
    config = (tmp_path / "a/tokenizer.txt").read_text()
    assert "pretokenize regex:gpt2\n" in config and "eos_id 2\n" in config


def _mutated(tokenizer_json: Path, tmp_path: Path, change) -> Path:
    spec = json.loads(tokenizer_json.read_text())
    change(spec)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.mark.parametrize("change, message", [
    (lambda s: s["model"].update(type="WordPiece"), "not BPE"),
    (lambda s: s["model"].update(type="Unigram"), "not BPE"),
    (lambda s: s.update(normalizer={"type": "NFKC"}), "normalizer 'NFKC' is not supported"),
    (lambda s: s.update(pre_tokenizer={"type": "Metaspace", "replacement": "▁"}), "Metaspace"),
    (lambda s: s.update(decoder={"type": "Metaspace"}), "not ByteLevel"),
    (lambda s: s.update(pre_tokenizer={"type": "Split", "pattern": {"Regex": "\\w+"},
                                       "behavior": "Isolated", "invert": False}), "Split"),
    (lambda s: s["model"].update(byte_fallback=True), "byte_fallback"),
    (lambda s: s["model"].update(continuing_subword_prefix="##"), "continuing_subword_prefix"),
    (lambda s: s.update(post_processor={"type": "BertProcessing"}), "BertProcessing"),
])
def test_export_tokenizer_refuses_what_it_cannot_reproduce(tiny_tokenizer_json, tmp_path, change,
                                                           message):
    path = _mutated(tiny_tokenizer_json, tmp_path, change)
    with pytest.raises(TokenizerExportError, match=message):
        export_tokenizer(path, tmp_path / "out")


def test_export_tokenizer_refuses_sentencepiece_style_vocab(tiny_tokenizer_json, tmp_path):
    def to_spm(spec):
        spec["model"]["vocab"] = {f"▁tok{i}": i for i in range(300)}
        spec["model"]["merges"] = []
    path = _mutated(tiny_tokenizer_json, tmp_path, to_spm)
    with pytest.raises(TokenizerExportError, match="ByteLevel alphabet"):
        export_tokenizer(path, tmp_path / "out")


def test_export_tokenizer_unreadable_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerExportError, match="cannot read"):
        export_tokenizer(tmp_path / "tokenizer.json", tmp_path / "out")
