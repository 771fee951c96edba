"""``rltrain-bench export``: peak memory of the DeepSpeed ZeRO-3 weight export, bucketed vs one dict.

Builds a Qwen2-architecture model of ~24M parameters locally (no download), starts a ZeRO-3 learner group of
``--world-size`` ranks on a local Ray, and exports its weights the way weight sync does, several times per
path: bucketed (``export_weight_bucket_refs``, one object ref per bucket) for each ``--bucket-mb``, and as one
dict (``export_weights_ref``). During each export it samples every rank's private resident memory (RssAnon,
every 2 ms) and reports the peak growth over the rank's memory before the export, next to the model size.

glibc keeps freed large chunks for reuse, which would hide when memory is released; the ranks run with
``MALLOC_MMAP_THRESHOLD_=1MiB`` so that large allocations are mmapped and RSS follows live memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import threading
import time

from rltrain.bench.report import emit, machine_info

MIB = 2**20


@dataclasses.dataclass
class RssPeak:
    """Peak anonymous (private) resident memory of some processes while a call runs, sampled every 2 ms."""

    pids: list[int]
    baseline: list[int] = dataclasses.field(default_factory=list)
    peak: list[int] = dataclasses.field(default_factory=list)

    @staticmethod
    def rss_anon(pid: int) -> int:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"no RssAnon for pid {pid}")

    def measure(self, call):
        """Run ``call()`` while sampling; returns its result."""
        self.baseline = [self.rss_anon(pid) for pid in self.pids]
        self.peak = list(self.baseline)
        done = threading.Event()

        def sample():
            while not done.is_set():
                self.peak = [max(p, self.rss_anon(pid)) for p, pid in zip(self.peak, self.pids)]
                time.sleep(0.002)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            return call()
        finally:
            done.set()
            sampler.join()

    @property
    def growth(self) -> list[int]:
        """Peak minus baseline, bytes per process."""
        return [peak - base for peak, base in zip(self.peak, self.baseline)]


def build_export_model(out_dir: str, *, hidden_size: int = 512, intermediate_size: int = 2048, num_layers: int = 6):
    """A ~24M-parameter (~91 MiB fp32) tiny-architecture Qwen2 model + tokenizer in ``out_dir``; returns the path."""
    from rltrain.data.prompts import task_corpus
    from rltrain.data.tasks import generate_task
    from rltrain.models import build_tiny_model

    rows, _ = generate_task("arithmetic", num_train=64, num_eval=8, seed=0)
    return build_tiny_model(
        out_dir,
        task_corpus(rows),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        num_heads=8,
        num_kv_heads=4,
    )


def rank_pids(group) -> list[int]:
    import ray

    return ray.get([worker.__ray_call__.remote(lambda _self: os.getpid()) for worker in group.workers])


def measure_exports(group, bucket_sizes: list[int], repeats: int) -> tuple[list[dict], int]:
    """Rows of {path, bucket_mb, buckets, seconds, rank baselines and peak growths (medians)}, and model bytes."""
    import ray

    pids = rank_pids(group)
    rows = []
    model_bytes = 0
    for bucket_mb in [*bucket_sizes, None]:
        samples = []
        for _ in range(repeats):
            peak = RssPeak(pids)
            start = time.perf_counter()
            if bucket_mb is None:
                refs = [peak.measure(group.export_weights_ref)]
            else:
                refs = peak.measure(lambda mb=bucket_mb: group.export_weight_bucket_refs(mb))
            seconds = time.perf_counter() - start
            exported = ray.get(refs)
            model_bytes = sum(t.numel() * t.element_size() for part in exported for t in part.values())
            samples.append((seconds, len(refs), peak.baseline, peak.growth))
            del refs, exported  # free the object store before the next export
        rows.append(
            {
                "path": "one dict" if bucket_mb is None else "bucketed",
                "bucket_mb": bucket_mb,
                "buckets": samples[0][1],
                "seconds": statistics.median(s[0] for s in samples),
                "baseline_mib": [statistics.median(s[2][r] for s in samples) / MIB for r in range(len(pids))],
                "peak_growth_mib": [statistics.median(s[3][r] for s in samples) / MIB for r in range(len(pids))],
            }
        )
    return rows, model_bytes


def markdown_table(rows: list[dict], model_bytes: int) -> str:
    ranks = len(rows[0]["peak_growth_mib"])
    head = "| export | buckets | " + " | ".join(f"rank {r} peak growth" for r in range(ranks)) + " | time |"
    lines = [head, "|" + "---|" * (ranks + 3)]
    for row in rows:
        name = f"bucketed, {row['bucket_mb']} MiB" if row["bucket_mb"] else "one dict (`export_weights_ref`)"
        growth = " | ".join(f"{g:.0f} MiB ({g * MIB / model_bytes:.2f}x)" for g in row["peak_growth_mib"])
        lines.append(f"| {name} | {row['buckets']} | {growth} | {row['seconds']:.2f} s |")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rltrain-bench export", description=__doc__.splitlines()[0])
    parser.add_argument("--bucket-mb", type=int, nargs="+", default=[4, 16, 64], help="bucket sizes to measure")
    parser.add_argument("--world-size", type=int, default=2, help="ZeRO-3 ranks (one Ray actor each)")
    parser.add_argument("--repeats", type=int, default=3, help="exports per path; medians are reported")
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--intermediate-size", type=int, default=2048)
    parser.add_argument("--num-layers", type=int, default=6)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    if min(args.bucket_mb) < 1 or args.world_size < 1 or args.repeats < 1:
        parser.error("--bucket-mb, --world-size and --repeats must be >= 1")
    return args


def main(argv: list[str]) -> int:
    import ray
    from omegaconf import OmegaConf

    from rltrain.config import LearnerConfig
    from rltrain.dist.deepspeed_group import DeepSpeedLearnerGroup

    args = parse_args(argv)
    # Inherited by the Ray workers started below.
    os.environ.update(OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_=str(MIB))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    learner_cfg = OmegaConf.structured(LearnerConfig(backend="deepspeed", world_size=args.world_size, zero_stage=3))
    options = {"lr": 1e-5, "grad_clip": 1.0, "micro_batch_size": 1}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_export_model(
            os.path.join(tmp, "model"),
            hidden_size=args.hidden_size,
            intermediate_size=args.intermediate_size,
            num_layers=args.num_layers,
        )
        ray.init(num_cpus=args.world_size + 1, include_dashboard=False, log_to_driver=False)
        try:
            group = DeepSpeedLearnerGroup(learner_cfg, model_dir, options)
            try:
                rows, model_bytes = measure_exports(group, args.bucket_mb, args.repeats)
            finally:
                group.shutdown()
        finally:
            ray.shutdown()
    text = "\n".join(
        [
            f"model: {model_bytes / MIB:.1f} MiB fp32 ({model_bytes // 4 / 1e6:.1f}M parameters), ZeRO-3, "
            f"{args.world_size} ranks, median of {args.repeats} exports",
            f"rank RssAnon before export: {', '.join(f'{b:.0f} MiB' for b in rows[0]['baseline_mib'])}",
            markdown_table(rows, model_bytes),
        ]
    )
    return emit(text, {"model_bytes": model_bytes, "rows": rows, "machine": machine_info()}, args.json)
