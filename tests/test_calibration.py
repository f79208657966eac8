"""Calibration sources, JSONL parsing and deterministic sampling."""

from __future__ import annotations

import logging

import pytest
import torch

from apq_sdk import calibration
from apq_sdk.errors import CalibrationError


def test_sampling_is_deterministic_and_seeded():
    ids = torch.arange(10_000)
    a = calibration.sample_sequences(ids, 8, 64, seed=3)
    b = calibration.sample_sequences(ids, 8, 64, seed=3)
    c = calibration.sample_sequences(ids, 8, 64, seed=4)
    assert a.shape == (8, 64) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 63, dtype=torch.long))


def test_text_shorter_than_a_sequence():
    with pytest.raises(CalibrationError, match="fewer than one sequence of 64"):
        calibration.sample_sequences(torch.arange(10), 2, 64, seed=0)


def test_jsonl_strings_and_objects(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('"first"\n{"text": "second"}\n\n')
    assert calibration.read_text_file(path) == "first\n\nsecond"


def test_jsonl_bad_line_names_line_number(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "ok"}\n{"body": 1}\n')
    with pytest.raises(CalibrationError, match=r"c.jsonl:2: expected a string or an object"):
        calibration.read_text_file(path)
    path.write_text("{not json\n")
    with pytest.raises(CalibrationError, match=r"c.jsonl:1: not valid JSON"):
        calibration.read_text_file(path)


def test_builtin_fallback_warns_and_is_recorded(tmp_path, monkeypatch, caplog, tiny_llama):
    from transformers import AutoTokenizer

    monkeypatch.setenv("APQ_DATA", str(tmp_path))  # a data folder without the validation split
    monkeypatch.setattr(calibration, "_warned_builtin", [])  # as in a new process
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    with caplog.at_level(logging.WARNING, logger="apq_sdk"):
        ids, info = calibration.load_calibration(tok, num_samples=4, seq_len=32, seed=0)
        calibration.load_calibration(tok, num_samples=2, seq_len=32, seed=1)  # the fit samples
    assert info.kind == "builtin" and info.source == "builtin:calibration-text.txt"
    assert caplog.text.count("should match the deployment domain") == 1  # once, not per load
    assert ids.shape == (4, 32) and len(info.sha256) == 64


def test_explicit_file_wins(tmp_path, tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    path = tmp_path / "domain.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    ids, info = calibration.load_calibration(tok, path, num_samples=2, seq_len=16, seed=0)
    assert info.kind == "file" and info.source == str(path)


def test_bad_data_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("APQ_DATA", str(tmp_path / "missing"))
    with pytest.raises(CalibrationError, match="is not a directory"):
        calibration.data_dir()
