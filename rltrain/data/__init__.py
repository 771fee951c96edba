"""Task data: procedural tasks, file / HF loaders, prompt templates and the resumable prompt stream."""

from rltrain.data.loaders import DataError, load_task_data
from rltrain.data.prompts import render_completion, render_prompt, task_corpus
from rltrain.data.stream import PromptStream
from rltrain.data.tasks import evaluate_expression, generate_task

__all__ = [
    "DataError",
    "PromptStream",
    "evaluate_expression",
    "generate_task",
    "load_task_data",
    "render_completion",
    "render_prompt",
    "task_corpus",
]
