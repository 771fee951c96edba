"""Both learner backends' driver-side groups implement the LearnerGroup protocol (the names and parameters the
driver calls), so Runtime and WeightSync need nothing backend-specific."""

from __future__ import annotations

import inspect

import pytest

from rltrain.dist.deepspeed_group import DeepSpeedLearnerGroup
from rltrain.dist.groups import TorchLearnerGroup
from rltrain.learner.base import LearnerGroup

METHODS = [
    name
    for name, member in vars(LearnerGroup).items()
    if callable(member) and not name.startswith("_") and name != "use_gpu"
]


def _parameters(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


@pytest.mark.parametrize("group", [TorchLearnerGroup, DeepSpeedLearnerGroup])
def test_each_learner_group_has_every_protocol_method_with_its_parameters(group):
    assert {"logprobs", "train_step", "export_weights_ref", "save", "load", "actors"} <= set(METHODS)
    for name in METHODS:
        assert hasattr(group, name), f"{group.__name__} lacks {name}"
        assert _parameters(getattr(group, name)) == _parameters(getattr(LearnerGroup, name)), (group.__name__, name)
    assert "use_gpu" in dir(group) or "self.use_gpu" in inspect.getsource(group.__init__)
    assert "self.labels" in inspect.getsource(group.__init__)
