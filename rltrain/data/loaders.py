"""Load task rows from a procedural generator, a jsonl / json / parquet file, or an HF dataset by name.

Every loader returns rows with at least ``"prompt"`` and ``"answer"`` (mapped from ``data.prompt_key`` /
``data.answer_key``), ``"task"`` and ``"id"``; other fields are kept (graders receive them as keyword fields).
A row missing a key, or a line that is not JSON, raises ``DataError`` naming ``file:line`` and the key:
bad data fails the run before anything starts instead of being silently dropped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from rltrain.config import ConfigError
from rltrain.data.tasks import TASKS, generate_task


class DataError(ConfigError):
    """A data file or dataset row is unusable; the message names the file:line (or dataset row) and key."""


def _plain(value: Any) -> Any:
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _iter_json_rows(path: str) -> Iterator[tuple[str, Any]]:
    """(``"file:line"``, record) for a JSON-lines file, or (``"file:row N"``, record) for a file holding one JSON
    array (as the MATH-500 / AIME ``*.json`` files do). Blank lines are skipped."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: invalid JSON array ({exc.msg})") from exc
        yield from ((f"{path}:row {i + 1}", record) for i, record in enumerate(records))
        return
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{line_number}", json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{line_number}: not a JSON object ({exc.msg})") from exc


def _iter_parquet_rows(path: str) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt or non-parquet file
        raise DataError(f"{path}: cannot read as parquet ({type(exc).__name__}: {exc})") from exc
    yield from ((f"{path}:row {i + 1}", record) for i, record in enumerate(table.to_pylist()))


def _iter_hf_rows(name: str, split: str) -> Iterator[tuple[str, Any]]:
    """Rows of HF dataset ``name`` (``"repo"`` or ``"repo:config"``), split ``split``."""
    try:
        import datasets
    except ImportError as exc:
        raise ConfigError("data.task=hf needs the 'datasets' package: pip install datasets") from exc
    repo, _, config_name = name.partition(":")
    try:
        dataset = datasets.load_dataset(repo, config_name or None, split=split)
    except Exception as exc:  # offline, unknown repo, unknown split: one clear message
        raise ConfigError(
            f"data.path={name}: cannot load HF dataset split {split!r} (hub unreachable or offline, or no such "
            f"dataset/split): {type(exc).__name__}: {exc}"
        ) from exc
    yield from ((f"{name}[{split}] row {i + 1}", record) for i, record in enumerate(dataset))


def _is_message(item: Any) -> bool:
    return isinstance(item, dict) and {"role", "content"} <= item.keys()


def _check_prompt(prompt: Any, where: str, key: str) -> None:
    if isinstance(prompt, str):
        return
    if isinstance(prompt, list) and prompt and all(_is_message(m) for m in prompt):
        return
    raise DataError(f"{where}: {key!r} must be a string or a list of {{role, content}} messages, got {prompt!r:.80}")


def map_row(record: Any, prompt_key: str, answer_key: str, where: str, task: str) -> dict[str, Any]:
    """``record`` with ``"prompt"``/``"answer"`` taken from ``prompt_key``/``answer_key``, plus ``task`` and ``id``."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in (prompt_key, answer_key):
        if key not in record or record[key] is None:
            raise DataError(f"{where}: missing key {key!r} (row has {sorted(record)}); set data.prompt_key/answer_key")
    _check_prompt(record[prompt_key], where, prompt_key)
    row = dict(record)
    row["prompt"] = record[prompt_key]
    row["answer"] = record[answer_key]
    row.setdefault("task", task)
    row["id"] = str(record.get("id", where))
    return row


def split_rows(
    rows: list[dict[str, Any]], num_train: int, num_eval: int, source: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The last ``num_eval`` rows are held out; train is the first ``num_train`` of the rest."""
    if len(rows) <= num_eval:
        raise DataError(
            f"{source}: {len(rows)} rows, but data.num_eval={num_eval} are held out and at least one is needed "
            "for training; lower data.num_eval"
        )
    return rows[: len(rows) - num_eval][:num_train], rows[len(rows) - num_eval :]


def load_task_data(data_cfg: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train rows, held-out rows) for the ``data`` config node (DataConfig or its DictConfig).

    Procedural tasks (``arithmetic``, ``countdown``) are generated from ``data.seed`` with disjoint splits.
    Files (``jsonl`` — also a ``.json`` array —, ``parquet``) and HF datasets (``hf``, ``data.path`` =
    ``"repo"`` or ``"repo:config"``, split ``data.hf_split``) hold out their last ``data.num_eval`` rows.
    """
    task = data_cfg.task
    if task in TASKS:
        params = _plain(data_cfg.task_params) or {}
        return generate_task(task, data_cfg.num_train, data_cfg.num_eval, data_cfg.seed, **params)
    if task not in ("jsonl", "parquet", "hf"):
        raise ConfigError(f"data.task={task!r} is not one of {sorted(TASKS) + ['jsonl', 'parquet', 'hf']}")
    if not data_cfg.path:
        raise ConfigError(f"data.path is required for data.task={task}")
    if task == "hf":
        records = _iter_hf_rows(data_cfg.path, data_cfg.hf_split)
        source = data_cfg.path
    else:
        source = os.path.expanduser(data_cfg.path)
        if not os.path.isfile(source):
            raise ConfigError(f"data.path={data_cfg.path!r}: no such file")
        records = _iter_json_rows(source) if task == "jsonl" else _iter_parquet_rows(source)
    name = os.path.splitext(os.path.basename(source))[0] if task != "hf" else source
    rows = [map_row(record, data_cfg.prompt_key, data_cfg.answer_key, where, name) for where, record in records]
    return split_rows(rows, data_cfg.num_train, data_cfg.num_eval, source)
