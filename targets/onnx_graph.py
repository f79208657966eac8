"""The runtime-neutral ONNX decoder graph, with a seam for how each runtime writes quantized linears.

The graph is written directly with `onnx.helper` rather than traced: every node, initializer and name
is chosen here, so a build is deterministic (the same checkpoint gives byte-identical files) and the
I/O contract is exact. `DecoderGraph` writes the decoder of any registered family from its
`apq_sdk.families.DecoderSpec`: embeddings (with Gemma's scale), RMSNorm (with Gemma's 1 + w),
rotary embeddings (partial rotary, static scaling), attention (GQA by grouping query heads per KV
head, masking with Where: causality, the attention_mask input and sliding windows), the MLP, the
KV cache as explicit inputs and outputs, and per-token dynamic int8 activations as explicit ops
(ReduceMax(Abs), scale = amax * clip / 127 with 0 -> 1, Div, Round half-to-even, Clip(-127, 127),
Mul: the float32 arithmetic of `apq_sdk.quant.modules.fake_quantize_activations`).

What differs between runtimes is how a block-quantized linear layer, a quantized embedding table and
the head are written: a `LinearLowering` subclass decides (ONNX Runtime: `MatMulNBits` and
`GatherBlockQuantized`, targets/onnxruntime/linears.py; TensorRT: standard `DequantizeLinear` with
`block_size`). Float16 and float32 layers are written here (Cast + Transpose + MatMul, folded by
runtimes at load). Layers a runtime fuses (q/k/v and gate/up) reach the lowering together when they
share format, activation mode and clip.

I/O (fixed; runners depend on it):
  inputs   input_ids int64 [1, S] (or, with GraphOptions(embeddings_input=True), inputs_embeds
           float32 [1, S, hidden]: the embedding rows, looked up by the runtime),
           attention_mask int64 [1, P+S], position_ids int64 [1, S],
           past_key_values.{i}.key / .value float32 [1, kv_heads, P, head_dim]
  outputs  logits float32 [1, S, vocab], present.{i}.key / .value float32 [1, kv_heads, P+S, head_dim]
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from apq_sdk.errors import ApqError
from apq_sdk.checkpoint import CheckpointModule
from apq_sdk.families import DecoderSpec, decoder_spec
from apq_sdk.plan_file import ACT_INT8, ACT_INT8_BLOCK, ACT_NONE  # noqa: F401

OPSET = 21
IR_VERSION = 10
MS_DOMAIN = "com.microsoft"
EXTERNAL_DATA_FILE = "model.onnx.data"
# protobuf refuses messages of 2 GiB; above this many initializer bytes the weights go to
# EXTERNAL_DATA_FILE (a fixed choice per model, so rebuilds stay byte-identical)
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
MODULES_DOC_PREFIX = "apq:modules="  # doc_string of every linear's output node (linear_doc)
FLOAT32_LOWEST = np.float32(np.finfo(np.float32).min)


class LoweringError(ApqError):
    """The model or plan cannot be written as this ONNX graph (message says why and what to do)."""


# --------------------------------------------------------------------------------------------------
# weights


def float_weights_from_model(model) -> tuple[object, dict[str, np.ndarray], dict[str, CheckpointModule]]:
    """(config, tensors, modules) of a float torch model: every linear as a float32 module (for
    float exports to compare against)."""
    from torch import nn

    config = model.config
    tensors = {name: t.detach().float().cpu().numpy() for name, t in model.state_dict().items()}
    modules: dict[str, CheckpointModule] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head" and ".layers." in f".{name}":
            weight = module.weight.detach().float().cpu().numpy()
            bias = None if module.bias is None else module.bias.detach().float().cpu().numpy()
            modules[name] = CheckpointModule(name=name, kind="float32", shape=weight.shape,
                                             arrays={"weight": weight}, bias=bias, bits=32)
    return config, tensors, modules


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


def linear_doc(members: list[CheckpointModule], x: str) -> str:
    """The doc_string of the node that produces a linear layer's output: the modules it computes
    and the tensor that feeds the layer (before any activation quantization), so verification can
    record both and check the layer against the torch reference on the same inputs."""
    return f"{MODULES_DOC_PREFIX}{','.join(m.name for m in members)};input={x}"


def parse_linear_doc(doc: str) -> tuple[list[str], str | None]:
    """(modules, input tensor) of a node written with linear_doc; ([], None) for other nodes."""
    if not doc.startswith(MODULES_DOC_PREFIX):
        return [], None
    fields = dict(part.split("=", 1) for part in doc.split(";") if "=" in part)
    return fields["apq:modules"].split(","), fields.get("input")


def linear_nodes(model) -> list[dict]:
    """Every node written with linear_doc: its name, modules, input (before activation
    quantization) and output tensor names."""
    found = []
    for node in model.graph.node:
        modules, source = parse_linear_doc(node.doc_string)
        if modules:
            found.append({"node": node.name, "modules": modules, "input": source,
                          "output": node.output[0]})
    return found


def read_float16_weights(model, shapes: dict[str, tuple[int, int]]) -> dict[str, CheckpointModule]:
    """The 16-bit layers of `model` as the shared graph writes them (float16 initializers named
    `<module>.weight`, or `<prefix>.<a>+<b>.weight` for a fused group, split by rows), in the
    checkpoint's layout; `shapes` are the plan's module shapes."""
    from onnx import numpy_helper

    out: dict[str, CheckpointModule] = {}
    for init in model.graph.initializer:
        if init.data_type != 10 or not init.name.endswith(".weight"):  # 10: FLOAT16
            continue
        base = init.name[:-len(".weight")]
        prefix, _, last = base.rpartition(".")
        names = [f"{prefix}.{part}" if prefix else part for part in last.split("+")]
        if not all(n in shapes for n in names):
            continue
        weight = numpy_helper.to_array(init)
        start = 0
        for name in names:
            n = shapes[name][0]
            out[name] = CheckpointModule(name=name, kind="float16", shape=shapes[name],
                                         arrays={"weight": weight[start:start + n]})
            start += n
    return out


class LinearLowering:
    """How one runtime writes block-quantized weights. Subclass per runtime; the graph calls:

    * `packed_linear` for one module or a fused group of packed ("packed" kind) members, after the
      shared code has applied per-token int8 activations (unless `quantizes_activations` says the
      runtime's kernel does that itself) and created the bias initializer;
    * `tied_embedding` / `tied_head` when a quantized head is tied to the embedding, so both read
      one copy of the codes.
    """

    name = "abstract"

    def quantizes_activations(self, module: CheckpointModule) -> bool:
        """Whether the runtime's quantized matmul applies `module.activation` itself."""
        return False

    def packed_linear(self, graph: "DecoderGraph", a: str, members: list[CheckpointModule],
                      name: str, bias: str | None, output, doc: str) -> str:
        """The output of a packed linear (or fused group) on `a`; the node that produces it
        carries `doc` (linear_doc)."""
        raise NotImplementedError

    def tied_embedding(self, graph: "DecoderGraph", head: CheckpointModule) -> str:
        raise LoweringError(f"{self.name}: a quantized head tied to the embedding is not supported; "
                            f"plan the head at 16 bits (--head-bits 16)")

    def tied_head(self, graph: "DecoderGraph", x: str, head: CheckpointModule,
                  output: str = "logits") -> str:
        raise LoweringError(f"{self.name}: a quantized head tied to the embedding is not supported; "
                            f"plan the head at 16 bits (--head-bits 16)")


@dataclass
class GraphOptions:
    fuse: bool = True  # q/k/v and gate/up into one matmul where the members allow
    sliding_windows: bool = True  # False: every layer attends to all of the past (for showing
    #                               that the windows change the result; never in a package)
    embeddings_input: bool = False  # True: the graph takes `inputs_embeds` [1, S, hidden] float32
    #                                 (the rows of the embedding table, looked up by the runtime)
    #                                 instead of input_ids, and a tied head is an ordinary linear
    #                                 (TensorRT, whose Gather takes no quantized table)


class DecoderGraph:
    """The decoder of `spec` as an ONNX graph; quantized linears through `lowering`."""

    def __init__(self, spec: DecoderSpec, tensors: dict[str, np.ndarray],
                 modules: dict[str, CheckpointModule], head: CheckpointModule | None,
                 lowering: LinearLowering, options: GraphOptions | None = None):
        self.options = options or GraphOptions()
        if not self.options.sliding_windows:
            spec = dataclasses.replace(spec, sliding_windows=[None] * spec.num_layers)
        self.spec = spec
        self.tensors = tensors
        self.modules = modules
        self.head = head
        self.lowering = lowering
        self.g = GraphBuilder()
        self.shared: dict[str, str] = {}  # initializers the embedding and the head share
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

    def linear(self, x: str, members: list[CheckpointModule], scope: str,
               output: str | None = None) -> list[str]:
        """y = x @ W^T (+ b) for one module or a fused group; returns one output per member."""
        g = self.g
        first = members[0]
        name = members[0].name if len(members) == 1 else \
            first.name.rsplit(".", 1)[0] + "." + "+".join(m.name.rsplit(".", 1)[1] for m in members)
        if first.activation == ACT_INT8_BLOCK and first.kind != "packed":
            raise LoweringError(f"{first.name}: {ACT_INT8_BLOCK} needs block-quantized weights; a "
                                f"{first.kind} layer keeps float activations")
        packed = first.kind == "packed"
        a = x
        if first.activation == ACT_INT8 and not (packed and self.lowering.quantizes_activations(first)):
            a = self.fake_quantize(x, first.act_clip, scope)
        if first.activation == ACT_INT8_BLOCK and not self.lowering.quantizes_activations(first):
            raise LoweringError(f"{first.name}: {self.lowering.name} cannot run {ACT_INT8_BLOCK} "
                                f"activations; plan within the target's capabilities")
        bias = None
        if first.bias is not None:
            bias = g.init(f"{name}.bias", np.concatenate([m.bias for m in members]).astype(np.float32))
        out_name = [output] if output and len(members) == 1 else 1
        doc = linear_doc(members, x)
        if packed:
            y = self.lowering.packed_linear(self, a, members, name, bias, out_name, doc)
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
                y = g.op("MatMul", [a, wt], name, outputs=out_name, doc=doc)
            else:
                y = g.op("Add", [g.op("MatMul", [a, wt], name), bias], name, outputs=out_name,
                         doc=doc)
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
            first = "inputs_embeds" if self.options.embeddings_input else "input_ids"
            seq = g.op("Gather", [g.op("Shape", [first], "mask"), one], "mask", axis=0)
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

    def rotary(self) -> dict[str, tuple[str, str]]:
        """Every rotary table's (cos, sin, rotary_dim), cos and sin [1, 1, S, rotary_dim] for the
        positions given."""
        g = self.g
        out = {}
        for name, table in sorted(self.spec.rope_tables.items()):
            single = len(self.spec.rope_tables) == 1
            s = "rotary" if single else f"rotary_{name}"
            pos = g.op("Unsqueeze", [g.op("Cast", ["position_ids"], s, to=1),
                                     g.const([-1], np.int64)], s)
            freqs = g.op("Mul", [pos, g.init("rotary.inv_freq" if single else f"rotary.{name}.inv_freq",
                                             table.inv_freq)], s)
            emb = g.op("Concat", [freqs, freqs], s, axis=-1)
            cos, sin = g.op("Cos", [emb], s), g.op("Sin", [emb], s)
            if table.scaling != 1.0:
                factor = g.const(table.scaling, np.float32)
                cos, sin = g.op("Mul", [cos, factor], s), g.op("Mul", [sin, factor], s)
            axis = g.const([1], np.int64)
            out[name] = (g.op("Unsqueeze", [cos, axis], s), g.op("Unsqueeze", [sin, axis], s),
                         table.rotary_dim)
        return out

    def apply_rotary(self, x: str, rope: tuple[str, str, int], scope: str) -> str:
        g = self.g
        cos, sin, r = rope
        d = self.spec.head_dim
        rot, rest = (x, None) if r == d else g.op("Split", [x, g.const([r, d - r], np.int64)], scope,
                                                    outputs=2, axis=-1)
        x1, x2 = g.op("Split", [rot, g.const([r // 2, r // 2], np.int64)], scope, outputs=2, axis=-1)
        rotated = g.op("Concat", [g.op("Neg", [x2], scope), x1], scope, axis=-1)
        out = g.op("Add", [g.op("Mul", [rot, cos], scope), g.op("Mul", [rotated, sin], scope)], scope)
        if rest is not None:
            out = g.op("Concat", [out, rest], scope, axis=-1)
        return out

    def softcap(self, x: str, cap: float, scope: str, output: str | None = None) -> str:
        """tanh(x / cap) * cap (Gemma 2's attention and final logit soft-capping)."""
        g = self.g
        c = g.const(cap, np.float32)
        return g.op("Mul", [g.op("Tanh", [g.op("Div", [x, c], scope)], scope), c], scope,
                    outputs=[output] if output else 1)

    def heads(self, x: str, count: int, scope: str) -> str:
        """[1, S, count*D] -> [1, count, S, D]."""
        g = self.g
        x = g.op("Reshape", [x, g.const([0, 0, count, self.spec.head_dim], np.int64)], scope)
        return g.op("Transpose", [x], scope, perm=[0, 2, 1, 3])

    # -- blocks ------------------------------------------------------------------------------------

    def attention(self, i: int, x: str, ropes: dict) -> str:
        g, spec = self.g, self.spec
        names, norms = spec.linear_names(i), spec.norm_names(i)
        scope = names["o"].rsplit(".", 1)[0]
        hd, h, hkv = spec.head_dim, spec.num_heads, spec.num_kv_heads
        if spec.stored_fused:
            qkv = self.linear(x, [self.modules[names["qkv"]]], scope)[0]
            q, k, v = self.split(qkv, [h * hd, hkv * hd, hkv * hd], scope)
        else:
            q, k, v = self.project(x, ["q", "k", "v"], names, scope)
        rope = spec.layer_rope[i]  # None: a layer without RoPE (SmolLM3)

        def position(x: str, count: int, role: str) -> str:
            x = self.heads(x, count, scope)
            if spec.qk_norm:  # RMSNorm over each head's dimensions, before RoPE
                x = self.rms_norm(x, f"{norms[role]}.weight", norms[role])
            return x if rope is None else self.apply_rotary(x, ropes[rope], scope)

        q, k = position(q, h, "q"), position(k, hkv, "k")
        v = self.heads(v, hkv, scope)
        k_all = g.op("Concat", [f"past_key_values.{i}.key", k], scope, outputs=[f"present.{i}.key"], axis=2)
        v_all = g.op("Concat", [f"past_key_values.{i}.value", v], scope, outputs=[f"present.{i}.value"],
                     axis=2)
        # query heads grouped by their KV head: [1, H, S, D] -> [1, Hkv, rep*S, D] (no K/V copies)
        qg = g.op("Reshape", [q, g.const([1, hkv, -1, hd], np.int64)], scope)
        scores = g.op("MatMul", [qg, g.op("Transpose", [k_all], scope, perm=[0, 1, 3, 2])], scope)
        scores = g.op("Mul", [scores, g.const(spec.attn_scale, np.float32)], scope)
        if spec.attn_softcap is not None:
            scores = self.softcap(scores, spec.attn_softcap, scope)
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
        scope = names["down"].rsplit(".", 1)[0]
        if self.spec.stored_fused:
            gate_up = self.linear(x, [self.modules[names["gate_up"]]], scope)[0]
            gate, up = self.split(gate_up, [self.spec.intermediate_size] * 2, scope)
        else:
            gate, up = self.project(x, ["gate", "up"], names, scope)
        hidden = self.g.op("Mul", [self.activation(gate, scope), up], scope)
        return self.linear(hidden, [self.modules[names["down"]]], scope)[0]

    def embedding(self) -> str:
        g, spec = self.g, self.spec
        s = spec.embedding_name
        head = self.head
        if self.options.embeddings_input:
            x = "inputs_embeds"
        elif spec.tie_word_embeddings and head is not None and head.kind == "packed":
            x = self.lowering.tied_embedding(self, head)  # one copy of the head's codes
        elif spec.tie_word_embeddings and head is not None and head.kind == "float16":
            self.shared["lm_head.weight"] = g.init("lm_head.weight",
                                                   head.arrays["weight"].astype(np.float16))
            table = g.op("Cast", [self.shared["lm_head.weight"]], s, to=1)
            x = g.op("Gather", [table, "input_ids"], s, axis=0)
        elif s in self.modules and self.modules[s].kind == "float16":  # planned: float16 table
            table = g.init(f"{s}.weight", self.modules[s].arrays["weight"].astype(np.float16))
            x = g.op("Gather", [g.op("Cast", [table], s, to=1), "input_ids"], s, axis=0)
        else:
            table = g.init(f"{s}.weight", self.tensor(f"{s}.weight"))
            x = g.op("Gather", [table, "input_ids"], s, axis=0)
        if spec.embed_scale is not None:
            x = g.op("Mul", [x, g.const(np.float32(spec.embed_scale), np.float32)], s)
        return x

    def lm_head(self, x: str) -> str:
        """The logits (named "logits"), soft-capped where the family says (Gemma 2)."""
        g, spec = self.g, self.spec
        head = self.head
        out = "logits" if spec.final_softcap is None else "logits_before_softcap"
        if head is None:  # not planned: float head (tied to the embedding or its own weight)
            name = f"{spec.embedding_name}.weight" if spec.tie_word_embeddings else "lm_head.weight"
            w = name if name in g.initializers else g.init(name, self.tensor(name))
            y = g.op("MatMul", [x, g.op("Transpose", [w], "lm_head", perm=[1, 0])], "lm_head",
                     outputs=[out])
        elif head.kind == "packed" and spec.tie_word_embeddings and not self.options.embeddings_input:
            y = self.lowering.tied_head(self, x, head, out)
        elif head.kind == "float16" and spec.tie_word_embeddings:
            if "lm_head.weight" not in self.shared:  # the embedding is looked up outside the graph
                self.shared["lm_head.weight"] = g.init("lm_head.weight",
                                                       head.arrays["weight"].astype(np.float16))
            w = g.op("Cast", [self.shared["lm_head.weight"]], "lm_head", to=1)
            y = g.op("MatMul", [x, g.op("Transpose", [w], "lm_head", perm=[1, 0])], "lm_head",
                     outputs=[out], doc=linear_doc([head], x))
        else:
            y = self.linear(x, [head], "lm_head", output=out)[0]
        if spec.final_softcap is not None:
            y = self.softcap(y, spec.final_softcap, "lm_head", output="logits")
        return y

    # -- whole model -------------------------------------------------------------------------------

    def build(self, metadata: dict[str, str] | None = None):
        from onnx import TensorProto, helper

        spec, g = self.spec, self.g
        x = self.embedding()
        ropes = self.rotary()
        for i in range(spec.num_layers):
            norms = spec.norm_names(i)
            prefix = norms["attn_in"].rsplit(".", 1)[0]

            def norm(value: str, role: str) -> str:
                return self.rms_norm(value, f"{norms[role]}.weight", norms[role])

            a = self.attention(i, norm(x, "attn_in"), ropes)
            if "attn_out" in norms:  # Gemma 2/3: attention and MLP outputs are normalised too
                a = norm(a, "attn_out")
            x = g.op("Add", [x, a], prefix)
            m = self.mlp(i, norm(x, "mlp_in"))
            if "mlp_out" in norms:
                m = norm(m, "mlp_out")
            x = g.op("Add", [x, m], prefix)
        x = self.rms_norm(x, f"{spec.final_norm_name}.weight", spec.final_norm_name)
        self.lm_head(x)

        f32, i64 = TensorProto.FLOAT, TensorProto.INT64
        kv_shape = [1, spec.num_kv_heads, "past_sequence_length", spec.head_dim]
        present_shape = [1, spec.num_kv_heads, "total_sequence_length", spec.head_dim]
        first = helper.make_tensor_value_info("input_ids", i64, [1, "sequence_length"])
        if self.options.embeddings_input:
            first = helper.make_tensor_value_info("inputs_embeds", f32,
                                                  [1, "sequence_length", spec.hidden_size])
        inputs = [first,
                  helper.make_tensor_value_info("attention_mask", i64, [1, "total_sequence_length"]),
                  helper.make_tensor_value_info("position_ids", i64, [1, "sequence_length"])]
        outputs = [helper.make_tensor_value_info("logits", f32, [1, "sequence_length", spec.vocab_size])]
        for i in range(spec.num_layers):
            for kind in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", f32, kv_shape))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", f32, present_shape))
        graph = helper.make_graph(g.nodes, "apq_decoder", inputs, outputs,
                                  list(g.initializers.values()))
        opsets = [helper.make_opsetid("", OPSET)]
        if any(node.domain == MS_DOMAIN for node in g.nodes):  # declared only where used
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        model = helper.make_model(graph, producer_name="apq-sdk", ir_version=IR_VERSION,
                                  opset_imports=opsets)
        for key, value in sorted((metadata or {}).items()):
            entry = model.metadata_props.add()
            entry.key, entry.value = key, str(value)
        return model


def build_decoder(config, tensors: dict[str, np.ndarray], modules: dict[str, CheckpointModule],
                  lowering: LinearLowering, *, options: GraphOptions | None = None,
                  metadata: dict[str, str] | None = None):
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
    return DecoderGraph(spec, tensors, body, head, lowering, options).build(metadata)


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


def write_package_model(model, path: Path, external_data: bool | None = None) -> list[Path]:
    """A package's model file: stale files of an earlier build removed, the model written
    (save_model) and, when it is one file, checked by onnx.checker; returns the files."""
    path = Path(path)
    for stale in (path, path.parent / EXTERNAL_DATA_FILE):
        stale.unlink(missing_ok=True)
    files = save_model(model, path, external_data)
    if len(files) == 1:
        import onnx

        onnx.checker.check_model(model)
    return files


def describe_io(spec: DecoderSpec, embeddings_input: bool = False) -> dict:
    """The graph's I/O contract (onnx_io.json); `embeddings_input` as in GraphOptions."""
    first = {"inputs_embeds": ["float32", [1, "S", spec.hidden_size]]} if embeddings_input \
        else {"input_ids": ["int64", [1, "S"]]}
    return {
        "inputs": {**first, "attention_mask": ["int64", [1, "P+S"]],
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
