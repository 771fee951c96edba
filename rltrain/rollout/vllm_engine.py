"""vLLM Generator: token-id prompts in, token ids + logprobs + finish reasons + cache accounting out.

The only module in rltrain that imports vllm; it does so lazily, inside ``VLLMGenerator``, so that
``import rltrain`` works without vllm installed.

The engine runs in the calling process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): a Ray rollout actor is
already the process boundary, start-up is seconds instead of half a minute, and in-place weight
updates reach the model directly. On CPU, oneDNN weight repacking is switched off before the engine is
built, because a repacked linear layer keeps serving its original weights after ``load_weights``.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from torch import Tensor

from rltrain.rollout.base import with_version
from rltrain.types import FinishReason, GenRequest, GenResult, SamplingParams, TokenStats

logger = logging.getLogger(__name__)

_GIB = 1 << 30
# vLLM finish reasons -> ours. "error" is a request the engine failed (e.g. a KV load failure): to the
# caller it is an aborted trajectory.
_FINISH_REASONS = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "abort": FinishReason.ABORT,
    "error": FinishReason.ABORT,
    "repetition": FinishReason.REPETITION,
}


def _prepare_vllm_process() -> None:
    """Process-wide vLLM settings that must be in place before the first engine is built."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # Per-step INFO lines ("reset prefix cache", engine stats) would fill a batch job's log: WARNING unless the
    # user asks for more with VLLM_LOGGING_LEVEL (read at vLLM's import; set here too if it was imported before).
    level = os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    import vllm._custom_ops as vllm_ops
    from vllm.platforms import current_platform

    logging.getLogger("vllm").setLevel(level)

    if current_platform.is_cpu():
        # oneDNN repacks linear weights into opaque handles; load_weights then fails or, worse, the layer
        # keeps computing with the old weights. Plain torch linear is as fast for the models used on CPU.
        vllm_ops._supports_onednn = False


class VLLMGenerator:
    """Generator over an in-process vLLM engine (prefix caching on by default).

    Logprobs: vLLM runs with ``logprobs_mode="processed_logprobs"``, i.e. each sampled token's logprob is
    log-softmax of the logits after temperature and after top-k/top-p masking. This equals the rltrain
    contract (log-softmax(logits / temperature), before top-k/top-p) exactly whenever top-k and top-p
    are off, at any temperature; greedy (``temperature == 0``) gives log-softmax of the raw logits, also
    as the contract says. With top-k or top-p on, the value is the logprob under the truncated,
    renormalised distribution the token was actually drawn from, which is higher than the contract's
    value by -log(kept probability mass). vLLM's other option, "raw", ignores temperature, so it would
    disagree with the contract at every temperature != 1, which RL recipes use more than truncation.

    Stopping: only ``params.stop_token_ids`` and ``params.stop_strings`` stop a sample (the model's EOS
    is not added implicitly, as in the torch engine); a stop token is included in ``token_ids``, and for
    a stop string the tokens up to the one that completed it are returned.

    ``kv_cache_gb`` sizes the KV cache on CPU; on GPU ``gpu_memory_utilization`` does. ``block_size``
    is the KV block (and prefix-cache reuse) granularity in tokens; None keeps vLLM's platform default
    (128 on CPU, 16 on most GPUs). Tree sampling reuses prefixes only in whole blocks, so a segment
    length ``l`` below the default needs ``block_size`` = ``l`` (CPU attention takes multiples of 32).
    ``enable_sleep_mode`` (GPU only) allows ``sleep``/``wake_up`` around a colocated learner's work.
    """

    def __init__(
        self,
        model_path: str,
        *,
        seed: int = 0,
        dtype: str = "float32",
        enable_prefix_caching: bool = True,
        enforce_eager: bool = True,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.5,
        max_model_len: int | None = None,
        kv_cache_gb: float = 1.0,
        block_size: int | None = None,
        enable_sleep_mode: bool = False,
    ) -> None:
        if kv_cache_gb <= 0:
            raise ValueError(f"kv_cache_gb must be > 0, got {kv_cache_gb}")
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        _prepare_vllm_process()
        from vllm import LLM
        from vllm.platforms import current_platform

        engine_kwargs: dict[str, Any] = {}
        if block_size is not None:
            if block_size < 1:
                raise ValueError(f"block_size must be >= 1, got {block_size}")
            engine_kwargs["block_size"] = block_size
        if enable_sleep_mode:
            if not current_platform.is_sleep_mode_available():
                raise ValueError(
                    f"vLLM sleep mode is not available on {current_platform.device_name}: colocated engines sleep "
                    "only on GPU (use cluster.placement=disaggregated)"
                )
            engine_kwargs["enable_sleep_mode"] = True
        if current_platform.is_cpu():
            engine_kwargs["kv_cache_memory_bytes"] = int(kv_cache_gb * _GIB)
        else:
            engine_kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        self._llm = LLM(
            model_path,
            seed=seed,
            dtype=dtype,
            enable_prefix_caching=enable_prefix_caching,
            enforce_eager=enforce_eager,
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            logprobs_mode="processed_logprobs",
            **engine_kwargs,
        )
        self.model_path = model_path
        self.max_model_len: int = self._llm.llm_engine.model_config.max_model_len
        self._version = 0
        self._partial_load_error: str | None = None
        try:
            self._check_supported(current_platform)
        except Exception:
            self.close()
            raise

    def _check_supported(self, platform) -> None:
        """Fail at construction, with the cause named, on what would otherwise fail deep in a worker later."""
        if platform.is_cpu():
            from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

            head_size = self._llm.llm_engine.model_config.get_head_size()
            supported = CPUAttentionBackend.get_supported_head_sizes()
            if head_size not in supported:
                raise ValueError(
                    f"{self.model_path}: head_dim={head_size} is not supported by vLLM's CPU attention "
                    f"(supported: {supported}); change hidden_size / num_attention_heads"
                )
        repacked = self._llm.apply_model(_names_of_empty_parameters)[0]
        if repacked:
            raise RuntimeError(
                f"vLLM repacked weights {repacked[:3]} at load time, so load_weights could not update them; "
                "this happens with oneDNN / AMX / zentorch CPU kernels (try dtype=float32)"
            )

    @property
    def policy_version(self) -> int:
        return self._version

    @property
    def kv_block_size(self) -> int:
        """Tokens per KV block: the prefix cache reuses a context in whole blocks of this size."""
        return int(self._llm.llm_engine.vllm_config.cache_config.block_size)

    def generate(self, requests: Sequence[GenRequest], params: SamplingParams) -> list[list[GenResult]]:
        """Sample ``request.n`` continuations of each request's ``context_ids``; results in request order.

        Each of the ``n`` samples is its own vLLM request, so its prefix-cache hit is counted: the first
        sample of a context usually computes it and the others reuse it. With ``params.seed`` set, sample
        k of the call (counting across requests) uses seed ``params.seed + k``, so identical requests
        still draw different samples and a call is reproducible.
        """
        if self._partial_load_error is not None:
            raise RuntimeError(f"{self._partial_load_error}; load a complete set of weights before generating")
        if not requests:
            return []
        self._check_lengths(len(request.context_ids) for request in requests)
        from vllm.inputs import TokensPrompt

        prompts, per_sample_params = [], []
        for request in requests:
            prompt = TokensPrompt(prompt_token_ids=list(request.context_ids))
            request_params = dataclasses.replace(params, max_tokens=request.token_budget(params.max_tokens))
            for _ in range(request.n):
                seed = None if params.seed is None else params.seed + len(prompts)
                prompts.append(prompt)
                per_sample_params.append(to_vllm_sampling_params(request_params, seed))
        outputs = self._llm.generate(prompts, per_sample_params, use_tqdm=False)
        return with_version(_group_results(requests, outputs), self._version)

    def score(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, ...]]:
        """Logprob of each ``continuation`` token given ``context`` and the continuation before it, for each
        (context, continuation) pair: vLLM prompt logprobs, i.e. log-softmax of the raw logits (temperature 1).

        This scores given tokens with the engine's current weights, so a fixed continuation can be compared
        with the learner's logprobs after a weight sync (the learner must use temperature 1 too).
        """
        import vllm
        from vllm.inputs import TokensPrompt

        if any(not continuation for _, continuation in pairs):
            raise ValueError("score: every continuation needs at least one token")
        params = vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        prompts = [TokensPrompt(prompt_token_ids=[*context, *continuation]) for context, continuation in pairs]
        self._check_lengths(len(prompt["prompt_token_ids"]) for prompt in prompts)
        outputs = self._llm.generate(prompts, params, use_tqdm=False)
        scores = []
        for output, (context, continuation) in zip(outputs, pairs):
            positions = output.prompt_logprobs[len(context) :]
            scores.append(tuple(position[token].logprob for position, token in zip(positions, continuation)))
        return scores

    def _check_lengths(self, context_lengths: Iterable[int]) -> None:
        for index, length in enumerate(context_lengths):
            if length >= self.max_model_len:
                raise ValueError(
                    f"request {index}: context has {length} tokens, but the engine's "
                    f"max_model_len is {self.max_model_len} (no room to generate)"
                )

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]], version: int) -> None:
        """Copy HF-named tensors into the engine's model in place, drop the now stale prefix cache, record ``version``.

        vLLM maps HF names onto its fused layers (q/k/v -> qkv_proj, gate/up -> gate_up_proj). An
        unknown name raises ValueError and leaves ``policy_version`` unchanged; ``generate`` then refuses
        to run until a later ``load_weights`` succeeds, since the tensors before the bad one were copied.
        """
        # A stream (collective sync) is consumed lazily, one received bucket at a time; anything else is listed,
        # since a tensor-parallel engine pickles it to its workers.
        weights = _CountedTensors(named_tensors if isinstance(named_tensors, Iterator) else list(named_tensors))
        try:
            self._llm.apply_model(lambda model: model.load_weights(weights))
        except Exception as exc:
            # Tensors before the failing one are already copied: the weights are now a mix of two versions.
            first_line = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            self._partial_load_error = f"load_weights of version {version} failed part-way ({first_line})"
            raise
        if weights.count == 0:
            raise ValueError("load_weights: no tensors given")
        self._partial_load_error = None
        # KV blocks computed with the old weights must not be reused by requests sampled with the new ones.
        if not self._llm.reset_prefix_cache():
            raise RuntimeError("load_weights: vLLM could not reset its prefix cache (requests still running?)")
        self._version = version

    def sleep(self) -> None:
        """Free device memory while a colocated learner trains: weights move to CPU memory, the KV cache (and
        so the prefix cache) is dropped. Needs ``enable_sleep_mode``."""
        self._llm.sleep(level=1)

    def wake_up(self) -> None:
        """Restore the weights and the KV cache; call before ``load_weights`` or ``generate``."""
        self._llm.wake_up()

    def close(self) -> None:
        """Shut the engine down and free its model and KV cache; the generator is unusable afterwards."""
        llm = self.__dict__.pop("_llm", None)
        if llm is None:
            return
        llm.llm_engine.engine_core.shutdown()
        del llm
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        # Torch distributed state is per process: tear it down so that another engine can start here.
        destroy_model_parallel()
        destroy_distributed_environment()
        gc.collect()


class _CountedTensors:
    """An iterable of (name, tensor) that counts what the engine consumed (an empty load is an error)."""

    def __init__(self, named_tensors: Iterable[tuple[str, Tensor]]):
        self._source = named_tensors
        self.count = 0

    def __iter__(self) -> Iterator[tuple[str, Tensor]]:
        for item in self._source:
            self.count += 1
            yield item


def to_vllm_sampling_params(params: SamplingParams, seed: int | None):
    """Our SamplingParams (one sample) -> vllm.SamplingParams, field by field.

    ``top_k <= 0`` disables top-k (vLLM's 0); EOS is ignored unless listed in ``stop_token_ids``;
    text is produced only when stop strings need it, and special tokens stay in it as in the torch engine.
    """
    import vllm

    return vllm.SamplingParams(
        n=1,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k if params.top_k > 0 else 0,
        max_tokens=params.max_tokens,
        stop_token_ids=list(params.stop_token_ids),
        stop=list(params.stop_strings) or None,
        seed=seed,
        ignore_eos=True,
        logprobs=0,
        flat_logprobs=True,
        detokenize=bool(params.stop_strings),
        skip_special_tokens=False,
    )


def _group_results(requests: Sequence[GenRequest], outputs: Sequence[Any]) -> list[list[GenResult]]:
    """One vLLM RequestOutput per sample, in request-major order -> results grouped per request.

    The token accounting of a request's ``n`` samples is summed onto its first result (types.GenResult).
    """
    grouped: list[list[GenResult]] = []
    position = 0
    for request in requests:
        samples = outputs[position : position + request.n]
        position += request.n
        context_len = len(request.context_ids)
        stats = TokenStats()
        results = []
        for output in samples:
            completion = output.outputs[0]
            cached = output.num_cached_tokens or 0
            stats = stats + TokenStats(context_len - cached, cached, len(completion.token_ids))
            results.append(
                GenResult(
                    token_ids=tuple(completion.token_ids),
                    logprobs=_sampled_logprobs(completion),
                    finish_reason=_finish_reason(completion.finish_reason),
                )
            )
        results[0] = GenResult(results[0].token_ids, results[0].logprobs, results[0].finish_reason, stats)
        grouped.append(results)
    return grouped


def _sampled_logprobs(completion: Any) -> tuple[float, ...]:
    """The logprob of each sampled token of a vLLM CompletionOutput requested with ``logprobs=0``."""
    token_ids = list(completion.token_ids)
    flat = completion.logprobs
    # With logprobs=0 each position holds exactly the sampled token: the flat lists line up with the tokens.
    if hasattr(flat, "token_ids") and list(flat.token_ids) == token_ids:
        return tuple(flat.logprobs)
    return tuple(position[token].logprob for token, position in zip(token_ids, flat, strict=True))


def _finish_reason(reason: str | None) -> FinishReason:
    if reason not in _FINISH_REASONS:
        raise ValueError(f"vLLM returned an unknown finish reason {reason!r}; known: {sorted(_FINISH_REASONS)}")
    return _FINISH_REASONS[reason]


def _names_of_empty_parameters(model) -> list[str]:
    """Parameters emptied by weight repacking (their data lives in kernel-specific handles instead)."""
    return [name for name, param in model.named_parameters() if param.numel() == 0]
