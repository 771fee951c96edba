"""Resolve ``env.fn`` to an environment class and check the ``env.*`` options (the one place they are checked).

``env.fn`` is a built-in name (``calculator``, ``feedback``, ``delethink``), ``path/to/file.py:Class`` or
``pkg.mod:Class``, loaded the way ``reward.functions`` entries are (rltrain/grading/resolve.py). No torch import: grader
processes resolve the class again.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from rltrain.config import ConfigError
from rltrain.grading.resolve import _absolute_ref, load_function

BUILTIN_ENVS = {
    "calculator": "rltrain.env.calculator:CalculatorEnv",
    "feedback": "rltrain.env.feedback:FeedbackEnv",
    "delethink": "rltrain.env.delethink:DelethinkEnv",
}


def env_ref(fn: str) -> str:
    """How a grader process loads ``env.fn`` again: the built-in's module path, or the reference with an
    absolute file path."""
    return BUILTIN_ENVS.get(fn, _absolute_ref(fn.strip()))


def env_name(fn: str) -> str:
    """The environment's short name in messages: the built-in name, else the class name."""
    return fn if fn in BUILTIN_ENVS else fn.rsplit(":", 1)[-1]


def load_env_class(fn: str, params: Mapping[str, Any]) -> type:
    """The class ``env.fn`` names, checked to take ``params`` and to have ``step``; ConfigError otherwise."""
    if not isinstance(fn, str) or (fn not in BUILTIN_ENVS and ":" not in fn):
        raise ConfigError(
            f"env.fn={fn!r}: a built-in environment {sorted(BUILTIN_ENVS)}, 'path/to/file.py:Class' or "
            "'package.module:Class'"
        )
    cls = load_function(env_ref(fn), "env.fn")
    if not callable(getattr(cls, "step", None)):
        raise ConfigError(f"env.fn={fn!r}: {cls!r} has no step(action_text, action_ids) method")
    try:
        inspect.signature(cls).bind(**params)
    except TypeError as error:
        raise ConfigError(f"env.params={dict(params)!r}: {env_name(fn)}({', '.join(params)}) fails: {error}") from error
    except ValueError:
        pass  # no signature to read (a builtin type): the first call reports a mismatch
    check = getattr(cls, "check_params", None)
    if callable(check):
        check(**params)  # the class's own value checks (ConfigError naming the key)
    return cls


def check_env_config(env: Any, sampler: str) -> None:
    """``env.fn`` (when set) with the sampler and its ``env.params``; ConfigError naming the key. (The ranges of
    ``env.max_*`` are rules in rltrain/config_rules.py.)"""
    if env.fn is None:
        return
    if sampler != "flat":
        raise ConfigError(f"rollout.sampler={sampler!r}: environments (env.fn={env.fn!r}) sample episodes; use flat")
    from omegaconf import OmegaConf

    params = OmegaConf.to_container(env.params, resolve=True) if OmegaConf.is_config(env.params) else env.params
    load_env_class(env.fn, params or {})
