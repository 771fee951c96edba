"""Load task rows from a procedural generator, a jsonl / json / parquet file, or an HF dataset by name.

Every loader returns rows with at least ``"prompt"`` and ``"answer"`` (mapped from ``data.prompt_key`` /
``data.answer_key``), ``"task"`` and ``"id"``; other fields are kept (graders receive them as keyword fields).
A row missing a key, a line that is not JSON or bytes that are not UTF-8 raise ``DataError`` naming ``file:line``
(``file:row N`` for parquet) and what is wrong: bad data fails the run before anything starts instead of being
silently dropped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any, NoReturn

from omegaconf import DictConfig, ListConfig, OmegaConf

from rltrain.config import ConfigError
from rltrain.data.tasks import TASKS, generate_task


class DataError(ConfigError):
    """A data file or dataset row is unusable; the message names the file:line (or dataset row) and key."""


def _plain(value: Any) -> Any:
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _not_utf8(exc: UnicodeDecodeError, position: str) -> str:
    """``"not UTF-8 (byte 0xff at <position>)"`` for the first byte that does not decode."""
    return f"not UTF-8 (byte 0x{exc.object[exc.start]:02x} at {position})"


def _read_utf8(path: str) -> str:
    """The text of ``path`` (a leading byte-order mark dropped); bytes that are not UTF-8 raise ``DataError``
    naming ``file:line`` and the byte's column (1-based, counted in bytes)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raw = exc.object  # the bytes after any byte-order mark: what exc.start counts in
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - raw.rfind(b"\n", 0, exc.start)
        raise DataError(f"{path}:{line}: {_not_utf8(exc, f'column {column}')}; save the file as UTF-8") from exc


def _iter_json_rows(path: str) -> Iterator[tuple[str, Any]]:
    """(``"file:line"``, record) for a JSON-lines file, or (``"file:row N"``, record) for a file holding one JSON
    array (as the MATH-500 / AIME ``*.json`` files do). Blank lines are skipped."""
    text = _read_utf8(path)
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: invalid JSON array ({exc.msg} at column {exc.colno})") from exc
        yield from ((f"{path}:row {i + 1}", record) for i, record in enumerate(records))
        return
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{line_number}", json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{line_number}: invalid JSON ({exc.msg} at column {exc.colno})") from exc


def _raise_non_utf8(table: Any, path: str, error: UnicodeDecodeError) -> NoReturn:
    """Raise ``DataError`` for the first (column, row) of ``table`` whose text is not UTF-8 (pyarrow reads such a
    file; only converting the value fails), or ``error`` itself if no single value fails."""
    for name in table.column_names:
        column = table.column(name)
        for i in range(len(column)):
            try:
                column[i].as_py()
            except UnicodeDecodeError as exc:
                where = f"{path}:row {i + 1}: column {name!r}"
                raise DataError(f"{where} is {_not_utf8(exc, f'offset {exc.start} of the value')}") from exc
    raise error


def _iter_parquet_rows(path: str) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt or non-parquet file
        raise DataError(f"{path}: cannot read as parquet ({type(exc).__name__}: {exc})") from exc
    try:
        records = table.to_pylist()
    except UnicodeDecodeError as exc:
        _raise_non_utf8(table, path, exc)
    yield from ((f"{path}:row {i + 1}", record) for i, record in enumerate(records))


def _iter_hf_rows(name: str, split: str) -> Iterator[tuple[str, Any]]:
    """Rows of HF dataset ``name`` (``"repo"`` or ``"repo:config"``), split ``split``."""
    try:
        import datasets
    except ImportError as exc:
        raise ConfigError(
            "data.task=hf needs the 'datasets' package: pip install 'rltrain[hf]' or pip install datasets"
        ) from exc
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
    """``record`` with ``"prompt"``/``"answer"`` taken from ``prompt_key``/``answer_key``, plus ``task`` and ``id``.

    A dotted key reads a nested field (``reward_model.ground_truth``), as in verl-style datasets.
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    prompt, answer = (_lookup(record, key, where) for key in (prompt_key, answer_key))
    _check_prompt(prompt, where, prompt_key)
    row = dict(record)
    row["prompt"] = prompt
    row["answer"] = answer
    row.setdefault("task", task)
    row["id"] = str(record.get("id", where))
    return row


def _lookup(record: dict[str, Any], key: str, where: str) -> Any:
    """``record[key]``, following dots into nested objects when ``key`` itself is not a column."""
    value: Any = record
    for part in [key] if key in record else key.split("."):
        if not isinstance(value, dict) or value.get(part) is None:
            raise DataError(
                f"{where}: missing key {key!r} (row has {sorted(record)}); set data.prompt_key/answer_key "
                "(a dotted key such as reward_model.ground_truth reads a nested field)"
            )
        value = value[part]
    return value


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
