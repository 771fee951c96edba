"""``rltrain-bench rollout``: flat vs tree-segment sampling on the same engine, model, prompts and budget.

Both modes produce ``width`` finished trajectories per prompt with the same temperature and the same
maximum response length (``depth * segment_len``); both share each prompt's prefill across its group
(flat: the engine forks the prompt's KV ``n`` ways; tree: kept KV rows / prefix caching). Measured per
run: computed tokens (prefill computed + decoded), reused prefill tokens, wall time, trajectories/s,
mean response length, finish reasons. Runs alternate flat/tree, ``--repeats`` times, sequentially;
the report gives medians. Caches are reset before every run by reloading the same weights
(``load_weights`` is the engines' public way to drop a prefix cache).

Only EOS stops a sample by default. ``--stop-tokens K`` makes K - 1 more token ids stop tokens: on a
near-uniform (untrained) model each adds ~1/vocab per-token stop probability, so more trajectories end
early, which shrinks the tree's saving; ``--stop-tokens 0``: nothing stops a sample before ``l * d``
tokens (both modes use the same stop set). See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import random
import statistics
import sys
import time
from typing import Any

import torch

from rltrain.bench.report import emit, machine_info
from rltrain.sampling.flat import FlatSampler, Trajectories
from rltrain.sampling.tree_sampler import TreeSampler
from rltrain.types import FinishReason, SamplingParams

# model presets for build_tiny_model: "tiny" = recipes/model/tiny.yaml, "small" >= 20M parameters
PRESETS = {
    "tiny": dict(
        hidden_size=128,
        intermediate_size=512,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        vocab_size=512,
        max_position_embeddings=2048,
    ),
    "small": dict(
        hidden_size=512,
        intermediate_size=1536,
        num_layers=8,
        num_heads=8,
        num_kv_heads=4,
        vocab_size=512,
        max_position_embeddings=2048,
    ),
}
INSTRUCTION = "Work it out step by step, check every digit, then write the final answer after 'Answer:'."


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rltrain-bench rollout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("torch", "vllm"), default="torch")
    parser.add_argument("--model", default="tiny", help="tiny | small (>= 20M params, built locally) | an HF model dir")
    parser.add_argument("--cache-dir", default=os.environ.get("RLTRAIN_CACHE", "~/.cache/rltrain"))
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--width", type=int, default=16, help="finished trajectories per prompt (flat n)")
    parser.add_argument("--branching", type=int, default=2)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--segment-len", type=int, default=16)
    parser.add_argument(
        "--prompt-len", type=int, default=0, help="0: the bare questions; N: N-token prompts (solved examples first)"
    )
    parser.add_argument(
        "--block-size", type=int, default=None, help="vLLM KV/prefix-cache block in tokens (default: vLLM's, CPU 128)"
    )
    parser.add_argument(
        "--no-align",
        dest="align",
        action="store_false",
        help="vLLM: do not align tree segment ends to KV blocks (rollout.tree.align_to_kv_blocks=false)",
    )
    parser.add_argument(
        "--hf-forward",
        dest="lean_decode",
        action="store_false",
        help="torch engine: decode with HF's model forward, not the lean step (rltrain/rollout/lean_decode.py)",
    )
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument(
        "--stop-tokens", type=int, default=1, help="stop token ids: EOS + this many - 1 others (0: none)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_path", default=None, help="write the full report here")
    args = parser.parse_args(argv)
    for name in ("prompts", "width", "branching", "depth", "segment_len", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("prompt_len", "stop_tokens"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    return args


def resolve_bench_model(model: str, cache_dir: str) -> str:
    """A preset name -> a model dir built once under ``cache_dir/bench-<preset>-<hash of its sizes>``;
    anything else must be an HF model dir."""
    if model not in PRESETS:
        if not os.path.isfile(os.path.join(os.path.expanduser(model), "config.json")):
            raise SystemExit(f"--model {model!r}: not a preset {sorted(PRESETS)} nor an HF model dir with config.json")
        return os.path.expanduser(model)
    from rltrain.data.prompts import task_corpus
    from rltrain.data.tasks import generate_task
    from rltrain.models import build_tiny_model

    key = hashlib.sha256(json.dumps(PRESETS[model], sort_keys=True).encode()).hexdigest()[:8]
    out_dir = os.path.join(os.path.expanduser(cache_dir), f"bench-{model}-{key}")
    if not os.path.isfile(os.path.join(out_dir, "config.json")):
        train, held_out = generate_task("arithmetic", num_train=2000, num_eval=64, seed=0)
        build_tiny_model(out_dir, task_corpus(train + held_out, INSTRUCTION), seed=0, **PRESETS[model])
    return out_dir


def build_prompts(tokenizer, count: int, seed: int, length: int = 0) -> list[list[int]]:
    """Held-out arithmetic questions behind a fixed instruction, as token ids. ``length`` > 0: solved
    examples go in front and the prompt is cut to its last ``length`` tokens (every prompt that long)."""
    from rltrain.data.prompts import render_prompt
    from rltrain.data.tasks import generate_task

    train, rows = generate_task("arithmetic", num_train=16 + length // 4, num_eval=count, seed=seed)
    prompts = [tokenizer.encode(render_prompt(row, tokenizer, "plain", INSTRUCTION)) for row in rows]
    if length <= 0:
        return prompts
    shots = tokenizer.encode("".join(f"{row['prompt']}{row['answer']}\n" for row in train))
    if len(shots) < length:
        raise SystemExit(f"--prompt-len {length}: the solved examples give only {len(shots)} tokens")
    return [(shots + prompt)[-length:] for prompt in prompts]


def stop_token_ids(tokenizer, count: int, seed: int) -> tuple[int, ...]:
    """EOS plus ``count - 1`` other ordinary token ids, chosen reproducibly; none for ``count == 0``."""
    if count == 0:
        return ()
    special = set(tokenizer.all_special_ids)
    ordinary = [i for i in range(len(tokenizer)) if i not in special]
    return (tokenizer.eos_token_id, *random.Random(seed).sample(ordinary, count - 1))


def build_engine(
    engine: str, model_dir: str, seed: int, device: str, block_size: int | None = None, lean_decode: bool = True
):
    if engine == "vllm":
        from rltrain.rollout.vllm_engine import VLLMGenerator

        return VLLMGenerator(model_dir, seed=seed, block_size=block_size)
    from rltrain.rollout.torch_tree_engine import TorchTreeGenerator

    return TorchTreeGenerator.from_pretrained(model_dir, seed=seed, device=device, lean_decode=lean_decode)


def model_weights(model_dir: str) -> list[tuple[str, torch.Tensor]]:
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for path in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        weights.update(load_file(path))
    return list(weights.items())


def summarize(traj: Trajectories, wall_s: float) -> dict[str, Any]:
    lengths = [len(p) + len(r.token_ids) for p, r in zip(traj.prefixes or [()] * len(traj.results), traj.results)]
    reasons: dict[str, int] = {}
    for r in traj.results:
        name = FinishReason(r.finish_reason).name.lower()
        reasons[name] = reasons.get(name, 0) + 1
    return {
        "trajectories": len(traj.results),
        "computed_tokens": traj.stats.computed,
        "prefill_computed": traj.stats.prefill_computed,
        "prefill_reused": traj.stats.prefill_reused,
        "decoded": traj.stats.decoded,
        "response_tokens": sum(lengths),
        "mean_response_len": sum(lengths) / len(lengths),
        "computed_per_response_token": traj.stats.computed / max(1, sum(lengths)),
        "wall_s": wall_s,
        "trajectories_per_s": len(traj.results) / wall_s,
        "generate_calls": traj.generate_calls,
        "finish_reasons": reasons,
    }


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model_dir = resolve_bench_model(args.model, args.cache_dir)
    from rltrain.models import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    engine = build_engine(args.engine, model_dir, args.seed, args.device, args.block_size, args.lean_decode)
    weights = model_weights(model_dir)
    prompts = build_prompts(tokenizer, args.prompts, args.seed, args.prompt_len)
    params = SamplingParams(
        temperature=args.temperature,
        max_tokens=args.depth * args.segment_len,
        stop_token_ids=stop_token_ids(tokenizer, args.stop_tokens, args.seed),
    )
    samplers = {
        "flat": lambda: FlatSampler(engine.generate, args.width),
        "tree": lambda: TreeSampler(
            engine.generate,
            segment_len=args.segment_len,
            max_depth=args.depth,
            width=args.width,
            branching=args.branching,
            seed=args.seed,
            kv_block_size=getattr(engine, "kv_block_size", None) if args.align else None,
        ),
    }
    for make in samplers.values():  # warm-up: first-call overheads stay out of the timings
        make().sample(prompts[:1], SamplingParams(temperature=args.temperature, max_tokens=args.segment_len))
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in samplers}
    version = 0
    for _ in range(args.repeats):
        for mode, make in samplers.items():
            version += 1
            engine.load_weights(weights, version)  # same weights: drops every kept KV row / prefix-cache block
            sampler = make()
            start = time.perf_counter()
            traj = sampler.sample(prompts, params)
            runs[mode].append(summarize(traj, time.perf_counter() - start))
    medians = {mode: _medians(r) for mode, r in runs.items()}
    n_params = sum(t.numel() for _, t in weights)  # tied embeddings are stored once
    return {
        "config": {
            **{k: v for k, v in vars(args).items() if k != "json_path"},
            "model_dir": model_dir,
            "parameters": n_params,
            "max_response_tokens": params.max_tokens,
            "mean_prompt_tokens": sum(map(len, prompts)) / len(prompts),
        },
        "machine": machine_info(),
        "runs": runs,
        "median": medians,
        "tree_over_flat": {
            "computed_tokens": medians["tree"]["computed_tokens"] / medians["flat"]["computed_tokens"],
            "trajectories_per_s": medians["tree"]["trajectories_per_s"] / medians["flat"]["trajectories_per_s"],
            "mean_response_len": medians["tree"]["mean_response_len"] / medians["flat"]["mean_response_len"],
            "computed_per_response_token": medians["tree"]["computed_per_response_token"]
            / medians["flat"]["computed_per_response_token"],
        },
    }


def _medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    numeric = [k for k, v in runs[0].items() if isinstance(v, int | float)]
    return {k: statistics.median(r[k] for r in runs) for k in numeric}


def format_report(report: dict[str, Any]) -> str:
    cfg, med, ratio = report["config"], report["median"], report["tree_over_flat"]
    lines = [
        f"engine={cfg['engine']} model={cfg['model']} ({cfg['parameters'] / 1e6:.1f}M params) prompts={cfg['prompts']} "
        f"w={cfg['width']} b={cfg['branching']} d={cfg['depth']} l={cfg['segment_len']} T={cfg['temperature']} "
        f"repeats={cfg['repeats']} threads={cfg['threads']} load_avg={report['machine']['load_avg']}",
        f"{'mode':<5} {'computed':>9} {'prefill':>8} {'reused':>7} {'decoded':>8} {'wall_s':>7} {'traj/s':>7} "
        f"{'mean_len':>8}",
    ]
    for mode, m in med.items():
        lines.append(
            f"{mode:<5} {m['computed_tokens']:>9.0f} {m['prefill_computed']:>8.0f} {m['prefill_reused']:>7.0f} "
            f"{m['decoded']:>8.0f} {m['wall_s']:>7.2f} {m['trajectories_per_s']:>7.1f} {m['mean_response_len']:>8.1f}"
        )
    lines.append(
        f"tree/flat: computed tokens {ratio['computed_tokens']:.3f} ({1 - ratio['computed_tokens']:.1%} fewer), "
        f"trajectories/s {ratio['trajectories_per_s']:.2f}x, mean response length {ratio['mean_response_len']:.2f}x, "
        f"computed tokens per response token {ratio['computed_per_response_token']:.3f}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run_benchmark(args)
    return emit(format_report(report), report, args.json_path)


if __name__ == "__main__":
    sys.exit(main())
