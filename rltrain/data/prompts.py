"""Prompt templates: turn a data row into the text the model continues, and the SFT target that follows it.

- ``plain``: the question text as is (``"23+58="``); the completion continues it directly.
- ``chat``: the tokenizer's chat template with ``add_generation_prompt=True``.

A row's ``prompt`` is a string, or a list of chat messages ``[{"role", "content"}, ...]`` (as in DAPO-Math).
Tokenize the prompt and the completion separately and concatenate the ids: a BPE may merge characters across
the boundary (``"=-"``), and generation always starts a fresh token after the prompt.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # transformers is heavy to import; only the type is needed here
    from transformers import PreTrainedTokenizerBase

TEMPLATES = ("plain", "chat")


def _messages(row: dict[str, Any], system_prompt: str | None) -> list[dict[str, str]]:
    prompt = row["prompt"]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if system_prompt is not None and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def _check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise ValueError(f"template={template!r} is not one of {list(TEMPLATES)}")


def render_prompt(
    row: dict[str, Any], tokenizer: PreTrainedTokenizerBase, template: str = "plain", system_prompt: str | None = None
) -> str:
    """The text the model continues for ``row``.

    plain: ``row["prompt"]`` as is, preceded by ``system_prompt + "\\n"`` when given (a message-list prompt
    becomes its contents joined by blank lines).
    chat: ``tokenizer.apply_chat_template(..., add_generation_prompt=True)``.
    """
    _check_template(template)
    if template == "plain":
        prompt = row["prompt"]
        text = prompt if isinstance(prompt, str) else "\n\n".join(m["content"] for m in prompt)
        return text if system_prompt is None else f"{system_prompt}\n{text}"
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"data.template=chat but the tokenizer {type(tokenizer).__name__} has no chat_template; "
            "use data.template=plain"
        )
    return tokenizer.apply_chat_template(_messages(row, system_prompt), tokenize=False, add_generation_prompt=True)


def render_completion(
    row: dict[str, Any], tokenizer: PreTrainedTokenizerBase, template: str = "plain", system_prompt: str | None = None
) -> str:
    """The SFT target after ``render_prompt``: ``row["solution"]`` plus the end marker the model must learn.

    plain: solution + eos token. chat: what the chat template puts after the generation prompt for an
    assistant turn holding the solution (for ChatML: ``"81<|im_end|>"``), trailing whitespace removed.
    """
    _check_template(template)
    if "solution" not in row:
        raise KeyError(f"row {row.get('id', '?')} has no 'solution' (the SFT target); SFT needs one per row")
    if template == "plain":
        return row["solution"] + tokenizer.eos_token
    prompt = render_prompt(row, tokenizer, "chat", system_prompt)
    messages = _messages(row, system_prompt) + [{"role": "assistant", "content": row["solution"]}]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError(
            "the chat template renders the conversation so that it does not start with the generation prompt; "
            "cannot split prompt from completion (use data.template=plain)"
        )
    return full[len(prompt) :].rstrip()


def task_corpus(rows: Iterable[dict[str, Any]], system_prompt: str | None = None) -> Iterator[str]:
    """Text to train the tiny model's BPE on: each row's prompt and solution as plain text and as ChatML turns.

    Special tokens are left out (the tokenizer adds them whole). Deterministic in row order.
    """
    if system_prompt is not None:
        yield system_prompt
        yield f"system\n{system_prompt}"
    for row in rows:
        prompt = row["prompt"]
        texts = [prompt] if isinstance(prompt, str) else [m["content"] for m in prompt]
        solution = row.get("solution", "")
        yield from texts
        yield texts[-1] + solution
        yield from (f"user\n{text}" for text in texts)
        if solution:
            yield solution
            yield f"assistant\n{solution}"
