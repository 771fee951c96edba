"""Torch engine and torch learner on a tiny locally built model."""

import os

import pytest
import torch
from ray_head import joined_ray

from rltrain import algo
from rltrain.learner.torch_learner import TorchLearner
from rltrain.models import load_causal_lm, load_tokenizer
from rltrain.rollout.torch_engine import TorchGenerator
from rltrain.types import FinishReason, GenRequest, SamplingParams, build_rollout_batch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    torch.set_num_threads(1)
    return TorchGenerator.from_pretrained(tiny_model_dir, seed=0)


def _recompute(model, prompt, tokens):
    full = torch.tensor([list(prompt) + list(tokens)])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(full).logits[0].float(), -1)
    return logprobs[len(prompt) - 1 : -1].gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def test_greedy_matches_hf_generate(engine, tiny_model_dir):
    model = load_causal_lm(tiny_model_dir)
    prompt = engine.tokenizer.encode("12+34=")
    out = engine.generate([GenRequest(tuple(prompt))], SamplingParams(temperature=0, max_tokens=12))[0][0]
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert list(out.token_ids) == ref[0, len(prompt) :].tolist()


def test_sampled_logprobs_match_recompute_and_prefill_is_shared(engine, tiny_model_dir):
    model = load_causal_lm(tiny_model_dir)
    prompts = [tuple(engine.tokenizer.encode("5+17=")), tuple(engine.tokenizer.encode("88-9="))]
    params = SamplingParams(temperature=1.0, max_tokens=10, seed=1)
    outputs = engine.generate([GenRequest(prompts[0], n=3), GenRequest(prompts[1], n=2)], params)
    assert [len(o) for o in outputs] == [3, 2]
    for prompt, group in zip(prompts, outputs):
        assert group[0].stats.prefill_computed == len(prompt)
        assert all(r.stats.prefill_computed == 0 for r in group[1:])
        for result in group:
            ref = _recompute(model, prompt, result.token_ids)
            assert torch.allclose(ref, torch.tensor(result.logprobs), atol=1e-4)


def test_stop_token_and_stop_string(engine):
    prompt = tuple(engine.tokenizer.encode("3+4="))
    free = engine.generate([GenRequest(prompt)], SamplingParams(temperature=0, max_tokens=6))[0][0]
    first = free.token_ids[0]
    stopped = engine.generate(
        [GenRequest(prompt)], SamplingParams(temperature=0, max_tokens=6, stop_token_ids=(first,))
    )
    assert stopped[0][0].token_ids == (first,) and stopped[0][0].finish_reason == FinishReason.STOP
    assert free.finish_reason == FinishReason.LENGTH
    text = engine.tokenizer.decode(free.token_ids[:2])
    by_string = engine.generate([GenRequest(prompt)], SamplingParams(temperature=0, max_tokens=6, stop_strings=(text,)))
    assert by_string[0][0].finish_reason == FinishReason.STOP and len(by_string[0][0].token_ids) <= 2


def _rl_batch(tokenizer, seed=0):
    gen = torch.Generator().manual_seed(seed)
    from rltrain.types import GenResult

    prompts, results = [], []
    for i in range(8):
        prompt = tokenizer.encode(f"{10 + i}+{3 * i}=")
        length = 1 + i % 4  # uneven lengths: global token normalisation matters
        tokens = torch.randint(3, 50, (length,), generator=gen).tolist()
        prompts.append(prompt)
        results.append(GenResult(tuple(tokens), tuple([-1.0] * length), FinishReason.STOP))
    batch = build_rollout_batch(prompts, results, group=[i // 4 for i in range(8)], policy_version=0)
    advantages = torch.randn(8, 1, generator=gen) * batch.response_mask
    return batch.replace(advantages=advantages)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"])
def test_micro_batching_does_not_change_the_step(tiny_model_dir, agg):
    """batch 8 x accumulation 1 == batch 1 x accumulation 8 (fp32): same gradients, same parameters (1e-6).

    AdamW's first step is ~lr*sign(g), which hides gradient scale errors and amplifies fp32 rounding
    where |g| ~ eps; with adam_eps=1 the update is ~lr*g, so a normalisation bug shows at ~1e-3 while
    rounding stays ~1e-10.
    """
    tokenizer = load_tokenizer(tiny_model_dir)
    batch = _rl_batch(tokenizer)
    params, grads = [], []
    for micro in (8, 1):
        learner = TorchLearner(tiny_model_dir, lr=1e-2, adam_eps=1.0, micro_batch_size=micro, grad_clip=1e9, seed=0)
        batch_with_old = batch.replace(old_logprobs=learner.logprobs(batch))
        loss_fn = algo.make_loss_fn(loss_agg=agg, loss_agg_constant=4.0, entropy_coef=0.01)
        step = learner.optimizer.step

        def capture(*args, _step=step, _model=learner.model, **kwargs):
            grads.append({n: p.grad.clone() for n, p in _model.named_parameters()})
            return _step(*args, **kwargs)

        learner.optimizer.step = capture
        learner.train_step(batch_with_old, loss_fn)
        params.append({k: v.detach().clone() for k, v in learner.model.named_parameters()})
    for name, value in params[0].items():
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=0), name
        assert torch.allclose(value, params[1][name], atol=1e-6, rtol=0), name
    moved = max(
        float((params[0][n] - p).abs().max()) for n, p in TorchLearner(tiny_model_dir, lr=0).model.named_parameters()
    )
    assert moved > 1e-5  # the step did something measurable


def test_train_step_changes_params_and_save_load_roundtrip(tiny_model_dir, tmp_path):
    tokenizer = load_tokenizer(tiny_model_dir)
    batch = _rl_batch(tokenizer)
    learner = TorchLearner(tiny_model_dir, lr=1e-2, micro_batch_size=4, seed=0)
    before = {k: v.clone() for k, v in learner.model.named_parameters()}
    metrics = learner.train_step(batch.replace(old_logprobs=learner.logprobs(batch)), algo.make_loss_fn())
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert any(not torch.equal(before[k], v) for k, v in learner.model.named_parameters())
    learner.save(str(tmp_path))
    assert os.path.isfile(tmp_path / "config.json")
    other = TorchLearner(tiny_model_dir, lr=1e-2, micro_batch_size=4, seed=0)
    other.load(str(tmp_path))
    for name, value in learner.model.named_parameters():
        assert torch.equal(value, dict(other.model.named_parameters())[name])
    assert other.optimizer_steps == 1


def test_forward_extras_give_hidden_states_and_subset_probs_per_response_token(tiny_model_dir):
    """THR's inputs: micro-batched forward == one full forward, probs restricted to the batch's tokens."""
    tokenizer = load_tokenizer(tiny_model_dir)
    batch = _rl_batch(tokenizer)
    learner = TorchLearner(tiny_model_dir, lr=1e-2, micro_batch_size=3, seed=0)
    captured = learner.forward_extras(batch, lambda h, p, idx, b: {"hidden": h, "probs": p, "index": idx})
    hidden, probs, index = captured["hidden"], captured["probs"], captured["index"]
    subset = torch.unique(batch.response_ids)
    assert hidden.shape[:2] == probs.shape[:2] == index.shape == batch.response_ids.shape
    assert probs.shape[2] == len(subset)
    model = learner.model.eval()
    for row in range(batch.batch_size):
        prompt = batch.prompt_ids[row][batch.prompt_mask[row] > 0].tolist()
        length = int(batch.response_mask[row].sum())
        tokens = batch.response_ids[row, :length].tolist()
        with torch.no_grad():
            out = model(torch.tensor([prompt + tokens]), output_hidden_states=True)
        positions = slice(len(prompt) - 1, len(prompt) - 1 + length)
        torch.testing.assert_close(hidden[row, :length], out.hidden_states[-1][0, positions], atol=1e-5, rtol=1e-4)
        full = torch.softmax(out.logits[0, positions].float(), -1)
        torch.testing.assert_close(probs[row, :length], full[:, subset], atol=1e-6, rtol=1e-4)
        assert torch.equal(subset[index[row, :length]], torch.tensor(tokens))
        assert not hidden[row, length:].any() and not probs[row, length:].any()
    advantages = torch.randn(8, 1) * batch.response_mask
    extras = learner.forward_extras(batch.replace(advantages=advantages), algo.thr_extras_from_forward)
    assert extras[algo.thr.THR_SCORE_KEY].shape == batch.response_ids.shape


def test_a_dead_learner_actor_is_a_run_error_naming_it(tiny_model_dir):
    """SIGKILL of the learner's process: the next call raises RunError naming rank, actor and pid, at once."""
    import signal

    from rltrain.dist.groups import TorchLearnerGroup
    from rltrain.errors import RunError

    tokenizer = load_tokenizer(tiny_model_dir)
    batch = _rl_batch(tokenizer)
    with joined_ray():
        group = TorchLearnerGroup(1, tiny_model_dir, {"lr": 1e-2}, placement={"num_cpus": 1})
        (label,) = group.labels.values()
        pid = int(label.rsplit("pid ", 1)[1].rstrip(")"))
        assert label.startswith("learner rank 0 (actor ") and group.logprobs(batch).shape == batch.response_ids.shape
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(
            RunError, match=r"learner rank 0 \(actor \w+, pid \d+\) died during logprobs: .*run.resume=auto"
        ):
            group.logprobs(batch)


def test_partial_rollouts_carry_two_versions_and_match_the_learner_per_version(engine, tiny_model_dir):
    from partial_check import check_partial_rollout

    prompts = [engine.tokenizer.encode(text) for text in ("12+34=", "7*8=", "99-5=")]
    check_partial_rollout(engine, tiny_model_dir, prompts, 1e-3)
