"""Models: resolve ``model.path`` to a local HF directory, build the tiny model, load tokenizer and weights.

``model.path=tiny`` builds a randomly initialised Qwen2-architecture causal LM plus a byte-level BPE tokenizer
trained on the task's own text, entirely offline, and caches it under ``model.cache_dir`` keyed by a hash of the
tiny-model parameters and the corpus. Any other value is a local HF model directory or a hub name.

Why a BPE and not a char-level tokenizer: for ``model_type: qwen2`` transformers 5.x always rebuilds a
``Qwen2Tokenizer`` (byte-level BPE with Qwen's split regex) from vocab + merges, so the tokenizer we save must
be exactly that kind of tokenizer or AutoTokenizer and vLLM would silently tokenize differently.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.utils import logging as hf_logging

from rltrain.config import ConfigError, check_kwargs
from rltrain.fsutil import fsync_tree, replace_dir

# Qwen2's pre-tokenizer split: ``\p{N}`` alone means every digit is its own pre-token, so BPE never merges
# digits and the model sees numbers digit by digit (what makes multi-digit arithmetic learnable).
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (EOS_TOKEN, IM_START, IM_END)  # ids 0, 1, 2
# Qwen-style ChatML without Qwen's default system message: a system turn appears only when given.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_BYTE_ALPHABET_SIZE = 256
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TINY_CACHE_VERSION = 1  # bump when build_tiny_model's output changes for the same inputs


def train_bpe_tokenizer(corpus: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE (Qwen2 split regex, NFC, ByteLevel decoder) with the special tokens at ids 0-2."""
    min_vocab = _BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least {min_vocab}")
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    # The same normalizer / pre-tokenizer / decoder that transformers' Qwen2Tokenizer rebuilds on load.
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return tokenizer


def _wrap_tokenizer(tokenizer: Tokenizer, max_length: int) -> PreTrainedTokenizerFast:
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def _tiny_config(
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    max_position_embeddings: int,
) -> Qwen2Config:
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"need hidden_size % num_heads == 0 and num_heads % num_kv_heads == 0, got "
            f"hidden_size={hidden_size}, num_heads={num_heads}, num_kv_heads={num_kv_heads}"
        )
    eos_id = SPECIAL_TOKENS.index(EOS_TOKEN)
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        max_window_layers=num_layers,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        dtype="float32",
    )


def build_tiny_model(
    out_dir: str,
    corpus: Iterable[str],
    *,
    hidden_size: int = 64,
    intermediate_size: int = 256,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    vocab_size: int = 512,
    max_position_embeddings: int = 512,
    seed: int = 0,
) -> str:
    """Train a BPE on ``corpus``, build a random float32 Qwen2ForCausalLM and save both to ``out_dir``.

    Deterministic for a given seed and corpus. The directory appears atomically (built next to it, then
    renamed), so a crash never leaves a half-written model; an existing ``out_dir`` is replaced.
    Returns ``out_dir``.
    """
    config = _tiny_config(
        vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, max_position_embeddings
    )
    tokenizer = _wrap_tokenizer(train_bpe_tokenizer(corpus, vocab_size), max_position_embeddings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).to(torch.float32)
    # Stop on either end marker: plain completions end with <|endoftext|>, chat turns with <|im_end|>.
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids(EOS_TOKEN), tokenizer.convert_tokens_to_ids(IM_END)],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tiny-", dir=parent)
    os.chmod(staging, 0o755)  # mkdtemp makes it owner-only; the model dir should be readable like any other
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        fsync_tree(staging)
        replace_dir(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


_TINY_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(build_tiny_model).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
}


def corpus_fingerprint(corpus: Iterable[str]) -> str:
    """sha256 over the corpus texts, order included (BPE merges depend on the text)."""
    digest = hashlib.sha256()
    for text in corpus:
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()


def tiny_cache_key(tiny: dict[str, Any], corpus_hash: str) -> str:
    payload = json.dumps({"v": _TINY_CACHE_VERSION, "tiny": dict(tiny), "corpus": corpus_hash}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def resolve_model(path: str, cache_dir: str, tiny: dict, corpus_fn: Callable[[], Iterable[str]]) -> str:
    """Turn ``model.path`` into a local HF model directory.

    - ``"tiny"``: build (or reuse) the tiny model under ``cache_dir/tiny-<hash>``; ``corpus_fn`` gives its
      BPE training text and is part of the hash, so a different task gets a different tokenizer.
    - a local directory: must hold ``config.json``.
    - anything else: a hub name, fetched with ``huggingface_hub.snapshot_download`` (honours HF_HUB_OFFLINE).
    Raises ``ConfigError`` naming ``model.path`` when none of these works.
    """
    if path == "tiny":
        check_kwargs(build_tiny_model, dict(tiny), "model.tiny")
        # Defaults filled in, so that {} and the same values spelled out share one cache entry.
        params = {**_TINY_DEFAULTS, **tiny}
        corpus = list(corpus_fn())
        cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
        model_dir = os.path.join(cache_dir, f"tiny-{tiny_cache_key(params, corpus_fingerprint(corpus))}")
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            build_tiny_model(model_dir, corpus, **params)
        return model_dir
    local = os.path.expanduser(path)
    if os.path.isdir(local):
        if not os.path.isfile(os.path.join(local, "config.json")):
            raise ConfigError(f"model.path={path!r} is a directory without config.json (not an HF model dir)")
        return os.path.abspath(local)
    if path.startswith(("/", ".", "~")):
        raise ConfigError(f"model.path={path!r}: no such directory")
    return _download_from_hub(path)


def _download_from_hub(repo_id: str) -> str:
    from huggingface_hub import snapshot_download

    try:
        # A short etag timeout: with no network the request fails fast instead of hanging.
        return snapshot_download(repo_id, etag_timeout=10)
    except Exception as exc:  # any hub failure (offline, unknown repo, no network) becomes one clear error
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        reason = "HF_HUB_OFFLINE is set and it is not in the local HF cache" if offline else "the hub is unreachable"
        raise ConfigError(
            f"model.path={repo_id}: not a local directory and {reason} ({type(exc).__name__}: {exc})"
        ) from exc


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """AutoTokenizer for ``path``, with a pad token (the EOS token when the model defines none)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer at {path} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str, dtype: str = "float32") -> PreTrainedModel:
    """AutoModelForCausalLM for ``path`` in ``dtype`` (float32 | bfloat16 | float16)."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {list(_DTYPES)}")
    # Per-load progress bars would repeat in every actor's log at every resume and sync.
    hf_logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype])


def select_cache_rows(cache, index: torch.Tensor):
    """A transformers KV cache (``DynamicCache``) whose row i is row ``index[i]`` of ``cache`` (rows repeated or
    dropped; differentiable, so a shared prompt's cache may feed the rows that continue it in training)."""
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, index)
        layer.values = layer.values.index_select(0, index)
    return cache
