import pytest
import torch

from rltrain.types import FinishReason, GenRequest, GenResult, RolloutBatch, SamplingParams, build_rollout_batch


def _batch(lengths=(3, 1), prompts=((5, 6), (7,))):
    results = [GenResult(tuple(range(10, 10 + n)), (-0.5,) * n, FinishReason.STOP) for n in lengths]
    return build_rollout_batch(prompts, results, group=[0, 0], policy_version=3)


def test_build_pads_prompts_left_and_responses_right():
    batch = _batch()
    assert batch.prompt_ids.tolist() == [[5, 6], [0, 7]]
    assert batch.prompt_mask.tolist() == [[1, 1], [0, 1]]
    assert batch.response_ids.tolist() == [[10, 11, 12], [10, 0, 0]]
    assert batch.response_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.rollout_logprobs[1].tolist() == [-0.5, 0.0, 0.0]
    assert batch.policy_version.tolist() == [3, 3]
    assert batch.num_tokens == 4


def test_validate_names_the_bad_field():
    batch = _batch()
    with pytest.raises(ValueError, match="advantages"):
        batch.replace(advantages=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="group"):
        batch.replace(group=torch.zeros(2))


def test_concat_pads_and_select_roundtrip():
    a, b = _batch(lengths=(3, 1)), _batch(lengths=(5, 2), prompts=((1, 2, 3), (4,)))
    merged = RolloutBatch.concat([a, b])
    assert merged.response_ids.shape == (4, 5) and merged.prompt_ids.shape == (4, 3)
    assert merged.prompt_ids[0].tolist() == [0, 5, 6]
    back = merged.select([2, 3])
    assert back.response_ids.tolist() == b.response_ids.tolist()
    assert [m.batch_size for m in merged.micro_batches(3)] == [3, 1]


def test_concat_refuses_partial_fields():
    a = _batch().replace(rewards=torch.ones(2))
    with pytest.raises(ValueError, match="rewards"):
        RolloutBatch.concat([a, _batch()])


def test_request_and_params_validation():
    with pytest.raises(ValueError):
        GenRequest(())
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)
    assert GenRequest((1, 2), prefix_ids=(3,)).context_ids == (1, 2, 3)
    with pytest.raises(ValueError):
        FinishReason.parse("exploded")
