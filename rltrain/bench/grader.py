"""``rltrain-bench grader``: grades/s of a reward function through the real grader process pool.

Workloads (each sample is a ~1,500-character worked solution ending in a boxed answer; samples come in
groups of ``--group`` per problem, as GRPO makes them):
- ``math500``: MATH-500 ground truths (LaTeX: fractions, intervals, sets, expressions). Per sample: the
  gold verbatim (40%), the gold written another way (15%: spaces, ``\\dfrac``, ``x = ...``, a trailing
  period), a wrong answer from a pool of 3 other problems' answers (35%; wrong answers repeat within a
  group, as a policy's do), or no boxed answer at all (10%);
- ``numeric``: integer answers in the same proportions (GSM8K-like); decided without SymPy.
Each repeat starts a fresh ``RewardGrader`` (cold caches, warmed-up processes: start-up is not timed) and
grades ``--samples`` new samples (a new seed per repeat); the report gives the median and every repeat. The
warm-up grades two answers that reach the LaTeX parser and a SymPy comparison in every grader process (the
one-time imports, regex compilation and parser tables of a process are start-up); none of its answers occurs
in the workloads.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from rltrain.bench.report import emit, machine_info
from rltrain.grading import RewardGrader

# The repository's copy (origin and licence in tests/data/README.md); an installed wheel has none: use --data.
MATH500_PATH = Path(__file__).resolve().parents[2] / "tests" / "data" / "math500_test.json"
_REASONING = (
    "Let us set up the problem. We write $a_n = 2a_{n-1} + 1$ and check small cases: $a_1 = 1$, $a_2 = 3$, "
    "$a_3 = 7$. By induction $a_n = 2^n - 1$, since $2(2^{n-1} - 1) + 1 = 2^n - 1$. Next we bound the sum "
    "$\\sum_{k=1}^{n} \\frac{1}{k(k+1)} = 1 - \\frac{1}{n+1}$, which telescopes. "
)
# (completion, gold) pairs that go through Math-Verify: a window extraction with simplify, a boxed interval
_WARM_UP = [("Warm-up: we find $\\frac{x^2-1}{x-1}$.", "x + 1"), ("Warm-up: \\boxed{(0, 1]}", "\\{1\\}")]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rltrain-bench grader", description=__doc__.split("\n\n")[0])
    parser.add_argument("--fn", default="math", help="reward function (built-in name or path.py:name)")
    parser.add_argument("--workload", choices=("math500", "numeric"), default="math500")
    parser.add_argument("--workers", type=int, default=2, help="grader processes (reward.num_workers)")
    parser.add_argument("--samples", type=int, default=4000, help="samples graded per repeat")
    parser.add_argument("--group", type=int, default=8, help="samples per problem")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="reward.batch_size")
    parser.add_argument("--timeout-s", type=float, default=5.0, help="reward.timeout_s")
    parser.add_argument("--data", default=None, help="MATH-500 json (default: tests/data/math500_test.json)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_path", default=None, help="also write the report here")
    parser.add_argument(
        "--scores", dest="scores_path", default=None, help="write each sample's score per repeat (JSON): diff versions"
    )
    args = parser.parse_args(argv)
    if args.workers < 1 or args.samples < 1 or args.group < 1 or args.repeats < 1:
        parser.error("--workers, --samples, --group and --repeats must be positive")
    return args


def load_golds(workload: str, data: str | None, rng: random.Random) -> list[str]:
    """Ground-truth answers: MATH-500's, or random integers for ``numeric``."""
    if workload == "numeric":
        return [str(rng.randint(1, 100_000)) for _ in range(500)]
    path = Path(data) if data else MATH500_PATH
    if not path.is_file():
        raise SystemExit(f"MATH-500 data not found at {path}; use --data")
    with open(path, encoding="utf-8") as file:
        return [row["answer"] for row in json.load(file)]


def rewrite(answer: str, rng: random.Random) -> str:
    """The same answer written another way (what Math-Verify must see through)."""
    options = [
        lambda a: a.replace("\\frac", "\\dfrac") if "\\frac" in a else f" {a} ",
        lambda a: f"x = {a}" if "=" not in a and "," not in a else a.replace(",", ", "),
        lambda a: a.replace(" ", "") if " " in a else f"{a}.",
    ]
    return rng.choice(options)(answer)


def make_samples(golds: list[str], samples: int, group: int, rng: random.Random) -> tuple[list[str], list[dict]]:
    """(completions, rows) for ``samples`` samples in groups of ``group`` per problem."""
    completions: list[str] = []
    rows: list[dict] = []
    while len(completions) < samples:
        gold = rng.choice(golds)
        distractors = [rng.choice(golds) for _ in range(3)]
        for _ in range(min(group, samples - len(completions))):
            draw = rng.random()
            if draw < 0.40:
                ending = f"Therefore the answer is $\\boxed{{{gold}}}$."
            elif draw < 0.55:
                ending = f"So we get $\\boxed{{{rewrite(gold, rng)}}}$."
            elif draw < 0.90:
                ending = f"Hence the answer is $\\boxed{{{rng.choice(distractors)}}}$."
            else:
                ending = "I could not finish the computation in time."
            completions.append(_REASONING * rng.randint(3, 6) + ending)
            rows.append({"answer": gold})
    return completions, rows


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    golds = load_golds(args.workload, args.data, rng)
    runs, scores = [], []
    for repeat in range(args.repeats):
        completions, rows = make_samples(golds, args.samples, args.group, random.Random(args.seed + 1 + repeat))
        options = dict(num_workers=args.workers, timeout_s=args.timeout_s, batch_size=args.batch_size)
        with RewardGrader([{"fn": args.fn}], **options) as grader:
            warm_up = _WARM_UP * args.workers
            grader.grade([completion for completion, _ in warm_up], [{"answer": gold} for _, gold in warm_up])
            start = time.perf_counter()
            result = grader.grade(completions, rows)
            elapsed = time.perf_counter() - start
        errors = {key: value for key, value in result.metrics.items() if key.startswith("reward/errors/") and value}
        scores.append(result.rewards.tolist())
        runs.append(
            {
                "grades_per_s": len(completions) / elapsed,
                "seconds": elapsed,
                "mean_score": float(result.rewards.mean()),
                "max_call_s": result.metrics["perf/grading_call_max_s"],
                "errors": errors,
            }
        )
    if args.scores_path:
        with open(args.scores_path, "w", encoding="utf-8") as file:
            json.dump(scores, file)
    return {
        "benchmark": "grader",
        "fn": args.fn,
        "workload": args.workload,
        "workers": args.workers,
        "samples": args.samples,
        "group": args.group,
        "batch_size": args.batch_size,
        "median_grades_per_s": statistics.median(run["grades_per_s"] for run in runs),
        "runs": runs,
        "machine": machine_info(),
    }


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"grader benchmark: fn={report['fn']} workload={report['workload']} workers={report['workers']} "
        f"samples={report['samples']} group={report['group']} batch_size={report['batch_size']} "
        f"(cpus: {report['machine']['cpus']})",
        f"median: {report['median_grades_per_s']:.0f} grades/s",
    ]
    for index, run in enumerate(report["runs"]):
        lines.append(
            f"  repeat {index}: {run['grades_per_s']:.0f} grades/s ({run['seconds']:.2f} s), "
            f"mean score {run['mean_score']:.3f}, slowest call {run['max_call_s']:.2f} s, errors {run['errors'] or 0}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run_benchmark(args)
    return emit(format_report(report), report, args.json_path)


if __name__ == "__main__":
    sys.exit(main())
