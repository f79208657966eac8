"""The decoder of a quantized checkpoint as a torch module Core AI converts: every family of
apq_sdk.families from its `DecoderSpec` (as targets/onnx_graph.py writes it for ONNX), with

* the planned weights as `coreai::constexpr_blockwise_shift_scale` over the core's own codes,
  scales and zero points (targets/coreai/weights.py): the asset stores them as they are, and the
  runtime expands them;
* the KV cache as two mutable buffers, `keyCache` and `valueCache`, [layers, 1, kv_heads,
  max_context, head_dim] float16, which Core AI turns into function state;
* the signature Apple's CoreAILanguageModel calls (its "dynamic" structure):
  `(input_ids int32 [1, q], position_ids int32 [1, past + q]) -> logits float16 [1, q, vocab]`,
  the new tokens' cache offset being `past = position_ids.shape[1] - q` (no mask input).

Arithmetic is float32 between the weights (float16 values, widened exactly; 16-bit layers multiply
in float16, see `Decoder.linear`) and the cache
(float16, as on the device); attention is written out (matmul, mask, softmax), so Gemma 2's soft
caps and sliding windows are the same ops as everywhere else.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

KEY_CACHE, VALUE_CACHE = "keyCache", "valueCache"  # CoreAILanguageModel's state names
INPUT_NAMES = ("input_ids", "position_ids")
OUTPUT_NAMES = ("logits",)


class Decoder(nn.Module):
    """`forward(input_ids [1, q], position_ids [1, past + q]) -> logits [1, q, vocab]` over the
    cache buffers (module docstring). `weights` builds each planned module's weight."""

    def __init__(self, checkpoint, weights, max_context: int):
        super().__init__()
        spec = checkpoint.spec
        self.spec = spec
        self.max_context = int(max_context)
        self.weights = weights
        self.modules_ = checkpoint.modules
        shape = (spec.num_layers, 1, spec.num_kv_heads, self.max_context, spec.head_dim)
        self.register_buffer(KEY_CACHE, torch.zeros(shape, dtype=torch.float16))
        self.register_buffer(VALUE_CACHE, torch.zeros(shape, dtype=torch.float16))
        self._norms: dict[str, torch.Tensor] = {}
        for name, table in sorted(spec.rope_tables.items()):
            self.register_buffer(f"inv_freq_{name}", torch.from_numpy(
                np.asarray(table.inv_freq, dtype=np.float32).copy()), persistent=False)
        self.layer_weights = nn.ModuleDict()
        # every planned module's weight, registered once (a tied head's lookup shares it)
        for name, module in checkpoint.modules.items():
            self.layer_weights[_key(name)] = weights(module)
        # every other stored tensor (norms, an unplanned embedding or head, biases), float32
        planned = set(checkpoint.modules)
        self.float_tensors = nn.ParameterDict()
        for name, value in sorted(checkpoint.tensors.items()):
            owner, _, leaf = name.rpartition(".")
            if owner in planned and leaf in ("qweight", "scales", "qzeros", "weight"):
                continue
            self.float_tensors[_key(name)] = _frozen(value)
        for name, module in checkpoint.modules.items():
            if module.bias is not None and _key(f"{name}.bias") not in self.float_tensors:
                self.float_tensors[_key(f"{name}.bias")] = _frozen(module.bias)

    # -- pieces --------------------------------------------------------------------------------------

    def _tensor(self, name: str) -> torch.Tensor:
        key = _key(name)
        if key not in self.float_tensors:
            from ..onnx_graph import LoweringError

            raise LoweringError(f"the checkpoint has no tensor {name!r} "
                                f"({self.spec.family} layout expected)")
        return self.float_tensors[key]

    def weight(self, name: str) -> torch.Tensor:
        """The float16 weight [N, K] of a planned module (expanded from its blocks, or stored)."""
        return self.layer_weights[_key(name)]()

    def linear(self, x, name: str):
        """x @ W^T (+ b). A block-quantized weight is widened to float32 after the runtime
        expands it; a 16-bit one multiplies in float16, since Core AI's converter folds a cast of
        a stored constant into a float32 copy (twice the bytes the plan counts)."""
        module = self.modules_[name]
        if module.kind == "float16":
            y = (x.to(torch.float16) @ self.weight(name).t()).float()
        else:
            y = x @ self.weight(name).float().t()
        return y if module.bias is None else y + self._tensor(f"{name}.bias")

    def rms_norm(self, x, name: str):
        w = self._tensor(f"{name}.weight")
        if self.spec.norm_offset:
            w = 1.0 + w
        var = (x * x).mean(-1, keepdim=True)
        return x * torch.rsqrt(var + self.spec.rms_eps) * w

    def activation(self, x):
        act = self.spec.hidden_act
        if act in ("silu", "swish"):
            return x * torch.sigmoid(x)
        if act in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
            return nn.functional.gelu(x, approximate="tanh")
        if act == "gelu":
            return nn.functional.gelu(x)
        from ..onnx_graph import LoweringError

        raise LoweringError(f"hidden activation {act!r} is not supported by the Core AI target")

    @staticmethod
    def softcap(x, cap: float):
        return torch.tanh(x / cap) * cap

    def rotary(self, positions):
        """{table: (cos, sin, rotary_dim)}, cos and sin [1, 1, q, rotary_dim]."""
        out = {}
        pos = positions.float()[:, None]
        for name, table in sorted(self.spec.rope_tables.items()):
            freqs = pos * getattr(self, f"inv_freq_{name}")[None, :]
            emb = torch.cat([freqs, freqs], dim=-1)
            cos, sin = torch.cos(emb), torch.sin(emb)
            if table.scaling != 1.0:
                cos, sin = cos * table.scaling, sin * table.scaling
            out[name] = (cos[None, None], sin[None, None], table.rotary_dim)
        return out

    def apply_rotary(self, x, rope):
        cos, sin, r = rope
        rot, rest = (x, None) if r == self.spec.head_dim else (x[..., :r], x[..., r:])
        x1, x2 = rot[..., : r // 2], rot[..., r // 2:]
        out = rot * cos + torch.cat([-x2, x1], dim=-1) * sin
        return out if rest is None else torch.cat([out, rest], dim=-1)

    def heads(self, x, count: int):
        """[1, q, count * D] -> [1, count, q, D]."""
        return x.reshape(1, x.shape[1], count, self.spec.head_dim).transpose(1, 2)

    def attention(self, i: int, x, ropes, past, allowed):
        spec = self.spec
        names, norms = spec.linear_names(i), spec.norm_names(i)
        h, hkv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        q_len = x.shape[1]
        if spec.stored_fused:
            qkv = self.linear(x, names["qkv"])
            q, k, v = qkv[..., : h * hd], qkv[..., h * hd:(h + hkv) * hd], \
                qkv[..., (h + hkv) * hd:]
        else:
            q, k, v = (self.linear(x, names[r]) for r in ("q", "k", "v"))
        rope = spec.layer_rope[i]

        def position(t, count, role):
            t = self.heads(t, count)
            if spec.qk_norm:
                t = self.rms_norm(t, norms[role])
            return t if rope is None else self.apply_rotary(t, ropes[rope])

        q, k = position(q, h, "q"), position(k, hkv, "k")
        v = self.heads(v, hkv)
        kc, vc = getattr(self, KEY_CACHE), getattr(self, VALUE_CACHE)
        kc[i, :, :, past:past + q_len] = k.to(torch.float16)
        vc[i, :, :, past:past + q_len] = v.to(torch.float16)
        rep, size = h // hkv, self.max_context
        # every query head reads its KV head's cache ([1, Hkv, S, D] -> [1, H, S, D])
        keys = kc[i].float()[:, :, None].expand(1, hkv, rep, size, hd).reshape(1, h, size, hd)
        values = vc[i].float()[:, :, None].expand(1, hkv, rep, size, hd).reshape(1, h, size, hd)
        scores = (q @ keys.transpose(-1, -2)) * spec.attn_scale  # [1, H, q, S]
        if spec.attn_softcap is not None:
            scores = self.softcap(scores, spec.attn_softcap)
        scores = scores.masked_fill(~allowed[spec.sliding_windows[i]], float("-inf"))
        ctx = torch.softmax(scores, dim=-1) @ values  # [1, H, q, D]
        ctx = ctx.transpose(1, 2).reshape(1, q_len, h * hd)
        return self.linear(ctx, names["o"])

    def mlp(self, i: int, x):
        names = self.spec.linear_names(i)
        if self.spec.stored_fused:
            gate_up = self.linear(x, names["gate_up"])
            n = self.spec.intermediate_size
            gate, up = gate_up[..., :n], gate_up[..., n:]
        else:
            gate, up = self.linear(x, names["gate"]), self.linear(x, names["up"])
        return self.linear(self.activation(gate) * up, names["down"])

    def embedding(self, input_ids):
        spec = self.spec
        name = spec.embedding_name
        if name in self.modules_:  # planned table (an untied model's)
            table = self.weight(name)
        elif spec.tie_word_embeddings and "lm_head" in self.modules_:
            table = self.weight("lm_head")
        else:
            table = self._tensor(f"{name}.weight")
        x = nn.functional.embedding(input_ids.long(), table).float()  # rows, then widened
        return x if spec.embed_scale is None else x * spec.embed_scale

    def masks(self, past, q_len):
        """{window: bool [q, S]}: key j visible from query i (causal, sliding window)."""
        spec = self.spec
        kv = torch.arange(self.max_context)[None, :]
        qi = (torch.arange(q_len) + past)[:, None]
        causal = kv <= qi
        return {window: causal if window is None else causal & (kv > qi - window)
                for window in set(spec.sliding_windows)}

    # -- whole model ---------------------------------------------------------------------------------

    def forward(self, input_ids, position_ids):
        spec = self.spec
        q_len = input_ids.shape[1]
        past = position_ids.shape[1] - q_len
        if not torch.jit.is_tracing():  # torch.export's bounds (jit.trace keeps sizes as tensors)
            torch._check(past >= 0)
            torch._check(past + q_len <= self.max_context)
        positions = position_ids[0, past:]
        ropes = self.rotary(positions)
        allowed = self.masks(past, q_len)
        x = self.embedding(input_ids)
        for i in range(spec.num_layers):
            norms = spec.norm_names(i)
            a = self.attention(i, self.rms_norm(x, norms["attn_in"]), ropes, past, allowed)
            if "attn_out" in norms:
                a = self.rms_norm(a, norms["attn_out"])
            x = x + a
            m = self.mlp(i, self.rms_norm(x, norms["mlp_in"]))
            if "mlp_out" in norms:
                m = self.rms_norm(m, norms["mlp_out"])
            x = x + m
        x = self.rms_norm(x, spec.final_norm_name)
        if "lm_head" in self.modules_:
            logits = self.linear(x, "lm_head")
        else:
            name = f"{spec.embedding_name}.weight" if spec.tie_word_embeddings \
                else "lm_head.weight"
            logits = x @ self._tensor(name).t()
        if spec.final_softcap is not None:
            logits = self.softcap(logits, spec.final_softcap)
        return logits.to(torch.float16)

    def reset(self) -> None:
        getattr(self, KEY_CACHE).zero_()
        getattr(self, VALUE_CACHE).zero_()


def _frozen(value) -> nn.Parameter:
    return nn.Parameter(torch.from_numpy(np.array(value, dtype=np.float32)), requires_grad=False)


def _key(name: str) -> str:
    """A module name as a ModuleDict key (no dots)."""
    return name.replace(".", "__")
