"""EnvRunner: environment calls in a pool of grader processes (in the reward actor, or in-process for tests).

Each call has the reward grader's deadline (``reward.timeout_s``) and memory cap (``reward.memory_mb``); a
raising, hanging, crashing or memory-hungry environment costs that call an error outcome, never the process
that asked. A batch stops early, its calls not run yet coming back ``skipped``, once the environment has timed
out on more calls in a row than there are workers (it hangs on everything: waiting for each deadline would
only delay the error).
"""

from __future__ import annotations

import uuid
from typing import Any

from rltrain.env.resolve import env_ref
from rltrain.env.worker import serve_env
from rltrain.grading.limits import consecutive_timeout_limit
from rltrain.grading.pool import GraderPool, Outcome


class _TimeoutStreak:
    """``stop_when`` of a batch: True once ``limit`` calls in a row have timed out."""

    def __init__(self, limit: int):
        self.limit, self.count = limit, 0

    def __call__(self, task: tuple, outcome: Outcome) -> bool:
        self.count = self.count + 1 if outcome.kind == "timeout" else 0
        return self.count >= self.limit


class EnvRunner:
    """``run([(row, actions), ...])`` -> one Outcome per call (``values``: see ``worker.run_env_call``)."""

    def __init__(
        self,
        fn: str,
        params: dict[str, Any],
        max_observation_chars: int,
        num_workers: int = 2,
        timeout_s: float = 5.0,
        memory_mb: int = 1024,
        batch_size: int = 64,
        process_tag: str | None = None,
    ):
        from rltrain.env.resolve import load_env_class

        load_env_class(fn, params)  # a bad env.fn fails here, in the caller, not as a worker's fatal message
        spec = {"fn": env_ref(fn), "params": dict(params), "max_observation_chars": max_observation_chars}
        self._timeouts_in_row = consecutive_timeout_limit(num_workers)
        self._pool: GraderPool | None = GraderPool(
            spec, num_workers, timeout_s, memory_mb, batch_size, tag=process_tag, target=serve_env
        )

    def run(self, calls: list[tuple[dict, list[tuple[str, tuple[int, ...]]]]]) -> list[Outcome]:
        if self._pool is None:
            raise RuntimeError("EnvRunner is closed")
        return self._pool.run(list(calls), _TimeoutStreak(self._timeouts_in_row))

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def __enter__(self) -> EnvRunner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def env_runner_options(cfg: Any) -> dict[str, Any] | None:
    """EnvRunner arguments from ``env`` and the grader options under ``reward``; None without ``env.fn``."""
    from omegaconf import OmegaConf

    if cfg.env.fn is None:
        return None
    return {
        "fn": cfg.env.fn,
        "params": OmegaConf.to_container(cfg.env.params, resolve=True),
        "max_observation_chars": cfg.env.max_observation_chars,
        "num_workers": cfg.reward.num_workers,
        "timeout_s": cfg.reward.timeout_s,
        "memory_mb": cfg.reward.memory_mb,
        "batch_size": cfg.reward.batch_size,
        "process_tag": f"rltrain-env-{uuid.uuid4().hex[:12]}",
    }
