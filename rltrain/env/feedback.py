"""``feedback``: RLEF-style retries (recipe ``feedback``; Gehring et al. 2024, "RLEF: Grounding Code LLMs in
Execution Feedback with Reinforcement Learning").

Each model turn is an attempt. The environment checks it and, while attempts remain and it is wrong, answers
with feedback the model can use; the episode ends at a correct attempt or after ``max_attempts``. Reward: 1 for a
correct final attempt, minus ``attempt_cost`` per extra attempt; 0 otherwise. Metrics: ``acc`` (final attempt),
``first_acc`` (first attempt), ``attempts``.

- ``mode: countdown``: the attempt is an expression (``<answer>3*5+7</answer>``, rewards/countdown.py's rules),
  evaluated exactly (never ``eval``); feedback, on its own line: ``<fb>=17</fb>`` for a valid expression with the
  wrong value, ``<fb>use 3, 5, 7</fb>`` when it does not use each number once, ``<fb>invalid</fb>`` otherwise.
- ``mode: code``: the attempt is a program run in the sandbox (rewards/sandbox.py) against the row's tests
  (``answer`` as in rewards/code.py); feedback ``<fb>passed k of n tests</fb>`` plus the first failing test's
  error output.
"""

from __future__ import annotations

import re
from typing import Any

from rltrain.env.base import Environment, StepResult, on_own_line

MODES = ("countdown", "code")
_SPECIAL = re.compile(r"<\|[^|>]*\|>")


def countdown_feedback(attempt: str, answer: Any) -> tuple[bool, str]:
    """(correct, feedback text) of a countdown attempt."""
    from rewards.countdown import _evaluate, check, expression_from, parse_ground_truth

    target, numbers = parse_ground_truth(answer)
    expression = expression_from(_SPECIAL.sub("", attempt))
    valid, correct = check(expression, target, numbers)
    if correct:
        return True, ""
    if valid:
        import ast

        value = _evaluate(ast.parse(expression, mode="eval"), [])
        shown = str(value.numerator) if value.denominator == 1 else str(value)
        return False, f"<fb>={shown}</fb>"
    if expression and re.fullmatch(r"[0-9+\-*/()\s]+", expression):
        return False, f"<fb>use {', '.join(map(str, numbers))}</fb>"
    return False, "<fb>invalid</fb>"


def code_feedback(attempt: str, answer: Any, timeout_s: float) -> tuple[bool, str]:
    """(all tests pass, feedback text) of a program attempt, run in the sandbox."""
    from rewards.code import _as_text, extract_program, outputs_match, parse_tests
    from rewards.sandbox import SandboxLimits, run_python

    tests, program = parse_tests(answer), extract_program(_SPECIAL.sub("", attempt))
    limits = SandboxLimits(timeout_s=timeout_s)
    passed, first_error = 0, ""
    for test in tests:
        if isinstance(test, str):
            result = run_python(f"{program}\n\n{test}\n", "", limits)
            ok = result.ok
        else:
            result = run_python(program, _as_text(test["input"]), limits)
            ok = result.ok and outputs_match(result.stdout, _as_text(test["output"]))
        passed += ok
        if not ok and not first_error:
            first_error = (result.stderr.strip().splitlines() or ["wrong output" if result.ok else "failed"])[-1]
    if passed == len(tests):
        return True, ""
    return False, f"<fb>passed {passed} of {len(tests)} tests; {first_error[:300]}</fb>"


class FeedbackEnv(Environment):
    def __init__(self, mode: str = "countdown", max_attempts: int = 3, attempt_cost: float = 0.0, timeout_s=2.0):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: one of {list(MODES)}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts={max_attempts}: at least 1")
        self.mode, self.max_attempts, self.attempt_cost, self.timeout_s = mode, max_attempts, attempt_cost, timeout_s
        self.attempts = 0
        self.answer: Any = None

    def reset(self, row: dict[str, Any]) -> str:
        self.answer = row["answer"]
        return ""

    def replay(self, action_text: str, action_ids: tuple[int, ...]) -> None:
        """An earlier attempt, replayed (rltrain/env/worker.py): only its count matters; nothing runs again."""
        self.attempts += 1

    def step(self, action_text: str, action_ids: tuple[int, ...]) -> StepResult:
        self.attempts += 1
        if self.mode == "countdown":
            correct, feedback = countdown_feedback(action_text, self.answer)
        else:
            correct, feedback = code_feedback(action_text, self.answer, self.timeout_s)
        metrics = {"first_acc": float(correct)} if self.attempts == 1 else {}
        if correct or self.attempts >= self.max_attempts:
            reward = 1.0 - self.attempt_cost * (self.attempts - 1) if correct else 0.0
            return StepResult(
                reward=reward, done=True, metrics={**metrics, "acc": float(correct), "attempts": self.attempts}
            )
        return StepResult(observation=on_own_line(feedback, action_text), metrics=metrics)
