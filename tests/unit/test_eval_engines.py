"""rltrain-eval's engines: the rollout workers' options for the chosen engine, whatever the training sampler."""

from __future__ import annotations

from fake_runtime import compose

from rltrain.eval.engines import engine_options, resolve_engine


def test_engine_options_are_the_rollout_workers_for_flat_sampling():
    tree = compose(["rollout=tree", "algorithm=tree", "model.dtype=bfloat16"])
    assert tree.rollout.engine == "torch" and tree.rollout.sampler == "tree"
    assert engine_options(tree, "torch") == {"dtype": "bfloat16", "kv_fork": False}
    vllm = engine_options(compose(["rollout.gpu_memory_utilization=0.4", "rollout.vllm_block_size=32"]), "vllm")
    assert vllm["gpu_memory_utilization"] == 0.4 and vllm["block_size"] == 32 and "kv_fork" not in vllm


def test_auto_is_vllm_only_where_it_is_installed():
    import importlib.util

    installed = importlib.util.find_spec("vllm") is not None
    assert resolve_engine("auto") == ("vllm" if installed else "torch")
    assert resolve_engine("torch") == "torch" and resolve_engine("vllm") == "vllm"
