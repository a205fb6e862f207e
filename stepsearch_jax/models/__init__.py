"""Flax NNX Qwen2/Llama policy and value models: functional API on pure-dict params.

See api.py (init/apply/KV cache/value), hf.py (HF folders), params.py (parameter shapes and
logical axes), sharding.py (mesh and RULES).
"""

from stepsearch_jax.models.api import (CACHE_SEQ_AXIS, apply_lm, apply_value, cache_put_window,
                                       cache_window, default_positions, segment_positions,
                                       forward_cached,
                                       hidden_states, init_cache, init_params, init_value_params,
                                       logits_from_hidden, split_layers)
from stepsearch_jax.models.config import ModelConfig
from stepsearch_jax.models.hf import load_pretrained, load_tokenizer, save_pretrained
from stepsearch_jax.models.smollm2_gguf import smollm2_path

__all__ = ["ModelConfig", "init_params", "apply_lm", "hidden_states", "logits_from_hidden",
           "init_cache", "cache_window", "cache_put_window", "CACHE_SEQ_AXIS", "forward_cached", "split_layers", "init_value_params", "apply_value", "load_pretrained",
           "save_pretrained", "load_tokenizer", "smollm2_path", "default_positions",
           "segment_positions"]
