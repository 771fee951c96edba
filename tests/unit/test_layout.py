"""The Slurm layout: the job's resources read from Slurm's environment, the layout derived from them, and the
check that a run fits the job before Ray starts (rltrain.dist.layout, run by launch/slurm/rltrain.sbatch)."""

from __future__ import annotations

import pytest

from rltrain.config import ConfigError
from rltrain.config_rules import validate
from rltrain.dist.layout import (
    JobResources,
    compose,
    derived_overrides,
    job_resources,
    main,
    plan_for_job,
    without_user_keys,
)

CPU_JOB = {"SLURM_JOB_NUM_NODES": "1", "SLURM_CPUS_ON_NODE": "2"}


@pytest.mark.parametrize(
    "env,expected",
    [
        (CPU_JOB, JobResources(1, 2, 0)),
        ({"SLURM_JOB_NUM_NODES": "2", "SLURM_CPUS_ON_NODE": "32", "SLURM_GPUS_ON_NODE": "8"}, JobResources(2, 32, 8)),
        ({**CPU_JOB, "CUDA_VISIBLE_DEVICES": "0,1,2"}, JobResources(1, 2, 3)),
        ({**CPU_JOB, "CUDA_VISIBLE_DEVICES": "NoDevFiles"}, JobResources(1, 2, 0)),
        ({**CPU_JOB, "CUDA_VISIBLE_DEVICES": ""}, JobResources(1, 2, 0)),
        ({**CPU_JOB, "SLURM_GPUS_ON_NODE": "4", "RAY_NUM_GPUS": "2", "RAY_NUM_CPUS": "6"}, JobResources(1, 6, 2)),
    ],
)
def test_job_resources_from_the_slurm_environment(env, expected):
    assert job_resources(env) == expected


def test_a_cpu_job_gets_one_torch_rollout_worker_and_the_torch_learner():
    layout = derived_overrides(JobResources(1, 2, 0))
    assert layout == ["learner=torch", "rollout.num_workers=1", "cluster.num_gpus=0", "cluster.omp_threads=1"]


def test_one_gpu_is_shared_by_an_engine_and_a_rank():
    layout = derived_overrides(JobResources(1, 8, 1))
    assert "cluster.placement=colocated" in layout and "cluster.num_gpus=1" in layout
    assert "learner.world_size=1" in layout and "rollout.num_workers=1" in layout


def test_gpus_are_split_between_vllm_engines_and_zero3_ranks_over_all_nodes():
    layout = derived_overrides(JobResources(2, 32, 8))
    for override in ("rollout.engine=vllm", "rollout.num_workers=8", "learner=deepspeed", "learner.zero_stage=3"):
        assert override in layout
    assert "learner.world_size=8" in layout and "cluster.num_gpus=16" in layout
    assert "cluster.omp_threads=3" in layout  # 32 CPUs per node over 9 actors per node (8 + 8 + reward)


def test_the_user_overrides_win_and_a_chosen_group_drops_the_derived_keys_of_that_group():
    derived = derived_overrides(JobResources(1, 8, 4))
    kept = without_user_keys(derived, ["learner=torch", "rollout.num_workers=1"])
    assert not [o for o in kept if o.startswith(("learner", "rollout.num_workers"))]
    assert "rollout.engine=vllm" in kept


@pytest.mark.parametrize("recipe", ["quickstart", "treepo"])
@pytest.mark.parametrize("resources", [JobResources(1, 2, 0), JobResources(1, 8, 1), JobResources(2, 32, 8)])
def test_the_derived_layout_composes_validates_and_fits(recipe, resources):
    env = {
        "SLURM_JOB_NUM_NODES": str(resources.nodes),
        "SLURM_CPUS_ON_NODE": str(resources.cpus_per_node),
        "SLURM_GPUS_ON_NODE": str(resources.gpus_per_node),
    }
    cpus, derived = plan_for_job(recipe, "slurm", [], env)
    assert derived == derived_overrides(resources)
    assert cpus >= resources.cpus_per_node


def test_a_cpu_job_offers_ray_enough_logical_cpus_for_the_actors():
    cpus, _ = plan_for_job("quickstart", "slurm", [], {**CPU_JOB, "SLURM_CPUS_ON_NODE": "1"})
    assert cpus == 3  # 1 rollout worker + 1 learner + the reward worker, taking turns on one CPU


def test_a_layout_with_more_gpus_than_the_job_fails_before_ray_with_the_table():
    env = {**CPU_JOB, "SLURM_GPUS_ON_NODE": "2"}
    with pytest.raises(ConfigError) as err:
        plan_for_job("quickstart", "slurm", ["rollout.num_workers=4"], env)
    message = str(err.value)
    assert "1 node(s) x 2 CPUs, 2 GPUs" in message and "rollout.num_workers" in message
    assert [line.split() for line in message.splitlines()[1:4]] == [
        ["resource", "needed", "job"],
        ["CPU", "6", "2"],
        ["GPU", "5", "2"],
    ]


def test_a_named_gpu_layout_on_a_cpu_job_fails_before_ray():
    with pytest.raises(ConfigError, match=r"cluster\.num_gpus=16"):
        plan_for_job("quickstart", "multi_node", [], CPU_JOB)


def test_a_tensor_parallel_engine_wider_than_a_node_fails():
    env = {"SLURM_JOB_NUM_NODES": "2", "SLURM_CPUS_ON_NODE": "8", "SLURM_GPUS_ON_NODE": "2"}
    with pytest.raises(ConfigError, match="largest bundle 4 GPUs"):
        plan_for_job("quickstart", "slurm", ["rollout.num_workers=1", "rollout.tensor_parallel_size=4"], env)


def test_main_prints_the_ray_cpus_then_the_overrides(capsys):
    assert main(["quickstart", "trainer.steps=5"], env=CPU_JOB) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["3", *derived_overrides(JobResources(1, 2, 0))]


@pytest.mark.parametrize("args", [["quickstart", "trainer.nonexistent=1"], ["quickstart", "trainer.steps=0"]])
def test_main_reports_a_bad_config_in_one_error_and_exit_2(args, capsys):
    assert main(args, env=CPU_JOB) == 2
    assert capsys.readouterr().err.startswith("rltrain: config error: ")


@pytest.mark.parametrize("cluster", ["gpu_node", "multi_node"])  # colocated: validate() wants ranks == workers
def test_learner_torch_after_a_gpu_cluster_option_keeps_no_deepspeed_layout(cluster):
    cfg = compose("quickstart", [f"cluster={cluster}", "learner=torch"])
    validate(cfg)
    assert cfg.learner.backend == "torch" and cfg.learner.world_size == 1
