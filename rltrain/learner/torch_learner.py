"""Single-process torch learner: AdamW, warm-up schedule, grad clipping, micro-batching.

Micro-batches are ``micro_batch_size`` consecutive padded rows, or, with ``max_tokens_per_micro_batch``,
groups of rows packed padding-free into one row of at most that many tokens (rltrain/learner/packing.py).
With ``share_prefixes`` whole prompt groups are packed with each distinct prefix (a group's prompt, a tree's
shared segments) computed once (rltrain/learner/tree_packing.py).

Algorithm-blind: ``train_step(batch, loss_fn)`` knows nothing about advantages or clipping. The loss
function returns contributions already normalised by the optimizer step's global token count
(see rltrain/learner/base.py), so gradients do not depend on ``micro_batch_size``.

A step whose loss or global gradient norm is not finite is skipped whole (``update_is_finite`` in
rltrain/learner/optim.py): gradients dropped, no optimizer or LR-schedule step, counted in
``loss/nonfinite_skipped``. ``grad_clip`` None or 0 means no clipping (``clip_max_norm``).

With ``lora`` (``learner.lora``, rank > 0) the model carries LoRA adapters and only they train
(rltrain/learner/lora.py): reference logprobs come from the same model with the adapter disabled, exports are
the merged weights under the base model's HF names, and a checkpoint holds the merged HF model and the adapter.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from rltrain.learner import lora as _lora
from rltrain.learner.base import LossFn, LossNorm
from rltrain.learner.logprobs import response_hidden_and_probs, sequence_logprobs
from rltrain.learner.micro_batches import MicroBatching, MicroForward, rows_in_batch_order
from rltrain.learner.micro_threads import MicroBatchThreads
from rltrain.learner.optim import build_optimizer, build_scheduler, clip_max_norm, update_is_finite
from rltrain.types import RolloutBatch

LEARNER_STATE_FILE = "learner_state.pt"


class TorchLearner:
    def __init__(
        self,
        model_path: str,
        *,
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
        device: str = "cpu",
        lora: dict[str, Any] | None = None,
    ):
        from rltrain.models import load_causal_lm, load_tokenizer

        torch.manual_seed(seed)
        self.device = torch.device(device)
        self.model = load_causal_lm(model_path, dtype).to(self.device)
        self.tokenizer = load_tokenizer(model_path)
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.lora = _lora.lora_settings(lora)
        if self.lora is not None:
            self.model = _lora.add_adapter(self.model, self.lora, gradient_checkpointing)
        self.use_reference = use_reference
        self.reference = None
        if use_reference and self.lora is None:  # under LoRA the reference is the model with its adapter disabled
            self.reference = load_causal_lm(model_path, dtype).to(self.device).eval().requires_grad_(False)
        params = _lora.trainable_parameters(self.model)
        self.optimizer = build_optimizer(params, lr, betas, weight_decay, adam_eps)
        self.scheduler = build_scheduler(self.optimizer, warmup_steps, total_steps, lr_schedule)
        self.max_grad_norm = clip_max_norm(grad_clip)
        self.micro_batch_size = micro_batch_size
        self.batching = MicroBatching(micro_batch_size, max_tokens_per_micro_batch, share_prefixes)
        self.micro_batch_threads = MicroBatchThreads()
        self.temperature = temperature
        self.optimizer_steps = 0

    @torch.no_grad()
    def logprobs(self, batch: RolloutBatch, reference: bool = False) -> Tensor:
        if reference and not self.use_reference:
            raise RuntimeError("reference logprobs requested but the learner has no reference model")
        model = self.reference if self.reference is not None and reference else self.model
        was_training = model.training
        model.eval()
        micro_rows = self.batching.rows(batch)
        with _lora.adapter_disabled(model) if reference and self.lora is not None else contextlib.nullcontext():
            parts = [self._forward(model, batch.select(rows).to(self.device)).logprobs.cpu() for rows in micro_rows]
        model.train(was_training)
        return rows_in_batch_order(parts, micro_rows, batch.response_ids.shape)

    @torch.no_grad()
    def forward_extras(self, batch: RolloutBatch, extras_fn: Callable[..., dict[str, Tensor]]) -> dict[str, Tensor]:
        """``extras_fn(hidden [B,T,H], probs [B,T,S], token_index [B,T], batch)`` on the current policy's forward.

        ``probs`` keeps the S vocabulary columns of the tokens that occur in the batch's responses and
        ``token_index`` points each response token into them (memory O(B*T*S), not O(B*T*V)). Algorithms
        that need hidden states (THR) pass their function here; the learner stays algorithm-blind.
        """
        token_subset, token_index = torch.unique(batch.response_ids, return_inverse=True)
        was_training = self.model.training
        self.model.eval()
        hidden, probs = [], []
        for micro in batch.micro_batches(self.micro_batch_size):
            h, p = response_hidden_and_probs(
                self.model, micro.to(self.device), token_subset.to(self.device), self.temperature
            )
            hidden.append(h.cpu())
            probs.append(p.cpu())
        self.model.train(was_training)
        width = batch.response_ids.shape[1]
        return extras_fn(_pad_cat_right(hidden, width), _pad_cat_right(probs, width), token_index, batch)

    def train_step(self, batch: RolloutBatch, loss_fn: LossFn, micro_threads: int = 1) -> dict[str, float]:
        """One optimizer step over all rows of ``batch``; ``micro_threads`` > 1 (CPU): that many micro-batches at once,
        one torch thread each, the rows cut into at least that many micro-batches (rltrain/learner/micro_threads.py)."""
        norm = LossNorm(global_tokens=max(1, batch.num_tokens), global_seqs=batch.batch_size)
        return self.train_step_normalised(batch, loss_fn, norm, micro_threads)

    def train_step_normalised(
        self, batch: RolloutBatch, loss_fn: LossFn, norm: LossNorm, micro_threads: int = 1
    ) -> dict[str, float]:
        """One optimizer step over this process's rows, normalised by counts given from outside."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        total_loss = 0.0
        computed_tokens = 0
        unshared_tokens = 0

        def micro_task(rows: list[int]):
            def task():
                micro = batch.select(rows).to(self.device)
                forward = self._forward(self.model, micro, loss_fn.needs_entropy)
                loss, metrics = loss_fn(forward.logprobs, forward.entropy, micro, norm)
                return loss, (forward.tokens, forward.unshared_tokens, {k: float(v) for k, v in metrics.items()})

            return task

        tasks = [micro_task(rows) for rows in self.batching.rows(batch, micro_threads)]
        params = [param for param in self.model.parameters() if param.requires_grad]
        for loss, (tokens, unshared, metrics) in self.micro_batch_threads.backward(tasks, params, micro_threads):
            total_loss += float(loss)
            computed_tokens += tokens
            unshared_tokens += unshared
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value
        lr = self.scheduler.get_last_lr()[0]
        grad_norm, skipped = self._apply_update(total_loss)
        return {
            **totals,
            "loss/total": total_loss,
            "loss/nonfinite_skipped": float(skipped),
            "perf/grad_norm": grad_norm,
            "perf/lr": lr,
            **self.batching.token_metrics(computed_tokens, unshared_tokens),
        }

    def _forward(self, model: torch.nn.Module, micro: RolloutBatch, with_entropy: bool = False) -> MicroForward:
        """One micro-batch's forward: shared or packed (``MicroBatching``), else padded."""
        if self.batching.packs:
            return self.batching.packed_forward(model, micro, self.temperature, with_entropy)
        logprobs, entropy = sequence_logprobs(model, micro, self.temperature, with_entropy)
        tokens = micro.prompt_ids.numel() + micro.response_ids.numel()
        return MicroForward(logprobs, entropy, tokens, tokens)

    def _apply_update(self, total_loss: float) -> tuple[float, bool]:
        """Clip and apply the accumulated gradients unless the step is not finite; (grad norm, skipped).

        The norm is the global L2 norm before clipping. A skipped step leaves weights, optimizer state, LR
        schedule and ``optimizer_steps`` as they were, so the next step is the one this step would have been.
        """
        params = [param for param in self.model.parameters() if param.grad is not None]
        norm = torch.nn.utils.get_total_norm([param.grad for param in params])
        skipped = not update_is_finite(total_loss, float(norm))
        if not skipped:
            if self.max_grad_norm > 0:
                torch.nn.utils.clip_grads_with_norm_(params, self.max_grad_norm, norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm), skipped

    def export_weights(self, copy: bool = True) -> Iterator[tuple[str, Tensor]]:
        """HF-named CPU copies of the weights (under LoRA: merged, with the base model's names). ``copy=False``:
        CPU weights as detached views, for a caller that serialises them before the next update."""
        if self.lora is not None:
            for entry in _lora.export_entries(self.model):
                yield entry.name, _lora.merged_tensor(entry)
            return
        for name, param in self.model.named_parameters():
            yield name, param.detach().to("cpu", copy=copy)

    def state_dict_cpu(self) -> dict[str, Tensor]:
        return dict(self.export_weights())

    def save(self, directory: str) -> None:
        """HF model dir (from_pretrained loads it; merged under LoRA, + the adapter) + optimizer/scheduler state."""
        if self.lora is not None:
            _lora.save_merged(self.model, directory, self.state_dict_cpu())
            _lora.save_adapter(self.model, directory)
        else:
            self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "optimizer_steps": self.optimizer_steps,
        }
        torch.save(state, os.path.join(directory, LEARNER_STATE_FILE))

    def load(self, directory: str) -> None:
        from rltrain.models import load_causal_lm

        if self.lora is not None:
            _lora.load_adapter(self.model, directory)  # the frozen base is the run's model_path, unchanged
        else:
            loaded = load_causal_lm(directory, str(next(self.model.parameters()).dtype).replace("torch.", ""))
            self.model.load_state_dict(loaded.state_dict())
        state = torch.load(os.path.join(directory, LEARNER_STATE_FILE), weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.optimizer_steps = state["optimizer_steps"]


def _pad_cat_right(parts: list[Tensor], width: int) -> Tensor:
    """Concatenate [b_i, t_i, ...] parts along dim 0, right-padding dim 1 with zeros to ``width``."""
    return torch.cat([_pad_dim1(p, width) for p in parts])


def _pad_dim1(part: Tensor, width: int) -> Tensor:
    pad = [0, 0] * (part.dim() - 2) + [0, width - part.shape[1]]
    return torch.nn.functional.pad(part, pad)
