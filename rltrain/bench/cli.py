"""``rltrain-bench <name> [options]``: benchmarks whose results go into docs/benchmarks.md.

Each benchmark is a module ``rltrain.bench.<name>`` with ``main(argv) -> int``; ``--help`` after the
name lists its options.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "grader": "grades/s of the math grader through the process pool",
    "rollout": "flat vs tree sampling: computed tokens, trajectories/s",
    "export": "peak memory of the DeepSpeed ZeRO-3 weight export, bucketed vs one dict",
    "sync": "seconds per weight sync to the rollout workers: object store vs bucketed broadcast",
    "step": "seconds per training step and its phases; --peer trl: TRL's GRPOTrainer alongside",
    "pipeline": "wall time and held-out accuracy, synchronous vs trainer.max_staleness 1 and 2",
    "learner": "learner train step time and tokens, prefix-shared vs unshared on the same batch (--tree: TreePO)",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHMARKS:
        lines = [f"  {name:10s} {what}" for name, what in BENCHMARKS.items()]
        print("usage: rltrain-bench <benchmark> [options]\n\nbenchmarks:\n" + "\n".join(lines))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"rltrain.bench.{argv[0]}")
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
