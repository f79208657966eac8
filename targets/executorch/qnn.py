"""The qualcomm target's quantized graph: ExecuTorch's QNN quantizer over the core's integers.

QNN's HTP runs statically quantized graphs. ExecuTorch's `QnnQuantizer` (its 16a4w_block
configuration, what its Qualcomm LLM examples use) annotates the exported model: every
activation a uint16 on a per-tensor grid calibrated ahead of time, every linear's weight int4
per block in QNN's block encoding (a float scale per row, a 4-bit multiplier 1..16 per block,
codes -7..7). `prepare_pt2e` inserts observers, calibration text runs through them, and
`convert_pt2e` writes the quantize/dequantize pairs the QNN partitioner lowers.

What this module changes in that flow: QNN's own weight observer (`PerBlockParamObserver`, the
min/max of each block: round to nearest) is replaced by `CheckpointBlockScales`, which returns
the checkpoint's block scales, so the weights the graph quantizes are the core's GPTQ codes, bit
for bit. That needs scales on QNN's grid (the plan's scale_dtype "qnn-lpbq",
apq_sdk.quant.weights.lpbq_scales); `check_weights` proves it on the converted graph.

The converted graph runs in torch: quantize/dequantize at every annotated activation, the
arithmetic between them in float32. That is the simulation of what QNN's static 16-bit
activations cost (bench/bench_qnn_simulation.py). Not simulated: the HTP's own integer kernels
(fixed-point requantization inside ops, its softmax and norm implementations).

The embedding lookup of a tied head is left unannotated (QNN's embedding annotator would quantize
the whole table per tensor): it reads the core's 4-bit codes with embedding_4bit, as on android.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

#: Snapdragon SoCs (ExecuTorch's names) whose HTP the quantizer is made for
QNN_SOCS = ("SM8650", "SM8750", "SM8850")
DEFAULT_SOC = "SM8650"


def qnn_quantizer(soc: str = DEFAULT_SOC):
    """ExecuTorch's QnnQuantizer for the HTP of `soc`: 16-bit activations, 4-bit block weights."""
    from executorch.backends.qualcomm.quantizer.quantizer import QnnQuantizer, QuantDtype
    from executorch.backends.qualcomm.serialization.qc_schema import QcomChipset
    from torchao.quantization.pt2e import MinMaxObserver

    if soc not in QNN_SOCS:
        raise ValueError(f"soc: expected one of {QNN_SOCS}, found {soc!r}")
    with _sdk_left_alone():
        quantizer = QnnQuantizer(soc_model=getattr(QcomChipset, soc))
    # ranges over every calibration window (the configuration's default observer is a moving
    # average, which keeps the first window's ranges and clips the rest)
    quantizer.set_default_quant_config(QuantDtype.use_16a4w_block, is_linear_per_channel=True,
                                       act_observer=MinMaxObserver)
    return quantizer


@contextlib.contextmanager
def _sdk_left_alone():
    """Without QNN_SDK_ROOT, ExecuTorch's Qualcomm backend tries to download the SDK when the
    quantizer is made; an empty QNN_SDK_ROOT tells it the SDK is the caller's business (the
    quantizer itself needs none of it)."""
    if os.environ.get("QNN_SDK_ROOT") is not None:
        yield
        return
    os.environ["QNN_SDK_ROOT"] = ""
    try:
        yield
    finally:
        os.environ.pop("QNN_SDK_ROOT", None)


#: the additive causal mask of the attention QNN runs: a bounded value, as Qualcomm's own LLM
#: adaptations use, because a per-tensor 16-bit grid over scores plus float32's minimum (what
#: transformers adds) leaves the scores no precision at all; e**-100 is 0 in softmax all the same
MASK_VALUE = -100.0
_ATTENTION = "apq_qnn_bounded_mask"  # transformers' attention-function name


def _bounded_mask_attention(module, query, key, value, attention_mask, scaling=None,
                            dropout=0.0, **kwargs):
    """Causal attention over one whole window [1, heads, L, dim] with MASK_VALUE above the
    diagonal: matmul, add, softmax, matmul, each an op QNN quantizes on its own grid."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    length = scores.shape[-1]
    mask = torch.triu(torch.full((length, length), MASK_VALUE, dtype=scores.dtype), diagonal=1)
    probs = torch.softmax(scores + mask, dim=-1)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def use_bounded_mask(model: nn.Module) -> nn.Module:
    """`model` (a transformers model) attending with `_bounded_mask_attention`."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS.register(_ATTENTION, _bounded_mask_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(_ATTENTION, lambda *args, **kwargs: None)
    model.config._attn_implementation = _ATTENTION
    return model


def float_model(checkpoint) -> nn.Module:
    """The checkpoint's torch reference with every planned linear a plain `nn.Linear` holding
    its dequantized weight (codes x float16 scales: exact in float32), which the quantizer
    annotates; a tied 4-bit head's lookup reads the head's codes (embedding_4bit)."""
    from apq_sdk.checkpoint import load_quantized
    from apq_sdk.placement import replace_module

    from ..onnx_graph import LoweringError
    from .program import Embedding4Bit, _embed_scale, custom_ops_refusal

    refusal = custom_ops_refusal(checkpoint.spec)
    if refusal:
        raise LoweringError(f"{checkpoint.spec.family}: the qualcomm graph attends causally over "
                            f"whole windows and cannot serve {refusal}")
    model = use_bounded_mask(load_quantized(checkpoint.path, checkpoint=checkpoint).eval())
    for name, module in checkpoint.modules.items():
        entry = checkpoint.plan.modules[name]
        if entry.kind == "embedding":
            continue
        if module.kind != "packed" or module.bits != 4 or entry.scale_dtype != "qnn-lpbq":
            raise LoweringError(
                f"{name}: {module.bits}-bit, scale grid {entry.scale_dtype}; QNN's HTP takes "
                f"4-bit blocks on its own grid (scale_dtype qnn-lpbq): quantize with a plan for "
                f"the qualcomm target")
        n, k = module.shape
        if k % module.group_size:
            raise LoweringError(f"{name}: groups of {module.group_size} do not divide its input "
                                f"width {k}; QNN's blocks must")
        weight = torch.from_numpy(dequantized(module))
        linear = nn.Linear(k, n, bias=module.bias is not None)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(torch.from_numpy(module.bias).float(), requires_grad=False)
        replace_module(model, name, linear)
    if model.config.tie_word_embeddings and "lm_head" in checkpoint.modules:
        model.set_input_embeddings(Embedding4Bit(checkpoint.modules["lm_head"],
                                                 _embed_scale(model)))
    model.requires_grad_(False)
    return model


def dequantized(module) -> np.ndarray:
    """float32 [N, K]: the signed codes times their block's float16 scale (exact)."""
    from .program import signed_codes

    codes = signed_codes(module).astype(np.float32)
    scales = np.repeat(module.arrays["scales"].astype(np.float32), module.group_size, axis=1)
    return codes * scales


class _Logits(nn.Module):
    """tokens [1, L] -> logits [1, L, vocab], no cache (attribute `llm`: program._clean_path)."""

    def __init__(self, model):
        super().__init__()
        self.llm = model

    def forward(self, tokens):
        return self.llm(input_ids=tokens, use_cache=False).logits


def _block_scales_observer():
    from executorch.backends.qualcomm.quantizer.observers.per_block_param_observer import (
        PerBlockParamObserver)

    class CheckpointBlockScales(PerBlockParamObserver):
        """QNN's per-block weight observer with the checkpoint's scales instead of min/max."""

        def __init__(self, observer: PerBlockParamObserver, scales: torch.Tensor):
            super().__init__(dtype=observer.dtype, block_size=observer.block_size,
                             quant_min=observer.quant_min, quant_max=observer.quant_max,
                             eps=observer.eps)
            self.original_dtype = torch.float32
            self.register_buffer("scales", scales)

        def forward(self, x):
            return x

        def calculate_qparams(self):
            return self.scales, torch.zeros(self.scales.shape, dtype=torch.int8)

    return CheckpointBlockScales


@dataclass
class QnnGraph:
    """The converted graph and where its quantized linears are."""

    module: torch.fx.GraphModule
    linears: dict[str, str]  # planned module name -> its linear node in the graph


def linear_names(graph: torch.fx.GraphModule, planned: set[str]) -> dict[str, str]:
    """planned module name -> the name of its aten.linear node (from the export's module stack)."""
    from .program import _module_of

    out = {}
    for node in graph.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.linear.default:
            name = _module_of(node, planned)
            if name is not None:
                out[name] = node.name
    return out


def quantize_graph(checkpoint, calibration: torch.Tensor, *, soc: str = DEFAULT_SOC,
                   progress=None) -> QnnGraph:
    """Export the checkpoint's model for windows shaped like `calibration` [n, L], annotate it
    with QnnQuantizer (16a4w_block, the checkpoint's block sizes and scales), calibrate the
    activation ranges on every window and convert. Raises LoweringError when a planned linear
    is missing from the graph or its weights would not be the checkpoint's."""
    planned = {n for n, m in checkpoint.plan.modules.items() if m.kind != "embedding"}
    blocks = {name: checkpoint.modules[name].group_size for name in planned}
    graph = convert(float_model(checkpoint), calibration, blocks, soc=soc, progress=progress,
                    observe=lambda prepared, linears: _fix_weight_observers(prepared, checkpoint,
                                                                            linears))
    check_weights(graph, checkpoint)
    return graph


def convert(model: nn.Module, calibration: torch.Tensor, blocks: dict[str, int], *,
            soc: str = DEFAULT_SOC, progress=None, observe=None) -> QnnGraph:
    """ExecuTorch's QNN PTQ flow on a transformers model: export for windows shaped like
    `calibration` [n, L], QnnQuantizer with 16a4w_block over the linears named in `blocks`
    (module name -> block size), `observe(prepared, linears)` (the place to replace observers),
    every calibration window through the observers, convert_pt2e."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    with torch.no_grad():
        exported = torch.export.export(_Logits(model), (calibration[:1],), strict=False).module()
        linears = linear_names(exported, set(blocks))
        quantizer = qnn_quantizer(soc)
        quantizer.set_block_size_map({node: (1, blocks[name]) for name, node in linears.items()})
        quantizer.add_discard_ops([torch.ops.aten.embedding.default])
        prepared = prepare_pt2e(exported, quantizer)
        if observe is not None:
            observe(prepared, linears)
        for i in range(calibration.shape[0]):
            prepared(calibration[i:i + 1])
            if progress is not None:
                progress(i + 1, calibration.shape[0])
        converted = convert_pt2e(prepared)
    return QnnGraph(converted, linears)


def block_encoding(scales: torch.Tensor) -> torch.Tensor:
    """The block scales [N, G] QNN runs with for float block scales: what ExecuTorch's QNN
    builder (node_visitor.make_qnn_per_block_config, ExecuTorch 1.5.1) stores, a row scale =
    largest / 16 and a multiplier clamp(round(scale / row scale), 1, 16) per block."""
    row = scales.amax(-1, keepdim=True) / 16
    return row * torch.clamp(torch.round(scales / row), 1, 16)


def encode_blocks(graph: QnnGraph) -> None:
    """Set every block-quantized weight's scales in `graph` to what QNN's builder makes of them
    (block_encoding), its codes unchanged: what a graph with float block scales (QNN's own PTQ)
    computes once lowered. A no-op on scales already on the grid (the checkpoint's)."""
    module = graph.module
    nodes = {node.name: node for node in module.graph.nodes}
    for node_name in graph.linears.values():
        dq = nodes[node_name].args[1]
        if "dequantize_affine" in str(dq.target):
            scale = dq.args[2]
            setattr(module, scale.target, block_encoding(getattr(module, scale.target)))


def _fix_weight_observers(prepared, checkpoint, linears: dict[str, str]) -> None:
    """Every planned linear's weight observer made the checkpoint's block scales (before any
    calibration runs: a planned layer missing from the graph fails here)."""
    from ..onnx_graph import LoweringError

    planned = {n for n, m in checkpoint.plan.modules.items() if m.kind != "embedding"}
    missing = sorted(planned - set(linears))
    if missing:
        raise LoweringError(f"{len(missing)} planned layers are not linears of the exported "
                            f"graph: {', '.join(missing[:8])}")
    observer_cls = _block_scales_observer()
    nodes = {node.name: node for node in prepared.graph.nodes}
    for name, node_name in linears.items():
        weight = nodes[node_name].args[1]
        if weight.op != "call_module":
            raise LoweringError(f"{name}: QnnQuantizer did not observe its weight")
        observer = prepared.get_submodule(weight.target)
        if tuple(observer.block_size) != (1, checkpoint.modules[name].group_size):
            raise LoweringError(f"{name}: QnnQuantizer made blocks of "
                                f"{tuple(observer.block_size)}, the plan groups of "
                                f"{checkpoint.modules[name].group_size}")
        scales = torch.from_numpy(checkpoint.modules[name].arrays["scales"].astype(np.float32))
        setattr(prepared, weight.target, observer_cls(observer, scales))


def check_weights(graph: QnnGraph, checkpoint) -> None:
    """Every planned linear's weight in the converted graph is quantized to the checkpoint's
    codes with its scales, in QNN's int4 range and block encoding; else LoweringError."""
    from ..onnx_graph import LoweringError
    from .program import signed_codes

    module = graph.module
    nodes = {node.name: node for node in module.graph.nodes}
    for name, node_name in graph.linears.items():
        dq = nodes[node_name].args[1]
        if "dequantize_affine" not in str(dq.target):
            raise LoweringError(f"{name}: its weight is not block-dequantized in the graph "
                                f"({dq.target})")
        q, block, scale, zero, _, qmin, qmax = dq.args[:7]
        if q.op == "get_attr":  # convert_pt2e folded quantize_affine(weight) into its codes
            codes = getattr(module, q.target)
        elif "quantize_affine" in str(q.target) and q.args[0].op == "get_attr":
            codes = torch.ops.torchao.quantize_affine(getattr(module, q.args[0].target),
                                                      *q.args[1:])
        else:
            raise LoweringError(f"{name}: its weight is not a block-quantized constant "
                                f"({q.target})")
        stored = checkpoint.modules[name]
        want = torch.from_numpy(signed_codes(stored))
        scales = getattr(module, scale.target)
        if (qmin, qmax) != (-7, 7) or tuple(block) != (1, stored.group_size):
            raise LoweringError(f"{name}: QNN range {qmin}..{qmax}, blocks {tuple(block)}; "
                                f"expected -7..7 and (1, {stored.group_size})")
        if not torch.equal(scales, torch.from_numpy(stored.arrays["scales"].astype(np.float32))):
            raise LoweringError(f"{name}: the graph's block scales are not the checkpoint's")
        if not torch.equal(codes.to(torch.int8), want) or bool(getattr(module, zero.target).any()):
            raise LoweringError(f"{name}: the graph's int4 codes are not the checkpoint's")
