"""Reward functions that fail the ways user code does, for the fault-injection tests (tests/integration/test_faults.py).

Each is called like any custom reward (``reward.functions=[{fn: '<this file>:raises'}]``); none is ever right.
"""

import time


def raises(completion: str, ground_truth, **fields) -> float:
    raise ValueError(f"injected fault on a {len(completion)}-character completion")


def hangs(completion: str, ground_truth, **fields) -> float:
    time.sleep(3600)
    return 1.0


def returns_nan(completion: str, ground_truth, **fields) -> float:
    return float("nan")


def returns_none(completion: str, ground_truth, **fields) -> None:
    return None


def sleeps(completion: str, ground_truth, **fields) -> float:
    """Always 0 after 50 ms: paces a tiny model's steps (a few ms each otherwise), so that a fault injected
    after step k lands in step k + 1, as it would in a real run."""
    time.sleep(0.05)
    return 0.0


def huge(completion: str, ground_truth, **fields) -> float:
    """Finite, and so are its group-centred advantages (Dr.GRPO: R - group mean, no std division), but the
    gradient of a loss scaled by +-3e37 overflows float32 (max ~3.4e38): an update the learner must skip."""
    return 3e37 if len(completion) % 2 == 0 else -3e37
