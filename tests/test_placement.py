"""Device maps through accelerate: the hooked model gives the same results as the plain one.

This machine has no GPU, so the maps here place every block on the CPU, one map entry per block:
accelerate still attaches its hooks to every block, the embedding and the head, so the block-wise
stages (input capture, Hessian hooks, weight replacement, the head) run exactly as they would
across GPUs, where only the devices differ. The refusals are checked without any GPU.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from apq_sdk.calibration import load_calibration
from apq_sdk.cli import main
from apq_sdk.errors import UsageError
from apq_sdk.model_io import load_model
from apq_sdk.placement import parse_max_memory, resolve_device_map
from apq_sdk.planning import Budget, make_plan
from apq_sdk.sensitivity import ProfileSettings, profile_model
from apq_sdk.quantizer import load_quantized, quantize_model, save_quantized
from apq_sdk.testing import FAMILIES


def _per_block_map(model, info) -> dict:
    """One entry per decoder block, the embedding, the final norm and the head: all on the CPU."""
    base_path, layers_name = info.layers_path.rsplit(".", 1)
    base = model.get_submodule(base_path)
    names = [f"{base_path}.{n}" for n, _ in base.named_children() if n != layers_name]
    names += [f"{info.layers_path}.{i}" for i in range(info.num_layers)]
    names += [n for n, _ in model.named_children() if n != base_path]
    return {name: "cpu" for name in names}


def _run(path, device_map, out_dir):
    model, tok, info = load_model(path, device_map=device_map)
    ids, calib = load_calibration(tok, num_samples=8, seq_len=32, seed=0)
    fit, _ = load_calibration(tok, num_samples=2, seq_len=32, seed=1)
    sens = profile_model(model, info, ids, calib, ProfileSettings(batch_size=4), fit_samples=fit)
    plan = make_plan(sens, Budget(bits_per_weight=4.0, scope="linear"), head_bits="8")
    quantize_model(model, info, plan, ids)
    save_quantized(model, tok, plan, out_dir)
    return model, sens, ids


@pytest.mark.parametrize("family", FAMILIES)
def test_hooked_per_block_map_gives_the_same_plan_and_weights(family, tiny_model_factory, tmp_path):
    path = tiny_model_factory(family)
    plain_model, plain_sens, ids = _run(path, None, tmp_path / "plain")
    probe, _, info = load_model(path)
    device_map = _per_block_map(probe, info)
    map_file = tmp_path / "map.json"
    map_file.write_text(json.dumps(device_map))
    hooked_model, hooked_sens, _ = _run(path, str(map_file), tmp_path / "hooked")
    layers = hooked_model.get_submodule(info.layers_path)
    assert all(hasattr(block, "_hf_hook") for block in layers)  # accelerate's hooks were there
    assert hasattr(hooked_model.get_output_embeddings(), "_hf_hook")  # kept on the new head
    assert hooked_sens.to_dict() == plain_sens.to_dict()
    plain_bytes = (tmp_path / "plain" / "model.safetensors").read_bytes()
    assert (tmp_path / "hooked" / "model.safetensors").read_bytes() == plain_bytes
    loaded = load_quantized(tmp_path / "hooked", device_map=str(map_file))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids[:2]).logits,
                                   plain_model(input_ids=ids[:2]).logits, rtol=0, atol=0)


def test_auto_map_on_a_cpu_only_machine_runs_the_cli(tiny_llama, tmp_path):
    result = CliRunner().invoke(main, ["profile", "-m", str(tiny_llama), "-n", "4", "-L", "16",
                                       "--device-map", "auto", "-o", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["profile", "-m", str(tiny_llama), "--device", "cpu",
                                       "--device-map", "auto", "-o", str(tmp_path / "s.json")])
    assert result.exit_code == 2 and "either --device or --device-map" in result.output


def test_max_memory_parsing():
    assert parse_max_memory("0=20GiB, 1=18.5GB,cpu=64GiB") == {0: "20GiB", 1: "18.5GB",
                                                              "cpu": "64GiB"}
    assert parse_max_memory(None) is None
    with pytest.raises(UsageError, match="DEVICE=AMOUNT"):
        parse_max_memory("0:20GiB")


@pytest.mark.parametrize("device_map,message", [
    ({"model.nope": "cpu"}, "is not a module of"),
    ({"model.embed_tokens": "cpu"}, "places no module holding"),
    ({"": "disk"}, "offloading"),
    ({"model": 0, "lm_head": "cpu"}, "mixes GPUs"),
    ({"": "cuda:7"}, "CUDA device"),
])
def test_impossible_maps_are_refused(tiny_llama, tmp_path, device_map, message):
    model, _, _ = load_model(tiny_llama)
    path = tmp_path / "map.json"
    path.write_text(json.dumps(device_map))
    with pytest.raises(UsageError, match=message):
        resolve_device_map(model, str(path))
    with pytest.raises(UsageError, match="expected one of auto"):
        resolve_device_map(model, str(tmp_path / "missing.json"))
