"""Serve the policy with JetStream's own orchestrator and gRPC server, on loopback.

  python -m stepsearch_jax.serve --config configs/demo.py --hf DIR --port 9000
  python -m stepsearch_jax.serve --config configs/demo.py --checkpoint WORKDIR --port 9000

Clients use JetStream's stub: ``jetstream_pb2_grpc.OrchestratorStub(channel).Decode(
DecodeRequest(token_content=..., max_tokens=N))`` streams the sampled token ids (text content
works too; it is tokenised with the policy's Hugging Face tokenizer). Decoding uses the engine's
default sampling: greedy unless ``--temperature`` > 0.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from concurrent import futures
from typing import Any

import grpc
from absl import flags, logging

from stepsearch_jax.engine.engine import SamplingParams, StepSearchEngine  # compat.install()
from jetstream.core import orchestrator  # pylint: disable=g-bad-import-order
from jetstream.core.proto import jetstream_pb2_grpc

LOOPBACK = "127.0.0.1"

_HF = flags.DEFINE_string("hf", None, "Hugging Face model folder (config.json + safetensors).")
_CKPT = flags.DEFINE_string("checkpoint", None, "Training workdir (or its checkpoints/ folder): "
                            "the latest step's policy and the workdir's tokenizer.")
_PORT = flags.DEFINE_integer("port", 9000, "gRPC port on 127.0.0.1.")
_TEMP = flags.DEFINE_float("temperature", 0.0, "Default sampling temperature (0 = greedy).")
_SLOTS = flags.DEFINE_integer("slots", None, "Decode slots (default config.rollout.num_slots).")


class Server:
  """JetStream's orchestrator (its Driver and LLMOrchestrator servicer, `engine` interleaved: one
  engine prefills and decodes) behind a grpc.aio server bound to `host:port` only. JetStream's
  own server_lib binds every interface ("[::]") with no option, so the gRPC side is ours."""

  def __init__(self, engine: StepSearchEngine, port: int, host: str, threads: int | None):
    params = engine.load_params()
    self.driver = orchestrator.Driver(prefill_engines=[engine], generate_engines=[engine],
                                      prefill_params=[params], generate_params=[params],
                                      interleaved_mode=True, jax_padding=True)
    threads = threads or max(self.driver.get_total_concurrent_requests(), 64)
    self._executor = futures.ThreadPoolExecutor(max_workers=threads)
    self._loop = asyncio.new_event_loop()
    self._loop.set_default_executor(self._executor)
    self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
    self._thread.start()

    async def start():
      server = grpc.aio.server(self._executor)
      jetstream_pb2_grpc.add_OrchestratorServicer_to_server(
          orchestrator.LLMOrchestrator(driver=self.driver), server)
      if not server.add_insecure_port(f"{host}:{port}"):
        raise OSError(f"cannot bind the gRPC server to {host}:{port}")
      await server.start()
      return server

    try:
      self._grpc = asyncio.run_coroutine_threadsafe(start(), self._loop).result()
    except BaseException:
      self.driver.stop()
      self._loop.call_soon_threadsafe(self._loop.stop)
      raise

  def stop(self) -> None:
    self.driver.stop()
    asyncio.run_coroutine_threadsafe(self._grpc.stop(grace=5), self._loop).result()
    self._loop.call_soon_threadsafe(self._loop.stop)
    self._thread.join(timeout=30)
    self._executor.shutdown(wait=False)


def start_server(engine: StepSearchEngine, port: int, host: str = LOOPBACK,
                 threads: int | None = None) -> Server:
  """Serve `engine` over JetStream's gRPC API on `host:port` (loopback by default)."""
  return Server(engine, port, host, threads)


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
