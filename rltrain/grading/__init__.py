"""Reward grading: resolve reward functions from the config and run them in a pool of grader processes.

``resolve_reward_functions`` checks ``reward.functions`` at start-up; ``RewardGrader.grade`` scores a batch
and raises ``RewardFunctionError`` (a RunError) when a function fails on more than ``reward.max_error_frac``.
Nothing here imports torch at module level (grader processes import this package).
"""

from rltrain.grading.grader import GradeResult, RewardGrader
from rltrain.grading.limits import RewardFunctionError
from rltrain.grading.resolve import BUILTIN_GRADERS, RewardSpec, resolve_reward_functions
from rltrain.grading.worker import ERROR_KINDS

__all__ = [
    "BUILTIN_GRADERS",
    "ERROR_KINDS",
    "GradeResult",
    "RewardFunctionError",
    "RewardGrader",
    "RewardSpec",
    "resolve_reward_functions",
]
