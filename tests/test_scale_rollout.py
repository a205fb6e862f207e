"""Greedy rollouts on 8 virtual CPU devices (meshes 1x8x1 and 2x2x2) equal one device, token for
token, with the KV cache really split: every device holds 1/8 of it.

A warm-started toy policy (4 heads, 2 KV heads, so tensor=2 splits KV heads) searches a real
retrieval server; XLA_FLAGS must be set before jax is imported, so it runs in a subprocess.
"""

import json
import os
import subprocess
import sys

_SCRIPT = r"""
import json, jax, numpy as np, ml_collections
from retrieval.server import start_subprocess
from stepsearch_jax.engine import StepSearchEngine
from stepsearch_jax.models.sharding import make_mesh
from stepsearch_jax.rollout.driver import rollout
from stepsearch_jax.rollout.retriever import RetrieverClient
import toy_world
assert len(jax.devices()) == 8, jax.devices()
world = toy_world.build_world(OUT + "/world", num_people=20, num_train=24, num_test=8)
proc, url = start_subprocess(world["index_dir"], timeout_s=120)
try:
  retriever = RetrieverClient(url, topk=3)
  config, params = toy_world.train_policy(world, retriever, hidden=128, steps=60, batch_size=8,
                                          lr=1e-2, limit=24)
  from stepsearch_jax import config as config_lib
  cfg = config_lib.base_config().rollout
  cfg.update(dict(driver="native", max_turns=3, max_tokens_per_turn=80, max_obs_tokens=800,
                  max_context=1024, max_start=2048, temperature=1.0, top_p=1.0, top_k=-1, n=1,
                  num_slots=8, prefill_buckets=(64, 128, 256, 512, 1024)))
  records = world["test_records"][:8]
  out = {}
  for name, shape, devices in (("single", (1, 1, 1), jax.devices()[:1]),
                               ("1x8x1", (1, 8, 1), None), ("2x2x2", (2, 2, 2), None)):
    mesh = make_mesh(shape, devices)
    engine = StepSearchEngine(config, params, world["tokenizer"], num_slots=8,
                              cache_len=1024 + 81, max_prefill_length=1024, mesh=mesh)
    trajs = rollout(engine, records, cfg, retriever, jax.random.PRNGKey(0), greedy=True)
    state = engine.init_decode_state()
    cache = jax.tree.leaves(state.cache)
    per_device = {}
    for leaf in cache:
      for s in leaf.addressable_shards:
        per_device[str(s.device)] = per_device.get(str(s.device), 0) + s.data.nbytes
    out[name] = dict(ids=[t.response_ids for t in trajs], docs=[t.doc_ids for t in trajs],
                     searches=sum(len(t.queries) for t in trajs),
                     total=sum(x.nbytes for x in cache), per_device=per_device,
                     spec=str(cache[0].sharding.spec),
                     param_specs=sorted({str(x.sharding.spec) for x in jax.tree.leaves(engine.params)}),
                     slot_spec=str(state.pos.sharding.spec))
finally:
  proc.terminate()
print("RESULT" + json.dumps(out))
"""


def test_greedy_rollouts_on_8_devices_equal_one_device_and_split_the_cache(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join([root, os.path.join(root, "tests"),  # tests/toy_world.py
                                       env.get("PYTHONPATH", "")])
  proc = subprocess.run([sys.executable, "-c", f"OUT = {str(tmp_path)!r}\n" + _SCRIPT], env=env,
                        capture_output=True, text=True, timeout=900, cwd=root)
  assert proc.returncode == 0, proc.stderr[-4000:]
  res = json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1][6:])
  single = res["single"]
  assert single["searches"] > 0, "the policy never searched"
  assert len(single["per_device"]) == 1
  for name in ("1x8x1", "2x2x2"):
    got = res[name]
    assert got["ids"] == single["ids"], name
    assert got["docs"] == single["docs"], name
    # 8 devices, each with exactly 1/8 of the cache: nothing replicated
    assert len(got["per_device"]) == 8, got["per_device"]
    assert set(got["per_device"].values()) == {got["total"] // 8}, got["per_device"]
    assert "data" in got["slot_spec"] or "fsdp" in got["slot_spec"]
  assert "tensor" in res["2x2x2"]["spec"]                  # KV heads over tensor
  assert any("fsdp" in s for s in res["1x8x1"]["param_specs"])
