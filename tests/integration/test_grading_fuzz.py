"""Property test: >= 10,000 random and adversarial completions through the real grader pool.

Every built-in text grader runs on every completion in the grader processes, with the per-call deadline
enforced from outside. Nothing may escape as an exception (a reward error of kind "exception" or
"crash" counts as escaping), and every call must return within its deadline + 1 s (a pathological
input may be killed at the deadline: that is a counted "timeout", not a hang).
"""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rltrain.grading import RewardGrader

pytestmark = pytest.mark.integration
TIMEOUT_S = 1.0
TOTAL = 10_000
BATCH = 100
_seen = {"completions": 0, "timeouts": 0}

_LATEX = [
    r"\boxed{",
    r"\fbox{",
    "{",
    "}",
    "$",
    r"\frac{",
    r"\sqrt{",
    "^{",
    "_{",
    r"\left(",
    r"\right)",
    r"\\",
    r"\begin{pmatrix}",
    r"\end{pmatrix}",
    "&",
    r"\text{",
    r"\%",
    "####",
    "Answer:",
    "final answer is ",
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
    "=",
    ",",
    "-",
    ".",
    "1",
    "9",
    "0",
    "x",
    r"\pi",
    r"\infty",
]
_pieces = st.one_of(
    st.sampled_from(_LATEX),
    st.text(max_size=20),
    st.integers(-(10**30), 10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(alphabet=st.characters(max_codepoint=31), max_size=20),  # control characters
)
_huge = st.sampled_from(
    [
        r"\boxed{" * 10_000,
        "{" * 20_000 + "}" * 19_999,
        "}" * 20_000,
        r"\frac{" * 3000 + "1",
        "$" * 10_001,
        "9" * 200_000,
        "a" * 1_000_000,
        r"\sqrt{" * 2000 + "2",
        "(" * 10_000 + "1" + ")" * 10_000,
        "<answer>" * 10_000,
        r"\begin{pmatrix}" * 3000,
        "1e999999999",
        r"\boxed{10^{10^{10^{10}}}}",
    ]
)
_completion = st.one_of(
    st.lists(_pieces, max_size=60).map("".join),
    st.tuples(_huge, st.lists(_pieces, max_size=10).map("".join)).map("".join),
    st.text(max_size=2000),
)


@pytest.fixture(scope="module")
def graders():
    text = [{"fn": "math"}, {"fn": "gsm8k"}, {"fn": "format", "params": {"mode": "tags"}}]
    no_budget = {"timeout_s": TIMEOUT_S, "max_error_frac": 1.0}  # containment is tested here, not the error budget
    with (
        RewardGrader(text, num_workers=2, batch_size=32, **no_budget) as text_grader,
        RewardGrader([{"fn": "countdown"}], num_workers=1, **no_budget) as countdown_grader,
    ):
        yield text_grader, countdown_grader


@settings(
    max_examples=TOTAL // BATCH,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(_completion, min_size=BATCH, max_size=BATCH), st.sampled_from(["5", r"\frac{1}{2}", "-3", "x=2"]))
def test_no_exception_escapes_and_every_call_meets_its_deadline(graders, completions, gold):
    text_grader, countdown_grader = graders
    rows = [{"answer": gold}] * len(completions)
    countdown_rows = [{"answer": {"target": 5, "numbers": [2, 3]}}] * len(completions)
    for grader, batch_rows in ((text_grader, rows), (countdown_grader, countdown_rows)):
        result = grader.grade(completions, batch_rows)
        assert result.rewards.shape == (len(completions),)
        assert result.metrics["perf/grading_call_max_s"] <= TIMEOUT_S + 1.0
        escaped = {kind: result.metrics[f"reward/errors/{kind}"] for kind in ("exception", "crash", "nonfinite")}
        assert escaped == {"exception": 0, "crash": 0, "nonfinite": 0}
        _seen["timeouts"] += result.metrics["reward/errors/timeout"]
    _seen["completions"] += len(completions)


def test_at_least_ten_thousand_completions_were_graded():
    print(f"graded {_seen['completions']} completions; {_seen['timeouts']:.0f} calls killed at the deadline")
    assert _seen["completions"] >= TOTAL
