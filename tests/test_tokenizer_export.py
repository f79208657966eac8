"""apq_sdk.tokenizer_export: Hugging Face BPE tokenizers (byte-level and SentencePiece-style) to
the plain-text files the C++ runner reads (the C++ side is tested against the tokenizers library
in tests/templates)."""

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
    # byte fallback makes it SentencePiece-style, which a ByteLevel pre-tokenizer is not
    (lambda s: s["model"].update(byte_fallback=True), "not supported for SentencePiece-style"),
    (lambda s: s["model"].update(continuing_subword_prefix="##"), "continuing_subword_prefix"),
    (lambda s: s.update(post_processor={"type": "BertProcessing"}), "BertProcessing"),
])
def test_export_tokenizer_refuses_what_it_cannot_reproduce(tiny_tokenizer_json, tmp_path, change,
                                                           message):
    path = _mutated(tiny_tokenizer_json, tmp_path, change)
    with pytest.raises(TokenizerExportError, match=message):
        export_tokenizer(path, tmp_path / "out")


def test_export_tokenizer_refuses_a_vocab_outside_the_byte_alphabet(tiny_tokenizer_json,
                                                                    tmp_path):
    def to_other(spec):
        spec["model"]["vocab"] = {f"\u2500tok{i}": i for i in range(300)}
        spec["model"]["merges"] = []
    path = _mutated(tiny_tokenizer_json, tmp_path, to_other)
    with pytest.raises(TokenizerExportError, match="ByteLevel alphabet"):
        export_tokenizer(path, tmp_path / "out")


@pytest.fixture(scope="module")
def gemma_tokenizer_json(tmp_path_factory):
    from apq_sdk.testing import make_sentencepiece_tokenizer

    out = tmp_path_factory.mktemp("spm")
    make_sentencepiece_tokenizer(512, "gemma").save_pretrained(out)
    return out / "tokenizer.json"


def test_export_sentencepiece_style(gemma_tokenizer_json, tmp_path):
    export_tokenizer(gemma_tokenizer_json, tmp_path / "out")
    config = (tmp_path / "out/tokenizer.txt").read_text().splitlines()
    assert {"model spm", "byte_fallback 1", "spm_spaces normalize", "spm_prepend never",
            "spm_split 0", "decode_strip 0", "bos_id 2", "eos_id 1"} <= set(config)
    vocab = (tmp_path / "out/vocab.txt").read_text().splitlines()
    spec = json.loads(gemma_tokenizer_json.read_text())
    ids = spec["model"]["vocab"]
    assert vocab[1 + ids["<0x41>"]] == "x41 x" + b"<0x41>".hex()  # shows its byte
    assert vocab[1 + ids["\u2581"]] == "x20 xe29681"  # U+2581 shows as a space
    assert vocab[1 + ids["<bos>"]].startswith("x" + b"<bos>".hex())


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update(normalizer={"type": "NFKC"}), "normalizer"),
    (lambda s: s.update(normalizer=None, pre_tokenizer=None), "spaces would not become U\\+2581"),
    (lambda s: s.update(pre_tokenizer={"type": "Whitespace"}), "pre_tokenizer"),
    (lambda s: s.update(pre_tokenizer={"type": "Metaspace", "replacement": "\u2581",
                                       "prepend_scheme": "first", "split": False}),
     "pre_tokenizer"),  # Metaspace after a Replace normalizer: not a layout anyone uses
    (lambda s: s["decoder"]["decoders"].pop(1), "decoder"),  # no ByteFallback
    (lambda s: s["decoder"]["decoders"].append({"type": "Strip", "content": "x", "start": 1,
                                                "stop": 0}), "decoder step"),
    (lambda s: s["decoder"]["decoders"].insert(0, {"type": "Fuse"}), "decoder step"),
])
def test_export_sentencepiece_style_refuses_what_it_cannot_reproduce(gemma_tokenizer_json,
                                                                     tmp_path, change, message):
    path = _mutated(gemma_tokenizer_json, tmp_path, change)
    with pytest.raises(TokenizerExportError, match=message):
        export_tokenizer(path, tmp_path / "out")


def test_export_tokenizer_unreadable_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerExportError, match="cannot read"):
        export_tokenizer(tmp_path / "tokenizer.json", tmp_path / "out")
