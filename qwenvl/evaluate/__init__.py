"""Evaluation: per-task scores of a model's answers on held-out JSONL sets (`qwenvl eval`)."""
from .harness import evaluate, load_samples, markdown_table, prompt_messages, write_report
from .scoring import TASK_METRICS, aggregate, eval_task, primary_metric, reference_text, score, task_of

__all__ = ["evaluate", "load_samples", "markdown_table", "prompt_messages", "write_report", "TASK_METRICS",
           "aggregate", "eval_task", "primary_metric", "reference_text", "score", "task_of"]
