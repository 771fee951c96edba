"""``code``: run the completion's Python program against test cases in the sandbox (``rewards.sandbox``).

Program: the last fenced block tagged ``python``/``py`` (else the last fenced block, else the whole completion).
Ground truth (a list/dict, or the same as a JSON string), one of:
- stdin/stdout cases: ``[{"input": "1 2\\n", "output": "3\\n"}, ...]``;
- APPS/TACO style: ``{"inputs": [...], "outputs": [...]}`` (stdin/stdout);
- assert statements: ``["assert add(1, 2) == 3", ...]``, each appended to the program and run on its own.
Outputs are compared line by line with trailing whitespace and trailing blank lines ignored.
Score: ``correct_score`` iff every case passes (stops at the first failure); ``partial=True`` runs every case
and scores the fraction passed. Each case runs in its own sandboxed process with ``timeout_s`` of wall
clock, so ``reward.timeout_s`` must cover ``cases * (timeout_s + ~0.2 s start-up)``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from rewards.sandbox import SandboxLimits, run_python

MAX_TEST_CASES = 256
_FENCE_RE = re.compile(r"^```[ \t]*([\w+-]*)[ \t]*$", re.MULTILINE)


def extract_program(completion: str) -> str:
    """Body of the last ```python fence (else the last fence of any language, else the whole completion)."""
    fences = list(_FENCE_RE.finditer(completion))
    blocks = []  # (language, body) for each opening fence followed by a closing one
    index = 0
    while index + 1 < len(fences):
        opening, closing = fences[index], fences[index + 1]
        blocks.append((opening.group(1).lower(), completion[opening.end() + 1 : closing.start()]))
        index += 2
    python_blocks = [body for language, body in blocks if language in ("python", "py", "python3")]
    if python_blocks:
        return python_blocks[-1]
    return blocks[-1][1] if blocks else completion


def parse_tests(ground_truth: Any) -> list[dict[str, str] | str]:
    """Test cases as ``{"input", "output"}`` dicts or assert strings; ValueError naming the expected formats."""
    tests = json.loads(ground_truth) if isinstance(ground_truth, str) else ground_truth
    if isinstance(tests, dict) and "inputs" in tests and "outputs" in tests:
        if "fn_name" in tests:
            raise ValueError("call-based (fn_name) test cases are not supported; use assert statements")
        tests = [{"input": i, "output": o} for i, o in zip(tests["inputs"], tests["outputs"])]
    if not isinstance(tests, list) or not tests:
        raise ValueError(
            "code ground truth must be a non-empty list of {'input', 'output'} cases or assert strings, "
            f"or {{'inputs': [...], 'outputs': [...]}}; got {type(tests).__name__}"
        )
    for test in tests:
        if not (isinstance(test, str) or (isinstance(test, dict) and {"input", "output"} <= set(test))):
            raise ValueError(f"code test case must be an assert string or {{'input', 'output'}}, got {test!r}")
    return tests[:MAX_TEST_CASES]


def _as_text(value: Any) -> str:
    return "\n".join(map(str, value)) if isinstance(value, list) else str(value)


def outputs_match(actual: str, expected: str) -> bool:
    """Equal up to trailing whitespace on each line and trailing blank lines."""
    return _lines(actual) == _lines(expected)


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.rstrip().splitlines()]


def passes(program: str, test: dict[str, str] | str, limits: SandboxLimits) -> bool:
    """Run one test case in the sandbox."""
    if isinstance(test, str):
        return run_python(f"{program}\n\n{test}\n", "", limits).ok
    result = run_python(program, _as_text(test["input"]), limits)
    return result.ok and outputs_match(result.stdout, _as_text(test["output"]))


def score(
    completion: str,
    ground_truth: Any,
    *,
    timeout_s: float = 2.0,
    memory_mb: int = 512,
    partial: bool = False,
    correct_score: float = 1.0,
    wrong_score: float = 0.0,
    **fields: Any,
) -> dict[str, float]:
    """``{"score", "acc", "pass_rate"}``; ``pass_rate`` counts cases not run (after a failure) as failed."""
    tests = parse_tests(ground_truth)
    program = extract_program(completion if isinstance(completion, str) else str(completion))
    limits = SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb)
    passed = 0
    for test in tests:
        if passes(program, test, limits):
            passed += 1
        elif not partial:
            break
    rate = passed / len(tests)
    all_passed = passed == len(tests)
    if partial:
        value = wrong_score + (correct_score - wrong_score) * rate
    else:
        value = correct_score if all_passed else wrong_score
    return {"score": value, "acc": float(all_passed), "pass_rate": rate}


def validate_params(params: dict[str, Any]) -> None:
    """Checked at start-up by rltrain.grading."""
    if params.get("timeout_s", 2.0) <= 0 or params.get("memory_mb", 512) < 64:
        raise ValueError("code needs timeout_s > 0 and memory_mb >= 64")
