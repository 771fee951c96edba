"""rltrain-bench learner on a tiny tree batch: both learners agree, sharing computes fewer tokens, the report prints.
(The timings are measured in docs/benchmarks.md, not tested.)"""

from __future__ import annotations

import json

from rltrain import algo
from rltrain.bench import learner


def test_tree_benchmark_reports_fewer_tokens_and_equal_logprobs(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "learner.json"
    argv = [
        "--tree",
        "--model",
        tiny_model_dir,
        "--prompts",
        "2",
        "--width",
        "4",
        "--repeats",
        "1",
        "--micro-threads",
        "2",
    ]
    assert learner.main([*argv, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["batch"]["rows"] == 8
    assert report["max_logprob_diff"] <= 1e-5
    tokens = {mode: report["median"][mode]["tokens"] for mode in learner.MODES}
    assert tokens["shared"] < tokens["unshared"] and report["shared_over_unshared"]["tokens"] < 1
    printed = capsys.readouterr().out
    assert "tree batch: 8 rows" in printed and "micro_threads=2" in printed and "fewer" in printed


def test_flat_groups_share_their_prompt(tiny_model_dir):
    args = learner.parse_args(["--model", tiny_model_dir, "--prompts", "2", "--width", "3", "--depth", "2"])
    batch = learner.sample_batch(args, tiny_model_dir)
    assert batch.ancestors is None and batch.group.tolist() == [0, 0, 0, 1, 1, 1]
    shared = learner.build_learner(args, tiny_model_dir, share_prefixes=True)
    metrics = shared.train_step(batch, algo.make_loss_fn())
    prompt_tokens = batch.prompt_mask.sum(1)
    assert metrics["perf/learner_tokens_saved"] >= float(prompt_tokens[1:3].sum() + prompt_tokens[4:].sum())
