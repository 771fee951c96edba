"""Rollout dispatch: token-balanced shares with prompt affinity (GPUs per actor: tests/unit/test_learner_gpus.py)."""

from __future__ import annotations

from rltrain.dist.groups import balance_by_tokens
from rltrain.types import GenRequest


def test_shares_cover_every_request_once_and_balance_tokens():
    requests = [GenRequest(prompt_ids=(i,) * (10 + i), n=2) for i in range(8)]
    shares = balance_by_tokens(requests, max_tokens=5, num_workers=3)
    assert sorted(i for share in shares for i in share) == list(range(8))
    loads = [sum((len(requests[i].context_ids) + 5) * 2 for i in share) for share in shares]
    # Largest-first greedy: no share exceeds the smallest by more than the largest single request.
    assert max(loads) - min(loads) <= (len(requests[-1].context_ids) + 5) * 2


def test_requests_of_one_prompt_share_a_worker():
    a, b = (1, 2, 3), (4, 5, 6)
    requests = [GenRequest(a), GenRequest(b), GenRequest(a, prefix_ids=(7,)), GenRequest(b, prefix_ids=(8, 9), n=3)]
    shares = balance_by_tokens(requests, max_tokens=4, num_workers=2)
    assert sorted(shares) == [[0, 2], [1, 3]]


def test_more_workers_than_prompts_leaves_some_idle():
    shares = balance_by_tokens([GenRequest((1,)), GenRequest((1,), prefix_ids=(2,))], max_tokens=1, num_workers=3)
    assert sorted(shares) == [[], [], [0, 1]]


def test_seeded_calls_give_each_worker_its_own_seed_range():
    from rltrain.dist.groups import share_params
    from rltrain.types import SamplingParams

    seeded = SamplingParams(seed=5)
    seeds = [share_params(seeded, slot).seed for slot in range(3)]
    assert seeds[0] == 5 and len(set(seeds)) == 3
    assert share_params(SamplingParams(), 2).seed is None
