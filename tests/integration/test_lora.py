"""LoRA on the DeepSpeed learner (real ZeRO-3 on 2 gloo ranks, joined to the session's Ray head) against the torch
learner: the same step, reference logprobs from the adapter-disabled model, the merged export and checkpoint, resume.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("peft")
ray = pytest.importorskip("ray")

from omegaconf import OmegaConf  # noqa: E402
from ray_head import joined_ray  # noqa: E402

from rltrain.config import LearnerConfig  # noqa: E402
from rltrain.dist.deepspeed_group import DeepSpeedLearnerGroup  # noqa: E402
from rltrain.learner import lora  # noqa: E402
from rltrain.learner.torch_learner import TorchLearner  # noqa: E402
from rltrain.models import load_causal_lm  # noqa: E402
from rltrain.sft import CrossEntropyLoss, sft_batch  # noqa: E402

pytestmark = pytest.mark.integration

LORA = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]}
# adam_eps keeps Adam from amplifying the reduction-order noise of near-zero gradient entries (its update is
# g / (|g| + eps)), so one step on 2 ranks matches one process to TOL in fp32
OPTIONS = {"lr": 5e-2, "adam_eps": 1e-4, "grad_clip": 1.0, "micro_batch_size": 2, "use_reference": True, "lora": LORA}
TOL = 1e-6


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert list(a) == list(b)
    return max(float((a[name] - b[name]).abs().max()) for name in a)


def test_zero3_lora_steps_like_the_torch_learner_saves_merged_and_resumes(tiny_model_dir, tmp_path):
    gen = torch.Generator().manual_seed(0)
    batch = sft_batch(
        [torch.randint(3, 512, (2 + i,), generator=gen).tolist() for i in range(5)],
        [torch.randint(3, 512, (1 + 2 * i,), generator=gen).tolist() for i in range(5)],
    )
    single = TorchLearner(tiny_model_dir, **OPTIONS)
    cfg = OmegaConf.structured(LearnerConfig(backend="deepspeed", world_size=2, zero_stage=3))
    with joined_ray():
        group = DeepSpeedLearnerGroup(cfg, tiny_model_dir, OPTIONS)
        try:
            single.train_step(batch, CrossEntropyLoss())
            group.train_step(batch, CrossEntropyLoss())
            exported = ray.get(group.export_weights_ref())
            assert _max_diff(exported, dict(single.export_weights())) < TOL
            reference = group.logprobs(batch, reference=True)
            assert torch.allclose(reference, single.logprobs(batch, reference=True), atol=TOL)
            assert not torch.allclose(reference, group.logprobs(batch), atol=1e-3)

            group.save(str(tmp_path))
            saved = {name: p.detach() for name, p in load_causal_lm(str(tmp_path), "float32").named_parameters()}
            assert _max_diff(saved, exported) == 0.0
            lora.load_adapter(single.model, str(tmp_path))  # the gathered adapter, as peft saved it
            assert _max_diff(dict(single.export_weights()), exported) == 0.0

            expected = group.train_step(batch, CrossEntropyLoss())
            after = ray.get(group.export_weights_ref())
            group.load(str(tmp_path))
            assert group.train_step(batch, CrossEntropyLoss()) == expected
            assert _max_diff(ray.get(group.export_weights_ref()), after) == 0.0
        finally:
            group.shutdown()
