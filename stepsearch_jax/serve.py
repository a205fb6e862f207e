"""Serve the policy with JetStream's own orchestrator and gRPC server, on loopback.

  python -m stepsearch_jax.serve --config configs/demo.py --hf DIR --port 9000
  python -m stepsearch_jax.serve --config configs/demo.py --checkpoint WORKDIR --port 9000

Clients use JetStream's stub: ``jetstream_pb2_grpc.OrchestratorStub(channel).Decode(
DecodeRequest(token_content=..., max_tokens=N))`` streams the sampled token ids (text content
works too; it is tokenised with the policy's Hugging Face tokenizer). Decoding uses the engine's
default sampling: greedy unless ``--temperature`` > 0.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from absl import flags, logging

from stepsearch_jax.engine import compat  # noqa: F401  (before jetstream imports)
from jetstream.core import config_lib, server_lib  # pylint: disable=g-bad-import-order

from stepsearch_jax.engine.engine import SamplingParams, StepSearchEngine

LOOPBACK = "127.0.0.1"

_HF = flags.DEFINE_string("hf", None, "Hugging Face model folder (config.json + safetensors).")
_CKPT = flags.DEFINE_string("checkpoint", None, "Training workdir (or its checkpoints/ folder): "
                            "the latest step's policy and the workdir's tokenizer.")
_PORT = flags.DEFINE_integer("port", 9000, "gRPC port on 127.0.0.1.")
_TEMP = flags.DEFINE_float("temperature", 0.0, "Default sampling temperature (0 = greedy).")
_SLOTS = flags.DEFINE_integer("slots", None, "Decode slots (default config.rollout.num_slots).")


def start_server(engine: StepSearchEngine, port: int, host: str = LOOPBACK,
                 threads: int | None = None) -> server_lib.JetStreamServer:
  """Run `server_lib.run` (orchestrator Driver + gRPC) with `engine` interleaved on one device."""
  device = engine.mesh.devices.flat[0]
  config = config_lib.ServerConfig(
      interleaved_slices=(f"{device.platform}=1",),
      interleaved_engine_create_fns=(lambda devices: engine,))
  # server_lib binds its module-level _HOST ("[::]", every interface); we serve loopback only.
  server_lib._HOST = host  # pylint: disable=protected-access
  return server_lib.run(port=port, config=config, devices=[device], threads=threads)


def _load_policy(cfg) -> tuple[Any, Any, Any]:
  """The one policy loader (workspace.load_policy); --checkpoint may name the workdir or its
  checkpoints/ folder."""
  from stepsearch_jax import workspace
  path = _HF.value or _CKPT.value
  if not path:
    raise SystemExit("FATAL give --hf DIR or --checkpoint DIR")
  if _CKPT.value and os.path.basename(os.path.normpath(path)) == "checkpoints":
    path = os.path.dirname(os.path.normpath(path))
  try:
    return workspace.load_policy(path, cfg.model.dtype)
  except FileNotFoundError as e:
    raise SystemExit(f"FATAL {e}") from None


def main(argv) -> None:
  del argv
  from stepsearch_jax import cli
  cfg = cli.load(optional=bool(_HF.value))
  mconfig, params, tok = _load_policy(cfg)
  from stepsearch_jax import workspace
  r = cfg.rollout
  sampling = (SamplingParams(float(_TEMP.value), float(r.top_p), int(r.top_k))
              if _TEMP.value > 0 else SamplingParams.greedy())
  engine = workspace.engine_for(cfg, mconfig, params, tok,
                                num_slots=_SLOTS.value or int(r.num_slots),
                                default_sampling=sampling, max_tokens=int(r.max_tokens_per_turn))
  server = start_server(engine, _PORT.value)
  logging.info("JetStream server on %s:%d", LOOPBACK, _PORT.value)
  print(f"serving on {LOOPBACK}:{_PORT.value}", flush=True)
  stop = threading.Event()
  signal.signal(signal.SIGTERM, lambda *_: stop.set())
  try:
    while not stop.wait(1.0):
      pass
  except KeyboardInterrupt:
    pass
  server.stop()


if __name__ == "__main__":
  from stepsearch_jax import cli as _cli
  _cli.run(main)
