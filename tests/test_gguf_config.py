"""GGUF files of every family transformers reads load as the model they were written from.

transformers' GGUF reader drops config fields that change the numbers (apq_sdk/gguf_config.py);
each tiny model is written as llama.cpp's converter writes its architecture
(apq_sdk.testing.write_tiny_gguf), loaded back through apq-sdk, and compared with the Hugging
Face directory it came from: same logits, same runtime description. transformers alone loads a
different model (or none) for the families and variants listed in DROPPED.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch

from apq_sdk.families import decoder_spec
from apq_sdk.gguf_config import GGUFConfigError
from apq_sdk.model_io import load_model
from apq_sdk.testing import GGUF_ARCHITECTURES, TINY_MODELS, VARIANTS, make_tiny_model, write_tiny_gguf

pytest.importorskip("gguf")

# the tiny models whose family llama.cpp writes and transformers reads, but for a window on a
# llama-architecture file (refused below)
CASES = [n for n in TINY_MODELS if VARIANTS.get(n, (n,))[0] in GGUF_ARCHITECTURES
         and n != "mistral-window"]
# a GGUF file cannot say what llama.cpp derives: Gemma's score scale follows the head size
OVERRIDES = {"gemma2": {"query_pre_attn_scalar": 16}}
# where transformers' own reader loads another model (or fails): what gguf_config restores
DROPPED = {"qwen3", "gemma2", "gemma3_text", "llama3-rope", "phi3-longrope"}

pytestmark = pytest.mark.usefixtures("module_cache")


def _pair(tmp_path, name):
    model_dir = make_tiny_model(tmp_path / name, name, overrides=OVERRIDES.get(name))
    return model_dir, write_tiny_gguf(model_dir, tmp_path / f"{name}.gguf")


def _spec_fields(config) -> dict:
    spec = dataclasses.asdict(decoder_spec(config))
    tables = spec.pop("rope_tables")
    spec["rope_tables"] = {k: (v["inv_freq"].tolist(), round(v["scaling"], 6)) for k, v in tables.items()}
    return spec


@pytest.mark.parametrize("name", CASES)
def test_a_gguf_loads_as_the_model_it_was_written_from(name, tmp_path):
    model_dir, gguf_path = _pair(tmp_path, name)
    ref, _, ref_info = load_model(model_dir)
    got, tok, info = load_model(gguf_path)
    assert info.model_type in (ref_info.model_type, "llama")  # mistral files are llama's
    ids = torch.randint(3, 380, (1, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # past the windows (8) and, for longrope, its original context (128)
        torch.testing.assert_close(got(input_ids=ids).logits, ref(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
    want, have = _spec_fields(ref.config), _spec_fields(got.config)
    for key in ("family", "max_position_embeddings"):  # llama for mistral; the writer's default
        want.pop(key), have.pop(key)
    for table, (inv_freq, scaling) in want["rope_tables"].items():
        np.testing.assert_allclose(have["rope_tables"][table][0], inv_freq, rtol=1e-6)
        assert have["rope_tables"][table][1] == pytest.approx(scaling, rel=1e-6)
    want.pop("rope_tables"), have.pop("rope_tables")
    assert have.pop("rms_eps") == pytest.approx(want.pop("rms_eps"), rel=1e-6)  # float32 in GGUF
    assert have == want


@pytest.mark.parametrize("name", sorted(DROPPED))
def test_transformers_alone_loads_another_model(name, tmp_path):
    """What makes the test above fail if gguf_config stopped restoring a field."""
    from transformers import AutoModelForCausalLM

    model_dir, gguf_path = _pair(tmp_path, name)
    ref = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.randint(3, 380, (1, 100), generator=torch.Generator().manual_seed(0))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception:  # noqa: BLE001 - the head size it drops makes the shapes disagree
        return
    with torch.no_grad():
        diff = (raw(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max()
    assert diff > 1e-3


def test_a_window_on_a_llama_file_is_refused(tmp_path):
    model_dir, gguf_path = _pair(tmp_path, "mistral-window")
    with pytest.raises(GGUFConfigError, match="sliding window of 8 tokens.*Hugging Face directory"):
        load_model(gguf_path)


def test_unmatched_llama3_divisors_are_refused(tmp_path):
    import gguf

    model_dir, gguf_path = _pair(tmp_path, "llama3-rope")
    reader = gguf.GGUFReader(str(gguf_path), "r+")  # scale the stored divisors in place
    freqs = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    freqs.data[:] = np.linspace(1.0, 3.3, freqs.data.size, dtype=np.float32)
    reader.data.flush()
    with pytest.raises(GGUFConfigError, match="rope_freqs.*match no llama3 scaling"):
        load_model(gguf_path)


@pytest.mark.parametrize("name", ["qwen3", "gemma3_text", "phi3"])
def test_a_package_builds_from_a_gguf(name, tmp_path):
    """`apq-sdk build --target arm64-linux --model <a GGUF file>` (the issue's case was a Gemma 3
    GGUF) for families whose file transformers reads with fields left out, with byte-level and
    SentencePiece-style tokenizers (which the package's C++ runner reproduces)."""
    from apq_sdk.builder import BuildRequest, build
    from apq_sdk.calibration import builtin_text

    _, gguf_path = _pair(tmp_path, name)
    calib = tmp_path / "calib.txt"
    calib.write_text(builtin_text()[:60_000])
    package = build(BuildRequest(target="arm64-linux", model=str(gguf_path), output=tmp_path / "out",
                                 calib=str(calib), memory_reduction=0.55, samples=8, seq_len=48,
                                 verify_windows=1), log=lambda _: None)
    result = json.loads((package / "verify.json").read_text())
    assert result["passed"], result["failures"]
    assert json.loads((package / "manifest.json").read_text())["model"]["model_type"] == name
