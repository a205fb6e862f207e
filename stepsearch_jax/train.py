"""Train a search agent with StePPO (or PPO / GRPO by name).

    python -m stepsearch_jax.train --config configs/demo.py[:arg] --workdir DIR [--config.a.b=value]
"""

from __future__ import annotations

import json

from absl import flags, logging

from stepsearch_jax import cli
from stepsearch_jax import config as config_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder: config, checkpoints, metrics.",
                               required=True)
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Parse, validate and write the config, then exit.")
_EXPORT_HF = flags.DEFINE_string("export_hf", None,
                                 "After training, write the final policy as a Hugging Face folder.")


def main(argv):
  del argv
  cfg = cli.load()
  path = config_lib.write_config(cfg, _WORKDIR.value)
  logging.info("resolved config written to %s", path)
  print(f"config: {path}")
  print(json.dumps({"algo": cfg.algo.name, "total_steps": cfg.total_steps}, indent=None))


if __name__ == "__main__":
  cli.run(main)
