"""Errors the CLI turns into one line instead of a traceback.

``ConfigError`` (rltrain.config): a bad value found before anything starts, exit 2. ``RunError``: the run was
stopped for a reason the user must act on (a reward function failing on most samples, a dead learner,
unwritable storage), exit 1. Both messages name the culprit: key, file, function or actor.
"""

from __future__ import annotations


class RunError(RuntimeError):
    """The run cannot go on; the message says why and names the culprit. The CLI prints it and exits 1."""
