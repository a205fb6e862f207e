"""Make `google-jetstream==0.2.2` importable next to current JAX without TensorFlow.

:func:`install` (idempotent) must run before anything imports `jetstream`; the one call is in
``stepsearch_jax/engine/__init__.py``, which Python runs before any module of the package, so
every module that imports jetstream lives in this package or imports it first. Importing this
module does nothing. `install` fixes four things, each only when needed, and changes nothing else:

1. ``jax.tree_map`` was removed from JAX; JetStream's orchestrator still calls it to free prefill
   results. We alias it to ``jax.tree_util.tree_map`` when the attribute is missing.
2. ``jetstream.engine.token_utils`` (imported by ``engine_api``) does
   ``from seqio.vocabularies import SentencePieceVocabulary, Vocabulary``. seqio drags in
   TensorFlow (3.2 GB) and we never use its SentencePiece vocabulary (our engine brings a
   Hugging Face tokenizer). When seqio is absent we register a tiny ``seqio.vocabularies``
   module whose two classes raise a clear error if anyone actually instantiates them. A real
   seqio installation is always preferred.
3. JetStream 0.2.2's orchestrator hands token-id requests (``DecodeRequest.token_content``) to
   ``token_utils.pad_tokens`` as a Python list, which only works when a BOS is prepended
   (``np.concatenate`` makes it an array); without BOS (a request with ``session_cache`` set, i.e.
   a continuation) it fails on ``list.shape``. We wrap ``pad_tokens`` to convert to an array first.
4. ``jetstream.core.orchestrator`` sets the ROOT logger to DEBUG and adds a stdout handler at
   import time, which floods every program that imports it (and slows the decode threads). We
   import it here once and restore the root logger's level and handlers afterwards.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import types

import jax

SEQIO_SHIM = False     # True once install() registered the seqio placeholder


def install() -> None:
  """Apply the four fixes (module docstring) once; later calls do nothing."""
  global SEQIO_SHIM
  if getattr(install, "done", False):
    return
  if not hasattr(jax, "tree_map"):
    jax.tree_map = jax.tree_util.tree_map  # type: ignore[attr-defined]
  SEQIO_SHIM = _install_seqio_shim()
  _import_jetstream_keeping_logging()
  _patch_pad_tokens()
  install.done = True


def _install_seqio_shim() -> bool:
  """Registers a minimal `seqio.vocabularies` when seqio is not installed; returns True if so."""
  if "seqio" in sys.modules or importlib.util.find_spec("seqio") is not None:
    return False

  class Vocabulary:
    """Placeholder for seqio's abstract vocabulary (type annotations in token_utils only)."""

    def __init__(self, *args, **kwargs):
      raise RuntimeError("seqio is not installed: JetStream's SentencePiece vocabularies are not "
                         "available; stepsearch_jax engines use a Hugging Face tokenizer instead")

  class SentencePieceVocabulary(Vocabulary):
    pass

  seqio = types.ModuleType("seqio")
  vocabularies = types.ModuleType("seqio.vocabularies")
  vocabularies.Vocabulary = Vocabulary
  vocabularies.SentencePieceVocabulary = SentencePieceVocabulary
  seqio.vocabularies = vocabularies
  seqio.__stepsearch_shim__ = True
  sys.modules["seqio"] = seqio
  sys.modules["seqio.vocabularies"] = vocabularies
  return True


def _import_jetstream_keeping_logging() -> None:
  root = logging.getLogger()
  level, handlers = root.level, list(root.handlers)
  try:
    import jetstream.core.orchestrator  # noqa: F401  pylint: disable=unused-import,g-import-not-at-top
    import jetstream.engine.engine_api  # noqa: F401  pylint: disable=unused-import,g-import-not-at-top
  finally:
    for h in list(root.handlers):
      if h not in handlers:
        root.removeHandler(h)
    root.setLevel(level)


def _patch_pad_tokens() -> None:
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jetstream.engine import token_utils  # pylint: disable=g-import-not-at-top
  original = token_utils.pad_tokens
  if getattr(original, "__stepsearch_patched__", False):
    return

  def pad_tokens(tokens, *args, **kwargs):
    return original(np.asarray(tokens, np.int32), *args, **kwargs)

  pad_tokens.__stepsearch_patched__ = True
  pad_tokens.__doc__ = original.__doc__
  token_utils.pad_tokens = pad_tokens
