"""The ExecuTorch program of a quantized checkpoint: torch modules built from the core's integers
and scales, `torch.export`, lowering with a partitioner, and the audit that nothing planned was
left outside the delegate.

The decoder is the transformers model of the checkpoint (the torch reference, `load_quantized`)
with every planned layer swapped for an exportable one:

* a 4-bit linear becomes an `nn.Linear` whose weight is torchao's `IntxUnpackedToInt8Tensor`
  holding the core's codes (minus the symmetric zero point 8, as int8), its scales (float32 of
  the bfloat16-grid values: XNNPACK stores them as bfloat16, exactly) and asymmetric per-token
  int8 activations: the pattern XNNPACK's partitioner lowers to its dynamically quantized
  blockwise GEMM (qd8-f32-qb4w);
* a 2- or 3-bit linear (the android-lowbit target only, `lowbit_kernel`) becomes a
  `LowbitLinear` (lowbit.py): the checkpoint's qweight bytes and float16 scales unchanged, computed
  by the custom op apq::lowbit_linear outside the delegate (runtime_kernels/
  executorch_lowbit_linear.cpp), with the same int8 per-token asymmetric activations. A tied
  packed head goes there too, and its embedding lookup becomes apq::lowbit_embedding
  over the same tensors (`LowbitEmbedding`): the program holds the head once;
* a 16-bit linear becomes a float32 `nn.Linear` of its float16 values (XNNPACK's float GEMM);
* (android) a tied 4-bit head's embedding lookup becomes `quantized_decomposed::embedding_4bit`
  over the same codes and float16 scales, nibbles re-laid out as that kernel reads them (first element in
  the high nibble): a second copy of the head in the core's size (Capabilities.tied_lookup),
  and a float table (an untied embedding, a tied 16-bit head's lookup) stays float16, cast after
  the lookup.

The program's `forward(tokens [1, n], cache_position [n])` returns logits [1, n, vocab], the
signature ExecuTorch's LLM runner (TextLLMRunner, Android's LlmModule) calls with
`enable_dynamic_shape`. The KV cache is mutable buffers, max_context long, attended one of two
ways (ATTENTION):

* "custom-ops" (the default where the family allows it): ExecuTorch's LLM kernels, what its own
  `export_llm` emits: `llama::update_cache` writes the new keys and values in place ([1, max, kv
  heads, head dim]) and `llama::custom_sdpa` attends causally over the first start + n positions
  only (grouped-query heads read in place). Android's LlmModule runtime ships these kernels; the
  package's C API bundles a reference implementation (runtime_kernels/executorch_llm_ops.cpp)
  for an ExecuTorch build without them.
* "static-cache": transformers' static cache and aten SDPA over the whole max_context with a
  mask (portable ops): any family, sliding windows and soft-capping included, but every decode
  step reads and copies the whole cache (several times slower at 2048 positions).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .lowbit import BITS as LOWBIT_BITS
from .lowbit import LowbitEmbedding, LowbitLinear

#: ops that must never run outside the delegate where a planned quantized layer produced them
#: (a quantized linear left in portable ops, dequantized to float on every call)
QUANT_OPS = ("dequantize_affine", "quantize_affine", "choose_qparams_affine",
             "dequantize_per_channel_group", "choose_qparams_per_token_asymmetric",
             "quantize_per_token", "dequantize_per_token", "_weight_int4pack_mm",
             "linear_dynamic_fp16")
LINEAR_OPS = ("aten.linear.", "aten.mm.", "aten.addmm.", "aten.matmul.")


@dataclass
class DelegationAudit:
    """What the partitioner took: planned linears inside the delegate and what stayed outside."""

    delegates: int = 0
    planned_linears: int = 0
    delegated_linears: int = 0
    kernel_linears: int = 0  # planned linears computed by apq::lowbit_linear (lowbit.py)
    outside: Counter = field(default_factory=Counter)  # op name -> count, outside any delegate
    undelegated_modules: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"delegates": self.delegates, "planned_linears": self.planned_linears,
                "delegated_linears": self.delegated_linears,
                "kernel_linears": self.kernel_linears,
                "ops_outside_delegates": dict(sorted(self.outside.items())),
                "undelegated_modules": self.undelegated_modules}


def nibbles_high_first(qweight: np.ndarray) -> np.ndarray:
    """The core's 4-bit rows (element 2i in the low nibble of byte i) as embedding_4bit reads
    them (element 2i in the high nibble): the same codes, each byte's nibbles swapped."""
    q = np.asarray(qweight, dtype=np.uint8)
    return ((q & 0x0F) << 4) | (q >> 4)


def signed_codes(module) -> np.ndarray:
    """int8 codes [N, K] of a symmetric packed module: the stored codes minus the zero point
    2**(bits-1) (docs/formats.md)."""
    from apq_sdk.quant.packing import unpack_bits

    n, k = module.shape
    codes = unpack_bits(module.arrays["qweight"], module.bits, k)
    return (codes.astype(np.int16) - (1 << (module.bits - 1))).astype(np.int8).reshape(n, k)


def bf16_exact(scales: np.ndarray) -> bool:
    """Whether float16 scales are all bfloat16 values (what XNNPACK's 4-bit kernels store)."""
    s = torch.from_numpy(np.ascontiguousarray(scales, dtype=np.float16)).float()
    return bool(torch.equal(s.to(torch.bfloat16).float(), s))


def kernel_modules(checkpoint, lowbit_kernel: bool) -> set[str]:
    """The planned layers apq::lowbit_linear computes (lowbit.py): with `lowbit_kernel`, every
    2/3-bit layer, and a tied packed head, whose embedding lookup (apq::lowbit_embedding) then
    reads the head's own operands instead of a second copy of them."""
    if not lowbit_kernel:
        return set()
    out = {name for name, m in checkpoint.modules.items()
           if m.kind == "packed" and m.bits in LOWBIT_BITS
           and checkpoint.plan.modules[name].kind != "embedding"}
    head = checkpoint.modules.get("lm_head")
    if head is not None and head.kind == "packed" and checkpoint.config.tie_word_embeddings:
        out.add("lm_head")
    return out


def exportable_model(checkpoint, *, activation_quantization: bool = True,
                     lowbit_kernel: bool = False):
    """The reference model of `checkpoint` with every planned layer exportable (module docstring);
    `lowbit_kernel`: 2- and 3-bit layers become apq::lowbit_linear (else they are refused).
    Raises LoweringError for a layer the program cannot hold exactly."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor, IntxUnpackedToInt8TensorActivationQuantization)

    from apq_sdk.checkpoint import load_quantized
    from apq_sdk.placement import replace_module

    from ..onnx_graph import LoweringError

    model = load_quantized(checkpoint.path, checkpoint=checkpoint).eval()
    plan = checkpoint.plan
    int4 = {4: torch.int4}
    kernel = kernel_modules(checkpoint, lowbit_kernel)
    act = IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN \
        if activation_quantization else None
    for name, module in checkpoint.modules.items():
        entry = plan.modules[name]
        if entry.kind == "embedding":
            replace_module(model, name, HalfEmbedding(module.arrays["weight"],
                                                      _embed_scale(model)))
            continue
        bias = None if module.bias is None else torch.from_numpy(module.bias).float()
        if name in kernel:
            if not module.symmetric:
                raise LoweringError(f"{name}: {module.bits}-bit asymmetric groups; "
                                    f"apq::lowbit_linear takes symmetric groups")
            if not activation_quantization:
                raise LoweringError(f"{name}: apq::lowbit_linear always quantizes its "
                                    f"activations (int8 per token)")
            replace_module(model, name, LowbitLinear(module, bias))
            continue
        if module.kind == "packed":
            if module.bits not in int4 or not module.symmetric:
                raise LoweringError(f"{name}: {module.bits}-bit "
                                    f"{'symmetric' if module.symmetric else 'asymmetric'} groups "
                                    f"have no XNNPACK kernel (4-bit symmetric only; 2 and 3 bits "
                                    f"run apq::lowbit_linear on the android-lowbit target)")
            if module.shape[1] % module.group_size:
                raise LoweringError(f"{name}: groups of {module.group_size} do not divide its "
                                    f"input width {module.shape[1]}; XNNPACK would leave it in "
                                    f"float")
            if not bf16_exact(module.arrays["scales"]):
                raise LoweringError(f"{name}: its scales are not on bfloat16's grid, which "
                                    f"XNNPACK's 4-bit kernels store; quantize with a plan for "
                                    f"this target (scale_dtype bfloat16)")
            n, k = module.shape
            groups = k // module.group_size
            weight = IntxUnpackedToInt8Tensor(
                torch.from_numpy(signed_codes(module)),
                torch.from_numpy(module.arrays["scales"].astype(np.float32)),
                torch.zeros((n, groups), dtype=torch.int8), int4[module.bits],
                (1, module.group_size), torch.float32, act)
            linear = nn.Linear(k, n, bias=bias is not None)
            linear.weight = nn.Parameter(weight, requires_grad=False)
        else:
            weight = torch.from_numpy(module.arrays["weight"].astype(np.float32))
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
            linear.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias, requires_grad=False)
        replace_module(model, name, linear)
    if model.config.tie_word_embeddings and "lm_head" in checkpoint.modules:
        head = checkpoint.modules["lm_head"]
        if "lm_head" in kernel:  # the head's own operands, read by apq::lowbit_embedding
            lookup = LowbitEmbedding(model.get_submodule("lm_head"), _embed_scale(model))
        elif head.kind == "packed":
            lookup = Embedding4Bit(head, _embed_scale(model))
        else:
            lookup = HalfEmbedding(head.arrays["weight"], _embed_scale(model))
        model.set_input_embeddings(lookup)
    model.requires_grad_(False)
    return model


def _embed_scale(model):
    """The factor a family's embedding module multiplies its rows by inside the module
    (Gemma 3's scaled word embedding), or None."""
    scale = getattr(model.get_input_embeddings(), "embed_scale", None)
    return None if scale is None else torch.as_tensor(scale, dtype=torch.float32).clone()


class HalfEmbedding(nn.Module):
    """A float16 table looked up, then cast to float32 (the lookup copy weighs float16)."""

    def __init__(self, weight: np.ndarray, scale=None):
        super().__init__()
        self.register_buffer("weight", torch.from_numpy(
            np.ascontiguousarray(weight, dtype=np.float16)))
        self.register_buffer("embed_scale", scale)

    def forward(self, ids):
        rows = torch.nn.functional.embedding(ids, self.weight).float()
        return rows if self.embed_scale is None else rows * self.embed_scale


class Embedding4Bit(nn.Module):
    """A tied 4-bit head's rows looked up with quantized_decomposed::embedding_4bit: the core's
    codes (nibbles re-laid out) and float16 scales, no zero points; rows come out float32
    (scale widened, then multiplied: exact)."""

    def __init__(self, module, scale=None):
        super().__init__()
        self.register_buffer("embed_scale", scale)
        # registers the op with torch (its definition lives in ExecuTorch's quant patterns)
        import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401

        self.register_buffer("packed", torch.from_numpy(
            nibbles_high_first(module.arrays["qweight"])))
        self.register_buffer("scales", torch.from_numpy(
            np.ascontiguousarray(module.arrays["scales"], dtype=np.float16)))

    def forward(self, ids):
        rows = torch.ops.quantized_decomposed.embedding_4bit.dtype(
            self.packed, self.scales, None, -8, 7, ids, dtype=torch.float32)
        return rows if self.embed_scale is None else rows * self.embed_scale


#: how the program attends over its cache (module docstring)
ATTENTION_CUSTOM_OPS = "custom-ops"
ATTENTION_STATIC_CACHE = "static-cache"
ATTENTION = (ATTENTION_CUSTOM_OPS, ATTENTION_STATIC_CACHE)
#: the kernels the custom-ops program calls outside the XNNPACK delegate
LLM_OPS = ("llama::update_cache.out", "llama::custom_sdpa.out")
_CUSTOM_ATTENTION = "apq_executorch_custom_sdpa"  # transformers' attention-function name


def custom_ops_refusal(spec) -> str | None:
    """Why a family's attention cannot be llama::custom_sdpa (causal over the whole cache, no
    soft-capping), or None where it can."""
    if any(window is not None for window in spec.sliding_windows):
        return "its sliding-window layers (custom_sdpa attends over every cached position)"
    if spec.attn_softcap:
        return "its attention soft-capping (custom_sdpa has none)"
    return None


def load_llm_ops() -> None:
    """Register ExecuTorch's LLM ops with torch and their kernels with the Python runtime."""
    try:
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    except (ImportError, OSError) as exc:  # the wheel ships the library; a source build may not
        from ..onnx_graph import LoweringError

        raise LoweringError(
            f"ExecuTorch's LLM ops (llama::update_cache, llama::custom_sdpa) cannot be loaded: "
            f"{exc}. Install the executorch wheel (pip install 'apq-sdk[executorch]' "
            f"torch==2.13.0), or build with --target-option attention=static-cache") from exc


class _Position:
    """The first cache position of the running call, shared by the cache layers and the
    attention function (a SymInt while exporting)."""

    start = 0


def _custom_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                 **kwargs):
    """transformers' attention-function interface over llama::custom_sdpa: `query` [1, heads,
    n, dim]; `key`, `value` the whole cache [1, max, kv heads, dim] from _OpCacheLayer.update.
    Returns [1, n, heads, dim], as the interface does."""
    out = torch.ops.llama.custom_sdpa(query.transpose(1, 2), key, value,
                                      module.apq_position.start, None, 0.0, True, scaling)
    return out, None


def _register_custom_attention() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS.register(_CUSTOM_ATTENTION, _custom_sdpa)
    # custom_sdpa is causal from its start position: no mask is built
    ALL_MASK_ATTENTION_FUNCTIONS.register(_CUSTOM_ATTENTION, lambda *args, **kwargs: None)


def _op_cache_layer(max_context: int, kv_heads: int, head_dim: int, position: _Position):
    from transformers.cache_utils import StaticLayer

    class _OpCacheLayer(StaticLayer):
        """A cache layer laid out as llama::update_cache writes it, [1, max, kv heads, dim]."""

        def __init__(self):
            super().__init__(max_context)
            self.keys = torch.zeros(1, max_context, kv_heads, head_dim)
            self.values = torch.zeros(1, max_context, kv_heads, head_dim)
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            torch.ops.llama.update_cache(key_states.transpose(1, 2), self.keys, position.start)
            torch.ops.llama.update_cache(value_states.transpose(1, 2), self.values,
                                         position.start)
            return self.keys, self.values

    return _OpCacheLayer()


class OpCacheDecoder(nn.Module):
    """`forward(tokens [1, n], cache_position [n]) -> logits [1, n, vocab]` over ExecuTorch's
    LLM ops (ATTENTION_CUSTOM_OPS): the signature ExecuTorch's LLM runner calls."""

    def __init__(self, model, max_context: int):
        super().__init__()
        from transformers.cache_utils import StaticCache

        load_llm_ops()
        _register_custom_attention()
        config = model.config
        layers = model.model.layers
        if any(getattr(layer, "self_attn", None) is None for layer in layers):
            raise ValueError(f"{type(model).__name__}: a decoder layer without self_attn")
        config._attn_implementation = _CUSTOM_ATTENTION
        self.position = _Position()
        self.max_context = max_context
        head_dim = getattr(config, "head_dim", None) or \
            config.hidden_size // config.num_attention_heads
        self.cache = StaticCache(max_cache_len=max_context, config=config)
        self.cache.layers = [_op_cache_layer(max_context, config.num_key_value_heads, head_dim,
                                             self.position) for _ in layers]
        for i, layer in enumerate(self.cache.layers):
            self.register_buffer(f"key_cache_{i}", layer.keys, persistent=False)
            self.register_buffer(f"value_cache_{i}", layer.values, persistent=False)
        for layer in layers:  # a plain attribute (not a module): what _custom_sdpa reads
            object.__setattr__(layer.self_attn, "apq_position", self.position)
        self.llm = model  # module paths "llm.<the model's names>" (_clean_path)

    def forward(self, tokens, cache_position):
        start = cache_position[0].item()
        torch._check(start >= 0)
        torch._check(start + tokens.shape[1] <= self.max_context)
        self.position.start = start
        return self.llm(input_ids=tokens, position_ids=cache_position[None], cache=self.cache,
                        use_cache=True).logits


class CachedDecoder(nn.Module):
    """`forward(tokens [1, n], cache_position [n]) -> logits [1, n, vocab]` over transformers'
    static cache (mutable buffers, ATTENTION_STATIC_CACHE): the signature ExecuTorch's LLM
    runner calls."""

    def __init__(self, model, max_context: int):
        super().__init__()
        from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

        model.generation_config.use_cache = True
        model.generation_config.cache_implementation = "static"
        self.inner = TorchExportableModuleWithStaticCache(model, batch_size=1,
                                                          max_cache_len=max_context)

    def forward(self, tokens, cache_position):
        return self.inner(input_ids=tokens, cache_position=cache_position)


def export_program(model, max_context: int, attention: str = ATTENTION_STATIC_CACHE):
    """torch.export of the cached decoder (`attention`: one of ATTENTION), the sequence length
    dynamic from 1 to max_context."""
    if attention not in ATTENTION:
        raise ValueError(f"attention: expected one of {ATTENTION}, found {attention!r}")
    # the config may be shared with other models of the checkpoint: the attention function is
    # this program's only
    previous = model.config._attn_implementation
    try:
        decoder = (OpCacheDecoder if attention == ATTENTION_CUSTOM_OPS else CachedDecoder)(
            model, max_context).eval()
        seq = torch.export.Dim("seq", min=1, max=max_context)
        example = (torch.zeros((1, 2), dtype=torch.long), torch.arange(2, dtype=torch.long))
        with torch.no_grad():
            return torch.export.export(decoder, example, dynamic_shapes=({1: seq}, {0: seq}),
                                       strict=True)
    finally:
        model.config._attn_implementation = previous


def lower_program(exported, partitioners, metadata: dict):
    """to_edge_transform_and_lower with `partitioners`; the metadata become constant methods."""
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    return to_edge_transform_and_lower(
        exported, partitioner=list(partitioners),
        compile_config=EdgeCompileConfig(_check_ir_validity=False),
        constant_methods=metadata)


class LoadedMethod:
    """One method of a program loaded into ExecuTorch's Python runtime, holding the program.

    `Runtime.load_program(buffer).load_method(name)` lets the Program (and with it the bytes it
    reads constants and delegate blobs from) be collected while the method still points into
    them: execute then reads freed memory and, now and then, segfaults. Keep both here."""

    def __init__(self, source, name: str = "forward"):
        from executorch.runtime import Runtime

        self.program = Runtime.get().load_program(source)  # a path, or bytes it holds
        self.method = self.program.load_method(name)
        if self.method is None:
            raise KeyError(f"the program has no method {name!r}; it has "
                           f"{sorted(self.program.method_names)}")

    def execute(self, inputs):
        return self.method.execute(inputs)


def _op_name(node) -> str:
    target = node.target
    if "auto_functionalized" in str(target) and node.args and callable(node.args[0]):
        target = node.args[0]  # a mutating op (llama::update_cache) as functionalized
    name = getattr(target, "__name__", None) or str(target)
    schema = getattr(target, "_schema", None)
    if schema is not None:
        name = f"{schema.name.replace('::', '.')}.{schema.overload_name or 'default'}"
    return name


def _module_of(node, planned: set[str]) -> str | None:
    """The planned module a node was traced from (the innermost one in its module stack)."""
    stack = node.meta.get("nn_module_stack") or {}
    found = None
    for path, _ in stack.values():
        name = _clean_path(path)
        if name in planned:
            found = name
    return found


def _clean_path(path: str) -> str:
    """A module path as torch.export records it ("L['self'].inner.model.model.layers[0].mlp",
    "inner.model.model.layers.0.mlp", "llm.model.layers.0.mlp") as the transformers model
    names it."""
    import re

    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    for prefix in ("inner.model.", "llm."):  # CachedDecoder's, OpCacheDecoder's
        if path.startswith(prefix):
            path = path[len(prefix):]
    return path


#: the op a planned 2/3-bit linear must become outside the delegate (lowbit.py)
LOWBIT_OP = "apq.lowbit_linear."


def audit_delegation(edge, planned: set[str], kernel: set[str] = frozenset()) -> DelegationAudit:
    """Count what the partitioner took. A planned linear whose matmul or quantization ops stayed
    outside every delegate is listed by module name (the build refuses it), except the `kernel`
    modules, which must be computed by apq::lowbit_linear and nothing else."""
    audit = DelegationAudit(planned_linears=len(planned))
    program = edge.exported_program()
    delegated: set[str] = set()
    by_kernel: set[str] = set()
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        name = _op_name(node)
        if "executorch_call_delegate" in name:
            audit.delegates += 1
            lowered = getattr(program.graph_module, node.args[0].target)
            for inner in lowered.original_module.graph.nodes:
                module = _module_of(inner, planned) if inner.op == "call_function" else None
                if module is not None and any(op in _op_name(inner) for op in LINEAR_OPS):
                    delegated.add(module)
            continue
        if name in ("getitem", "<built-in function getitem>") or name.startswith("getitem"):
            continue
        short = name.split(".")[1] if name.count(".") >= 2 else name
        audit.outside[short] += 1
        module = _module_of(node, planned)
        if LOWBIT_OP in name:
            if module in kernel:
                by_kernel.add(module)
            elif module is not None and module not in audit.undelegated_modules:
                audit.undelegated_modules.append(module)  # not planned for the kernel
            continue
        quant = any(op in name for op in QUANT_OPS)
        if module is not None and (quant or any(op in name for op in LINEAR_OPS)):
            if module not in audit.undelegated_modules:
                audit.undelegated_modules.append(module)
    audit.delegated_linears = len(delegated)
    audit.kernel_linears = len(by_kernel)
    delegated_kernel = sorted(set(kernel) & delegated)  # a kernel module in the delegate
    missing = sorted(planned - delegated - by_kernel - set(audit.undelegated_modules))
    missing += delegated_kernel
    audit.undelegated_modules = sorted(set(audit.undelegated_modules) | set(missing))
    return audit


class _Recording(nn.Module):
    """A planned linear that also hands its input and output to the recorder's list."""

    def __init__(self, inner: nn.Module, sink: list, name: str, order: list):
        super().__init__()
        self.inner = inner
        self._sink, self._name, self._order = sink, name, order

    def forward(self, x):
        y = self.inner(x)
        self._sink.extend((x, y))
        self._order.append(self._name)
        return y


class LinearRecorder(nn.Module):
    """`forward(tokens [1, n]) -> (logits, x_0, y_0, x_1, y_1, ...)`: the exportable model
    (no cache) that also returns every planned linear's input and output, in the order they run
    (`order`, known after one call)."""

    def __init__(self, model, names: list[str]):
        from apq_sdk.placement import replace_module

        super().__init__()
        self._sink: list = []
        self.order: list[str] = []
        for name in names:
            replace_module(model, name, _Recording(model.get_submodule(name), self._sink, name,
                                                   self.order))
        self.model = model

    def forward(self, tokens):
        self._sink.clear()
        self.order.clear()
        logits = self.model(input_ids=tokens, use_cache=False).logits
        return (logits, *self._sink)


#: decoder layers the recording program keeps (the full program's weights are read back bit
#: for bit anyway; lowering a 30-layer recorder would double the build's time)
RECORDED_LAYERS = 2


def recording_program(checkpoint, length: int, partitioners, layers: int = RECORDED_LAYERS,
                      lowbit_kernel: bool = False):
    """The recorder of `checkpoint` for `length` tokens, lowered like the package's program:
    its first `layers` decoder layers, the final norm and the head, every linear recorded."""
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    model = exportable_model(checkpoint, lowbit_kernel=lowbit_kernel)
    kept = truncate_layers(model, layers)
    names = [n for n, m in checkpoint.plan.modules.items()
             if m.kind in ("linear", "lm_head") and _layer_of(n) in kept]
    recorder = LinearRecorder(model, names).eval()
    example = (torch.zeros((1, length), dtype=torch.long),)
    with torch.no_grad():
        recorder(*example)
        order = list(recorder.order)
        exported = torch.export.export(recorder, example, strict=True)
    edge = to_edge_transform_and_lower(exported, partitioner=list(partitioners),
                                       compile_config=EdgeCompileConfig(_check_ir_validity=False))
    return edge.to_executorch().buffer, order


def cache_probe_program(checkpoint, max_context: int, attention: str, partitioners,
                        layers: int = RECORDED_LAYERS) -> bytes:
    """The package's cache and attention (`attention`, max_context long) over float32 weights
    (the checkpoint's, dequantized) and its first `layers` layers: a program whose prefill and
    decode must equal its full sequence exactly, as no int8 rounding amplifies the attention
    kernel's summation order (verify's exact KV-cache check)."""
    from apq_sdk.checkpoint import load_quantized
    from apq_sdk.placement import replace_module
    from apq_sdk.quant.modules import QuantLinear

    model = load_quantized(checkpoint.path, checkpoint=checkpoint).eval()
    for name, entry in checkpoint.plan.modules.items():
        if entry.kind == "embedding":
            continue
        module = model.get_submodule(name)
        weight = module.quantized.dequantize().float() if isinstance(module, QuantLinear) \
            else module.weight.detach().float()
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None)
        linear.weight = nn.Parameter(weight.clone(), requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach().float().clone(), requires_grad=False)
        replace_module(model, name, linear)
    truncate_layers(model, layers)
    model.requires_grad_(False)
    exported = export_program(model, max_context, attention)
    return lower_program(exported, partitioners, {}).to_executorch().buffer


def _layer_of(name: str) -> int | None:
    """The decoder layer a module belongs to (`model.layers.<i>.`), None for the head."""
    import re

    match = re.search(r"\.layers\.(\d+)\.", name)
    return None if match is None else int(match.group(1))


def truncate_layers(model, layers: int) -> set:
    """Keep the first `layers` decoder layers (and the config's per-layer lists in step);
    returns the kept layer indices with None (the modules outside the layers)."""
    stack = model.model.layers
    keep = min(layers, len(stack))
    if keep < len(stack):
        model.model.layers = stack[:keep]
        config = model.config
        config.num_hidden_layers = keep
        for key in ("layer_types", "sliding_window_pattern_list"):
            value = getattr(config, key, None)
            if isinstance(value, list):
                setattr(config, key, value[:keep])
    return {*range(keep), None}
