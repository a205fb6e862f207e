"""bench/search_r1_cpu.py runs a GPU-minded server file unchanged on a CPU, on the port we pick.

Search-R1's own retrieval_server.py is not shipped here, so the file served is one written in the
same way: it moves a torch module and a tensor with `.cuda()`, calls `torch.cuda.empty_cache()`
and `.half()`, and hard-codes `uvicorn.run(app, host="0.0.0.0", port=8000)`. Served through the
launcher (a real uvicorn process), it must answer on the chosen loopback port, and `--fp32` must
keep the module in float32.
"""

import os
import subprocess
import sys
import textwrap
import time

import httpx
import portpicker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SERVER = textwrap.dedent('''
    import sys
    import torch, uvicorn
    from fastapi import FastAPI
    model = torch.nn.Linear(2, 2).cuda()
    if "--half" in sys.argv:
        model = model.half()
    app = FastAPI()

    @app.post("/retrieve")
    def retrieve():
        x = torch.zeros(1, 2).cuda()
        torch.cuda.empty_cache()
        return {"result": [[]], "dtype": str(next(model.parameters()).dtype), "argv": sys.argv[1:],
                "device": str(x.device)}

    uvicorn.run(app, host="0.0.0.0", port=8000)
''')


def _serve(tmp_path, *extra):
  path = tmp_path / "retrieval_server.py"
  path.write_text(SERVER)
  port = portpicker.pick_unused_port()
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "bench", "search_r1_cpu.py"),
                           str(path), "--port", str(port), *extra],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  deadline = time.time() + 120
  try:
    while True:
      assert proc.poll() is None, proc.stdout.read().decode()
      try:
        return httpx.post(f"http://127.0.0.1:{port}/retrieve", timeout=5).json()
      except httpx.HTTPError:
        assert time.time() < deadline, "launcher did not serve on the chosen port"
        time.sleep(0.5)
  finally:
    proc.terminate()
    proc.wait(timeout=30)


def test_launcher_serves_unchanged_file_on_cpu(tmp_path):
  got = _serve(tmp_path, "--half", "--topk", "3")
  assert got["device"] == "cpu"
  assert got["argv"] == ["--half", "--topk", "3"]     # its own arguments pass through
  assert got["dtype"] == "torch.float16"               # as shipped: its .half() applies


def test_launcher_fp32_skips_half(tmp_path):
  assert _serve(tmp_path, "--fp32", "--half")["dtype"] == "torch.float32"


def _bench_retrieval():
  """bench/retrieval.py as a module (its file name would shadow the `retrieval` package)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("bench_retrieval",
                                                os.path.join(ROOT, "bench", "retrieval.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_start_search_r1_waits_for_an_answer_and_passes_our_index(tmp_path):
  path = tmp_path / "retrieval_server.py"
  path.write_text(SERVER)
  bench = _bench_retrieval()
  proc, url = bench.start_search_r1(str(path), sys.executable, str(tmp_path), "corpus.jsonl",
                                    "minilm_dir", fp32=True, timeout_s=120)
  try:
    got = httpx.post(f"{url}/retrieve", timeout=5).json()
    argv = got["argv"]
    assert argv[argv.index("--index_path") + 1] == str(tmp_path / "index.faiss")
    assert argv[argv.index("--retriever_model") + 1] == "minilm_dir"
    assert got["dtype"] == "torch.float32" and got["device"] == "cpu"
  finally:
    proc.terminate()
    proc.wait(timeout=30)


def test_start_search_r1_failure_carries_the_log_and_a_hint(tmp_path):
  path = tmp_path / "retrieval_server.py"
  path.write_text("import datasets_is_missing_here as datasets\n")
  try:
    _bench_retrieval().start_search_r1(str(path), sys.executable, str(tmp_path), "c", "e",
                                       fp32=False, timeout_s=60)
  except SystemExit as e:
    msg = str(e)
  else:
    raise AssertionError("a server that cannot import must not count as started")
  assert "exited with code 1" in msg and "datasets_is_missing_here" in msg
  assert "needs `datasets`" in msg and "search_r1_server_" in msg   # the log file is named
