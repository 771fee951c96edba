"""Weight sync learner → rollout workers: seconds per sync through the Ray object store vs the bucketed broadcast.

For each transport it starts the run's actors as ``rltrain`` does (a ``Runtime`` over the quickstart recipe
with the chosen model, engine and worker count), does one warm-up sync (the broadcast opens its group
there), then ``--repeats`` timed syncs, each checked by the workers' reported policy version. Reports the
median ``perf/weight_sync_s`` and the bytes moved.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

from rltrain.bench.report import emit, machine_info
from rltrain.bench.rollout import resolve_bench_model

TRANSPORTS = ("object_store", "collective")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rltrain-bench sync", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny | small (>= 20M params, built locally) | an HF model dir")
    parser.add_argument("--cache-dir", default=os.environ.get("RLTRAIN_CACHE", "~/.cache/rltrain"))
    parser.add_argument("--engine", choices=("torch", "vllm"), default="vllm")
    parser.add_argument("--workers", type=int, default=2, help="rollout workers receiving the weights")
    parser.add_argument("--bucket-mb", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", dest="json_path", default=None, help="write the full report here")
    args = parser.parse_args(argv)
    for name in ("workers", "bucket_mb", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def measure(model_dir: str, transport: str, args: argparse.Namespace) -> dict:
    """Timed syncs over one transport with a fresh set of actors."""
    from hydra import compose, initialize_config_module

    from rltrain.config import register_configs
    from rltrain.runtime import Runtime

    register_configs()
    overrides = [
        f"model.path={model_dir}",
        f"rollout.engine={args.engine}",
        f"rollout.num_workers={args.workers}",
        f"rollout.weight_sync={transport}",
        f"rollout.weight_sync_bucket_mb={args.bucket_mb}",
        f"run.dir={tempfile.mkdtemp(prefix='rltrain-bench-sync-')}",
    ]
    with initialize_config_module(config_module="recipes", version_base="1.3"):
        cfg = compose(config_name="quickstart", overrides=overrides)
    runtime = Runtime(cfg, model_dir, total_optimizer_steps=1)
    try:
        warm_up = runtime.sync_weights(1)
        rows = [runtime.sync_weights(version) for version in range(2, args.repeats + 2)]
    finally:
        runtime.shutdown()
    seconds = [row["perf/weight_sync_s"] for row in rows]
    return {
        "transport": transport,
        "median_s": statistics.median(seconds),
        "seconds": seconds,
        "warm_up_s": warm_up["perf/weight_sync_s"],
        "mb_per_sync": rows[0].get("perf/weight_sync_mb"),
        "fallbacks": rows[-1].get("rollout/weight_sync_fallbacks", 0),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model_dir = resolve_bench_model(args.model, args.cache_dir)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    results = [measure(model_dir, transport, args) for transport in TRANSPORTS]
    lines = [f"weight sync, {args.model}, {args.engine} x {args.workers} workers, {args.repeats} repeats"]
    for row in results:
        lines.append(
            f"  {row['transport']:13s} median {row['median_s'] * 1000:8.1f} ms  (warm-up {row['warm_up_s']:.2f} s, "
            f"fallbacks {row['fallbacks']})"
        )
    report = {
        "benchmark": "sync",
        "args": vars(args),
        "model_dir": model_dir,
        "model_type": config.model_type,
        "machine": machine_info(),
        "results": results,
    }
    return emit("\n".join(lines), report, args.json_path)
