"""ONNX graph construction for the onnxruntime target: a decoder with a KV cache, built op by op.

The graph is written directly with `onnx.helper` rather than traced: every node, initializer and name
is chosen here, so a build is deterministic (the same quantized directory gives byte-identical
files), the I/O contract is exact, and every quantized linear layer is a `com.microsoft.MatMulNBits`
whose initializers are the core's packed arrays, re-laid out but never re-quantized:

* `B` [N, n_blocks, blob_size] uint8: row n of the core's `qweight` (a little-endian bit stream of K
  codes, docs/formats.md) cut into blocks of `block_size * bits / 8` bytes; the short last block of a
  ragged row is padded with zero bytes. For 2, 4 and 8 bits the bit order is MatMulNBits' own.
* `scales` [N, n_blocks] float32: the float16 scales widened (exact); MatMulNBits wants A's type.
* `zero_points` [N, ceil(n_blocks * bits / 8)] uint8: the core's `qzeros` bytes unchanged (same
  per-row LSB-first packing); absent for symmetric layers, whose zero point 2**(bits-1) is also
  MatMulNBits' default.

Layers the runtime fuses (q/k/v and gate/up) become one MatMulNBits whose initializers are the
members' rows concatenated, when the members share format, activation mode and clip.

16-bit layers keep their float16 weight bytes ([N, K] float16 initializer, Cast + Transpose, folded
by onnxruntime at load). Per-token dynamic int8 activations are explicit ops before the matmul
(ReduceMax(Abs), scale = amax * clip / 127 with 0 -> 1, Div, Round half-to-even, Clip(-127, 127),
Mul): the same float32 arithmetic as `apq_sdk.quant.modules.fake_quantize_activations`.

The decoder families are those of `apq_sdk.model_io.SUPPORTED_MODEL_TYPES`: llama, mistral, qwen2,
phi3 (fused qkv_proj / gate_up_proj, partial rotary) and gemma ((1 + w) norms, scaled embeddings,
tanh GELU). Attention is written out (GQA by grouping query heads per KV head, additive-free masking
with Where, softmax in float32); the mask combines causality, the attention_mask input and a
sliding window where the family has one.

I/O (fixed; runners depend on it):
  inputs   input_ids int64 [1, S], attention_mask int64 [1, P+S], position_ids int64 [1, S],
           past_key_values.{i}.key / .value float32 [1, kv_heads, P, head_dim]
  outputs  logits float32 [1, S, vocab], present.{i}.key / .value float32 [1, kv_heads, P+S, head_dim]
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

OPSET = 21
IR_VERSION = 10
MS_DOMAIN = "com.microsoft"
EXTERNAL_DATA_FILE = "model.onnx.data"
# protobuf refuses messages of 2 GiB; above this many initializer bytes the weights go to
# EXTERNAL_DATA_FILE (a fixed choice per model, so rebuilds stay byte-identical)
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
NBITS_DOC_PREFIX = "apq:modules="
ACT_INT8 = "int8-per-token-dynamic"
ACT_INT8_BLOCK = "int8-per-block-dynamic"
ACT_NONE = "none"
ACTIVATION_LOWERINGS = ("explicit", "accuracy-level-4")
FLOAT32_LOWEST = np.float32(np.finfo(np.float32).min)

FAMILIES = ("llama", "mistral", "qwen2", "phi3", "gemma")


class LoweringError(ValueError):
    """The model or plan cannot be written as this ONNX graph (message says why and what to do)."""


# --------------------------------------------------------------------------------------------------
# weights


@dataclass
class ModuleWeights:
    """One linear layer as the graph consumes it.

    kind "nbits": arrays qweight / scales / (qzeros) exactly as stored by the core;
    kind "float16": arrays weight [N, K] float16 as stored; kind "float32": weight [N, K] float32.
    """

    name: str
    kind: str
    shape: tuple[int, int]  # (N, K)
    arrays: dict[str, np.ndarray]
    bits: int = 16
    group_size: int | None = None
    bias: np.ndarray | None = None
    activation: str = ACT_NONE
    act_clip: float = 1.0

    @property
    def symmetric(self) -> bool:
        return "qzeros" not in self.arrays

    def fuse_key(self) -> tuple:
        return (self.kind, self.bits, self.group_size, self.symmetric, self.activation,
                float(self.act_clip), self.bias is not None, self.shape[1])


def num_blocks(k: int, block_size: int) -> int:
    return -(-k // block_size)


def nbits_b(qweight: np.ndarray, bits: int, block_size: int, k: int) -> np.ndarray:
    """Core qweight [N, K*b/8] -> MatMulNBits B [N, n_blocks, block_size*b/8], last block zero-padded."""
    n, row_bytes = qweight.shape
    if row_bytes * 8 != k * bits:
        raise LoweringError(f"qweight has {row_bytes} bytes per row, expected {k * bits // 8} for "
                            f"K={k} at {bits} bits")
    blocks = num_blocks(k, block_size)
    blob = block_size * bits // 8
    out = np.zeros((n, blocks * blob), dtype=np.uint8)
    out[:, :row_bytes] = qweight
    return out.reshape(n, blocks, blob)


def nbits_initializers(module: ModuleWeights) -> dict[str, np.ndarray]:
    """The MatMulNBits initializers of one quantized module (B, scales, optional zero_points)."""
    n, k = module.shape
    arrays = module.arrays
    out = {"B": nbits_b(arrays["qweight"], module.bits, module.group_size, k),
           "scales": np.ascontiguousarray(arrays["scales"], dtype=np.float16).astype(np.float32)}
    if "qzeros" in arrays:
        out["zero_points"] = np.ascontiguousarray(arrays["qzeros"], dtype=np.uint8)
    return out


def unpack_rows(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """[R, bytes] LSB-first bit streams -> [R, count] codes (uint8)."""
    from apq_sdk.quant.packing import unpack_bits

    return np.ascontiguousarray(unpack_bits(packed, bits, count), dtype=np.uint8)


def load_quantized_weights(quantized_dir: Path):
    """(config, plan, tensors, modules) from a quantized model directory, arrays as stored."""
    from safetensors.numpy import load_file
    from transformers import AutoConfig

    from apq_sdk.plan_file import load_plan

    quantized_dir = Path(quantized_dir)
    plan = load_plan(quantized_dir / "plan.json")
    config = AutoConfig.from_pretrained(quantized_dir)
    tensors = load_file(str(quantized_dir / "model.safetensors"))
    modules: dict[str, ModuleWeights] = {}
    for name, entry in plan.modules.items():
        n, k = entry.shape
        bias = tensors.get(f"{name}.bias")
        common = dict(name=name, shape=(n, k), bias=None if bias is None else bias.astype(np.float32),
                      activation=entry.activation, act_clip=float(entry.act_clip))
        if entry.bits == 16:
            weight = tensors.get(f"{name}.weight")
            if weight is None:
                raise LoweringError(f"{quantized_dir}/model.safetensors lacks {name}.weight (the plan "
                                    f"keeps {name} at 16 bits); quantize again")
            modules[name] = ModuleWeights(kind="float16", arrays={"weight": weight.astype(np.float16)},
                                          **common)
            continue
        if entry.bits not in (2, 4, 8):
            raise LoweringError(f"{name}: {entry.bits}-bit weights cannot be lowered to MatMulNBits "
                                f"(2, 4 and 8 bits only); plan with the arm64-linux capabilities")
        arrays = {key: tensors[f"{name}.{key}"] for key in ("qweight", "scales", "qzeros")
                  if f"{name}.{key}" in tensors}
        if "qweight" not in arrays or "scales" not in arrays:
            raise LoweringError(f"{quantized_dir}/model.safetensors lacks {name}.qweight or .scales")
        if entry.symmetric == ("qzeros" in arrays):
            raise LoweringError(f"{name}: plan says symmetric={entry.symmetric} but the stored "
                                f"tensors {'have' if 'qzeros' in arrays else 'lack'} qzeros")
        modules[name] = ModuleWeights(kind="nbits", arrays=arrays, bits=entry.bits,
                                      group_size=entry.group_size, **common)
    return config, plan, tensors, modules


def float_weights_from_model(model) -> tuple[object, dict[str, np.ndarray], dict[str, ModuleWeights]]:
    """(config, tensors, modules) of a float torch model: every linear as a float32 module."""
    from torch import nn

    config = model.config
    tensors = {name: t.detach().float().cpu().numpy() for name, t in model.state_dict().items()}
    modules: dict[str, ModuleWeights] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head" and ".layers." in f".{name}":
            weight = module.weight.detach().float().cpu().numpy()
            bias = None if module.bias is None else module.bias.detach().float().cpu().numpy()
            modules[name] = ModuleWeights(name=name, kind="float32", shape=weight.shape,
                                          arrays={"weight": weight}, bias=bias, bits=32)
    return config, tensors, modules


# --------------------------------------------------------------------------------------------------
# model description


@dataclass
class DecoderSpec:
    family: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    intermediate_size: int
    rms_eps: float
    hidden_act: str
    tie_word_embeddings: bool
    inv_freq: np.ndarray  # [rotary_dim / 2] float32
    rope_scaling: float  # cos/sin multiplier (1.0 for default RoPE)
    sliding_windows: list[int | None] = field(default_factory=list)
    norm_offset: bool = False  # gemma: weight applied as (1 + w)
    embed_scale: float | None = None  # gemma: embeddings times sqrt(hidden)

    @property
    def rotary_dim(self) -> int:
        return 2 * int(self.inv_freq.shape[0])

    def linear_names(self, layer: int) -> dict[str, str]:
        p = f"model.layers.{layer}"
        if self.family == "phi3":
            return {"qkv": f"{p}.self_attn.qkv_proj", "o": f"{p}.self_attn.o_proj",
                    "gate_up": f"{p}.mlp.gate_up_proj", "down": f"{p}.mlp.down_proj"}
        return {"q": f"{p}.self_attn.q_proj", "k": f"{p}.self_attn.k_proj",
                "v": f"{p}.self_attn.v_proj", "o": f"{p}.self_attn.o_proj",
                "gate": f"{p}.mlp.gate_proj", "up": f"{p}.mlp.up_proj", "down": f"{p}.mlp.down_proj"}


def _rotary_module(config):
    model_type = config.model_type
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    classes = [getattr(module, n) for n in sorted(dir(module)) if n.endswith("RotaryEmbedding")
               and not n.startswith("_")]
    if not classes:
        raise LoweringError(f"transformers has no rotary embedding class for {model_type!r}")
    return classes[0](config=config)


def decoder_spec(config) -> DecoderSpec:
    family = config.model_type
    if family not in FAMILIES:
        raise LoweringError(f"model type {family!r} is not supported by the onnxruntime target "
                            f"(supported: {', '.join(FAMILIES)})")
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "dynamic":
        raise LoweringError("rope_type 'dynamic' changes frequencies with the sequence length; the "
                            "onnxruntime target supports static RoPE variants only")
    if rope_type == "longrope":
        original = getattr(config, "original_max_position_embeddings", None) or \
            rope.get("original_max_position_embeddings")
        if original is None or config.max_position_embeddings > original:
            raise LoweringError("rope_type 'longrope' switches frequencies past "
                                "original_max_position_embeddings; not supported by this target")
    rotary = _rotary_module(config)
    inv_freq = rotary.inv_freq.detach().float().cpu().numpy().astype(np.float32)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    windows: list[int | None] = []
    for i in range(config.num_hidden_layers):
        if window is None or family in ("llama", "gemma"):
            windows.append(None)
        elif family in ("mistral", "phi3") or layer_types is None:
            windows.append(int(window))
        else:
            windows.append(int(window) if layer_types[i] == "sliding_attention" else None)
    act = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None)
    if family == "gemma" and act in (None, "gelu"):
        act = "gelu_pytorch_tanh"
    return DecoderSpec(
        family=family, num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=config.vocab_size,
        intermediate_size=config.intermediate_size, rms_eps=float(config.rms_norm_eps),
        hidden_act=act, tie_word_embeddings=bool(config.tie_word_embeddings), inv_freq=inv_freq,
        rope_scaling=float(getattr(rotary, "attention_scaling", 1.0)), sliding_windows=windows,
        norm_offset=family == "gemma",
        embed_scale=float(config.hidden_size ** 0.5) if family == "gemma" else None)


# --------------------------------------------------------------------------------------------------
# graph building


class GraphBuilder:
    def __init__(self):
        self.nodes = []
        self.initializers: dict[str, object] = {}
        self._names: dict[str, int] = {}

    def _unique(self, base: str) -> str:
        count = self._names.get(base, 0)
        self._names[base] = count + 1
        return base if count == 0 else f"{base}_{count}"

    def init(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        if name in self.initializers:
            raise LoweringError(f"initializer {name} defined twice")
        self.initializers[name] = numpy_helper.from_array(np.ascontiguousarray(array), name)
        return name

    def const(self, array, dtype) -> str:
        """A small named constant, shared by value."""
        arr = np.asarray(array, dtype=dtype)
        key = f"const_{arr.dtype.name}_{'x'.join(map(str, arr.shape)) or 's'}_" + \
            "_".join(str(v) for v in arr.reshape(-1).tolist())
        key = key.replace("-", "m").replace(".", "p").replace("+", "")
        if key not in self.initializers:
            self.init(key, arr)
        return key

    def op(self, op_type: str, inputs, scope: str, outputs: int | list[str] = 1,
           domain: str = "", doc: str | None = None, **attrs):
        from onnx import helper

        name = self._unique(f"{scope}/{op_type}")
        if isinstance(outputs, int):
            outs = [f"{name}:{i}" for i in range(outputs)]
        else:
            outs = list(outputs)
        node = helper.make_node(op_type, list(inputs), outs, name=name, domain=domain or None,
                                doc_string=doc, **attrs)
        self.nodes.append(node)
        return outs[0] if len(outs) == 1 else outs


@dataclass
class LoweringOptions:
    fuse: bool = True  # q/k/v and gate/up into one MatMulNBits where the members allow
    activation_lowering: str = "explicit"  # or "accuracy-level-4" (measurement only)

    def __post_init__(self):
        if self.activation_lowering not in ACTIVATION_LOWERINGS:
            raise LoweringError(f"activation_lowering: expected one of {ACTIVATION_LOWERINGS}, "
                                f"found {self.activation_lowering!r}")


class DecoderLowering:
    def __init__(self, spec: DecoderSpec, tensors: dict[str, np.ndarray],
                 modules: dict[str, ModuleWeights], head: ModuleWeights | None,
                 options: LoweringOptions):
        self.spec = spec
        self.tensors = tensors
        self.modules = modules
        self.head = head
        self.options = options
        self.g = GraphBuilder()
        self._fake_quant: dict[tuple[str, float], str] = {}
        self._masks: dict[int | None, str] = {}

    # -- helpers -----------------------------------------------------------------------------------

    def tensor(self, name: str) -> np.ndarray:
        if name not in self.tensors:
            raise LoweringError(f"the model has no tensor {name!r} ({self.spec.family} layout expected)")
        return np.asarray(self.tensors[name], dtype=np.float32)

    def fake_quantize(self, x: str, clip: float, scope: str) -> str:
        """Per-token dynamic int8 fake quantization of x [1, S, K] (docs/formats.md)."""
        key = (x, float(clip))
        if key in self._fake_quant:
            return self._fake_quant[key]
        g = self.g
        s = f"{scope}/act_int8"
        amax = g.op("ReduceMax", [g.op("Abs", [x], s), g.const([-1], np.int64)], s, keepdims=1)
        scale = g.op("Div", [g.op("Mul", [amax, g.const(clip, np.float32)], s),
                             g.const(127.0, np.float32)], s)
        is_zero = g.op("Equal", [scale, g.const(0.0, np.float32)], s)
        scale = g.op("Where", [is_zero, g.const(1.0, np.float32), scale], s)
        q = g.op("Round", [g.op("Div", [x, scale], s)], s)
        q = g.op("Clip", [q, g.const(-127.0, np.float32), g.const(127.0, np.float32)], s)
        out = g.op("Mul", [q, scale], s)
        self._fake_quant[key] = out
        return out

    def linear(self, x: str, members: list[ModuleWeights], scope: str,
               output: str | None = None) -> list[str]:
        """y = x @ W^T (+ b) for one module or a fused group; returns one output per member."""
        g = self.g
        first = members[0]
        n_total = sum(m.shape[0] for m in members)
        k = first.shape[1]
        name = members[0].name if len(members) == 1 else \
            first.name.rsplit(".", 1)[0] + "." + "+".join(m.name.rsplit(".", 1)[1] for m in members)
        if first.activation == ACT_INT8_BLOCK and first.kind != "nbits":
            raise LoweringError(f"{first.name}: {ACT_INT8_BLOCK} needs block-quantized weights "
                                f"(MatMulNBits); a {first.kind} layer keeps float activations")
        # int8-per-block-dynamic is exactly MatMulNBits' accuracy_level 4 (CompInt8): A quantized
        # per block of block_size with codes RNE(a * 127 / amax) and scale amax / 127.
        use_level4 = first.kind == "nbits" and (
            first.activation == ACT_INT8_BLOCK
            or first.activation == ACT_INT8 and self.options.activation_lowering == "accuracy-level-4")
        a = x
        if first.activation == ACT_INT8 and not use_level4:
            a = self.fake_quantize(x, first.act_clip, scope)
        bias = None
        if first.bias is not None:
            bias = g.init(f"{name}.bias", np.concatenate([m.bias for m in members]).astype(np.float32))
        out_name = [output] if output and len(members) == 1 else 1
        if first.kind == "nbits":
            parts = [nbits_initializers(m) for m in members]
            b = g.init(f"{name}.B", np.concatenate([p["B"] for p in parts]))
            sc = g.init(f"{name}.scales", np.concatenate([p["scales"] for p in parts]))
            zp = g.init(f"{name}.zero_points", np.concatenate([p["zero_points"] for p in parts])) \
                if "zero_points" in parts[0] else ""
            inputs = [a, b, sc, zp]
            if bias is not None:
                inputs += ["", bias]
            while inputs[-1] == "":
                inputs.pop()
            y = g.op("MatMulNBits", inputs, name, outputs=out_name, domain=MS_DOMAIN,
                     doc=NBITS_DOC_PREFIX + ",".join(m.name for m in members),
                     K=k, N=n_total, bits=first.bits, block_size=first.group_size,
                     accuracy_level=4 if use_level4 else 0)
        else:
            if first.kind == "float16":
                w = g.init(f"{name}.weight", np.concatenate([m.arrays["weight"] for m in members])
                           .astype(np.float16))
                w = g.op("Cast", [w], name, to=1)
            else:
                w = g.init(f"{name}.weight", np.concatenate([m.arrays["weight"] for m in members])
                           .astype(np.float32))
            wt = g.op("Transpose", [w], name, perm=[1, 0])
            if bias is None:
                y = g.op("MatMul", [a, wt], name, outputs=out_name)
            else:
                y = g.op("Add", [g.op("MatMul", [a, wt], name), bias], name, outputs=out_name)
        if len(members) == 1:
            return [y]
        return self.split(y, [m.shape[0] for m in members], name)

    def split(self, y: str, sizes: list[int], scope: str) -> list[str]:
        return self.g.op("Split", [y, self.g.const(sizes, np.int64)], scope, outputs=len(sizes), axis=-1)

    def project(self, x: str, roles: list[str], names: dict[str, str], scope: str) -> list[str]:
        """Outputs of the modules of `roles` (fused into one matmul when allowed)."""
        members = []
        for role in roles:
            if names[role] not in self.modules:
                raise LoweringError(f"no weights for {names[role]}")
            members.append(self.modules[names[role]])
        if self.options.fuse and len({m.fuse_key() for m in members}) == 1:
            return self.linear(x, members, scope)
        return [self.linear(x, [m], scope)[0] for m in members]

    def rms_norm(self, x: str, weight_name: str, scope: str) -> str:
        g = self.g
        w = self.tensor(weight_name)
        if self.spec.norm_offset:
            w = (np.float32(1.0) + w).astype(np.float32)
        wi = g.init(weight_name if not self.spec.norm_offset else f"{weight_name}+1", w)
        var = g.op("ReduceMean", [g.op("Mul", [x, x], scope), g.const([-1], np.int64)], scope, keepdims=1)
        inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [var, g.const(self.spec.rms_eps, np.float32)],
                                                       scope)], scope)], scope)
        return g.op("Mul", [g.op("Mul", [x, inv], scope), wi], scope)

    def activation(self, x: str, scope: str) -> str:
        g = self.g
        act = self.spec.hidden_act
        if act in ("silu", "swish"):
            return g.op("Mul", [x, g.op("Sigmoid", [x], scope)], scope)
        if act in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
            return g.op("Gelu", [x], scope, approximate="tanh")
        if act == "gelu":
            return g.op("Gelu", [x], scope)
        raise LoweringError(f"hidden activation {act!r} is not supported by the onnxruntime target")

    def mask(self, window: int | None) -> str:
        """Bool [rep * S, T]: key j visible from query i (causal, attention_mask, sliding window)."""
        if window in self._masks:
            return self._masks[window]
        g = self.g
        s = "mask" if window is None else f"mask_w{window}"
        if "kv_idx" not in self._masks:
            one = g.const(1, np.int64)
            total = g.op("Gather", [g.op("Shape", ["attention_mask"], "mask"), one], "mask", axis=0)
            seq = g.op("Gather", [g.op("Shape", ["input_ids"], "mask"), one], "mask", axis=0)
            past = g.op("Sub", [total, seq], "mask")
            kv_idx = g.op("Range", [g.const(0, np.int64), total, one], "mask")
            q_idx = g.op("Range", [past, total, one], "mask")
            self._masks["kv_idx"] = g.op("Unsqueeze", [kv_idx, g.const([0], np.int64)], "mask")
            self._masks["q_idx"] = g.op("Unsqueeze", [q_idx, g.const([1], np.int64)], "mask")
            self._masks["pad"] = g.op("Cast", ["attention_mask"], "mask", to=9)  # bool [1, T]
        kv, q = self._masks["kv_idx"], self._masks["q_idx"]
        allowed = g.op("And", [g.op("LessOrEqual", [kv, q], s), self._masks["pad"]], s)
        if window is not None:
            lower = g.op("Sub", [q, g.const(window, np.int64)], s)
            allowed = g.op("And", [allowed, g.op("Greater", [kv, lower], s)], s)
        rep = self.spec.num_heads // self.spec.num_kv_heads
        if rep > 1:
            allowed = g.op("Tile", [allowed, g.const([rep, 1], np.int64)], s)
        self._masks[window] = allowed
        return allowed

    def rotary(self) -> tuple[str, str]:
        g = self.g
        s = "rotary"
        pos = g.op("Unsqueeze", [g.op("Cast", ["position_ids"], s, to=1), g.const([-1], np.int64)], s)
        freqs = g.op("Mul", [pos, g.init("rotary.inv_freq", self.spec.inv_freq)], s)
        emb = g.op("Concat", [freqs, freqs], s, axis=-1)
        cos, sin = g.op("Cos", [emb], s), g.op("Sin", [emb], s)
        if self.spec.rope_scaling != 1.0:
            factor = g.const(self.spec.rope_scaling, np.float32)
            cos, sin = g.op("Mul", [cos, factor], s), g.op("Mul", [sin, factor], s)
        axis = g.const([1], np.int64)
        return g.op("Unsqueeze", [cos, axis], s), g.op("Unsqueeze", [sin, axis], s)

    def apply_rotary(self, x: str, cos: str, sin: str, scope: str) -> str:
        g = self.g
        d, r = self.spec.head_dim, self.spec.rotary_dim
        rot, rest = (x, None) if r == d else g.op("Split", [x, g.const([r, d - r], np.int64)], scope,
                                                    outputs=2, axis=-1)
        x1, x2 = g.op("Split", [rot, g.const([r // 2, r // 2], np.int64)], scope, outputs=2, axis=-1)
        rotated = g.op("Concat", [g.op("Neg", [x2], scope), x1], scope, axis=-1)
        out = g.op("Add", [g.op("Mul", [rot, cos], scope), g.op("Mul", [rotated, sin], scope)], scope)
        if rest is not None:
            out = g.op("Concat", [out, rest], scope, axis=-1)
        return out

    def heads(self, x: str, count: int, scope: str) -> str:
        """[1, S, count*D] -> [1, count, S, D]."""
        g = self.g
        x = g.op("Reshape", [x, g.const([0, 0, count, self.spec.head_dim], np.int64)], scope)
        return g.op("Transpose", [x], scope, perm=[0, 2, 1, 3])

    # -- blocks ------------------------------------------------------------------------------------

    def attention(self, i: int, x: str, cos: str, sin: str) -> str:
        g, spec = self.g, self.spec
        names = spec.linear_names(i)
        scope = f"model.layers.{i}.self_attn"
        hd, h, hkv = spec.head_dim, spec.num_heads, spec.num_kv_heads
        if spec.family == "phi3":
            qkv = self.linear(x, [self.modules[names["qkv"]]], scope)[0]
            q, k, v = self.split(qkv, [h * hd, hkv * hd, hkv * hd], scope)
        else:
            q, k, v = self.project(x, ["q", "k", "v"], names, scope)
        q = self.apply_rotary(self.heads(q, h, scope), cos, sin, scope)
        k = self.apply_rotary(self.heads(k, hkv, scope), cos, sin, scope)
        v = self.heads(v, hkv, scope)
        k_all = g.op("Concat", [f"past_key_values.{i}.key", k], scope, outputs=[f"present.{i}.key"], axis=2)
        v_all = g.op("Concat", [f"past_key_values.{i}.value", v], scope, outputs=[f"present.{i}.value"],
                     axis=2)
        # query heads grouped by their KV head: [1, H, S, D] -> [1, Hkv, rep*S, D] (no K/V copies)
        qg = g.op("Reshape", [q, g.const([1, hkv, -1, hd], np.int64)], scope)
        scores = g.op("MatMul", [qg, g.op("Transpose", [k_all], scope, perm=[0, 1, 3, 2])], scope)
        scores = g.op("Mul", [scores, g.const(hd ** -0.5, np.float32)], scope)
        scores = g.op("Where", [self.mask(spec.sliding_windows[i]), scores,
                                g.const(FLOAT32_LOWEST, np.float32)], scope)
        probs = g.op("Softmax", [scores], scope, axis=-1)
        ctx = g.op("MatMul", [probs, v_all], scope)
        ctx = g.op("Reshape", [ctx, g.const([1, h, -1, hd], np.int64)], scope)
        ctx = g.op("Transpose", [ctx], scope, perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", [ctx, g.const([0, 0, h * hd], np.int64)], scope)
        return self.linear(ctx, [self.modules[names["o"]]], scope)[0]

    def mlp(self, i: int, x: str) -> str:
        names = self.spec.linear_names(i)
        scope = f"model.layers.{i}.mlp"
        if self.spec.family == "phi3":
            gate_up = self.linear(x, [self.modules[names["gate_up"]]], scope)[0]
            gate, up = self.split(gate_up, [self.spec.intermediate_size] * 2, scope)
        else:
            gate, up = self.project(x, ["gate", "up"], names, scope)
        hidden = self.g.op("Mul", [self.activation(gate, scope), up], scope)
        return self.linear(hidden, [self.modules[names["down"]]], scope)[0]

    def embedding(self) -> str:
        g, spec = self.g, self.spec
        s = "model.embed_tokens"
        head = self.head
        if spec.tie_word_embeddings and head is not None and head.kind == "nbits":
            # the tied embedding uses the quantized head: GatherBlockQuantized on the head's own B
            # (shared initializer), with its scales and zero points as [V, n_blocks, 1]
            v, k = head.shape
            blocks = num_blocks(k, head.group_size)
            self.head_b = g.init("lm_head.B", nbits_initializers(head)["B"])
            inputs = [self.head_b, "input_ids",
                      g.init("model.embed_tokens.scales",
                             head.arrays["scales"].astype(np.float16).astype(np.float32)
                             .reshape(v, blocks, 1))]
            if "qzeros" in head.arrays:
                zeros = unpack_rows(head.arrays["qzeros"], head.bits, blocks)
                inputs.append(g.init("model.embed_tokens.zero_points", zeros.reshape(v, blocks, 1)))
            x = g.op("GatherBlockQuantized", inputs, s, domain=MS_DOMAIN, bits=head.bits,
                     block_size=head.group_size, gather_axis=0, quantize_axis=2)
            x = g.op("Reshape", [x, g.const([0, 0, -1], np.int64)], s)
            if blocks * head.group_size != k:
                x = g.op("Slice", [x, g.const([0], np.int64), g.const([k], np.int64),
                                   g.const([2], np.int64)], s)
        elif spec.tie_word_embeddings and head is not None and head.kind == "float16":
            self.head_f16 = g.init("lm_head.weight", head.arrays["weight"].astype(np.float16))
            table = g.op("Cast", [self.head_f16], s, to=1)
            x = g.op("Gather", [table, "input_ids"], s, axis=0)
        else:
            table = g.init("model.embed_tokens.weight", self.tensor("model.embed_tokens.weight"))
            x = g.op("Gather", [table, "input_ids"], s, axis=0)
        if spec.embed_scale is not None:
            x = g.op("Mul", [x, g.const(np.float32(spec.embed_scale), np.float32)], s)
        return x

    def lm_head(self, x: str) -> str:
        g, spec = self.g, self.spec
        head = self.head
        if head is None:  # not planned: float head (tied to the embedding or its own weight)
            name = "model.embed_tokens.weight" if spec.tie_word_embeddings else "lm_head.weight"
            w = name if name in g.initializers else g.init(name, self.tensor(name))
            return g.op("MatMul", [x, g.op("Transpose", [w], "lm_head", perm=[1, 0])], "lm_head",
                        outputs=["logits"])
        if head.kind == "nbits" and spec.tie_word_embeddings:
            parts = nbits_initializers(head)
            inputs = [x, self.head_b, g.init("lm_head.scales", parts["scales"]),
                      g.init("lm_head.zero_points", parts["zero_points"]) if "zero_points" in parts else ""]
            while inputs[-1] == "":
                inputs.pop()
            return g.op("MatMulNBits", inputs, "lm_head", outputs=["logits"], domain=MS_DOMAIN,
                        doc=NBITS_DOC_PREFIX + "lm_head", K=head.shape[1], N=head.shape[0],
                        bits=head.bits, block_size=head.group_size,
                        accuracy_level=4 if head.activation == ACT_INT8_BLOCK else 0)
        if head.kind == "float16" and spec.tie_word_embeddings:
            w = g.op("Cast", [self.head_f16], "lm_head", to=1)
            return g.op("MatMul", [x, g.op("Transpose", [w], "lm_head", perm=[1, 0])], "lm_head",
                        outputs=["logits"])
        return self.linear(x, [head], "lm_head", output="logits")[0]

    # -- whole model -------------------------------------------------------------------------------

    def build(self, metadata: dict[str, str] | None = None):
        from onnx import TensorProto, helper

        spec, g = self.spec, self.g
        x = self.embedding()
        cos, sin = self.rotary()
        for i in range(spec.num_layers):
            prefix = f"model.layers.{i}"
            h = self.rms_norm(x, f"{prefix}.input_layernorm.weight", f"{prefix}.input_layernorm")
            x = g.op("Add", [x, self.attention(i, h, cos, sin)], prefix)
            h = self.rms_norm(x, f"{prefix}.post_attention_layernorm.weight",
                              f"{prefix}.post_attention_layernorm")
            x = g.op("Add", [x, self.mlp(i, h)], prefix)
        x = self.rms_norm(x, "model.norm.weight", "model.norm")
        self.lm_head(x)

        f32, i64 = TensorProto.FLOAT, TensorProto.INT64
        kv_shape = [1, spec.num_kv_heads, "past_sequence_length", spec.head_dim]
        present_shape = [1, spec.num_kv_heads, "total_sequence_length", spec.head_dim]
        inputs = [helper.make_tensor_value_info("input_ids", i64, [1, "sequence_length"]),
                  helper.make_tensor_value_info("attention_mask", i64, [1, "total_sequence_length"]),
                  helper.make_tensor_value_info("position_ids", i64, [1, "sequence_length"])]
        outputs = [helper.make_tensor_value_info("logits", f32, [1, "sequence_length", spec.vocab_size])]
        for i in range(spec.num_layers):
            for kind in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", f32, kv_shape))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", f32, present_shape))
        graph = helper.make_graph(g.nodes, "apq_decoder", inputs, outputs,
                                  list(g.initializers.values()))
        model = helper.make_model(graph, producer_name="apq-sdk", ir_version=IR_VERSION,
                                  opset_imports=[helper.make_opsetid("", OPSET),
                                                 helper.make_opsetid(MS_DOMAIN, 1)])
        for key, value in sorted((metadata or {}).items()):
            entry = model.metadata_props.add()
            entry.key, entry.value = key, str(value)
        return model


def build_decoder(config, tensors: dict[str, np.ndarray], modules: dict[str, ModuleWeights], *,
                  options: LoweringOptions | None = None, metadata: dict[str, str] | None = None):
    """The ONNX ModelProto of a decoder; `modules` holds every linear and, if planned, `lm_head`."""
    spec = decoder_spec(config)
    head = modules.get("lm_head")
    body = {n: m for n, m in modules.items() if n != "lm_head"}
    for i in range(spec.num_layers):
        for name in spec.linear_names(i).values():
            if name not in body:
                raise LoweringError(f"no weights for {name}: the plan must cover every decoder linear")
    if head is not None and head.activation not in (ACT_NONE, ACT_INT8_BLOCK):
        raise LoweringError(f"lm_head with {head.activation} activations is not supported: plan the "
                            f"head with float ('none') or int8-per-block-dynamic activations")
    lowering = DecoderLowering(spec, tensors, body, head, options or LoweringOptions())
    return lowering.build(metadata)


def initializer_bytes(model) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def save_model(model, path: Path, external_data: bool | None = None) -> list[Path]:
    """Write the model (single file, or with EXTERNAL_DATA_FILE beside it); returns the files."""
    import onnx

    path = Path(path)
    if external_data is None:
        external_data = initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    if not external_data:
        path.write_bytes(model.SerializeToString())
        return [path]
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=EXTERNAL_DATA_FILE, size_threshold=1024, convert_attribute=False)
    return [path, path.parent / EXTERNAL_DATA_FILE]


def nbits_nodes(model) -> list[dict]:
    """Every MatMulNBits node: its modules, attributes and initializer arrays (for checks)."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}

    def array(name):
        if not name:
            return None
        return numpy_helper.to_array(inits[name]) if name in inits else None

    found = []
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        doc = node.doc_string
        modules = doc[len(NBITS_DOC_PREFIX):].split(",") if doc.startswith(NBITS_DOC_PREFIX) else []
        inputs = list(node.input) + [""] * (6 - len(node.input))
        found.append({"node": node.name, "modules": modules, "attrs": attrs,
                      "input": inputs[0], "B": array(inputs[1]), "scales": array(inputs[2]),
                      "zero_points": array(inputs[3]), "bias": array(inputs[5]),
                      "initializer_names": [n for n in inputs[1:] if n]})
    return found


def describe_io(spec: DecoderSpec) -> dict:
    return {
        "inputs": {"input_ids": ["int64", [1, "S"]], "attention_mask": ["int64", [1, "P+S"]],
                   "position_ids": ["int64", [1, "S"]],
                   "past_key_values.{i}.key": ["float32", [1, spec.num_kv_heads, "P", spec.head_dim]],
                   "past_key_values.{i}.value": ["float32", [1, spec.num_kv_heads, "P", spec.head_dim]]},
        "outputs": {"logits": ["float32", [1, "S", spec.vocab_size]],
                    "present.{i}.key": ["float32", [1, spec.num_kv_heads, "P+S", spec.head_dim]],
                    "present.{i}.value": ["float32", [1, spec.num_kv_heads, "P+S", spec.head_dim]]},
        "num_layers": spec.num_layers, "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim, "vocab_size": spec.vocab_size,
    }


def dumps_json(data) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"
