"""What the launcher tests share: the shrunk quickstart they launch, and small helpers."""

from __future__ import annotations

import os
import socket
import sys

from processes import cmdline

from rltrain import tracking

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DATA = os.path.join(REPO, "tests", "integration", "data")
SLURM_NODE = os.path.join(REPO, "tests", "launch", "slurm_node.sh")
SKIPPED = 3  # slurm_node.sh: this OS cannot run a one-node Slurm

# A 5-step quickstart shrunk to seconds a step; the paced reward (50 ms a sample, adds 0) makes a step last
# about a second, so that a signal sent after step k lands in step k + 1, as in a real run.
SMALL = [
    "trainer.steps=5",
    "trainer.save_every=100",
    "trainer.eval_every=0",
    "trainer.prompts_per_step=4",
    "rollout.n=4",
    "data.num_train=256",
    "data.num_eval=16",
    "sft.steps=5",
    "sft.batch_size=16",
    "model.tiny.intermediate_size=128",
    "reward.num_workers=1",
    "tracking.log_every_s=0",
    "tracking.wandb.enabled=false",
    f"reward.functions=[{{fn: '{DATA}/length_reward.py:score'}}, {{fn: '{DATA}/faulty_rewards.py:sleeps'}}]",
]
# Equal in a resumed and an uninterrupted run (same threads, CPU, fp32: deterministic).
DETERMINISTIC_KEYS = ("loss/total", "reward/mean", "perf/grad_norm", "rollout/response_len_mean")


def banner(message: str) -> None:
    """A line that stands out in CI output (pytest captures stdout; the terminal writer does not)."""
    line = "=" * 100
    sys.__stderr__.write(f"\n{line}\nLAUNCH TESTS: {message}\n{line}\n")
    sys.__stderr__.flush()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_metrics(run_dir) -> list[dict]:
    """The complete lines of a run's metrics.jsonl (none before the run writes it), read as rltrain reads them."""
    return tracking.read_metrics(os.path.join(run_dir, tracking.METRICS_FILE))


def assert_same_metrics(records: list[dict], reference: list[dict]) -> None:
    """Every step of ``records`` equals the ``reference`` run's step in the DETERMINISTIC_KEYS."""
    by_step = {r["step"]: r for r in reference}
    for record in records:
        if record["step"] == 0:
            continue
        for key in DETERMINISTIC_KEYS:
            assert abs(record[key] - by_step[record["step"]][key]) <= 1e-6, (record["step"], key)


def processes_naming(text: str) -> list[str]:
    """Command lines of the running processes that contain ``text`` (e.g. a Ray temp dir)."""
    lines = (cmdline(int(pid)) for pid in filter(str.isdigit, os.listdir("/proc")))
    return [line for line in lines if text in line]
