"""JetStream engine over the Flax decoder (engine.py). The package's first act is the one
``compat.install()`` call (JetStream 0.2.2 next to current JAX, no TensorFlow): Python runs this
file before any module of the package, so everything here may import jetstream at module level."""

from stepsearch_jax.engine import compat

compat.install()

# pylint: disable=g-import-not-at-top,wrong-import-position
from stepsearch_jax.engine.engine import DecodeState, Prefix, StepSearchEngine  # noqa: E402
from stepsearch_jax.engine.sampling import SamplingParams  # noqa: E402
from stepsearch_jax.engine.tokenizer import HFTokenizer, stop_sequences  # noqa: E402

__all__ = ["StepSearchEngine", "SamplingParams", "DecodeState", "Prefix", "HFTokenizer",
           "stop_sequences"]
