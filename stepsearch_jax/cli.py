"""Shared absl flag handling for the entry points (train, evaluate, serve).

Every entry point takes ``--config configs/X.py[:arg]`` with ``--config.a.b=value`` overrides
(ml_collections.config_flags). Unknown override keys and wrong types fail while flags are parsed;
:func:`parse_flags` turns those failures into one line naming the key instead of a traceback, and
:func:`load` then validates combinations of values.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from stepsearch_jax import config as config_lib
from stepsearch_jax import hostmem

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file, optionally with ':arg' for get_config(arg).",
    lock_config=True)


def parse_flags(argv):
  """absl flags parser that reports bad config keys/values in one line naming the key."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"FATAL flags error: {e}")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    bad = [a for a in argv[1:] if a.startswith("--config.")]
    msg = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'")
    sys.exit(f"FATAL config error in {' '.join(bad) or 'config'}: {msg}")


def run(main):
  """app.run with the friendly config parser; library INFO logs (orbax, absl) only on request.

  First re-executes the process with huge-page host allocations (see `hostmem`).
  """
  hostmem.reexec_with_hugepages()
  def quiet_main(argv):
    if not any(a.startswith(("--verbosity", "-v")) for a in sys.argv[1:]):
      logging.set_verbosity(logging.WARNING)
    return main(argv)
  app.run(quiet_main, flags_parser=parse_flags)


def config_source() -> tuple[str, str | None]:
  """(file, arg) of `--config FILE.py[:arg]`."""
  spec = config_flags.get_config_filename(flags.FLAGS["config"])
  path, _, arg = spec.partition(":")
  return path, arg or None


def load(optional: bool = False):
  """Return the validated config given on the command line; exits naming the bad key.

  `optional`: without --config, the base config (serve --hf DIR needs nothing else: the folder
  holds the model and the tokenizer).
  """
  cfg = _CONFIG.value
  if cfg is None and optional:
    cfg = config_lib.base_config()
  if cfg is None:
    sys.exit("FATAL --config is required, e.g. --config configs/demo.py:smoke")
  try:
    cfg = config_lib.validate(cfg)
  except ValueError as e:
    sys.exit(f"FATAL config error: {e}")
  if cfg.compile_cache_dir != "none":
    from retrieval.encoder import enable_compilation_cache   # the one home of the cache settings
    enable_compilation_cache(cfg.compile_cache_dir or None)
  return cfg
