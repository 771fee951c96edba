"""LoRA adapters for both learners (``learner.lora``): the only module that uses peft, imported lazily.

With ``learner.lora.rank`` r > 0 the learner wraps its causal LM in a peft LoRA model (Hu et al. 2021,
"LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685). Every targeted linear layer computes
``W x + (alpha / r) B A x`` with the base weight W [out, in] frozen and only A [r, in] and B [out, r] trained
(B starts at zero, so step 0 is the base model). What the rest of rltrain sees:

- **weight sync and export** (``export_entries`` + ``merged_tensor``): the base model's HF parameter names with
  the merged weight ``W + (alpha / r) B A``, computed into a fresh tensor; the trained model is never merged in
  place. Rollout engines load them like a full fine-tune's weights.
- **reference logprobs** (``adapter_disabled``): the same model with the adapter switched off is the base
  model, so ``learner.use_reference`` costs no second model.
- **checkpoints** (``save_adapter`` / ``load_adapter``): ``<checkpoint>/lora_adapter/`` holds the adapter
  (peft's ``adapter_config.json`` + ``adapter_model.safetensors``), next to the merged HF model that
  ``rltrain-eval`` and ``model.path=<checkpoint>`` load; resuming loads the adapter onto the run's base model.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rltrain.config import ConfigError, setting

ADAPTER_DIR = "lora_adapter"  # a sub-directory: an adapter_config.json beside config.json would make
# transformers' from_pretrained try to load the checkpoint as an adapter instead of the merged model
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_NAME = "default"  # peft's name of the one adapter


@dataclass(frozen=True)
class LoraSettings:
    """``learner.lora`` as the learners take it; ``rank`` > 0 (rank 0 means no adapter: the learners get None)."""

    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]


@dataclass(frozen=True)
class ExportEntry:
    """One HF-named tensor of the exported model: ``sources`` are the parameters it is computed from (what
    ZeRO-3 must gather), ``layer`` the LoRA layer whose delta is added to ``sources[0]`` (None: copied as is)."""

    name: str
    sources: tuple[torch.nn.Parameter, ...]
    layer: Any = None


def lora_settings(options: Mapping[str, Any] | None) -> LoraSettings | None:
    """``learner.lora`` options (a mapping with rank, alpha, dropout, target_modules) -> settings, or None when off."""
    if not options or int(options["rank"]) == 0:
        return None
    return LoraSettings(
        rank=int(options["rank"]),
        alpha=float(options["alpha"]),
        dropout=float(options["dropout"]),
        target_modules=tuple(options["target_modules"]),
    )


def add_adapter(model: torch.nn.Module, settings: LoraSettings, gradient_checkpointing: bool = False):
    """Wrap ``model`` in a peft LoRA model: base weights frozen, adapter A random, B zero (same outputs as ``model``).

    A target that matches no module of the model raises ConfigError naming ``learner.lora.target_modules``.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        wrapped = get_peft_model(model, config)
    except ValueError as err:
        key = setting("learner.lora.target_modules", list(settings.target_modules))
        raise ConfigError(f"{key}: {err}") from None
    if gradient_checkpointing:
        # Checkpointed blocks re-run from their inputs; with frozen embeddings those need grad for B and A to get one.
        wrapped.enable_input_require_grads()
    return wrapped


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What the optimizer steps: every parameter of a full fine-tune, only the adapter's under LoRA."""
    return [param for param in model.parameters() if param.requires_grad]


def adapter_disabled(model) -> contextlib.AbstractContextManager:
    """Context in which the LoRA model computes as its base model (the reference policy)."""
    return model.disable_adapter()


def export_entries(model) -> list[ExportEntry]:
    """The merged model's HF-named tensors of the LoRA model ``model``, in the base model's parameter order.

    ``x.base_layer.weight`` of a LoRA layer ``x`` becomes ``x.weight`` (plus the adapter delta); its bias and every
    parameter outside LoRA layers keep their names; the adapter matrices themselves are not exported.
    """
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    layers = {name: module for name, module in base.named_modules() if isinstance(module, LoraLayer)}
    entries = []
    for name, param in base.named_parameters():
        parts = name.split(".")
        if any(part.startswith("lora_") for part in parts):
            continue  # adapter matrices: folded into their layer's weight
        if "base_layer" not in parts:
            entries.append(ExportEntry(name, (param,)))
            continue
        index = parts.index("base_layer")
        layer_name, leaf = ".".join(parts[:index]), parts[index + 1 :]
        hf_name = ".".join(parts[:index] + leaf)
        if leaf == ["weight"]:
            layer = layers[layer_name]
            adapter = tuple(p for n, p in layer.named_parameters() if not n.startswith("base_layer."))
            entries.append(ExportEntry(hf_name, (param, *adapter), layer))
        else:
            entries.append(ExportEntry(hf_name, (param,)))
    return entries


def merged_tensor(entry: ExportEntry) -> Tensor:
    """A CPU copy of ``entry``'s tensor: ``W + (alpha / r) B A`` for a LoRA weight [out, in], else the parameter.

    Its sources must be whole (under ZeRO-3: gathered). The model is not changed.
    """
    tensor = entry.sources[0].detach()
    if entry.layer is not None:
        tensor = tensor + entry.layer.get_delta_weight(ADAPTER_NAME).to(tensor.dtype)
    return tensor.to("cpu", copy=True)


def save_merged(model, directory: str, state: Mapping[str, Tensor]) -> None:
    """Write the merged HF model dir: the base model's config with ``state`` (HF names) as its weights."""
    model.get_base_model().save_pretrained(directory, state_dict=dict(state))


def adapter_state(model) -> dict[str, Tensor]:
    """The adapter's tensors under peft's saved names (CPU copies)."""
    from peft import get_peft_model_state_dict

    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in get_peft_model_state_dict(model).items()}


def save_adapter(model, directory: str, state: Mapping[str, Tensor] | None = None) -> None:
    """``directory/lora_adapter/``: peft's adapter_config.json + adapter_model.safetensors (``state``: whole tensors
    to save instead of the model's own, e.g. gathered under ZeRO-3)."""
    model.save_pretrained(os.path.join(directory, ADAPTER_DIR), state_dict=dict(state) if state is not None else None)


def load_adapter(model, directory: str) -> None:
    """Load the adapter saved by ``save_adapter`` in checkpoint ``directory`` into ``model`` (same settings)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = os.path.join(directory, ADAPTER_DIR, ADAPTER_FILE)
    if not os.path.isfile(path):
        raise ConfigError(
            f"{directory} has no LoRA adapter ({ADAPTER_DIR}/{ADAPTER_FILE}): it was saved with learner.lora.rank=0; "
            "resume with the learner.lora settings it was saved with"
        )
    result = set_peft_model_state_dict(model, load_file(path))
    if result.unexpected_keys:
        raise ConfigError(f"{path}: adapter tensors {sorted(result.unexpected_keys)[:4]} do not fit learner.lora")


def fingerprint(options: Mapping[str, Any]) -> str:
    """``learner.lora`` as a checkpoint records it: ``off``, or the settings that shape the adapter."""
    settings = lora_settings(options)
    if settings is None:
        return "off"
    return (
        f"rank={settings.rank} alpha={settings.alpha} dropout={settings.dropout} "
        f"target_modules={list(settings.target_modules)}"
    )
