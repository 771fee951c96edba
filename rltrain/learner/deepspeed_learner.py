"""DeepSpeed ZeRO learner: one data-parallel rank. The only module that imports deepspeed (lazily).

Ranks are created and driven by ``rltrain/dist/deepspeed_group.py``, which shards a batch across ranks and
gives every rank the step's global ``LossNorm``. Two rules make a K-rank step equal to the single-process
torch learner on the whole batch:

- Gradient scale: loss contributions are already normalised by the global counts of the step (all
  micro-batches, all ranks), so the step's gradient is the *sum* of the ranks' gradients. DeepSpeed
  averages gradients over data-parallel ranks, so each rank back-propagates ``world_size * loss``.
- Collectives: ZeRO-3 gathers parameters inside every forward and ZeRO-2 reduces gradients inside every
  backward, so all ranks run the same number of micro-batches. A rank with fewer micro-batches runs zero-weight
  "filler" micro-batches (one row, loss multiplied by 0) to keep the collectives in step.

Micro-batches are the group's plan, by the torch learner's rule (``MicroBatching``, rltrain/learner/micro_batches.py):
padded rows without their all-padding columns, or rows packed padding-free (``max_tokens_per_micro_batch``,
``share_prefixes``). Ranks may then plan different numbers of micro-batches; the fillers even that out.

The optimizer is the torch AdamW of ``rltrain/learner/optim.py`` (no JIT-built fused Adam), with the same
warm-up schedule; gradient clipping is DeepSpeed's (same formula as ``clip_grad_norm_``; ``grad_clip`` None
or 0 is ``gradient_clipping: 0``, no clipping, as in the torch learner).

Non-finite steps are skipped as in the torch learner, by DeepSpeed's own overflow path: ZeRO-1/2/3 discard
the accumulated gradients and skip the optimizer and LR-schedule step when the global gradient norm (reduced
over ranks, so every rank decides alike) is not finite, in every precision (``check_grad_overflow`` is set
for bf16). A rank whose loss is not finite back-propagates NaN, so a NaN loss with finite gradients is
skipped on every rank too. ``engine.was_step_applied()`` then says whether the step was taken.

With ``lora`` (``learner.lora``, rank > 0) the engine wraps a peft LoRA model and only the adapters train
(rltrain/learner/lora.py): the reference is the engine's model with the adapter disabled, exports are the merged
weights under the base model's HF names (under ZeRO-3 each bucket gathers a layer's base weight with its
adapter), and ZeRO checkpoints leave out the frozen base weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from rltrain.config import ConfigError
from rltrain.learner import lora as _lora
from rltrain.learner.base import LossFn, LossNorm
from rltrain.learner.logprobs import sequence_logprobs
from rltrain.learner.micro_batches import MicroBatching, MicroForward, rows_in_batch_order
from rltrain.learner.optim import build_optimizer, build_scheduler, clip_max_norm
from rltrain.types import RolloutBatch

DEFAULT_EXTENSIONS_DIR = "~/.cache/rltrain/torch_extensions"  # JIT-built DeepSpeed ops, reused across runs
CHECKPOINT_TAG = "deepspeed"  # ZeRO state lives in <save dir>/deepspeed/
CHECKPOINT_META_FILE = "rltrain_deepspeed.json"
ZERO_STAGES = (1, 2, 3)
DTYPES = ("float32", "bfloat16", "float16")


def deepspeed_config(
    *,
    zero_stage: int,
    micro_batch_size: int,
    world_size: int,
    grad_clip: float | None,
    dtype: str,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    hidden_size: int | None = None,
) -> dict:
    """The DeepSpeed config dict of one learner rank; raises ValueError on an unsupported combination.

    Gradient accumulation is driven by the learner (``set_gradient_accumulation_boundary``), so the config
    says one micro-batch per step. ``hidden_size`` sets ZeRO-3's persistence threshold to HF's "auto"
    value (10 * hidden): parameters smaller than that stay replicated instead of being gathered.
    """
    if world_size < 1:
        raise ValueError(f"learner.world_size must be >= 1, got {world_size}")
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"learner.zero_stage must be one of {ZERO_STAGES}, got {zero_stage}")
    if offload_params and zero_stage != 3:
        raise ValueError(f"learner.offload_params needs learner.zero_stage=3, got zero_stage={zero_stage}")
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype!r} is not one of float32, bfloat16, float16")
    zero: dict = {"stage": zero_stage}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if zero_stage == 3 and hidden_size:
        zero["stage3_param_persistence_threshold"] = 10 * hidden_size
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch_size * world_size,
        "gradient_clipping": clip_max_norm(grad_clip),
        "zero_optimization": zero,
        # The client optimizer is torch AdamW; offloading it must not demand DeepSpeed's CPU Adam.
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if dtype == "bfloat16":
        # fp32 and fp16 always skip a step with a non-finite gradient norm; bf16 does when asked to.
        config["bf16"] = {"enabled": True, "check_grad_overflow": True}
    elif dtype == "float16":
        config["fp16"] = {"enabled": True}
    return config


def init_distributed(rank: int, world_size: int, master_addr: str, master_port: int, backend: str) -> None:
    """Join the torch.distributed group of the learner ranks (gloo on CPU, nccl on GPU).

    Each rank sees only its own device (Ray sets CUDA_VISIBLE_DEVICES), hence LOCAL_RANK 0 on GPU.
    DeepSpeed's shared-memory CPU all-reduce serves its inference all-reduce only; training's collectives go
    through gloo. It is marked unavailable, so it is neither JIT-built (~20 s at a rank's first start on a fresh
    machine) nor initialised (LOCAL_SIZE stays unset as well).
    """
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK="0" if backend == "nccl" else str(rank),
        MASTER_ADDR=master_addr,
        MASTER_PORT=str(master_port),
    )
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser(DEFAULT_EXTENSIONS_DIR))
    if backend == "gloo":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # say so, rather than have DeepSpeed warn while probing
    import deepspeed

    if backend == "gloo":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.utils.logger.setLevel(logging.WARNING)
    deepspeed.init_distributed(
        dist_backend=backend, auto_mpi_discovery=False, verbose=False, rank=rank, world_size=world_size
    )


def bucket_by_bytes(sizes: Sequence[int], bucket_bytes: int) -> list[list[int]]:
    """Consecutive index groups whose byte sizes sum to at most ``bucket_bytes`` (a larger item is alone)."""
    buckets: list[list[int]] = []
    current: list[int] = []
    filled = 0
    for index, size in enumerate(sizes):
        if current and filled + size > bucket_bytes:
            buckets.append(current)
            current, filled = [], 0
        current.append(index)
        filled += size
    if current:
        buckets.append(current)
    return buckets


def padding_bounds(prompt_mask: Tensor, response_mask: Tensor) -> tuple[int, int]:
    """(first prompt column that is real in some row, number of response columns up to the last trained-on one).

    prompt_mask [b,P], response_mask [b,T]. The response width is at least 1.
    """
    real_prompt = prompt_mask.sum(0).nonzero()
    start = int(real_prompt[0]) if len(real_prompt) else 0
    trained = response_mask.sum(0).nonzero()
    width = int(trained[-1]) + 1 if len(trained) else 1
    return start, width


def trimmed_tokens(micro: RolloutBatch) -> int:
    """Tokens ``trimmed_logprobs`` computes for ``micro``: rows x the width left after its all-padding columns."""
    start, width = padding_bounds(micro.prompt_mask, micro.response_mask)
    return micro.batch_size * (micro.prompt_ids.shape[1] - start + width)


def trimmed_logprobs(
    model, micro: RolloutBatch, temperature: float, with_entropy: bool = False
) -> tuple[Tensor, Tensor | None]:
    """``sequence_logprobs`` without the micro-batch's all-padding columns; (logprobs [b,T], entropy [b,T] | None).

    Exact: dropped prompt columns are masked for every row (positions come from the mask's cumsum), and
    dropped response columns come after every trained-on token of a causal model (their outputs are 0 anyway).
    """
    start, width = padding_bounds(micro.prompt_mask, micro.response_mask)
    view = RolloutBatch(
        prompt_ids=micro.prompt_ids[:, start:],
        prompt_mask=micro.prompt_mask[:, start:],
        response_ids=micro.response_ids[:, :width],
        response_mask=micro.response_mask[:, :width],
        rollout_logprobs=micro.rollout_logprobs[:, :width],
        group=micro.group,
        finish_reason=micro.finish_reason,
        policy_version=micro.policy_version,
    )
    logprobs, entropy = sequence_logprobs(model, view, temperature, with_entropy)
    pad = (0, micro.response_ids.shape[1] - width)
    return torch.nn.functional.pad(logprobs, pad), (torch.nn.functional.pad(entropy, pad) if with_entropy else None)


def rank_micro_batches(
    shard: RolloutBatch, micro_rows: Sequence[Sequence[int]], num_micro: int, filler: RolloutBatch
) -> list[tuple[RolloutBatch, bool]]:
    """This rank's micro-batches (``micro_rows``: shard rows of each), padded with ``filler`` to ``num_micro``;
    (micro, is_real) pairs."""
    if len(micro_rows) > num_micro:
        raise ValueError(
            f"shard of {shard.batch_size} rows has {len(micro_rows)} micro-batches, plan allows {num_micro}"
        )
    real = [(shard.select(rows), True) for rows in micro_rows]
    return real + [(filler, False)] * (num_micro - len(micro_rows))


class DeepSpeedLearner:
    """One rank of a DeepSpeed ZeRO learner. ``init_distributed`` must have run in this process."""

    def __init__(
        self,
        model_path: str,
        *,
        rank: int,
        world_size: int,
        zero_stage: int = 1,
        offload_optimizer: bool = False,
        offload_params: bool = False,
        export_bucket_mb: int = 64,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        adam_eps: float = 1e-8,
        warmup_steps: int = 0,
        lr_schedule: str = "constant",
        total_steps: int = 1,
        grad_clip: float | None = 1.0,
        micro_batch_size: int = 16,
        max_tokens_per_micro_batch: int | None = None,
        share_prefixes: bool = False,
        temperature: float = 1.0,
        use_reference: bool = False,
        dtype: str = "float32",
        gradient_checkpointing: bool = False,
        seed: int = 0,
        lora: dict[str, Any] | None = None,
    ):
        import deepspeed
        from transformers import AutoConfig

        from rltrain.models import load_causal_lm, load_tokenizer

        if export_bucket_mb < 1:
            raise ValueError(f"learner.export_bucket_mb must be >= 1, got {export_bucket_mb}")
        torch.manual_seed(seed)
        self.rank, self.world_size, self.zero_stage = rank, world_size, zero_stage
        self.temperature = temperature
        self.batching = MicroBatching(micro_batch_size, max_tokens_per_micro_batch, share_prefixes)
        self.export_bucket_bytes = export_bucket_mb * 2**20
        self.config = deepspeed_config(
            zero_stage=zero_stage,
            micro_batch_size=micro_batch_size,
            world_size=world_size,
            grad_clip=grad_clip,
            dtype=dtype,
            offload_optimizer=offload_optimizer,
            offload_params=offload_params,
            hidden_size=getattr(AutoConfig.from_pretrained(model_path), "hidden_size", None),
        )
        # While this object lives, from_pretrained builds ZeRO-3 models already partitioned (never whole on a rank).
        self._hf_zero3 = _hf_zero3_config(self.config) if zero_stage == 3 else None
        model = load_causal_lm(model_path, dtype)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.lora = _lora.lora_settings(lora)
        if self.lora is not None:
            model = _lora.add_adapter(model, self.lora, gradient_checkpointing)
        optimizer = build_optimizer(_lora.trainable_parameters(model), lr, betas, weight_decay, eps=adam_eps)
        scheduler = build_scheduler(optimizer, warmup_steps, total_steps, lr_schedule)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.config
        )
        self.device = self.engine.device
        self.tokenizer = load_tokenizer(model_path)
        self.use_reference = use_reference
        # Under LoRA the reference is the engine's own model with its adapter disabled: no second model.
        self.reference = self._build_reference(model_path, dtype) if use_reference and self.lora is None else None
        self.optimizer_steps = 0

    def _build_reference(self, model_path: str, dtype: str):
        """Frozen copy of the initial policy: a ZeRO-3 inference engine (partitioned) or a replicated module."""
        import deepspeed

        from rltrain.models import load_causal_lm

        model = load_causal_lm(model_path, dtype).eval().requires_grad_(False)
        if self.zero_stage != 3:
            return model.to(self.device)
        config = dict(self.config)
        config["zero_optimization"] = {
            key: value for key, value in self.config["zero_optimization"].items() if key != "offload_optimizer"
        }
        engine, *_ = deepspeed.initialize(model=model, config=config)
        engine.eval()  # DeepSpeedEngine.eval() returns None, unlike Module.eval()
        return engine

    @torch.no_grad()
    def logprobs(
        self,
        shard: RolloutBatch,
        reference: bool,
        micro_rows: Sequence[Sequence[int]],
        num_micro: int,
        filler: RolloutBatch,
    ) -> Tensor:
        """[rows, T] logprobs of this rank's rows in shard order (collective: each rank runs ``num_micro`` forwards)."""
        if reference and not self.use_reference:
            raise RuntimeError("reference logprobs requested but the learner has no reference model (use_reference)")
        model = self.reference if reference and self.reference is not None else self.engine
        was_training = model.training
        model.eval()
        parts = []
        base_only = _lora.adapter_disabled(self.engine.module) if reference and self.lora is not None else None
        with base_only or contextlib.nullcontext():
            for micro, real in rank_micro_batches(shard, micro_rows, num_micro, filler):
                logprobs = self._forward(model, micro.to(self.device)).logprobs
                if real:
                    parts.append(logprobs.float().cpu())
        model.train(was_training)
        return rows_in_batch_order(parts, micro_rows, shard.response_ids.shape)

    def train_step(
        self,
        shard: RolloutBatch,
        micro_rows: Sequence[Sequence[int]],
        loss_fn: LossFn,
        norm: LossNorm,
        num_micro: int,
        filler: RolloutBatch,
    ) -> tuple[dict[str, float], dict[str, float]]:
        """One optimizer step (collective). Returns (this rank's metric contributions, step-wide metrics)."""
        self.engine.train()
        micros = rank_micro_batches(shard, micro_rows, num_micro, filler)
        totals: dict[str, float] = {}
        total_loss = 0.0
        computed_tokens = unshared_tokens = 0  # filler micro-batches included: they are computed too
        for index, (micro, real) in enumerate(micros):
            self.engine.set_gradient_accumulation_boundary(index == len(micros) - 1)
            micro = micro.to(self.device)
            forward = self._forward(self.engine, micro, real and loss_fn.needs_entropy)
            computed_tokens += forward.tokens
            unshared_tokens += forward.unshared_tokens
            logprobs, entropy = forward.logprobs, forward.entropy
            if real:
                loss, metrics = loss_fn(logprobs, entropy, micro, norm)
                total_loss += float(loss.detach())
                for key, value in metrics.items():
                    totals[key] = totals.get(key, 0.0) + float(value)
                if not math.isfinite(float(loss.detach())):
                    # NaN gradients make the ranks' shared grad norm non-finite: DeepSpeed skips the step everywhere.
                    loss = logprobs.sum() * math.nan
            else:
                loss = logprobs.sum() * 0.0
            # DeepSpeed averages rank gradients; the contributions are global, so the step needs their sum.
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
        lr = self.scheduler.get_last_lr()[0]
        self.engine.step()  # a skipped step advances neither the optimizer nor the LR schedule
        applied = self.engine.was_step_applied()
        self.optimizer_steps += int(applied)
        step_metrics = {
            "loss/nonfinite_skipped": float(not applied),
            "perf/grad_norm": _as_float(self.engine.get_global_grad_norm()),
            "perf/lr": lr,
        }
        contributions = {
            **totals,
            "loss/total": total_loss,
            **self.batching.token_metrics(computed_tokens, unshared_tokens),
        }
        return contributions, step_metrics

    def _forward(self, model, micro: RolloutBatch, with_entropy: bool = False) -> MicroForward:
        """One micro-batch's forward: shared or packed (``MicroBatching``), else padded without all-padding columns."""
        if self.batching.packs:
            return self.batching.packed_forward(model, micro, self.temperature, with_entropy)
        logprobs, entropy = trimmed_logprobs(model, micro, self.temperature, with_entropy)
        tokens = trimmed_tokens(micro)
        return MicroForward(logprobs, entropy, tokens, tokens)

    def export_buckets(self, bucket_mb: int | None = None) -> Iterator[dict[str, Tensor]]:
        """HF-named CPU parameters in buckets of at most ``bucket_mb`` (default ``export_bucket_mb``; a bigger
        tensor travels alone).

        Rank 0 yields the tensors; other ranks yield empty dicts. Under ZeRO-3 this is collective (each bucket
        is gathered on every rank, then released), so every rank must consume the whole iterator. Under
        ZeRO-1/2 every rank holds the full parameters and the other ranks return at once.
        """
        if self.zero_stage != 3 and self.rank != 0:
            return
        entries = self._export_entries()
        sizes = [_whole_bytes(entry.sources[0]) for entry in entries]
        bucket_bytes = bucket_mb * 2**20 if bucket_mb is not None else self.export_bucket_bytes
        for bucket in bucket_by_bytes(sizes, bucket_bytes):
            chosen = [entries[i] for i in bucket]
            with self._gathered([param for entry in chosen for param in entry.sources]):
                if self.rank == 0:
                    yield {entry.name: _lora.merged_tensor(entry) for entry in chosen}
                else:
                    yield {}

    def _export_entries(self) -> list[_lora.ExportEntry]:
        """The exported HF-named tensors: the parameters as they are, or under LoRA the merged weights."""
        if self.lora is not None:
            return _lora.export_entries(self.engine.module)
        return [_lora.ExportEntry(name, (param,)) for name, param in self.engine.module.named_parameters()]

    def export_weights(self) -> Iterator[tuple[str, Tensor]]:
        """(name, tensor) pairs for weight sync, streamed bucket by bucket (see ``export_buckets``)."""
        for bucket in self.export_buckets():
            yield from bucket.items()

    def _gathered(self, params: list[torch.nn.Parameter]):
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def save(self, directory: str) -> None:
        """Collective. ZeRO state in ``directory/deepspeed/`` + an HF model dir (rank 0) in ``directory``; under LoRA
        the HF model is the merged one and the adapter is in ``directory/lora_adapter/``."""
        os.makedirs(directory, exist_ok=True)
        full_state = None
        if self.zero_stage == 3 or self.lora is not None:
            full_state = {}
            for bucket in self.export_buckets():
                full_state.update(bucket)
        adapter = None
        if self.lora is not None:
            with self._gathered(_lora.trainable_parameters(self.engine.module)):
                adapter = _lora.adapter_state(self.engine.module) if self.rank == 0 else None
        if self.rank == 0:
            if self.lora is not None:
                _lora.save_merged(self.engine.module, directory, full_state)
                _lora.save_adapter(self.engine.module, directory, adapter)
            else:
                self.engine.module.save_pretrained(directory, state_dict=full_state)
            self.tokenizer.save_pretrained(directory)
            meta = {"world_size": self.world_size, "zero_stage": self.zero_stage}
            with open(os.path.join(directory, CHECKPOINT_META_FILE), "w") as handle:
                json.dump(meta, handle)
        self.engine.save_checkpoint(
            directory,
            tag=CHECKPOINT_TAG,
            client_state={"optimizer_steps": self.optimizer_steps},
            exclude_frozen_parameters=self.lora is not None,  # the frozen base is the run's model_path
        )

    def load(self, directory: str) -> None:
        """Collective. Restore the ZeRO state written by ``save`` (same world_size and zero_stage: the group and
        the trainer call ``check_checkpoint`` first)."""
        path, client_state = self.engine.load_checkpoint(
            directory,
            tag=CHECKPOINT_TAG,
            load_module_strict=self.lora is None,  # a LoRA checkpoint holds the adapter, not the frozen base
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}")
        self.optimizer_steps = int(client_state.get("optimizer_steps", 0))


def check_checkpoint(directory: str, *, world_size: int, zero_stage: int) -> None:
    """Raise ConfigError (a ValueError) unless ``directory`` has DeepSpeed learner state of this world_size, stage."""
    meta_path = os.path.join(directory, CHECKPOINT_META_FILE)
    if not os.path.isfile(meta_path) or not os.path.isdir(os.path.join(directory, CHECKPOINT_TAG)):
        raise ConfigError(
            f"{directory} has no DeepSpeed learner state ({CHECKPOINT_META_FILE} + {CHECKPOINT_TAG}/): it was not "
            "saved by learner.backend=deepspeed; resume with the backend that saved it"
        )
    with open(meta_path) as handle:
        meta = json.load(handle)
    if (meta["world_size"], meta["zero_stage"]) != (world_size, zero_stage):
        raise ConfigError(
            f"checkpoint {directory} was saved with learner.world_size={meta['world_size']}, "
            f"learner.zero_stage={meta['zero_stage']}; this learner has world_size={world_size}, "
            f"zero_stage={zero_stage}. ZeRO state is partitioned per rank: resume with the same values"
        )


def _hf_zero3_config(config: dict):
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    return HfDeepSpeedConfig(config)


def _whole_bytes(param: torch.nn.Parameter) -> int:
    """Bytes of the whole parameter, also when ZeRO-3 has partitioned it (``ds_numel``)."""
    return getattr(param, "ds_numel", param.numel()) * param.element_size()


def _as_float(value) -> float:
    return float(value) if value is not None else float("nan")
