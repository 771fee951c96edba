"""Name -> function registries for the algorithm pieces a config can select.

Kinds: ``advantage`` (rewards -> one scalar per trajectory), ``policy_loss`` (per-token surrogate),
``kl`` (elementwise estimators) and ``agg`` (loss aggregation over a micro-batch). The config value is
the registry key; there is no parallel enum. A registration may carry metadata the config checks read
before anything runs, e.g. ``min_group_size=2`` for an advantage that compares each trajectory with its group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

KINDS = ("advantage", "policy_loss", "kl", "agg")

_REGISTRY: dict[str, dict[str, Callable[..., Any]]] = {kind: {} for kind in KINDS}
_METADATA: dict[str, dict[str, dict[str, Any]]] = {kind: {} for kind in KINDS}

F = TypeVar("F", bound=Callable[..., Any])


class UnknownNameError(KeyError, ValueError):
    """An unknown registry kind or name; the message lists the known ones.

    Subclasses both KeyError (a failed lookup) and ValueError (a bad config value) so callers can
    catch whichever they expect.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _kind_table(kind: str) -> dict[str, Callable[..., Any]]:
    if kind not in _REGISTRY:
        raise UnknownNameError(f"unknown algorithm kind {kind!r}; known kinds: {list(KINDS)}")
    return _REGISTRY[kind]


def register(kind: str, name: str, **metadata: Any) -> Callable[[F], F]:
    """Decorator: register ``fn`` as ``name`` of ``kind`` with optional ``metadata`` (read by ``metadata``).

    Registering a taken name raises ValueError. Known metadata: ``min_group_size`` (advantage: the fewest
    trajectories per prompt the estimator needs for a baseline; default 1).
    """
    table = _kind_table(kind)

    def decorator(fn: F) -> F:
        if name in table:
            owner = f"{table[name].__module__}.{table[name].__name__}"
            raise ValueError(f"{kind} {name!r} is already registered (by {owner})")
        table[name] = fn
        _METADATA[kind][name] = dict(metadata)
        return fn

    return decorator


def get(kind: str, name: str) -> Callable[..., Any]:
    """The function registered as ``name`` of ``kind``; UnknownNameError lists the known names."""
    table = _kind_table(kind)
    if name not in table:
        raise UnknownNameError(f"unknown {kind} {name!r}; known: {sorted(table)}")
    return table[name]


def names(kind: str) -> list[str]:
    """Sorted registered names of ``kind``."""
    return sorted(_kind_table(kind))


def metadata(kind: str, name: str) -> dict[str, Any]:
    """The metadata ``name`` of ``kind`` was registered with (a copy; {} if none)."""
    get(kind, name)
    return dict(_METADATA[kind].get(name, {}))
