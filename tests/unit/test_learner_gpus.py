"""One rule decides which actors use a GPU (``gpus_per_actor``); everything else reads the placement."""

from rltrain.dist.placement import actor_uses_gpu, gpus_per_actor


def _gpus(cluster_gpus, engine="vllm", tp=1, backend="deepspeed", ranks=2):
    return gpus_per_actor(cluster_gpus, engine, tp, backend, ranks)


def test_only_vllm_workers_on_a_gpu_cluster_reserve_their_tensor_parallel_size():
    assert _gpus(8, "vllm", tp=2)[0] == 2
    assert _gpus(1, "auto")[0] == 1
    assert _gpus(8, "torch")[0] == 0
    assert _gpus(0, "vllm", tp=2) == (0, 0)


def test_deepspeed_ranks_take_a_gpu_only_when_the_cluster_has_one_per_rank():
    assert _gpus(2, backend="deepspeed", ranks=2)[1] == 1
    assert _gpus(1, backend="deepspeed", ranks=2)[1] == 0
    assert _gpus(8, backend="torch", ranks=1)[1] == 0


def test_gpu_use_is_read_from_the_placement():
    assert actor_uses_gpu({"num_cpus": 1, "num_gpus": 0.5})
    assert not actor_uses_gpu({"num_cpus": 1, "num_gpus": 0})
    assert not actor_uses_gpu({"num_cpus": 1})
