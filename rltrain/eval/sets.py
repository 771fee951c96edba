"""Eval sets: what ``eval.sets`` / ``trainer.eval_sets`` entries mean, their validation, and their rows.

An entry is a name (``gsm8k``) or a dict ``{name, path, split, prompt_key, answer_key, n, temperature, top_p,
max_tokens, template, reward, limit}``. Without ``path`` the name picks a shipped benchmark (``SHIPPED``) or
``heldout`` (the run's own held-out rows). See docs/evaluation.md.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, fields
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from rltrain.config import ConfigError, setting

HELDOUT = "heldout"
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


@dataclass(frozen=True)
class Benchmark:
    """A benchmark vendored in ``rltrain/eval/data`` (``file``), or fetched with ``datasets`` as ``hub``."""

    file: str
    prompt_key: str
    answer_key: str
    reward: str  # the grader its answers need
    hub: str  # "repo:config" and split, used by `datasets` where a hub is reachable and the file is absent
    hub_split: str
    row_filter: str | None = None  # a regex a row's "url" must match (amc23 keeps the 2023 contests)


SHIPPED: dict[str, Benchmark] = {
    "math500": Benchmark("math500_test.json", "problem", "answer", "math", "HuggingFaceH4/MATH-500", "test"),
    "aime24": Benchmark("aime24_test.json", "problem", "answer", "math", "HuggingFaceH4/aime_2024", "train"),
    "amc23": Benchmark(
        "amc_test.json", "problem", "answer", "math", "AI-MO/aimo-validation-amc", "train", row_filter=r"/2023_AMC"
    ),
    "gsm8k": Benchmark("gsm8k_test.jsonl", "question", "answer", "gsm8k", "openai/gsm8k:main", "test"),
}
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class EvalSet:
    """One validated eval set. ``None`` fields take the run's value (rollout.max_tokens, data.template,
    reward.functions; all rows)."""

    name: str
    path: str | None = None
    split: str = "test"
    prompt_key: str | None = None
    answer_key: str | None = None
    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int | None = None
    template: str | None = None
    reward: str | None = None
    limit: int | None = None


_KEYS = tuple(f.name for f in fields(EvalSet))


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig | ListConfig) else value


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


# field -> (test of a non-null value, what is allowed)
_FIELD_RULES: dict[str, tuple[Any, str]] = {
    "path": (lambda v: isinstance(v, str) and bool(v), "a jsonl/parquet file or an HF dataset name"),
    "split": (lambda v: isinstance(v, str) and bool(v), "an HF split name"),
    "prompt_key": (lambda v: isinstance(v, str) and bool(v), "a column name"),
    "answer_key": (lambda v: isinstance(v, str) and bool(v), "a column name"),
    "n": (_count, "an integer >= 1"),
    "temperature": (lambda v: _number(v) and v >= 0, "a number >= 0 (0: greedy)"),
    "top_p": (lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "max_tokens": (_count, "an integer >= 1 (or null: rollout.max_tokens)"),
    "template": (lambda v: v in ("plain", "chat"), "plain | chat (or null: data.template)"),
    "reward": (lambda v: isinstance(v, str) and bool(v), "a grader name, e.g. math (or null: reward.functions)"),
    "limit": (_count, "an integer >= 1 (or null: all rows)"),
}


def parse_eval_set(entry: Any, key: str) -> EvalSet:
    """Validate one entry of the list at ``key`` (``"eval.sets[0]"``); ConfigError names the key and the field."""
    entry = _plain(entry)
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict):
        raise ConfigError(f"{setting(key, entry)}: an eval set is a name or a dict with a 'name'")
    unknown = sorted(set(entry) - set(_KEYS))
    if unknown:
        raise ConfigError(f"{setting(key, entry)}: unknown key(s) {unknown}; allowed: {list(_KEYS)}")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ConfigError(f"{setting(key + '.name', name)}: a name of letters, digits, '_', '.', '-'")
    for field_name, (test, allowed) in _FIELD_RULES.items():
        value = entry.get(field_name)
        if value is not None and not test(value):
            raise ConfigError(f"{setting(f'{key}.{field_name}', value)}: must be {allowed}")
    if entry.get("path") is None and name != HELDOUT and name not in SHIPPED:
        raise ConfigError(
            f"{setting(key + '.name', name)}: not a shipped set ({[HELDOUT, *SHIPPED]}); give a 'path' "
            "(jsonl/parquet file or HF dataset name) for your own data"
        )
    if entry.get("reward") is not None:
        _check_grader(entry["reward"], f"{key}.reward")
    values = {k: v for k, v in entry.items() if v is not None}
    if isinstance(values.get("temperature"), int):
        values["temperature"] = float(values["temperature"])
    return EvalSet(**values)


def _check_grader(reward: str, key: str) -> None:
    from rltrain.grading import resolve_reward_functions

    try:
        resolve_reward_functions([{"fn": reward, "weight": 1.0, "params": {}}])
    except ConfigError as err:
        raise ConfigError(f"{setting(key, reward)}: {err}") from err


def parse_eval_sets(entries: Any, key: str) -> list[EvalSet]:
    """Every entry of the list at ``key`` validated; names must be unique (they key the metrics)."""
    parsed = [parse_eval_set(entry, f"{key}[{i}]") for i, entry in enumerate(_plain(entries) or [])]
    names = [s.name for s in parsed]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{setting(key, names)}: set names must be unique (repeated: {duplicates})")
    return parsed


def load_set_rows(spec: EvalSet, heldout_rows: list[dict]) -> list[dict]:
    """The rows of ``spec`` (``prompt``, ``answer``, unique ``id``, other columns kept), at most ``limit``.

    ``heldout``: the run's own held-out rows. A shipped name: its vendored file (fetched with ``datasets`` from
    the hub only when the file is absent). A ``path``: a .parquet file, a jsonl/json file, else an HF dataset
    name (``repo`` or ``repo:config``) read at ``split``. Row ids are the row's position in the source.
    """
    if spec.path is None and spec.name == HELDOUT:
        rows = [dict(row) for row in heldout_rows]
    else:
        rows = _source_rows(spec)
    rows = rows[: spec.limit] if spec.limit else rows
    ids = [row["id"] for row in rows]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"eval set {spec.name!r}: row ids are not unique")
    if not rows:
        raise ConfigError(f"eval set {spec.name!r}: no rows")
    return rows


def _source_rows(spec: EvalSet) -> list[dict]:
    from rltrain.data.loaders import _iter_hf_rows, _iter_json_rows, _iter_parquet_rows, map_row

    benchmark = SHIPPED.get(spec.name) if spec.path is None else None
    prompt_key = spec.prompt_key or (benchmark.prompt_key if benchmark else "prompt")
    answer_key = spec.answer_key or (benchmark.answer_key if benchmark else "answer")
    if benchmark is not None:
        file = os.path.join(DATA_DIR, benchmark.file)
        records = _iter_json_rows(file) if os.path.isfile(file) else _iter_hf_rows(benchmark.hub, benchmark.hub_split)
        if benchmark.row_filter is not None:
            records = ((where, r) for where, r in records if re.search(benchmark.row_filter, str(r.get("url", ""))))
    else:
        path = os.path.expanduser(spec.path)
        if path.endswith(".parquet"):
            records = _iter_parquet_rows(path)
        elif os.path.isfile(path):
            records = _iter_json_rows(path)
        else:
            records = _iter_hf_rows(spec.path, spec.split)
    return [
        {**map_row(record, prompt_key, answer_key, where, spec.name), "id": f"{spec.name}-{index}"}
        for index, (where, record) in enumerate(records)
    ]
