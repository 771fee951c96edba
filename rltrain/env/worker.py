"""Environment calls inside grader processes (the reward grader's isolation: deadline from outside, memory cap,
process-tree kill; rltrain/grading/pool.py).

A call is ``(row, actions)``: with no actions it is the episode's ``reset``; otherwise a fresh environment
replays ``reset`` and every earlier action (its ``replay(action_text, action_ids)`` method when it has one,
else ``step``), and the last action's ``step`` is the answer. So no state lives
between calls: a killed or replaced process loses nothing, and any process can serve any episode.
No torch import here.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

from rltrain.env.base import as_step_result, clean_observation
from rltrain.grading.worker import _short, _where, serve_calls


def serve_env(conn: Connection, spec: dict, memory_mb: int, tag: str) -> None:
    """GraderPool target: ``spec`` is ``{"fn", "params", "max_observation_chars"}``."""
    serve_calls(conn, memory_mb, tag, functools.partial(load_env, spec), run_env_call)


def load_env(spec: dict) -> dict:
    """The worker state: the environment class, its parameters and the observation cap."""
    from rltrain.env.resolve import load_env_class

    return {**spec, "cls": load_env_class(spec["fn"], spec["params"])}


def run_env_call(state: dict, row: dict, actions: Sequence[tuple[str, Sequence[int]]]) -> tuple[str, Any]:
    """("ok", {"observation", "reward", "done", "metrics", "cut", "non_utf8"}) or (error kind, message);
    never raises."""
    try:
        env = state["cls"](**state["params"])
        result = as_step_result(env.reset(row))
        for text, ids in actions[:-1]:  # replay: an environment may skip the work of a past step (``replay``)
            getattr(env, "replay", env.step)(text, tuple(ids))
        if actions:
            result = as_step_result(env.step(actions[-1][0], tuple(actions[-1][1])))
    except MemoryError:
        return "memory", "MemoryError: the environment needed more than reward.memory_mb of address space"
    except BaseException as error:  # noqa: BLE001 - SystemExit, KeyboardInterrupt too: the worker lives on
        method = getattr(state["cls"], "step" if actions else "reset", None)
        return "exception", _short(f"{type(error).__name__}: {error}") + _where(error, method)
    text, cut, non_utf8 = clean_observation(result.observation, state["max_observation_chars"])
    values = {"observation": text, "reward": result.reward, "done": result.done, "metrics": result.metrics}
    return "ok", {**values, "cut": cut, "non_utf8": non_utf8}
