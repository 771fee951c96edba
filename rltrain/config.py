"""Hydra structured-config schema: one dataclass per config group, registered in the ConfigStore.

Hydra composes recipes against this schema in struct mode, so an unknown key (``trainer.nonexistent=1``)
or a value of the wrong type fails at composition. ``rltrain.config_rules.validate(cfg)`` then checks values and
paths and raises ``ConfigError`` naming the key, before Ray or any model starts. Validation raises; it never fixes.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key."""


@dataclass
class RunConfig:
    name: str = "run"
    dir: str = "outputs/${run.name}"  # run directory: config.yaml, metrics.jsonl, checkpoints/, plots
    seed: int = 0
    resume: str = "auto"  # auto: continue the latest complete checkpoint in run.dir | never | <checkpoint dir>
    deterministic: bool = False


@dataclass
class TinyModelConfig:
    """A Qwen2-architecture model and a byte-level BPE tokenizer built locally (no downloads)."""

    hidden_size: int = 64
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 2  # head size hidden_size / num_heads must be one vLLM-CPU supports (32, 64, 80, ...)
    num_kv_heads: int = 1
    vocab_size: int = 512  # BPE vocabulary trained on the task's own text
    max_position_embeddings: int = 512
    seed: int = 0


@dataclass
class ModelConfig:
    path: str = "tiny"  # "tiny" (built locally), a local HF model dir, or a hub name
    cache_dir: str = "${oc.env:RLTRAIN_CACHE,'~/.cache/rltrain'}"
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    dtype: str = "float32"  # float32 | bfloat16 | float16
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    task: str = "arithmetic"  # arithmetic | countdown | jsonl | parquet | hf
    path: str | None = None  # file for jsonl/parquet, dataset name for hf
    hf_split: str = "train"
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    template: str = "plain"  # plain | chat
    system_prompt: str | None = None
    num_train: int = 20000  # procedural tasks: rows generated for training
    num_eval: int = 200  # held-out rows (procedural: disjoint from train; files: last rows)
    seed: int = 1234
    task_params: dict[str, Any] = field(default_factory=dict)  # e.g. {digits: 2} for arithmetic
    max_prompt_tokens: int = 128


@dataclass
class TreeConfig:
    """Tree-segment sampling (TreePO). See docs/tree.md."""

    segment_len: int = 16  # l: max tokens per segment
    max_depth: int = 6  # d: max segments per trajectory
    width: int = 8  # w: finished trajectories per prompt (group size)
    branching: int = 2  # b: children per fork
    init_divergence_min: int = -1  # -1: use branching
    init_divergence_max: int = -1
    divergence_policy: str = "even"  # even | logprob | entropy
    divergence_temperature: float = 2.0
    fallback: bool = True  # restart an exhausted prompt from a finished STOP path (false: from the root)
    fallback_policy: str = "segment"  # segment: at a segment boundary | critical: at a high-surprisal token (CURE)
    critical_top_k: int = 20
    answer_pattern: str | None = None  # regex; its first match ends a path (TreePO "boxed as EOS")
    repetition_ngram: int = 0  # > 0: a path repeating an n-gram repetition_count times ends
    repetition_count: int = 8
    # vLLM: end segments where the context is one token past a KV block boundary, so the prefix cache
    # serves all but one context token of every continued path (docs/tree.md); the torch engine ignores it.
    align_to_kv_blocks: bool = True


@dataclass
class RolloutConfig:
    engine: str = "torch"  # torch | vllm | auto
    sampler: str = "flat"  # flat | tree
    num_workers: int = 1
    n: int = 8  # responses per prompt (group size)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 32
    stop_strings: list[str] = field(default_factory=list)
    eval_temperature: float = 0.0
    tree: TreeConfig = field(default_factory=TreeConfig)
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.5
    enforce_eager: bool = True
    vllm_block_size: int | None = None  # KV/prefix-cache block in tokens; None: vLLM's default (CPU 128)
    logprob_diff_warn: float = 0.05  # rollout/logprob_diff above this: loud warning
    logprob_diff_error: float = 1.0  # above this: error naming the likely cause
    # How weights reach the rollout workers: object_store (Ray object store + load_weights) | collective
    # (a torch.distributed broadcast in buckets: NCCL between GPUs, gloo on CPU) | auto (collective when the
    # cluster has GPUs and placement is disaggregated, else object_store).
    weight_sync: str = "auto"
    weight_sync_bucket_mb: int = 256
    weight_sync_timeout_s: float = 600.0
    # Partial rollouts (trainer.max_staleness >= 1): generate in chunks of partial_chunk_tokens and load newer
    # weights between chunks, so a long generation does not hold back a weight update (docs/async.md).
    partial: bool = False
    partial_chunk_tokens: int = 32


@dataclass
class RewardFunctionConfig:
    fn: str = MISSING  # built-in name ("math"), "path/file.py:name" or "pkg.mod:name"
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class RewardConfig:
    functions: list[RewardFunctionConfig] = field(default_factory=list)
    num_workers: int = 2  # grader processes
    timeout_s: float = 5.0  # per-call wall-clock deadline, enforced from outside the grader
    memory_mb: int = 1024
    on_error: float = 0.0  # reward of a sample whose grader raised, hung, crashed or returned non-finite
    batch_size: int = 64
    # A grading call whose failed fraction (errors, timeouts, crashes, non-finite) exceeds this stops the run
    # with the first failure's message (exit 1); 1.0 never stops.
    max_error_frac: float = 0.5


@dataclass
class EnvConfig:
    """Multi-turn environments (docs/environments.md). ``fn`` null: one completion per prompt, graded by
    ``reward.functions``; set: episodes of model and environment turns, rewarded by the environment (its calls run
    in the reward worker's grader processes under ``reward.timeout_s``, ``reward.memory_mb``, ``reward.on_error``,
    ``reward.max_error_frac``)."""

    fn: str | None = None  # calculator | feedback | "path/file.py:Class" | "pkg.mod:Class"
    params: dict[str, Any] = field(default_factory=dict)  # constructor arguments of the environment
    max_turns: int = 4  # model turns per episode
    max_tokens: int = 256  # response tokens per episode, model and observation tokens together
    max_observation_chars: int = 4000  # longer observations are cut (counted in env/observations_cut)


@dataclass
class AlgorithmConfig:
    advantage: str = "grpo"  # registry name, see rltrain.algo
    advantage_params: dict[str, Any] = field(default_factory=dict)
    policy_loss: str = "ppo_clip"  # ppo_clip | gspo
    loss_agg: str = "token_mean"  # token_mean | seq_mean_token_mean | seq_mean_token_sum | seq_mean_token_sum_norm
    loss_agg_constant: float | None = None  # seq_mean_token_sum_norm: C (default: rollout.max_tokens)
    clip_low: float = 0.2
    clip_high: float = 0.2
    clip_c: float | None = None  # dual-clip constant (> 1); None disables
    tis_cap: float | None = None  # truncated importance sampling against rollout logprobs; None disables
    # Correction for the policy that sampled the tokens (docs/async.md#corrections): auto (tis when tis_cap is set,
    # else none) | none | tis (min(w, tis_cap)) | mis (w inside [mis_low, mis_high], else the token is dropped) |
    # decoupled (decoupled PPO: w, tokens above decoupled_cap dropped when it is set); w = pi_old / pi_rollout.
    correction: str = "auto"
    correction_level: str = "token"  # token | sequence (one w per trajectory: exp(mean log w), as GSPO)
    mis_low: float = 0.5
    mis_high: float = 2.0
    decoupled_cap: float | None = None
    entropy_coef: float = 0.0
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_in_reward: bool = False
    thr: dict[str, Any] = field(default_factory=dict)  # THR token reweighting options; empty disables
    dynamic_sampling: bool = False
    filter_metric: str = "score"  # score | acc
    max_gen_batches: int = 10
    overlong_buffer: int = 0  # soft overlong punishment buffer (tokens); 0 disables
    overlong_penalty: float = 1.0
    overlong_filter: bool = False  # mask truncated samples out of the loss
    epochs: int = 1  # passes over each rollout batch
    mini_batches: int = 1  # optimizer steps per pass


@dataclass
class LoraConfig:
    """LoRA adapters via peft (docs/learner.md#lora): rank 0 trains every weight (full fine-tune)."""

    rank: int = 0  # r of each adapter; > 0 freezes the base model and trains only the adapters
    alpha: float = 16.0  # adapter output scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapter's input while training
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )  # module-name suffixes that get an adapter (the linear layers of Qwen2 / Llama blocks)


@dataclass
class LearnerConfig:
    backend: str = "torch"  # torch | deepspeed
    lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine | linear
    grad_clip: float | None = 1.0  # global gradient-norm clip; 0 or null: no clipping (every backend)
    micro_batch_size: int = 16
    # torch learner: pack rows padding-free into micro-batches of at most this many tokens (micro_batch_size is
    # then unused); null: micro_batch_size padded rows. Same loss and gradients either way (docs/learner.md).
    max_tokens_per_micro_batch: int | None = None
    # torch learner: pack each prompt group with its shared prompt and tree segments computed once (same loss and
    # gradients, fewer tokens; docs/learner.md)
    share_prefixes: bool = False
    world_size: int = 1
    zero_stage: int = 1
    offload_optimizer: bool = False
    offload_params: bool = False
    export_bucket_mb: int = 64
    use_reference: bool = False  # keep a frozen reference model (needed for KL)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class TrainerConfig:
    steps: int = 20
    prompts_per_step: int = 8
    eval_every: int = 0  # 0: evaluate only before and after training
    eval_before: bool = True
    save_every: int = 10
    keep_checkpoints: int = 2
    # An update whose loss or gradient is not finite is always skipped (weights never become NaN) and counted
    # in loss/nonfinite_skipped; skip: the run goes on | stop: the run stops with an error (exit 1).
    on_nonfinite: str = "skip"
    # Asynchronous pipeline (docs/async.md): 0 = generate, then train, in turn (on-policy). k >= 1: rollout workers
    # generate the next batches while the learner trains; a batch is trained at most k policy versions after the
    # weights that sampled its oldest token.
    max_staleness: int = 0
    # Eval sets scored at each evaluation (entries as eval.sets; docs/evaluation.md). Empty: the held-out rows,
    # greedy pass@1, logged as eval/accuracy only; set: eval/<name>/pass@k, maj@k, avg@k ... as well.
    eval_sets: list[Any] = field(default_factory=list)


@dataclass
class EvalConfig:
    """``rltrain-eval``: the sets scored, where eval.json / samples.jsonl go, the generation engine."""

    # Each a name (heldout | math500 | aime24 | amc23 | gsm8k) or a dict {name, path, split, prompt_key,
    # answer_key, n, temperature, top_p, max_tokens, template, reward, limit} (docs/evaluation.md).
    sets: list[Any] = field(default_factory=lambda: ["heldout"])
    output_dir: str | None = None  # null: run.dir
    engine: str = "auto"  # auto: vllm where installed, else torch | torch | vllm
    num_workers: int = 1  # 1: one engine in this process; N > 1: N rollout-worker Ray actors share each set
    wandb: bool = False  # also log the results to a W&B run (tracking.wandb settings) with a summary table


@dataclass
class SFTConfig:
    enabled: bool = False  # quickstart: warm-start the base model on the task before RL
    steps: int = 200
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 20
    output: str = "${model.cache_dir}/sft"  # cached warm-started model (reused when present)


@dataclass
class WandbConfig:
    enabled: bool = True
    mode: str = "auto"  # auto: online when WANDB_API_KEY is set, otherwise offline | online | offline | disabled
    project: str = "rltrain"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class TrackingConfig:
    progress: bool = True  # a live bar on a terminal; elsewhere (a Slurm log) a plain line every log_every_s
    log_every_s: float = 30.0  # seconds between plain progress lines when stdout is not a terminal (0: every step)
    plots: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class ClusterConfig:
    mode: str = "local"  # local: start a local Ray | address: connect to an existing Ray cluster
    address: str | None = None
    num_cpus: int | None = None
    num_gpus: int = 0  # GPUs the layout expects: fewer in the Ray cluster is an error before any actor starts
    omp_threads: int = 1
    # CPU time sharing (local CPU runs): each phase's actors use the cores of the actors that wait (rollout workers
    # while generating, the learner while computing), torch threads set per call (rltrain/dist/threads.py)
    share_cpu_threads: bool = True
    # disaggregated: rollout workers and learner ranks on separate CPUs/GPUs | colocated: rollout worker i
    # shares learner rank i's bundle (GPU: vLLM sleeps while the learner trains). Both reserve a Ray
    # placement group up front and fail with the missing resources named if the cluster cannot hold it.
    placement: str = "disaggregated"
    placement_timeout_s: float = 60.0  # fail fast naming what is missing; raise while a cluster scales up


@dataclass
class RLTrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


GROUP_SCHEMAS = {
    "model": ModelConfig,
    "data": DataConfig,
    "rollout": RolloutConfig,
    "reward": RewardConfig,
    "algorithm": AlgorithmConfig,
    "learner": LearnerConfig,
    "cluster": ClusterConfig,
    "tracking": TrackingConfig,
}


def register_configs() -> None:
    """Register the schema so recipes can say ``defaults: [rltrain_schema, ...]``."""
    store = ConfigStore.instance()
    store.store(name="rltrain_schema", node=RLTrainConfig)
    for group, schema in GROUP_SCHEMAS.items():
        store.store(group=group, name="schema", node=schema)


def setting(key: str, value: Any) -> str:
    """``key=value`` as error messages start: ``algorithm.clip_low=1.5``, ``rollout.engine='tensorrt'``."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    return f"{key}={value!r}"


def check_kwargs(fn: Any, params: dict[str, Any], key: str) -> None:
    """Raise ConfigError if ``params`` has a name that ``fn`` does not accept."""
    signature = inspect.signature(fn)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return
    unknown = sorted(set(params) - set(signature.parameters))
    if unknown:
        raise ConfigError(f"{key}: unknown parameter(s) {unknown}; accepted: {sorted(signature.parameters)}")
