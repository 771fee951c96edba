"""Every config key has at least one invalid value, and the validation pass before Ray names the key.

The cases walk every leaf key of the schema; keys that take any value are listed in FREE with the reason, so
a new key without a case (or a FREE entry) fails ``test_every_key_has_a_case``.
"""

from __future__ import annotations

import dataclasses

import pytest
from hydra import compose, initialize_config_module

from rltrain.config import ConfigError, RLTrainConfig, register_configs
from rltrain.data import load_task_data
from rltrain.prepare import check_config

register_configs()

TREE = ["rollout=tree", "algorithm=tree"]
DEEPSPEED = ["learner=deepspeed"]
JSONL = ["data.task=jsonl"]

# key -> overrides of the quickstart recipe that make (only) that key invalid
CASES: dict[str, list[str]] = {
    "run.seed": ["run.seed=-1"],
    "model.path": ["model.path=/nonexistent"],
    "model.tiny.hidden_size": ["model.tiny.hidden_size=0"],
    "model.tiny.intermediate_size": ["model.tiny.intermediate_size=0"],
    "model.tiny.num_layers": ["model.tiny.num_layers=0"],
    "model.tiny.num_heads": ["model.tiny.num_heads=3"],
    "model.tiny.num_kv_heads": ["model.tiny.num_kv_heads=0"],
    "model.tiny.vocab_size": ["model.tiny.vocab_size=100"],
    "model.tiny.max_position_embeddings": ["model.tiny.max_position_embeddings=0"],
    "model.tiny.seed": ["model.tiny.seed=-1"],
    "model.dtype": ["model.dtype=float8"],
    "data.task": ["data.task=poetry"],
    "data.path": ["data.path=/no/such/file.jsonl"],
    "data.template": ["data.template=fancy"],
    "data.num_train": ["data.num_train=0"],
    "data.num_eval": ["data.num_eval=0"],
    "data.seed": ["data.seed=-1"],
    "data.task_params": ["data.task_params.num_numbers=1"],
    "data.max_prompt_tokens": ["data.max_prompt_tokens=0"],
    "rollout.engine": ["rollout.engine=tensorrt"],
    "rollout.sampler": ["rollout.sampler=beam"],
    "rollout.num_workers": ["rollout.num_workers=0"],
    "rollout.n": ["rollout.n=1"],
    "rollout.temperature": ["rollout.temperature=-1"],
    "rollout.top_p": ["rollout.top_p=1.5"],
    "rollout.top_k": ["rollout.top_k=-5"],
    "rollout.max_tokens": ["rollout.max_tokens=0"],
    "rollout.stop_strings": ["rollout.stop_strings=['']"],
    "rollout.eval_temperature": ["rollout.eval_temperature=-0.5"],
    "rollout.tree.segment_len": [*TREE, "rollout.tree.segment_len=0"],
    "rollout.tree.max_depth": [*TREE, "rollout.tree.max_depth=0"],
    "rollout.tree.width": [*TREE, "rollout.tree.width=1"],
    "rollout.tree.branching": [*TREE, "rollout.tree.branching=0"],
    "rollout.tree.init_divergence_min": [
        *TREE,
        "rollout.tree.init_divergence_min=9",
        "rollout.tree.init_divergence_max=2",
    ],
    "rollout.tree.init_divergence_max": [
        *TREE,
        "rollout.tree.init_divergence_min=1",
        "rollout.tree.init_divergence_max=0",
    ],
    "rollout.tree.divergence_policy": [*TREE, "rollout.tree.divergence_policy=random"],
    "rollout.tree.divergence_temperature": [*TREE, "rollout.tree.divergence_temperature=0"],
    "rollout.tree.fallback_policy": [*TREE, "rollout.tree.fallback_policy=best"],
    "rollout.tree.critical_top_k": [*TREE, "rollout.tree.critical_top_k=0"],
    "rollout.tree.answer_pattern": [*TREE, "rollout.tree.answer_pattern='(x'"],
    "rollout.tree.repetition_ngram": [*TREE, "rollout.tree.repetition_ngram=-1"],
    "rollout.tree.repetition_count": [*TREE, "rollout.tree.repetition_count=0"],
    "rollout.tensor_parallel_size": ["rollout.tensor_parallel_size=0"],
    "rollout.gpu_memory_utilization": ["rollout.gpu_memory_utilization=1.5"],
    "rollout.vllm_block_size": ["rollout.vllm_block_size=0"],
    "rollout.logprob_diff_warn": ["rollout.logprob_diff_warn=2.0"],  # above logprob_diff_error
    "rollout.logprob_diff_error": ["rollout.logprob_diff_error=-1"],
    "rollout.weight_sync": ["rollout.weight_sync=carrier_pigeon"],
    "rollout.weight_sync_bucket_mb": ["rollout.weight_sync_bucket_mb=0"],
    "rollout.weight_sync_timeout_s": ["rollout.weight_sync_timeout_s=0"],
    "reward.functions": ["reward.functions=[]"],
    "reward.num_workers": ["reward.num_workers=0"],
    "reward.timeout_s": ["reward.timeout_s=0"],
    "reward.memory_mb": ["reward.memory_mb=0"],
    "reward.on_error": ["reward.on_error=nan"],
    "reward.batch_size": ["reward.batch_size=0"],
    "reward.max_error_frac": ["reward.max_error_frac=1.5"],
    "env.fn": ["env.fn=chess"],
    "env.params": ["env.fn=calculator", "+env.params.colour=red"],
    "env.max_turns": ["env.max_turns=0"],
    "env.max_tokens": ["env.max_tokens=0"],
    "env.max_observation_chars": ["env.max_observation_chars=0"],
    "algorithm.advantage": ["algorithm.advantage=ppo"],
    "algorithm.advantage_params": ["+algorithm.advantage_params.temperature=2"],
    "algorithm.policy_loss": ["algorithm.policy_loss=sft"],
    "algorithm.loss_agg": ["algorithm.loss_agg=median"],
    "algorithm.loss_agg_constant": ["algorithm.loss_agg=seq_mean_token_sum_norm", "algorithm.loss_agg_constant=-1"],
    "algorithm.clip_low": ["algorithm.clip_low=1.5"],
    "algorithm.clip_high": ["algorithm.clip_high=-1"],
    "algorithm.clip_c": ["algorithm.clip_c=0.5"],
    "algorithm.tis_cap": ["algorithm.tis_cap=0"],
    "algorithm.correction": ["algorithm.correction=vtrace"],
    "algorithm.correction_level": ["algorithm.correction_level=group"],
    "algorithm.mis_low": ["algorithm.correction=mis", "algorithm.mis_low=1.5"],
    "algorithm.mis_high": ["algorithm.correction=mis", "algorithm.mis_high=0.9"],
    "algorithm.decoupled_cap": ["algorithm.decoupled_cap=0"],
    "trainer.max_staleness": ["trainer.max_staleness=-1"],
    "rollout.partial": ["rollout.partial=true"],
    "rollout.partial_chunk_tokens": ["rollout.partial_chunk_tokens=0"],
    "algorithm.entropy_coef": ["algorithm.entropy_coef=inf"],
    "algorithm.kl_coef": ["algorithm.kl_coef=-0.1"],
    "algorithm.kl_estimator": ["algorithm.kl_estimator=k9"],
    "algorithm.thr": ["+algorithm.thr.p=2"],
    "algorithm.filter_metric": ["algorithm.filter_metric=loss"],
    "algorithm.overlong_buffer": ["algorithm.overlong_buffer=100"],  # above rollout.max_tokens
    "algorithm.overlong_penalty": ["algorithm.overlong_penalty=-1"],
    "algorithm.epochs": ["algorithm.epochs=0"],
    "algorithm.mini_batches": ["algorithm.mini_batches=0"],
    "learner.backend": ["learner.backend=jax"],
    "learner.lr": ["learner.lr=-1"],
    "learner.betas": ["learner.betas=[0.9,1.5]"],
    "learner.weight_decay": ["learner.weight_decay=-0.1"],
    "learner.adam_eps": ["learner.adam_eps=0"],
    "learner.warmup_steps": ["learner.warmup_steps=-1"],
    "learner.lr_schedule": ["learner.lr_schedule=step"],
    "learner.grad_clip": ["learner.grad_clip=-1"],
    "learner.micro_batch_size": ["learner.micro_batch_size=0"],
    "learner.max_tokens_per_micro_batch": ["learner.max_tokens_per_micro_batch=0"],
    "learner.world_size": ["learner.world_size=0"],
    "learner.zero_stage": [*DEEPSPEED, "learner.zero_stage=4"],
    "learner.offload_params": [*DEEPSPEED, "learner.zero_stage=1", "learner.offload_params=true"],
    "learner.export_bucket_mb": ["learner.export_bucket_mb=0"],
    "learner.lora.rank": ["learner.lora.rank=-1"],
    "learner.lora.alpha": ["learner.lora.alpha=0"],
    "learner.lora.dropout": ["learner.lora.dropout=1.0"],
    "learner.lora.target_modules": ["learner.lora.rank=8", "learner.lora.target_modules=[]"],
    "trainer.steps": ["trainer.steps=-1"],
    "trainer.prompts_per_step": ["trainer.prompts_per_step=0"],
    "trainer.eval_every": ["trainer.eval_every=-1"],
    "trainer.save_every": ["trainer.save_every=0"],
    "trainer.keep_checkpoints": ["trainer.keep_checkpoints=0"],
    "trainer.on_nonfinite": ["trainer.on_nonfinite=ignore"],
    "trainer.eval_sets": ["trainer.eval_sets=[{name:gsm8k,n:0}]"],
    "eval.sets": ["eval.sets=[no_such_benchmark]"],
    "eval.engine": ["eval.engine=tensorrt"],
    "eval.num_workers": ["eval.num_workers=0"],
    "sft.steps": ["sft.steps=0"],
    "sft.batch_size": ["sft.batch_size=0"],
    "sft.lr": ["sft.lr=0"],
    "sft.warmup_steps": ["sft.warmup_steps=-1"],
    "tracking.log_every_s": ["tracking.log_every_s=-1"],
    "tracking.wandb.mode": ["tracking.wandb.mode=loud"],
    "cluster.mode": ["cluster.mode=cloud"],
    "cluster.address": ["cluster.address=10.0.0.1:6379"],  # with cluster.mode=local
    "cluster.num_cpus": ["cluster.num_cpus=0"],
    "cluster.num_gpus": ["cluster.num_gpus=-1"],
    "cluster.omp_threads": ["cluster.omp_threads=0"],
    "cluster.placement": ["cluster.placement=scattered"],
    "cluster.placement_timeout_s": ["cluster.placement_timeout_s=0"],
}

# Keys that take any value of their type (booleans, names, free text), with where else they are checked.
FREE = {
    "run.resume": "checked by checkpoint.resolve_resume before Ray starts (tests/unit/test_checkpoint.py)",
    "run.name": "a name",
    "run.dir": "any directory; created on start",
    "run.deterministic": "boolean",
    "model.cache_dir": "any directory; created on use",
    "model.gradient_checkpointing": "boolean",
    "data.hf_split": "a dataset split name, checked by the hub loader",
    "data.prompt_key": "checked on each dataset row, naming file:line (test_data_loaders.py)",
    "data.answer_key": "checked on each dataset row, naming file:line (test_data_loaders.py)",
    "data.system_prompt": "free text",
    "rollout.tree.fallback": "boolean",
    "rollout.tree.align_to_kv_blocks": "boolean",
    "rollout.enforce_eager": "boolean",
    "algorithm.kl_in_reward": "boolean",
    "algorithm.dynamic_sampling": "boolean",
    "algorithm.max_gen_batches": "any integer: <= 0 means unlimited (verl)",
    "algorithm.overlong_filter": "boolean",
    "learner.offload_optimizer": "boolean",
    "learner.use_reference": "boolean",
    "learner.share_prefixes": "boolean",
    "trainer.eval_before": "boolean",
    "eval.output_dir": "any directory; created on use (null: run.dir)",
    "eval.wandb": "boolean",
    "sft.enabled": "boolean",
    "sft.output": "any directory",
    "tracking.progress": "boolean",
    "tracking.plots": "boolean",
    "tracking.wandb.enabled": "boolean",
    "cluster.share_cpu_threads": "boolean",
    "tracking.wandb.project": "a name",
    "tracking.wandb.entity": "a name",
    "tracking.wandb.tags": "names",
}
_OPEN_DICTS = {"task_params", "advantage_params", "thr"}  # free-form options: one case for the whole dict


def _leaf_keys(schema: type, prefix: str = "") -> set[str]:
    keys = set()
    for f in dataclasses.fields(schema):
        nested = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(nested) and f.name not in _OPEN_DICTS:
            keys |= _leaf_keys(nested, f"{prefix}{f.name}.")
        else:
            keys.add(f"{prefix}{f.name}")
    return keys


def _check(overrides: list[str]) -> None:
    """What the driver runs before Ray: the validation pass, then the data (task_params, dataset rows)."""
    with initialize_config_module(config_module="recipes", version_base="1.3"):
        cfg = compose(config_name="quickstart", overrides=overrides)
    check_config(cfg)
    load_task_data(cfg.data)


def test_every_key_has_a_case():
    keys = _leaf_keys(RLTrainConfig)
    assert not set(CASES) & set(FREE)
    assert sorted(keys - set(CASES) - set(FREE)) == [], "new config key: add an invalid case or a FREE entry"
    assert sorted((set(CASES) | set(FREE)) - keys) == [], "stale entries for keys the schema no longer has"


def test_the_quickstart_passes():
    _check([])


@pytest.mark.parametrize("key", sorted(CASES))
def test_an_invalid_value_names_its_key(key):
    with pytest.raises(ConfigError) as info:
        _check(CASES[key])
    assert key in str(info.value)


@pytest.mark.parametrize("options", [[], TREE, DEEPSPEED, ["algorithm=dapo"], ["sft.enabled=false", "sft.steps=0"]])
def test_the_base_of_each_case_passes(options):
    """The invalid value is the only thing wrong in each case: its base configuration validates."""
    with initialize_config_module(config_module="recipes", version_base="1.3"):
        cfg = compose(config_name="quickstart", overrides=options)
    from rltrain.config_rules import validate

    validate(cfg)


def test_more_gpus_than_this_machine_has_is_refused_before_a_local_ray_starts():
    """A local Ray gets this machine's GPUs (none here); a joined cluster's GPUs are checked once joined."""
    import torch

    too_many = torch.cuda.device_count() + 1
    with pytest.raises(ConfigError, match=rf"cluster\.num_gpus={too_many}, but this machine has \d+ GPUs"):
        _check([f"cluster.num_gpus={too_many}"])
    _check([f"cluster.num_gpus={too_many}", "cluster.mode=address"])
