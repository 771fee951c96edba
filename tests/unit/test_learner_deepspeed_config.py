"""DeepSpeed config builder: ``grad_clip`` means what it means in the torch learner (0 / None: no clipping)."""

import pytest

from rltrain.config import ConfigError
from rltrain.learner.deepspeed_learner import deepspeed_config


def _config(grad_clip, dtype="float32"):
    return deepspeed_config(zero_stage=2, micro_batch_size=2, world_size=2, grad_clip=grad_clip, dtype=dtype)


@pytest.mark.parametrize(("grad_clip", "expected"), [(None, 0.0), (0, 0.0), (0.5, 0.5)])
def test_grad_clip_none_or_zero_is_deepspeeds_no_clipping(grad_clip, expected):
    clipping = _config(grad_clip)["gradient_clipping"]
    assert clipping == expected and isinstance(clipping, float)


def test_negative_grad_clip_is_a_config_error():
    with pytest.raises(ConfigError, match=r"learner.grad_clip=-1"):
        _config(-1)


def test_bf16_skips_non_finite_gradients_like_fp32():
    assert _config(1.0, "bfloat16")["bf16"] == {"enabled": True, "check_grad_overflow": True}
    assert "bf16" not in _config(1.0) and "fp16" not in _config(1.0)
