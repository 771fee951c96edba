"""LoRA on the torch learner (rltrain/learner/lora.py): merged export, reference with the adapter disabled, only the
adapter trains, checkpoints hold the merged HF model and the adapter, resume equals the uninterrupted run."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from omegaconf import OmegaConf
from signed_batches import signed_batch

from rltrain import algo
from rltrain.checkpoint import CheckpointError, check_fingerprint
from rltrain.config import ConfigError, LearnerConfig
from rltrain.learner import lora
from rltrain.learner.torch_learner import TorchLearner
from rltrain.models import load_causal_lm
from rltrain.runtime import learner_options

LORA = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]}


@pytest.fixture(scope="module")
def batch(tiny_model_dir):
    """4 rows of uneven response lengths with advantages +-1 and rollout logprobs as old logprobs."""
    return signed_batch(tiny_model_dir, [f"{10 + i}+{i}=" for i in range(4)], [2 + i for i in range(4)])


def _learner(model_dir: str, **overrides) -> TorchLearner:
    options = {"lr": 5e-2, "micro_batch_size": 2, "total_steps": 8, "warmup_steps": 2, "seed": 0, "lora": LORA}
    return TorchLearner(model_dir, **{**options, **overrides})


def _named(module: torch.nn.Module, trainable: bool) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad == trainable}


@pytest.fixture(scope="module")
def trained(tiny_model_dir, batch):
    """A LoRA learner after two steps (its B matrices are no longer zero) and its base parameters before them."""
    learner = _learner(tiny_model_dir, use_reference=True)
    frozen = _named(learner.model, trainable=False)
    adapter = _named(learner.model, trainable=True)
    for _ in range(2):
        learner.train_step(batch, algo.make_loss_fn())
    return learner, frozen, adapter


def test_only_the_adapter_trains_and_no_second_model_is_loaded(trained):
    learner, frozen, adapter = trained
    optimized = [p for group in learner.optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in optimized} == {id(p) for p in learner.model.parameters() if p.requires_grad}
    assert all("lora_" in name for name in adapter) and len(adapter) == 2 * 4 * 2  # A, B x 4 targets x 2 layers
    assert all(torch.equal(frozen[n], p) for n, p in learner.model.named_parameters() if n in frozen)
    assert any(not torch.equal(adapter[n], p) for n, p in learner.model.named_parameters() if n in adapter)
    assert learner.reference is None


def test_merged_export_equals_peft_merge_and_unload_under_the_base_names(tiny_model_dir, trained):
    learner, _, _ = trained
    exported = dict(learner.export_weights())
    merged = copy.deepcopy(learner.model).merge_and_unload()
    base_names = [name for name, _ in load_causal_lm(tiny_model_dir, "float32").named_parameters()]
    assert list(exported) == base_names  # what the rollout engines load, in the same order as a full fine-tune
    for name, tensor in merged.named_parameters():
        assert torch.equal(exported[name], tensor.detach()), name
    assert not torch.equal(exported["model.layers.0.self_attn.q_proj.weight"], _base_weight(learner, 0))


def _base_weight(learner: TorchLearner, layer: int) -> torch.Tensor:
    return learner.model.get_base_model().model.layers[layer].self_attn.q_proj.base_layer.weight.detach()


def test_reference_logprobs_are_the_base_models_and_the_adapter_is_back_after(tiny_model_dir, trained, batch):
    learner, _, _ = trained
    base = TorchLearner(tiny_model_dir, lr=1e-3, micro_batch_size=2)
    policy_before = learner.logprobs(batch)
    reference = learner.logprobs(batch, reference=True)
    assert torch.allclose(reference, base.logprobs(batch), atol=1e-6)
    assert not torch.allclose(policy_before, reference, atol=1e-3)  # the adapter changes the policy
    assert torch.equal(learner.logprobs(batch), policy_before)


def test_packed_micro_batches_compute_the_same_lora_logprobs(tiny_model_dir, trained, batch):
    learner, _, _ = trained
    packed = _learner(tiny_model_dir, max_tokens_per_micro_batch=64)
    packed.model.load_state_dict(learner.model.state_dict())
    assert torch.allclose(packed.logprobs(batch), learner.logprobs(batch), atol=1e-5)


def test_reference_needs_use_reference(tiny_model_dir, batch):
    with pytest.raises(RuntimeError, match="no reference model"):
        _learner(tiny_model_dir).logprobs(batch, reference=True)


def test_checkpoint_holds_the_merged_hf_model_and_the_adapter(trained, tmp_path):
    learner, _, _ = trained
    learner.save(str(tmp_path))
    assert os.path.isfile(tmp_path / lora.ADAPTER_DIR / lora.ADAPTER_FILE)
    assert not os.path.exists(tmp_path / "adapter_config.json")  # else from_pretrained would load it as an adapter
    loaded = load_causal_lm(str(tmp_path), "float32")
    exported = dict(learner.export_weights())
    for name, tensor in loaded.named_parameters():
        assert torch.equal(tensor.detach(), exported[name]), name


def test_resume_reproduces_the_uninterrupted_run(tiny_model_dir, batch, tmp_path):
    """Two steps, save, a third step; a fresh learner loading the save takes the same third step."""
    loss_fn = algo.make_loss_fn()
    uninterrupted = _learner(tiny_model_dir)
    for _ in range(2):
        uninterrupted.train_step(batch, loss_fn)
    uninterrupted.save(str(tmp_path))
    expected = uninterrupted.train_step(batch, loss_fn)

    resumed = _learner(tiny_model_dir, seed=1)  # another seed: a different initial adapter A, all replaced by load
    resumed.load(str(tmp_path))
    assert resumed.train_step(batch, loss_fn) == expected
    theirs, ours = dict(uninterrupted.export_weights()), dict(resumed.export_weights())
    assert all(torch.equal(theirs[name], ours[name]) for name in theirs)


def test_loading_a_full_fine_tune_checkpoint_names_the_setting(tiny_model_dir, tmp_path):
    TorchLearner(tiny_model_dir, lr=1e-3).save(str(tmp_path))
    with pytest.raises(ConfigError, match="learner.lora.rank=0"):
        _learner(tiny_model_dir).load(str(tmp_path))


def test_a_target_that_matches_no_module_is_a_config_error(tiny_model_dir):
    with pytest.raises(ConfigError, match=r"learner.lora.target_modules=\['qkv'\]: .*not found"):
        _learner(tiny_model_dir, lora={**LORA, "target_modules": ["qkv"]})


def test_learner_options_carry_lora_only_when_the_rank_is_positive():
    cfg = OmegaConf.create({"learner": OmegaConf.structured(LearnerConfig), "rollout": {"temperature": 1.0}})
    cfg.merge_with({"model": {"dtype": "float32", "gradient_checkpointing": False}, "run": {"seed": 0}})
    assert "lora" not in learner_options(cfg, 1)
    cfg.learner.lora.rank = 8
    assert learner_options(cfg, 1)["lora"] == {**OmegaConf.to_container(cfg.learner.lora), "rank": 8}


def test_a_checkpoint_resumes_only_with_its_lora_settings():
    off = lora.fingerprint({**LORA, "rank": 0})
    on = lora.fingerprint(LORA)
    assert off == "off" and "rank=4" in on
    check_fingerprint("ckpt", {"learner.lora": on}, {"learner.lora": on})
    with pytest.raises(CheckpointError, match="learner.lora: checkpoint rank=4 .*, config off"):
        check_fingerprint("ckpt", {"learner.lora": on}, {"learner.lora": off})


def test_only_the_lora_module_imports_peft_and_only_inside_functions():
    import ast
    import pathlib

    import rltrain

    importers, top_level = [], []
    for path in pathlib.Path(rltrain.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(name.split(".")[0] == "peft" for name in names):
                importers.append(path.name)
                top_level += [path.name] if node in tree.body else []
    assert set(importers) == {"lora.py"} and top_level == []
