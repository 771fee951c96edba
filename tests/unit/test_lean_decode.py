"""The torch engine's lean decode step (rltrain/rollout/lean_decode.py): HF's logits, the same samples, or HF itself."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from rltrain.models import load_causal_lm, load_tokenizer
from rltrain.rollout.lean_decode import lean_decoder
from rltrain.rollout.sampling_ops import left_pad
from rltrain.rollout.torch_engine import TorchGenerator
from rltrain.rollout.torch_tree_engine import TorchTreeGenerator
from rltrain.types import GenRequest, SamplingParams

SMALL = {"vocab_size": 97, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2}


def _model(cls, config) -> torch.nn.Module:
    torch.manual_seed(0)
    model = cls(config).eval()
    for param in model.parameters():  # random biases too (HF initialises them to zero)
        torch.nn.init.normal_(param, std=0.2)
    return model


def _llama(**changes) -> torch.nn.Module:
    values = {**SMALL, "num_attention_heads": 4, "num_key_value_heads": 4, "attention_bias": True, "mlp_bias": True}
    return _model(LlamaForCausalLM, LlamaConfig(**{**values, **changes}))


def _qwen2(**changes) -> torch.nn.Module:
    values = {**SMALL, "num_attention_heads": 4, "num_key_value_heads": 2}
    return _model(Qwen2ForCausalLM, Qwen2Config(**{**values, **changes}))


def _hf_and_lean_logits(model, prompts: list[list[int]], steps: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Next-token logits of ``steps`` decode steps after ``prompts`` (left-padded), by HF's forward and by the lean
    step, each from its own prefill of the same prompts, feeding the same tokens."""
    ids, mask = left_pad(prompts, 0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    feeds = torch.randint(1, 90, (steps, len(prompts)), generator=torch.Generator().manual_seed(1))
    decoder = lean_decoder(model)
    runs = []
    with torch.no_grad():
        for lean in (False, True):
            cache = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True).past_key_values
            step_mask, next_pos, logits = mask, positions[:, -1] + 1, []
            for tokens in feeds:
                step_mask = torch.cat([step_mask, step_mask.new_ones(len(prompts), 1)], dim=1)
                if lean:
                    logits.append(decoder.step(tokens, step_mask, next_pos, cache))
                else:
                    out = model(
                        input_ids=tokens[:, None],
                        attention_mask=step_mask,
                        position_ids=next_pos[:, None],
                        past_key_values=cache,
                        use_cache=True,
                    )
                    logits.append(out.logits[:, -1])
                next_pos = next_pos + 1
            runs.append(logits)
    return runs[0], runs[1]


@pytest.mark.parametrize(
    "build",
    [_qwen2, _llama, lambda: _llama(num_key_value_heads=1, attention_bias=False, mlp_bias=False)],
    ids=["qwen2-gqa-bias", "llama-mha-biases", "llama-mqa-no-bias"],
)
@pytest.mark.parametrize(
    "prompts", [[[5, 6, 7], [8, 9, 10]], [[5, 6, 7, 8, 9], [11], [12, 13]]], ids=["even", "padded"]
)
def test_the_lean_step_gives_hf_logits(build, prompts):
    model = build()
    assert lean_decoder(model) is not None
    hf, lean = _hf_and_lean_logits(model, prompts, steps=4)
    for expected, got in zip(hf, lean):
        assert got.shape == expected.shape
        assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "build",
    [
        lambda: _qwen2(use_sliding_window=True, sliding_window=4),
        lambda: _model(GPT2LMHeadModel, GPT2Config(vocab_size=97, n_embd=32, n_layer=1, n_head=2)),
        lambda: _qwen2(attn_implementation="eager"),
    ],
    ids=["sliding-window", "another-architecture", "eager-attention"],
)
def test_models_the_lean_step_does_not_cover_keep_the_hf_forward(build):
    assert lean_decoder(build()) is None


def test_fused_projections_are_the_parameters_so_loaded_weights_reach_them():
    model = _qwen2()
    decoder = lean_decoder(model)
    attn = model.model.layers[0].self_attn
    before = decoder.layers[0].qkv_weight.clone()
    with torch.no_grad():
        attn.k_proj.weight.add_(1.0)  # what load_weights' copy_ does
    rows = attn.q_proj.weight.shape[0]
    assert torch.equal(decoder.layers[0].qkv_weight[rows : rows + attn.k_proj.weight.shape[0]], attn.k_proj.weight)
    assert torch.equal(decoder.layers[0].qkv_weight[:rows], before[:rows])


@pytest.mark.parametrize("engine_cls", [TorchGenerator, TorchTreeGenerator])
def test_the_engine_samples_the_same_tokens_with_and_without_the_lean_step(tiny_model_dir, engine_cls):
    def engine(lean: bool):
        return engine_cls(load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir), seed=0, lean_decode=lean)

    requests = [GenRequest((5, 6, 7, 8), n=3), GenRequest((9, 10), n=2)]
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=0, stop_token_ids=(3,))
    lean, hf = engine(True), engine(False)
    assert lean.lean is not None and hf.lean is None
    weights = [(name, param.detach() + 0.01) for name, param in lean.model.named_parameters()]
    for run in range(2):
        got, expected = lean.generate(requests, params), hf.generate(requests, params)
        assert [[(r.token_ids, r.logprobs) for r in group] for group in got] == [
            [(r.token_ids, r.logprobs) for r in group] for group in expected
        ]
        if run == 0:  # new weights reach the fused projections
            lean.load_weights(weights, version=1)
            hf.load_weights(weights, version=1)
