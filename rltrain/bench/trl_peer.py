"""TRL's GRPOTrainer on the step bench's workload: the peer of ``rltrain-bench step --peer trl``.

The only module that imports trl. ``rltrain-bench step`` runs it as its own process
(``python -m rltrain.bench.trl_peer SPEC OUT``), so that TRL's imports and torch threads never mix with the
bench's: SPEC (JSON, written by rltrain/bench/step.py) names the model directory, the prompts, the reward
functions and the sizes; OUT receives the wall time of every optimizer step and of every ``model.generate``
call. A step is timed from the trainer's ``on_step_begin`` to its ``on_step_end`` (generation, rewards,
loss, backward and optimizer step; not TRL's logging), as rltrain's ``perf/step_time_s`` is.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

INSTALL_HINT = "--peer trl: trl is not installed; pip install 'rltrain[bench]'"


def trl_installed() -> bool:
    return importlib.util.find_spec("trl") is not None


def run_peer(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run the peer in a fresh process with ``spec``; returns its report (``step_s``, ``generate_s``, ...).

    The process gets ``spec["threads"]`` OpenMP/torch threads from its start (a single process may use every core).
    """
    with tempfile.TemporaryDirectory(prefix="rltrain-bench-trl-") as tmp:
        spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
        with open(spec_path, "w", encoding="utf-8") as f:
            json.dump(spec, f)
        env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM": "false"}
        done = subprocess.run(
            [sys.executable, "-m", "rltrain.bench.trl_peer", spec_path, out_path],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if done.returncode != 0:
            raise RuntimeError(f"the TRL peer failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
        with open(out_path, encoding="utf-8") as f:
            return json.load(f)


def reward_function(functions: list[dict]):
    """A TRL reward function scoring each completion with rltrain's ``reward.functions`` (weighted sum), called
    in-process; the dataset's ``row_json`` column carries each prompt's row (ground truth under ``answer``)."""
    from rltrain.grading.resolve import call_reward, resolve_reward_functions

    specs = resolve_reward_functions(functions)

    def score(prompts: list[str], completions: list[str], row_json: list[str], **_: Any) -> list[float]:
        rewards = []
        for completion, encoded in zip(completions, row_json):
            row = json.loads(encoded)
            rewards.append(
                sum(spec.weight * call_reward(spec, completion, row["answer"], row)["score"] for spec in specs)
            )
        return rewards

    score.__name__ = "rltrain_reward"
    return score


def timed_generate(model, seconds: list[float]) -> None:
    """Wrap ``model.generate`` (the instance's) to append each call's wall time to ``seconds``."""
    generate = model.generate

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return generate(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    model.generate = wrapper


def train(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec["steps"]`` GRPO steps of ``prompts_per_step`` prompts x ``num_generations`` on the CPU, no vLLM."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(spec["threads"])
    step_s: list[float] = []
    generate_s: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_s.append(time.perf_counter() - self.start)

    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    timed_generate(model, generate_s)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    dataset = Dataset.from_list([{"prompt": p, "row_json": r} for p, r in zip(spec["prompts"], spec["rows"])])
    with tempfile.TemporaryDirectory(prefix="rltrain-bench-trl-out-") as output_dir:
        config = GRPOConfig(
            output_dir=output_dir,
            per_device_train_batch_size=spec["prompts_per_step"] * spec["num_generations"],
            gradient_accumulation_steps=1,
            num_generations=spec["num_generations"],
            max_completion_length=spec["max_completion_length"],
            temperature=spec["temperature"],
            learning_rate=spec["learning_rate"],
            max_steps=spec["steps"],
            seed=spec["seed"],
            use_cpu=True,
            bf16=False,
            report_to="none",
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=reward_function(spec["reward_functions"]),
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[StepTimer()],
        )
        trainer.train()
    import trl

    return {"step_s": step_s, "generate_s": generate_s, "trl": trl.__version__, "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    spec_path, out_path = sys.argv[1:] if argv is None else argv
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    report = train(spec)
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(report, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
