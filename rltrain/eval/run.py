"""Score eval sets: generate the samples not yet in samples.jsonl, grade them, append them, summarise each set.

Every sample is one samples.jsonl line (appended and flushed as its chunk is graded), keyed by (set, prompt id,
sample index): a killed evaluation re-run generates only what is missing, and every metric can be recomputed,
or the completions re-graded, from the file alone. Generation and grading are passed in (``generate`` of an
in-process engine for rltrain-eval, of the rollout workers in training), so this module imports no backend.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rltrain.eval.answers import equivalence, extract_answer
from rltrain.eval.metrics import Sample, set_metrics
from rltrain.eval.sets import EvalSet
from rltrain.types import FinishReason, GenRequest, GenResult, SamplingParams

Generate = Callable[[Sequence[GenRequest], SamplingParams], list[list[GenResult]]]
Grade = Callable[[list[str], list[dict]], tuple[list[bool], list[float]]]  # completions, rows -> correct, reward
CHUNK_PROMPTS = 32  # prompts generated, graded and appended together


@dataclass
class SetJob:
    """One eval set ready to score: its rows and tokenised prompts, sampling settings, grader."""

    spec: EvalSet
    rows: list[dict]
    prompt_ids: list[list[int]]
    params: SamplingParams
    grade: Grade
    grader: str  # the grader whose answers and equivalence maj@k uses (e.g. "math", "countdown")
    # What produced a sample (model and sampling settings): a logged sample counts as done only under the same
    # identity, so re-running with another model or temperature into the same samples.jsonl regenerates.
    identity: str = ""


class SampleLog:
    """samples.jsonl: completed samples read at open, new ones appended line by line (flushed); ``path=None``
    keeps them in memory only (in-training evaluation: each one scores a new policy).

    A last line cut by a kill is dropped on open, so appending always starts a whole line."""

    def __init__(self, path: str | None):
        self.path = path
        self.records: dict[tuple[str, str, int], dict] = {}
        self._file = None
        if path is None:
            return
        if os.path.exists(path):
            self._read()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the log's lifetime

    def _read(self) -> None:
        with open(self.path, "rb") as f:
            data = f.read()
        whole = data[: data.rfind(b"\n") + 1]
        if len(whole) != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(len(whole))
        for line in whole.decode("utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                self.records[(record["set"], record["prompt_id"], record["index"])] = record

    def append(self, records: list[dict]) -> None:
        for record in records:
            self.records[(record["set"], record["prompt_id"], record["index"])] = record
        if self._file is not None:
            self._file.write("".join(json.dumps(record, ensure_ascii=False, default=str) + "\n" for record in records))
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> SampleLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def is_done(job: SetJob, log: SampleLog, prompt_id: str, index: int) -> bool:
    """A sample of this job (same set, prompt, index and identity) is in the log."""
    record = log.records.get((job.spec.name, prompt_id, index))
    return record is not None and record.get("identity", "") == job.identity


def missing_samples(job: SetJob, log: SampleLog) -> list[tuple[int, list[int]]]:
    """(row position, sample indices not in the log) for every row with something left to generate."""
    todo = []
    for position, row in enumerate(job.rows):
        indices = [i for i in range(job.spec.n) if not is_done(job, log, row["id"], i)]
        if indices:
            todo.append((position, indices))
    return todo


def generate_missing(
    job: SetJob,
    log: SampleLog,
    generate: Generate,
    decode: Callable[[Sequence[int]], str],
    on_samples=None,
    chunk_prompts: int = CHUNK_PROMPTS,
) -> None:
    """Generate, grade and append every sample of ``job`` that the log lacks, ``chunk_prompts`` prompts at a
    time; ``on_samples(count)`` after each chunk (progress)."""
    todo = missing_samples(job, log)
    for start in range(0, len(todo), chunk_prompts):
        chunk = todo[start : start + chunk_prompts]
        requests = [GenRequest(tuple(job.prompt_ids[position]), n=len(indices)) for position, indices in chunk]
        groups = generate(requests, job.params)
        keyed = [
            (job.rows[position], index, result)
            for (position, indices), group in zip(chunk, groups)
            for index, result in zip(indices, group)
        ]
        completions = [decode(result.token_ids) for _, _, result in keyed]
        verdicts, rewards = job.grade(completions, [row for row, _, _ in keyed])
        log.append(
            [
                {**_record(job, row, index, result, completion), "correct": bool(correct), "reward": float(reward)}
                for (row, index, result), completion, correct, reward in zip(keyed, completions, verdicts, rewards)
            ]
        )
        if on_samples is not None:
            on_samples(len(keyed))


def _record(job: SetJob, row: dict, index: int, result: GenResult, completion: str) -> dict:
    return {
        "set": job.spec.name,
        "prompt_id": row["id"],
        "index": index,
        "identity": job.identity,
        "completion": completion,
        "answer": extract_answer(completion, job.grader),
        "gold": row["answer"],
        "length": len(result.token_ids),
        "truncated": result.finish_reason == FinishReason.LENGTH,
    }


def job_metrics(job: SetJob, log: SampleLog) -> dict[str, float]:
    """The set's metrics (rltrain.eval.metrics.set_metrics) over the log's samples of its current rows."""
    records = [log.records[(job.spec.name, row["id"], i)] for row in job.rows for i in range(job.spec.n)]
    samples = [
        Sample(r["prompt_id"], r["index"], r["answer"], r["correct"], r["length"], r["truncated"]) for r in records
    ]
    metrics = set_metrics(samples, job.spec.n, equivalence(job.grader))
    metrics["reward_mean"] = sum(r["reward"] for r in records) / len(records)
    return metrics


def evaluate_sets(
    jobs: Sequence[SetJob],
    log: SampleLog,
    generate: Generate,
    decode: Callable[[Sequence[int]], str],
    on_samples=None,
    chunk_prompts: int = CHUNK_PROMPTS,
) -> dict[str, dict[str, float]]:
    """Complete every set's samples in ``log``, then {set name: metrics}."""
    for job in jobs:
        generate_missing(job, log, generate, decode, on_samples, chunk_prompts)
    return {job.spec.name: job_metrics(job, log) for job in jobs}


def flat_metrics(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """``eval/<set>/<metric>`` for the tracker."""
    return {f"eval/{name}/{key}": value for name, metrics in results.items() for key, value in metrics.items()}


def default_sets(cfg) -> list[EvalSet]:
    """``trainer.eval_sets``, or when empty the held-out rows at ``rollout.eval_temperature``, one sample each."""
    from rltrain.eval.sets import HELDOUT, parse_eval_sets

    return parse_eval_sets(cfg.trainer.eval_sets, "trainer.eval_sets") or [
        EvalSet(HELDOUT, temperature=float(cfg.rollout.eval_temperature))
    ]


def build_job(cfg, prep, spec: EvalSet, grade: Grade, grader: str) -> SetJob:
    """Rows of ``spec`` rendered with its template (else data.template), tokenised, rows over
    data.max_prompt_tokens dropped; sampling at its temperature / top_p / max_tokens (else rollout.max_tokens)."""
    from omegaconf import OmegaConf

    from rltrain.eval.sets import load_set_rows
    from rltrain.prepare import encode_prompts

    template = spec.template or cfg.data.template
    rows = load_set_rows(spec, prep.eval_rows)
    rows, prompt_ids = encode_prompts(rows, prep.tokenizer, OmegaConf.merge(cfg, {"data": {"template": template}}))
    params = SamplingParams(
        temperature=spec.temperature,
        top_p=spec.top_p,
        max_tokens=spec.max_tokens or cfg.rollout.max_tokens,
        stop_token_ids=tuple(prep.stop_token_ids),
        stop_strings=tuple(cfg.rollout.stop_strings),
    )
    return SetJob(spec, rows, prompt_ids, params, grade, grader, sample_identity(prep.model_path, spec, params))


def sample_identity(model_path: str, spec: EvalSet, params: SamplingParams) -> str:
    """A short hash of the model directory and everything that decides a set's samples."""
    import dataclasses
    import hashlib

    what = {"model": os.path.abspath(model_path), "set": dataclasses.asdict(spec), "params": dataclasses.asdict(params)}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def correctness(parts: dict, rewards, primary: str):
    """[B] bool tensor: the primary grader's ``acc`` metric when it reports one, else its score >= 0.5."""
    if f"{primary}/acc" in parts:
        return parts[f"{primary}/acc"] >= 0.5
    if primary in parts:
        return parts[primary] >= 0.5
    return rewards >= 0.5


def set_grader(spec: EvalSet) -> str | None:
    """The grader a set is scored with: its ``reward``, else a shipped benchmark's own (math500/aime24/amc23: math,
    gsm8k: gsm8k), else None: the run's ``reward.functions``."""
    from rltrain.eval.sets import SHIPPED

    if spec.reward is not None:
        return spec.reward
    return SHIPPED[spec.name].reward if spec.path is None and spec.name in SHIPPED else None


class Graders:
    """The grade function of each set: the run's reward functions (``run_grade``, e.g. the training runtime's
    reward worker; else a local RewardGrader) or a local RewardGrader per other grader name, started on first
    use and closed with this object."""

    def __init__(self, cfg, primary: str, run_grade=None):
        self._cfg = cfg
        self._primary = primary
        self._run_grade = run_grade
        self._local: dict[str | None, object] = {}

    def _grader(self, name: str | None):
        from rltrain.grading import RewardGrader
        from rltrain.runtime import grader_options

        if name not in self._local:
            options = grader_options(self._cfg.reward)
            if name is not None:
                options["functions"] = [{"fn": name, "weight": 1.0, "params": {}}]
            self._local[name] = RewardGrader(**options)
        return self._local[name]

    def for_set(self, spec: EvalSet) -> tuple[Grade, str]:
        """(grade function, grader name for answers and equivalence) of ``spec``."""
        name = set_grader(spec)
        if name is None and self._run_grade is not None:
            grade_fn, primary = self._run_grade, self._primary
        else:
            grader = self._grader(name)
            grade_fn, primary = grader.grade, grader.specs[0].name

        def grade(completions: list[str], rows: list[dict]) -> tuple[list[bool], list[float]]:
            result = grade_fn(completions, rows)
            return correctness(result.parts, result.rewards, primary).tolist(), result.rewards.tolist()

        return grade, name or str(self._cfg.reward.functions[0].fn)

    def close(self) -> None:
        for grader in self._local.values():
            grader.close()
        self._local.clear()

    def __enter__(self) -> Graders:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def compat_metrics(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """The single-number keys logged since before eval sets (``eval/accuracy`` = pass@1, ``eval/reward_mean``,
    ``eval/response_len_mean``, ``eval/num_prompts``), of the ``heldout`` set when scored, else the first set."""
    from rltrain.eval.sets import HELDOUT

    metrics = results[HELDOUT] if HELDOUT in results else next(iter(results.values()))
    return {
        "eval/accuracy": metrics["pass@1"],
        "eval/reward_mean": metrics["reward_mean"],
        "eval/response_len_mean": metrics["response_len_mean"],
        "eval/num_prompts": metrics["num_prompts"],
    }


def evaluate_policy(cfg, prep, generate: Generate, run_grade) -> dict[str, float]:
    """In-training evaluation of the current policy on ``default_sets(cfg)`` (samples kept in memory): the compat
    keys, plus ``eval/<set>/<metric>`` when ``trainer.eval_sets`` is set."""
    specs = default_sets(cfg)
    with Graders(cfg, prep.primary_reward, run_grade) as graders, SampleLog(None) as log:
        jobs = [build_job(cfg, prep, spec, *graders.for_set(spec)) for spec in specs]
        results = evaluate_sets(jobs, log, generate, decoder(prep.tokenizer))
    named = flat_metrics(results) if cfg.trainer.eval_sets else {}
    return {**compat_metrics(results), **named}


def decoder(tokenizer) -> Callable[[Sequence[int]], str]:
    return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)
