"""Data curation tools for any JSONL conversation set (the report's SFT filtering as reusable steps):
rule-based filters, domain tagging, model-based scoring (the model's own answer log-likelihood) and
rejection sampling against ground truth. `qwenvl data ...` runs them (cli.main)."""
from .filters import RULES, check, filter_records
from .tagging import TAGS, tag, tag_records, task_for

__all__ = ["RULES", "check", "filter_records", "TAGS", "tag", "tag_records", "task_for"]
