import torch

from rltrain.rollout.sampling_ops import filter_logits, left_pad, sample_next_tokens


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, top_k=2, top_p=1.0)).tolist() == [[True, True, False, False]]
    # nucleus 0.7: 0.5 (<0.7 before) and 0.3 (0.5 before) stay, 0.15 (0.8 before) goes
    assert torch.isfinite(filter_logits(logits, top_k=-1, top_p=0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_k=-1, top_p=0.01)).tolist() == [[True, False, False, False]]


def test_greedy_and_sampled_logprobs_follow_the_contract():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    tokens, logprobs = sample_next_tokens(logits, 0.0, -1, 1.0, None)
    assert tokens.tolist() == [1]
    assert torch.allclose(logprobs, torch.log_softmax(logits, -1)[:, 1])
    gen = torch.Generator().manual_seed(0)
    tokens, logprobs = sample_next_tokens(logits.repeat(64, 1), 2.0, 1, 1.0, gen)
    assert set(tokens.tolist()) == {1}  # top-k 1 always picks the argmax
    # logprob is of the temperature-scaled distribution before top-k truncation
    assert torch.allclose(logprobs, torch.log_softmax(logits / 2.0, -1)[0, 1].expand(64))


def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
