"""Run Search-R1's `retrieval_server.py`, file unchanged, on a CPU and a port of our choosing.

  .venv/bin/python bench/search_r1_cpu.py PATH/retrieval_server.py --port N [its own arguments]

Their server is written for a GPU: it calls `.cuda()` on the encoder and on every batch of
inputs, `torch.cuda.empty_cache()` after each, and listens on port 8000. This launcher makes those
three calls CPU-safe (`.cuda()` returns the object itself, the cache call does nothing) and points
`uvicorn.run` at `--port` on loopback, then executes the file as `__main__` with the remaining
arguments. Nothing else is touched, so its tokenisation, fp16 choice, pooling, batching and
response building are exactly what Search-R1 users run. It needs what that file imports
(torch, transformers, faiss, fastapi, uvicorn, datasets); `datasets` is not in our pinned set, so
the bench reports a clear error if it is missing. Used by `bench/retrieval.py --search_r1 PATH`.

`--fp32` is the one deliberate change, off by default: the file hard-codes
`retrieval_use_fp16=True`, which on a CPU (no fast fp16 matmul) makes its encoder several times
slower; with `--fp32`, `.half()` returns the model unchanged, as a Search-R1 user who edited that
line for a CPU would run it (and as our encoder runs: float32).
"""

import argparse
import runpy
import sys


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
  p.add_argument("server", help="path to Search-R1's search_r1/search/retrieval_server.py")
  p.add_argument("--port", type=int, required=True)
  p.add_argument("--fp32", action="store_true", help="keep the encoder in float32 (no .half())")
  args, rest = p.parse_known_args()
  import torch
  import uvicorn
  torch.nn.Module.cuda = lambda self, *a, **k: self
  torch.Tensor.cuda = lambda self, *a, **k: self
  torch.cuda.empty_cache = lambda: None
  if args.fp32:
    torch.nn.Module.half = lambda self: self
  run = uvicorn.run
  uvicorn.run = lambda app, **kw: run(app, host="127.0.0.1", port=args.port, log_level="warning")
  sys.argv = [args.server, *rest]
  runpy.run_path(args.server, run_name="__main__")


if __name__ == "__main__":
  main()
