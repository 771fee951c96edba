"""A lean one-token decode step for Llama-family HF models (Qwen2, Llama, Mistral) in the torch engine.

The torch engine calls the model once per generated token. On a small model most of an HF forward is Python
around tiny kernels: the model-level wrappers (output capturing, config defaults), the attention mask built anew,
three query/key/value and two gate/up projections, the key/value heads repeated for grouped-query attention. This
step runs the same computation with the model's own modules where they are cheap (norms, rotary embedding,
output and down projections, activation, the ``DynamicCache``), one matrix product for the query/key/value
projections and one for gate/up, and SDPA with its own grouped-query support (a fifth less time per generated
token on the tiny models, docs/benchmarks.md). Its logits equal HF's forward (to float rounding;
bit for bit on the CPUs we test, tests/unit/test_lean_decode.py), so the engine samples the same tokens.

The fused projections cost no memory: the query/key/value (and gate/up) parameters become views of one tensor
each, so ``load_weights``' in-place copies land in it. Any other architecture or setting (sliding windows,
per-head query/key norms, another attention implementation) keeps the HF forward (``lean_decoder`` gives None).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # the same in Qwen2 and Mistral

LEAN_MODEL_TYPES = ("qwen2", "llama", "mistral")


@dataclass(frozen=True)
class _FusedLayer:
    qkv_weight: Tensor
    qkv_bias: Tensor | None
    qkv_sizes: tuple[int, int, int]
    gate_up_weight: Tensor
    gate_up_bias: Tensor | None


def lean_decoder(model: torch.nn.Module) -> LeanDecoder | None:
    """The lean step for ``model``, or None when its architecture or settings need HF's own forward."""
    config = model.config
    if getattr(config, "model_type", None) not in LEAN_MODEL_TYPES or not _full_attention(config):
        return None
    if getattr(config, "_attn_implementation", None) != "sdpa" or getattr(config, "pretraining_tp", 1) != 1:
        return None
    layers = model.model.layers
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        if not all(hasattr(attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim")):
            return None
        if any(hasattr(attn, name) for name in ("q_norm", "k_norm")):
            return None
        if len({proj.bias is None for proj in (attn.q_proj, attn.k_proj, attn.v_proj)}) != 1:
            return None
        if (mlp.gate_proj.bias is None) != (mlp.up_proj.bias is None):
            return None
    return LeanDecoder(model)


def _full_attention(config) -> bool:
    """Every layer attends to the whole context (no sliding window in effect)."""
    layer_types = getattr(config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types):
        return False
    if config.model_type == "qwen2":
        return not getattr(config, "use_sliding_window", False)
    return getattr(config, "sliding_window", None) is None


class LeanDecoder:
    """``step(tokens, mask, positions, cache)``: next-token logits of one decode step, the cache extended in place."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.layers = [_fuse(layer) for layer in model.model.layers]

    def step(self, tokens: Tensor, mask: Tensor, positions: Tensor, cache) -> Tensor:
        """tokens [N] long, mask [N,L] (1: attended; L counts the new token), positions [N] long, ``cache`` a
        ``DynamicCache`` holding L-1 positions -> logits [N,V]."""
        decoder = self.model.model
        rows = tokens.shape[0]
        hidden = decoder.embed_tokens(tokens[:, None])
        cos, sin = decoder.rotary_emb(hidden, positions[:, None])
        attend = mask.bool()[:, None, None, :]
        for index, (layer, fused) in enumerate(zip(decoder.layers, self.layers)):
            attn = layer.self_attn
            residual = hidden
            hidden = layer.input_layernorm(hidden)
            query, key, value = F.linear(hidden, fused.qkv_weight, fused.qkv_bias).split(fused.qkv_sizes, dim=-1)
            query = query.view(rows, 1, -1, attn.head_dim).transpose(1, 2)
            key = key.view(rows, 1, -1, attn.head_dim).transpose(1, 2)
            value = value.view(rows, 1, -1, attn.head_dim).transpose(1, 2)
            query, key = apply_rotary_pos_emb(query, key, cos, sin)
            key, value = cache.update(key, value, index)
            out = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attend, scale=attn.scaling, enable_gqa=query.shape[1] != key.shape[1]
            )
            hidden = residual + attn.o_proj(out.transpose(1, 2).reshape(rows, 1, -1))
            residual = hidden
            hidden = layer.post_attention_layernorm(hidden)
            gate, up = F.linear(hidden, fused.gate_up_weight, fused.gate_up_bias).chunk(2, dim=-1)
            hidden = residual + layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)
        return self.model.lm_head(decoder.norm(hidden))[:, -1]


def _fuse(layer: torch.nn.Module) -> _FusedLayer:
    attn, mlp = layer.self_attn, layer.mlp
    qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
    gate_up = (mlp.gate_proj, mlp.up_proj)
    return _FusedLayer(
        qkv_weight=_share_storage([proj.weight for proj in qkv]),
        qkv_bias=None if attn.q_proj.bias is None else _share_storage([proj.bias for proj in qkv]),
        qkv_sizes=tuple(proj.weight.shape[0] for proj in qkv),
        gate_up_weight=_share_storage([proj.weight for proj in gate_up]),
        gate_up_bias=None if mlp.gate_proj.bias is None else _share_storage([proj.bias for proj in gate_up]),
    )


def _share_storage(params: list[torch.nn.Parameter]) -> Tensor:
    """One tensor holding ``params`` stacked along dim 0; each parameter becomes a view of its rows, so an
    in-place update of a parameter updates the fused tensor (and the other way round)."""
    fused = torch.cat([param.detach() for param in params])
    start = 0
    for param in params:
        param.data = fused[start : start + param.shape[0]]
        start += param.shape[0]
    return fused
