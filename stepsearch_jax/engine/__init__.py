"""JetStream engine over the Flax decoder (engine.py), its compat shims (compat.py, imported first)."""

from stepsearch_jax.engine import compat  # noqa: F401  (before any jetstream import)
from stepsearch_jax.engine.engine import DecodeState, Prefix, StepSearchEngine
from stepsearch_jax.engine.sampling import SamplingParams
from stepsearch_jax.engine.tokenizer import HFTokenizer, stop_sequences

__all__ = ["StepSearchEngine", "SamplingParams", "DecodeState", "Prefix", "HFTokenizer",
           "stop_sequences"]
