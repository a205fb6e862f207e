"""stepsearch_jax: train LLM search agents with StePPO in JAX (see README.md)."""

__version__ = "0.1.0"
