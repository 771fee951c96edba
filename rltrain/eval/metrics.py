"""Per-set metrics over n samples per prompt: pass@k, maj@k, avg@k, response length, truncation.

Pure functions over plain lists (no torch), so every number in eval.json can be recomputed from samples.jsonl.
Definitions in docs/evaluation.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

Same = Callable[[str, str], bool]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt with ``c`` correct of ``n`` samples (Chen et al. 2021, "Evaluating Large
    Language Models Trained on Code", eq. 1): ``1 - C(n-c, k) / C(n, k)``, the probability that a k-subset drawn
    without replacement holds a correct sample. Computed as a product, which stays exact-ish for large n."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def cluster(answers: Sequence[str | None], same: Same) -> list[int | None]:
    """Cluster index of each answer: an answer joins the first cluster (in order of first appearance) whose first
    member ``same`` calls equal to it, else opens a new one. None (nothing extracted) joins no cluster."""
    representatives: list[str] = []
    labels: list[int | None] = []
    for answer in answers:
        if answer is None:
            labels.append(None)
            continue
        label = next((i for i, rep in enumerate(representatives) if same(rep, answer)), None)
        if label is None:
            representatives.append(answer)
            label = len(representatives) - 1
        labels.append(label)
    return labels


def majority_correct(labels: Sequence[int | None], correct: Sequence[bool]) -> bool:
    """Whether the most frequent cluster among ``labels`` is correct (the verdict of its first member); ties go to
    the cluster seen first. No answer at all: wrong."""
    counts: dict[int, int] = {}
    first: dict[int, bool] = {}
    for label, verdict in zip(labels, correct):
        if label is not None:
            counts[label] = counts.get(label, 0) + 1
            first.setdefault(label, verdict)
    if not counts:
        return False
    winner = max(counts, key=lambda label: (counts[label], -label))  # cluster labels count up in order of first sight
    return first[winner]


def maj_at_k(answers: Sequence[str | None], correct: Sequence[bool], k: int, same: Same) -> float:
    """1.0 when the majority vote over the first ``k`` samples' answers (clustered by ``same``) is correct."""
    return float(majority_correct(cluster(answers[:k], same), correct[:k]))


@dataclass(frozen=True)
class Sample:
    """One graded completion, as a samples.jsonl line carries it."""

    prompt_id: str
    index: int  # sample number within its prompt, 0..n-1
    answer: str | None  # extracted final answer
    correct: bool
    length: int  # response tokens
    truncated: bool  # stopped by max_tokens


def set_metrics(samples: Sequence[Sample], n: int, same: Same) -> dict[str, float]:
    """``pass@k`` and ``maj@k`` for k = 1..n, ``avg@n``, ``response_len_mean``, ``truncated_frac``,
    ``num_prompts``, averaged over prompts. Every prompt must have all n samples."""
    by_prompt: dict[str, list[Sample]] = {}
    for sample in samples:
        by_prompt.setdefault(sample.prompt_id, []).append(sample)
    incomplete = sorted(pid for pid, group in by_prompt.items() if len(group) != n)
    if not by_prompt or incomplete:
        raise ValueError(f"every prompt needs {n} samples; incomplete: {incomplete[:5]} (or no prompts)")
    groups = [sorted(group, key=lambda s: s.index) for group in by_prompt.values()]
    metrics: dict[str, float] = {}
    for k in range(1, n + 1):
        metrics[f"pass@{k}"] = _mean(pass_at_k(n, sum(s.correct for s in g), k) for g in groups)
    votes = [(cluster([s.answer for s in g], same), [s.correct for s in g]) for g in groups]
    for k in range(1, n + 1):  # greedy clustering in order: the first k answers' clusters are a prefix
        metrics[f"maj@{k}"] = _mean(majority_correct(labels[:k], correct[:k]) for labels, correct in votes)
    metrics[f"avg@{n}"] = _mean(s.correct for s in samples)
    metrics["response_len_mean"] = _mean(s.length for s in samples)
    metrics["truncated_frac"] = _mean(s.truncated for s in samples)
    metrics["num_prompts"] = float(len(groups))
    return metrics


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values)
