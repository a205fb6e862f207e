"""Data: the StepSearch record schema and loaders, prompt templates, the synthetic multi-hop world
and the MuSiQue converter. Importable without jax."""

from stepsearch_jax.data.records import (Record, RecordError, load_records, record_from_row,
                                         render_prompt, write_records)
from stepsearch_jax.data.templates import TEMPLATES, make_prompt

__all__ = ["Record", "RecordError", "load_records", "record_from_row", "render_prompt",
           "write_records", "TEMPLATES", "make_prompt"]
