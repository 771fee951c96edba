"""``rltrain-bench learner``: torch learner train steps with prefix sharing (``learner.share_prefixes``) vs without,
on the same batch.

The batch is sampled once: ``--tree`` grows TreePO trees (rltrain/sampling/tree_sampler.py) over the torch engine,
otherwise flat groups of ``--width`` samples per prompt; the defaults are the TreePO quickstart's shapes (16 prompts,
w=8, b=2, d=5, l=2, micro_batch_size 16, the tiny model). Two learners start from the same weights, one unshared
(padded micro-batches, or packed under ``--budget``) and one sharing prefixes; their first logprobs are compared
(they must agree to float summation order), then train steps alternate between them, ``--repeats`` times. Reported
per mode: tokens computed per step (``perf/learner_tokens``), median seconds per train step, and the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import torch

from rltrain.bench.report import emit, machine_info
from rltrain.bench.rollout import build_engine, build_prompts, resolve_bench_model
from rltrain.types import RolloutBatch, SamplingParams, build_rollout_batch

MODES = ("unshared", "shared")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rltrain-bench learner", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="store_true", help="TreePO trees (default: flat groups)")
    parser.add_argument("--model", default="tiny", help="tiny | small (>= 20M params, built locally) | an HF model dir")
    parser.add_argument("--cache-dir", default=os.environ.get("RLTRAIN_CACHE", "~/.cache/rltrain"))
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--width", type=int, default=8, help="trajectories per prompt")
    parser.add_argument("--branching", type=int, default=2)
    parser.add_argument("--depth", type=int, default=5)
    parser.add_argument("--segment-len", type=int, default=2, help="tree segment length; responses <= depth * this")
    parser.add_argument("--prompt-len", type=int, default=0, help="0: the bare questions; N: N-token prompts")
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--budget", type=int, default=None, help="learner.max_tokens_per_micro_batch (both modes)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--micro-threads", type=int, default=1, help="micro-batches at once, one torch thread each (learner.md)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_path", default=None, help="write the full report here")
    args = parser.parse_args(argv)
    counts = ("prompts", "width", "branching", "depth", "segment_len", "micro_batch_size", "repeats", "threads")
    for name in (*counts, "micro_threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.budget is not None and args.budget < 1:
        parser.error("--budget must be >= 1")
    return args


def sample_batch(args: argparse.Namespace, model_dir: str) -> RolloutBatch:
    """One step's trajectories (trees or flat groups) as a batch with old logprobs and +-1 advantages."""
    from rltrain.models import load_tokenizer
    from rltrain.sampling.flat import FlatSampler
    from rltrain.sampling.tree_sampler import TreeSampler

    engine = build_engine("torch", model_dir, args.seed, args.device)
    prompts = build_prompts(load_tokenizer(model_dir), args.prompts, args.seed, args.prompt_len)
    params = SamplingParams(temperature=1.0, max_tokens=args.depth * args.segment_len, seed=args.seed)
    if args.tree:
        sampler = TreeSampler(
            engine.generate,
            segment_len=args.segment_len,
            max_depth=args.depth,
            width=args.width,
            branching=args.branching,
            seed=args.seed,
        )
    else:
        sampler = FlatSampler(engine.generate, args.width)
    traj = sampler.sample(prompts, params)
    batch = build_rollout_batch(
        [prompts[i] for i in traj.prompt_index],
        traj.results,
        list(traj.prompt_index),
        prefixes=traj.prefixes or None,
        prefix_logprobs=traj.prefix_logprobs or None,
        ancestors=traj.ancestors,
    )
    signs = torch.tensor([1.0, -1.0]).repeat((batch.batch_size + 1) // 2)[: batch.batch_size, None]
    return batch.replace(old_logprobs=batch.rollout_logprobs, advantages=signs * batch.response_mask)


def build_learner(args: argparse.Namespace, model_dir: str, share_prefixes: bool):
    from rltrain.learner.torch_learner import TorchLearner

    return TorchLearner(
        model_dir,
        lr=1e-6,
        micro_batch_size=args.micro_batch_size,
        max_tokens_per_micro_batch=args.budget,
        share_prefixes=share_prefixes,
        seed=args.seed,
        device=args.device,
    )


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from rltrain import algo

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model_dir = resolve_bench_model(args.model, args.cache_dir)
    batch = sample_batch(args, model_dir)
    learners = {mode: build_learner(args, model_dir, mode == "shared") for mode in MODES}
    logprobs = {mode: learner.logprobs(batch) for mode, learner in learners.items()}  # also the warm-up
    loss_fn = algo.make_loss_fn()
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode, learner in learners.items():
            start = time.perf_counter()
            metrics = learner.train_step(batch, loss_fn, args.micro_threads)
            runs[mode].append({"train_s": time.perf_counter() - start, "tokens": metrics["perf/learner_tokens"]})
    medians = {mode: {key: statistics.median(r[key] for r in runs[mode]) for key in runs[mode][0]} for mode in MODES}
    return {
        "config": {**{k: v for k, v in vars(args).items() if k != "json_path"}, "model_dir": model_dir},
        "machine": machine_info(),
        "batch": {
            "rows": batch.batch_size,
            "mean_prompt_tokens": float(batch.prompt_mask.sum(1).mean()),
            "mean_response_tokens": float(batch.response_mask.sum(1).mean()),
        },
        "max_logprob_diff": float((logprobs["shared"] - logprobs["unshared"]).abs().max()),
        "runs": runs,
        "median": medians,
        "shared_over_unshared": {
            "tokens": medians["shared"]["tokens"] / medians["unshared"]["tokens"],
            "speedup": medians["unshared"]["train_s"] / medians["shared"]["train_s"],
        },
    }


def format_report(report: dict[str, Any]) -> str:
    cfg, shape, med, ratio = report["config"], report["batch"], report["median"], report["shared_over_unshared"]
    lines = [
        f"{'tree' if cfg['tree'] else 'flat'} batch: {shape['rows']} rows, prompts {shape['mean_prompt_tokens']:.1f} "
        f"tokens, responses {shape['mean_response_tokens']:.1f} tokens (mean); model={cfg['model']} "
        f"micro_batch_size={cfg['micro_batch_size']} budget={cfg['budget']} repeats={cfg['repeats']} "
        f"threads={cfg['threads']} micro_threads={cfg['micro_threads']} load_avg={report['machine']['load_avg']}",
        f"{'mode':<9} {'tokens':>8} {'train_s':>8}",
    ]
    for mode, m in med.items():
        lines.append(f"{mode:<9} {m['tokens']:>8.0f} {m['train_s']:>8.3f}")
    lines.append(
        f"shared/unshared: tokens {ratio['tokens']:.3f} ({1 - ratio['tokens']:.1%} fewer), train step "
        f"{ratio['speedup']:.2f}x faster; max logprob difference {report['max_logprob_diff']:.1e}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run_benchmark(args)
    return emit(format_report(report), report, args.json_path)


if __name__ == "__main__":
    sys.exit(main())
