"""Micro-batch threads (rltrain/learner/micro_threads.py): side by side, the same gradients bit for bit as one."""

from __future__ import annotations

import pytest
import torch
from signed_batches import signed_batch

from rltrain import algo
from rltrain.learner.micro_batches import MicroBatching
from rltrain.learner.micro_threads import MicroBatchThreads
from rltrain.learner.torch_learner import TorchLearner


def _toy_tasks(model: torch.nn.Module, inputs: list[torch.Tensor]):
    """One task per input: a loss through the model, whose weight is used twice (as a tied embedding is)."""

    def task_for(x):
        def task():
            hidden = torch.tanh(model(x))
            loss = (hidden @ model.weight).pow(2).mean()  # the weight's second use
            return loss, {"rows": x.shape[0]}

        return task

    return [task_for(x) for x in inputs]


def _grads_after(micro_threads: int, count: int) -> tuple[list[torch.Tensor], list]:
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16)
    inputs = [torch.randn(3 + i, 16, generator=torch.Generator().manual_seed(i)) for i in range(count)]
    results = MicroBatchThreads().backward(_toy_tasks(model, inputs), list(model.parameters()), micro_threads)
    return [p.grad.clone() for p in model.parameters()], results


@pytest.mark.parametrize("micro_threads", [2, 3])
@pytest.mark.parametrize("count", [1, 2, 5])
def test_threads_accumulate_the_same_gradients_bit_for_bit_as_one_thread(micro_threads, count):
    one_thread, one_results = _grads_after(1, count)
    several, results = _grads_after(micro_threads, count)
    assert all(torch.equal(a, b) for a, b in zip(one_thread, several))
    assert [payload for _, payload in results] == [payload for _, payload in one_results]  # in task order
    assert [float(loss) for loss, _ in results] == [float(loss) for loss, _ in one_results]
    assert all(not loss.requires_grad for loss, _ in results)


def test_a_failing_micro_batch_raises_after_every_thread_stopped_and_restores_the_thread_count():
    model = torch.nn.Linear(4, 4)
    finished = []

    def good():
        loss = model(torch.ones(2, 4)).sum()
        finished.append("good")
        return loss, None

    def bad():
        raise ValueError("a bad micro-batch")

    torch.set_num_threads(2)
    try:
        with pytest.raises(ValueError, match="a bad micro-batch"):
            MicroBatchThreads().backward([good, bad, good], list(model.parameters()), 2)
        assert finished == ["good"]  # the round's first micro-batch ran to its end; no round after the failure
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_a_micro_batch_thread_runs_with_one_torch_thread():
    seen = []
    weight = torch.ones(1, requires_grad=True)

    def task():
        seen.append(torch.get_num_threads())
        return (weight * 2).sum(), None

    torch.set_num_threads(2)
    try:
        MicroBatchThreads().backward([task, task], [weight], 2)
    finally:
        torch.set_num_threads(1)
    assert seen == [1, 1]


def test_threads_cut_a_step_into_at_least_that_many_micro_batches_of_whole_groups(batch):
    assert MicroBatching(64).rows(batch) == [[0, 1, 2, 3]]
    assert MicroBatching(64).rows(batch, micro_threads=2) == [[0, 1], [2, 3]]
    assert MicroBatching(1).rows(batch, micro_threads=2) == [[0], [1], [2], [3]]  # micro_batch_size still bounds
    shared = MicroBatching(64, share_prefixes=True).rows(batch, micro_threads=2)
    assert sorted(map(sorted, shared)) == [[0, 1], [2, 3]]  # prompt groups stay whole
    assert MicroBatching(64, max_tokens=1000).rows(batch, micro_threads=2) == MicroBatching(64, max_tokens=1000).rows(
        batch
    )


@pytest.fixture(scope="module")
def batch(tiny_model_dir):
    """4 rows in 2 prompt groups, uneven response lengths, advantages +-1, rollout logprobs as old logprobs."""
    return signed_batch(tiny_model_dir, [f"{10 + i // 2}+{i // 2}=" for i in range(4)], [2 + i for i in range(4)])


LORA = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


@pytest.mark.parametrize(
    "options",
    [{}, {"share_prefixes": True}, {"gradient_checkpointing": True}, {"lora": LORA}],
    ids=["padded", "shared-prefixes", "gradient-checkpointing", "lora"],
)
def test_torch_learner_steps_on_two_threads_equal_one_on_the_same_micro_batches(tiny_model_dir, batch, options):
    def learner():
        return TorchLearner(tiny_model_dir, lr=1e-2, micro_batch_size=2, **options)

    one, two = learner(), learner()
    loss_fn = algo.make_loss_fn()
    for _ in range(2):
        metrics_one = one.train_step(batch, loss_fn)
        metrics_two = two.train_step(batch, loss_fn, micro_threads=2)
        assert metrics_one == metrics_two
    assert all(torch.equal(a, b) for a, b in zip(one.model.parameters(), two.model.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(one.model.parameters(), learner().model.parameters()))


def test_two_threads_split_one_micro_batch_with_the_same_update_to_rounding(tiny_model_dir, batch):
    one, two = (TorchLearner(tiny_model_dir, lr=1e-2, micro_batch_size=64) for _ in range(2))
    loss_fn = algo.make_loss_fn()
    metrics_one, metrics_two = one.train_step(batch, loss_fn), two.train_step(batch, loss_fn, micro_threads=2)
    assert metrics_two["loss/total"] == pytest.approx(metrics_one["loss/total"], abs=1e-6)
    assert metrics_two["perf/grad_norm"] == pytest.approx(metrics_one["perf/grad_norm"], rel=1e-5)
    for a, b in zip(one.model.parameters(), two.model.parameters()):
        assert (a - b).abs().max() <= 1e-6


def test_a_deepspeed_group_takes_no_micro_batch_threads(batch):
    from rltrain.dist.deepspeed_group import DeepSpeedLearnerGroup

    with pytest.raises(ValueError, match="micro_threads must be 1"):
        DeepSpeedLearnerGroup.train_step(object(), batch, algo.make_loss_fn(), None, micro_threads=2)
