"""Calibration text: where it comes from and how sequences are sampled from it.

Sources, in order: an explicit `--calib PATH` (text or JSONL), the WikiText-2 validation split in the
data folder (`APQ_DATA`, or `../shared/data` beside the checkout), and a built-in fallback shipped with
apq-sdk: an excerpt of the same validation split (apq_sdk/data/calibration-text.txt). `builtin_text`
(Python's docstrings) trains the tiny test tokenizers. N sequences of L tokens are drawn
at offsets chosen by a seeded generator, so the same text, tokenizer and seed give the same samples.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import CalibrationError

log = logging.getLogger("apq_sdk")

CALIB_FILE = "wikitext2-valid.txt"
#: calibration text when no other is found: 410 kB of the WikiText-2 validation split (natural
#: English prose, CC BY-SA 3.0, apq_sdk/data/README.md); never the test split
BUILTIN_CALIBRATION = Path(__file__).resolve().parent / "data" / "calibration-text.txt"
EVAL_FILE = "wikitext2-test.txt"
BUILTIN_MODULES = (
    "abc", "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email",
    "enum", "fractions", "functools", "gzip", "hashlib", "heapq", "html", "http.client",
    "inspect", "io", "ipaddress", "itertools", "json", "logging", "mailbox", "math", "mimetypes",
    "operator", "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "sched", "shlex",
    "shutil", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "tokenize", "typing", "unittest", "urllib.parse", "uuid",
    "warnings", "wave", "xml.dom.minidom", "zipfile", "zoneinfo",
)


@dataclass(frozen=True)
class CalibrationInfo:
    source: str
    kind: str  # "file" | "data-dir" | "builtin"
    sha256: str
    num_samples: int
    seq_len: int
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)


def data_dir() -> Path | None:
    """The shared data folder: $APQ_DATA, else ../shared/data beside the checkout or cwd."""
    env = os.environ.get("APQ_DATA")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise CalibrationError(f"APQ_DATA={env} is not a directory; point it at a folder "
                                   f"holding {CALIB_FILE} and {EVAL_FILE}, or unset it")
        return path
    checkout = Path(__file__).resolve().parents[1]
    for base in (checkout, Path.cwd()):
        candidate = base.parent / "shared" / "data"
        if (candidate / CALIB_FILE).is_file():
            return candidate
    return None


def eval_text_path() -> Path:
    folder = data_dir()
    if folder is None or not (folder / EVAL_FILE).is_file():
        raise CalibrationError(f"no evaluation text: expected {EVAL_FILE} in $APQ_DATA or "
                               f"../shared/data; pass --text PATH")
    return folder / EVAL_FILE


def read_text_file(path: Path) -> str:
    """Plain text, or JSONL whose lines are strings or objects with a 'text' field."""
    if not path.is_file():
        raise CalibrationError(f"calibration file {path} does not exist")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"{path} is not UTF-8 text ({exc}); pass a .txt or .jsonl file") from exc
    if path.suffix.lower() not in (".jsonl", ".ndjson"):
        return raw
    texts = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{path}:{number}: not valid JSON ({exc.msg}); each line of a "
                                   f"JSONL file must be a JSON string or an object with 'text'") from exc
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, dict) and isinstance(item.get("text"), str):
            texts.append(item["text"])
        else:
            raise CalibrationError(f"{path}:{number}: expected a string or an object with a "
                                   f"'text' string, found {type(item).__name__} "
                                   f"{sorted(item) if isinstance(item, dict) else ''}")
    return "\n\n".join(texts)


def builtin_text() -> str:
    """Docstrings of a fixed list of standard-library modules, in a fixed order."""
    import warnings

    parts = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # typing.io and friends warn when touched
        for module_name in BUILTIN_MODULES:
            parts.extend(_module_docstrings(module_name))
    return "\n\n".join(parts)


def _module_docstrings(module_name: str) -> list[str]:
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return []
    parts = [inspect.getdoc(module) or ""]
    for attr in sorted(vars(module)):
        obj = getattr(module, attr)
        if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        doc = inspect.getdoc(obj)
        if doc and len(doc) > 40:
            parts.append(f"{attr}: {doc}")
    return [p for p in parts if p]


_warned_builtin: list[bool] = []


def resolve_calibration_text(calib: str | os.PathLike | None) -> tuple[str, str, str]:
    """(text, source, kind) by the documented order of sources."""
    if calib is not None:
        path = Path(calib).expanduser()
        return read_text_file(path), str(path), "file"
    folder = data_dir()
    if folder is not None and (folder / CALIB_FILE).is_file():
        return read_text_file(folder / CALIB_FILE), f"data-dir:{CALIB_FILE}", "data-dir"
    if not _warned_builtin:  # once per process, however many samples are drawn from it
        _warned_builtin.append(True)
        log.warning("no calibration text found (no --calib, no $APQ_DATA, no ../shared/data): "
                    "using the built-in excerpt of the WikiText-2 validation split. Calibration "
                    "text should match the deployment domain; pass --calib PATH for real use.")
    return (read_text_file(BUILTIN_CALIBRATION), f"builtin:{BUILTIN_CALIBRATION.name}",
            "builtin")


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def sample_sequences(ids: torch.Tensor, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """`num_samples` windows of `seq_len` tokens at seeded random offsets: [num_samples, seq_len]."""
    if num_samples < 1 or seq_len < 2:
        raise CalibrationError(f"expected num_samples >= 1 and seq_len >= 2, found "
                               f"{num_samples} and {seq_len}")
    if ids.numel() <= seq_len:
        raise CalibrationError(f"calibration text has {ids.numel()} tokens, fewer than one sequence "
                               f"of {seq_len}; give more text or a smaller --seq-len")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (num_samples,), generator=generator)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def check_seq_len(seq_len: int, config) -> None:
    """Calibration sequences must fit the model's context."""
    from .errors import UsageError

    context = getattr(config, "max_position_embeddings", None)
    if context is not None and seq_len > context:
        raise UsageError(f"--seq-len {seq_len} is longer than the model's context of {context} "
                         f"tokens; pass --seq-len {min(512, context)} or less")


def load_calibration(tokenizer, calib=None, *, num_samples: int = 128, seq_len: int = 512,
                     seed: int = 0) -> tuple[torch.Tensor, CalibrationInfo]:
    text, source, kind = resolve_calibration_text(calib)
    if not text.strip():
        raise CalibrationError(f"calibration source {source} is empty")
    ids = tokenize_text(tokenizer, text)
    samples = sample_sequences(ids, num_samples, seq_len, seed)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return samples, CalibrationInfo(source, kind, digest, num_samples, seq_len, seed)


def eval_windows(tokenizer, text_path: Path, seq_len: int = 512,
                 max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of `seq_len` tokens from a text file: [windows, seq_len]."""
    ids = tokenize_text(tokenizer, read_text_file(Path(text_path)))
    count = ids.numel() // seq_len
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise CalibrationError(f"{text_path} has {ids.numel()} tokens: fewer than one window of {seq_len}")
    return ids[: count * seq_len].view(count, seq_len)
