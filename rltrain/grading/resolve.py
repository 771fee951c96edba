"""Turn ``reward.functions`` entries into callables, and call them the same way everywhere.

Runs at start-up (before any model loads) and again inside each grader process. Never imports torch:
grader processes import this module, and torch would add seconds and ~650 MB of address space to each.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import importlib.util
import inspect
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rltrain.config import ConfigError

BUILTIN_GRADERS = ("math", "gsm8k", "countdown", "format", "code", "reasoning_gym")
_POSITIONAL = ("completion", "ground_truth")


@dataclass(frozen=True)
class RewardSpec:
    """One resolved reward function: ``fn(completion, ground_truth, **params, **fields)``, weighted."""

    name: str  # metric name: the built-in name, else the function name (deduplicated with _2, _3, ...)
    ref: str  # "math", "/abs/path/file.py:name" or "pkg.mod:name": how grader processes load it again
    weight: float
    params: dict[str, Any] = field(default_factory=dict)
    fn: Callable[..., Any] | None = field(default=None, compare=False, repr=False)
    columns: frozenset[str] | None = None  # dataset columns it is passed: None = all (it takes **fields)


def resolve_reward_functions(functions: list[dict]) -> list[RewardSpec]:
    """Load and check every entry ``{"fn": ..., "weight": w, "params": {...}}``; raise ConfigError naming it.

    ``fn`` is a built-in grader name (``math``, ``gsm8k``, ``countdown``, ``format``, ``code``,
    ``reasoning_gym``), ``path/to/file.py:name`` (relative to the current directory) or ``pkg.mod:name``.
    """
    if not isinstance(functions, list | tuple) or not functions:
        raise ConfigError(f"reward.functions must be a non-empty list of {{fn, weight, params}}, got {functions!r}")
    specs: list[RewardSpec] = []
    for index, entry in enumerate(functions):
        spec = _resolve_entry(entry, f"reward.functions[{index}]")
        taken = {existing.name for existing in specs}
        name, suffix = spec.name, 2
        while name in taken:
            name, suffix = f"{spec.name}_{suffix}", suffix + 1
        specs.append(RewardSpec(name, spec.ref, spec.weight, spec.params, spec.fn, spec.columns))
    return specs


def _resolve_entry(entry: Any, key: str) -> RewardSpec:
    if not isinstance(entry, Mapping) or "fn" not in entry:
        raise ConfigError(f"{key} must be a mapping with an 'fn' key, got {entry!r}")
    unknown = sorted(set(entry) - {"fn", "weight", "params"})
    if unknown:
        raise ConfigError(f"{key}: unknown key(s) {unknown}; accepted: fn, weight, params")
    ref, weight, params = entry["fn"], entry.get("weight", 1.0), entry.get("params") or {}
    if not isinstance(ref, str) or not ref.strip():
        raise ConfigError(f"{key}.fn must be a non-empty string, got {ref!r}")
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
        raise ConfigError(f"{key}.weight must be a finite number, got {weight!r}")
    if not isinstance(params, Mapping):
        raise ConfigError(f"{key}.params must be a mapping, got {params!r}")
    ref = _absolute_ref(ref.strip())
    fn = load_function(ref, f"{key}.fn")
    params = dict(params)
    columns = _check_signature(fn, params, ref, key)
    if ref in BUILTIN_GRADERS:  # built-ins read only the columns they declare: "task" or "mode" must not leak in
        columns = frozenset(getattr(sys.modules[fn.__module__], "COLUMNS", ()))
    name = ref if ref in BUILTIN_GRADERS else ref.rsplit(":", 1)[-1]
    return RewardSpec(name, ref, float(weight), params, fn, columns)


def _absolute_ref(ref: str) -> str:
    """File references become absolute: grader processes may start in another working directory."""
    path, sep, attr = ref.rpartition(":")
    if sep and path.endswith(".py"):
        return f"{os.path.abspath(os.path.expanduser(path))}:{attr}"
    return ref


def load_function(ref: str, key: str = "fn") -> Callable[..., Any]:
    """The callable named by ``ref``; ConfigError saying what is wrong (bad path, missing name, not callable)."""
    if ref in BUILTIN_GRADERS:
        module = _import(f"rewards.{ref}", key)
        return module.score
    path, sep, attr = ref.rpartition(":")
    if not sep or not path or not attr:
        raise ConfigError(
            f"{key}={ref!r} is not a built-in grader {list(BUILTIN_GRADERS)}, "
            "nor 'path/to/file.py:function', nor 'package.module:function'"
        )
    module = _load_file(path, key) if path.endswith(".py") else _import(path, key)
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"{key}={ref!r}: {getattr(module, '__file__', path)} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{key}={ref!r}: {attr!r} is a {type(target).__name__}, not a function")
    return target


def _import(module_name: str, key: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"{key}: cannot import {module_name!r}: {error}") from error


def _load_file(path: str, key: str) -> Any:
    if not os.path.isfile(path):
        raise ConfigError(f"{key}: file {path!r} does not exist")
    module_name = "rltrain_reward_" + hashlib.sha1(path.encode()).hexdigest()[:12]
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{key}: {path!r} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # pickling and dataclasses inside the file need the module registered
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise ConfigError(f"{key}: importing {path!r} failed: {type(error).__name__}: {error}") from error
    return module


def _check_signature(fn: Callable[..., Any], params: dict[str, Any], ref: str, key: str) -> frozenset[str] | None:
    """Check ``fn(completion, ground_truth, **params)`` binds; return the dataset columns it can take
    (None: all of them, it has ``**fields``)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{key}={ref!r}: cannot read its signature: {error}") from error
    parameters = signature.parameters.values()
    takes_all_fields = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    if ref in BUILTIN_GRADERS:  # built-ins swallow dataset columns in **fields: name params strictly
        accepted = sorted(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY)
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            raise ConfigError(f"{key}.params: unknown parameter(s) {unknown} for {ref!r}; accepted: {accepted}")
    try:
        signature.bind("", None, **params)
    except TypeError as error:
        raise ConfigError(
            f"{key}={ref!r}: signature {signature} cannot be called as fn(completion, ground_truth, **params) "
            f"with params {sorted(params)}: {error}"
        ) from error
    validate = getattr(sys.modules.get(getattr(fn, "__module__", "")), "validate_params", None)
    if ref in BUILTIN_GRADERS and callable(validate):
        try:
            validate(params)
        except (ValueError, TypeError, ImportError) as error:
            raise ConfigError(f"{key}.params for {ref!r}: {error}") from error
    if takes_all_fields:
        return None
    return frozenset(p.name for p in parameters if p.name not in _POSITIONAL and p.kind is not p.VAR_POSITIONAL)


def call_reward(spec: RewardSpec, completion: str, ground_truth: Any, fields: Mapping[str, Any]) -> dict[str, float]:
    """Call one reward function and normalise its return to ``{"score": float, <metric>: float, ...}``.

    Raises TypeError for a return that is neither a number nor a dict with a numeric "score"; non-numeric
    extra entries (e.g. a predicted string) are dropped. Coroutine functions are run to completion.
    """
    assert spec.fn is not None, "RewardSpec.fn is set by resolve_reward_functions"
    columns = {
        name: value
        for name, value in fields.items()
        if name not in _POSITIONAL and (spec.columns is None or name in spec.columns)
    }
    result = spec.fn(completion, ground_truth, **{**columns, **spec.params})
    if inspect.isawaitable(result):
        result = asyncio.run(_awaited(result))
    return normalise_result(result)


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def _is_number(value: Any) -> bool:
    if isinstance(value, int | float):
        return True
    return type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0  # numpy scalars


def normalise_result(result: Any) -> dict[str, float]:
    """``{"score": float, ...numeric extras}`` from a float/int/bool or a dict with a "score" key."""
    if _is_number(result):
        return {"score": float(result)}
    if isinstance(result, Mapping):
        if "score" not in result or not _is_number(result["score"]):
            raise TypeError(f"reward dict needs a numeric 'score', got keys {sorted(map(str, result))}")
        return {str(k): float(v) for k, v in result.items() if _is_number(v)}
    raise TypeError(f"reward function returned {type(result).__name__}; expected a number or a dict with 'score'")
