"""An endless, resumable stream of prompt rows: shuffled epochs, batches that cross epoch boundaries."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any


class PromptStream:
    """Yields ``batch_size`` rows at a time from endlessly repeated epochs over ``rows``.

    Epoch ``e`` visits the rows in the order of a permutation that depends only on ``(seed, e)``, so the
    stream is reproducible and ``state_dict()`` -> ``load_state_dict()`` resumes with exactly the prompts
    an uninterrupted run would have seen. A batch that reaches the end of an epoch continues with the next.
    """

    def __init__(self, rows: Sequence[dict[str, Any]], batch_size: int, seed: int = 0):
        if not rows:
            raise ValueError("PromptStream needs at least one row")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.rows = list(rows)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0  # index of the next row within the current epoch's order
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def next_batch(self) -> list[dict[str, Any]]:
        """The next ``batch_size`` rows (shallow copies, so callers may add fields)."""
        batch = []
        while len(batch) < self.batch_size:
            if self.position == len(self.rows):
                self.epoch += 1
                self.position = 0
                self._order = self._epoch_order(self.epoch)
            batch.append(dict(self.rows[self._order[self.position]]))
            self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_rows": len(self.rows)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from ``state``; the saved seed wins. Raises if the rows changed in number since it was saved."""
        num_rows = state.get("num_rows", len(self.rows))
        if num_rows != len(self.rows):
            raise ValueError(
                f"prompt stream state was saved with {num_rows} rows but the data now has {len(self.rows)}; "
                "the data changed since the checkpoint, so the run cannot continue with the same prompts"
            )
        if not 0 <= state["position"] <= len(self.rows) or state["epoch"] < 0:
            raise ValueError(f"invalid prompt stream state {state}")
        self.seed = state["seed"]
        self.epoch = state["epoch"]
        self.position = state["position"]
        self._order = self._epoch_order(self.epoch)
