"""CPU time sharing: how many torch intra-op threads each actor uses while its phase runs.

In the synchronous loop only one phase runs at a time (rollout, then grading, then the learner's logprobs and
train step), so an actor that waits holds its cores for nothing. With ``cluster.share_cpu_threads`` the driver
gives each call the threads of the cores its phase may use: in a synchronous step the rollout workers split
the machine between them while they generate and the learner ranks split it while they compute; when phases
overlap (an asynchronous pipeline) every rollout worker and learner rank keeps its own share. A torch learner (one
process) also computes its micro-batches side by side on as many threads of one torch thread each as the machine
has cores (rltrain/learner/micro_threads.py), so that it takes up a core whenever a rollout worker leaves it idle
without stalling when one does not. Pure: no torch, no Ray; the actors apply the counts at the start of each call
(rltrain/dist/actors.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PhaseThreads:
    """Torch threads per actor for each phase's calls; None: the actor keeps the count it started with
    (``cluster.omp_threads``). ``learner_micro_threads``: the torch learner's micro-batch threads in train steps (1: none)."""

    rollout: int | None = None
    learner: int | None = None
    learner_micro_threads: int = 1


def phase_threads(
    omp_threads: int, cores: int, rollout_workers: int, learner_ranks: int, overlapping: bool, micro_threads: bool = False
) -> PhaseThreads:
    """Threads per rollout worker and per learner rank on ``cores`` CPUs.

    Not overlapping: a phase's actors split all the cores (each gets ``cores // actors_in_phase``). Overlapping:
    every rollout worker and learner rank runs at once, so each gets ``cores // (rollout_workers + learner_ranks)``.
    Never fewer than ``omp_threads``, the count each actor starts with. ``micro_threads`` (a torch learner): its train
    steps compute ``cores // learner_ranks`` micro-batches at once in either case.
    """
    learner_micro_threads = max(1, cores // learner_ranks) if micro_threads else 1
    if overlapping:
        share = max(omp_threads, cores // (rollout_workers + learner_ranks))
        return PhaseThreads(rollout=share, learner=share, learner_micro_threads=learner_micro_threads)
    return PhaseThreads(
        rollout=max(omp_threads, cores // rollout_workers),
        learner=max(omp_threads, cores // learner_ranks),
        learner_micro_threads=learner_micro_threads,
    )


def local_cores(num_cpus: int | None) -> int:
    """The CPUs a local run's actors share: ``cluster.num_cpus`` when set, else the cores this process may use."""
    if num_cpus:
        return num_cpus
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def run_phase_threads(
    cluster: Any, rollout_workers: int, learner_ranks: int, cluster_gpus: float, overlapping: bool, micro_threads: bool
) -> PhaseThreads:
    """The run's plan from ``cluster.*``: shared on a local CPU-only Ray with ``cluster.share_cpu_threads``;
    otherwise (off, GPUs, or a joined cluster whose nodes' cores the driver cannot see) every actor keeps
    ``cluster.omp_threads`` and a learner computes one micro-batch at a time. ``micro_threads``: the learner is a torch
    learner."""
    if not cluster.share_cpu_threads or cluster.mode != "local" or cluster_gpus > 0:
        return PhaseThreads()
    cores = local_cores(cluster.num_cpus)
    return phase_threads(cluster.omp_threads, cores, rollout_workers, learner_ranks, overlapping, micro_threads)
