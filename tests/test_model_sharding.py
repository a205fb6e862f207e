"""The model on a 2x2x2 (data, fsdp, tensor) mesh of 8 virtual CPU devices equals one device.

Runs in a subprocess because XLA_FLAGS must be set before jax is imported (and must not leak into
the rest of the suite).
"""

import os
import subprocess
import sys
import textwrap

import pytest

from stepsearch_jax.models import sharding

SCRIPT = textwrap.dedent(r"""
  import os, sys, tempfile
  import jax, jax.numpy as jnp, numpy as np
  assert jax.device_count() == 8, jax.devices()
  from stepsearch_jax import models
  from stepsearch_jax.models.sharding import (make_mesh, param_shardings, shard_params,
                                              logical_sharding, cache_sharding)

  cfg = models.ModelConfig(model_type="qwen2", vocab_size=128, hidden_size=64,
                           intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                           head_dim=16, tie_word_embeddings=False)
  dev0 = jax.devices()[0]
  params = jax.device_put(models.init_params(cfg, jax.random.key(0)), dev0)
  rs = np.random.RandomState(0)
  tokens = rs.randint(0, 128, size=(4, 8)).astype(np.int32)
  mask = np.ones((4, 8), np.int32); mask[1, :3] = 0
  ref = np.asarray(models.apply_lm(cfg, params, jax.device_put(tokens, dev0),
                                   jax.device_put(mask, dev0)))

  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert dict(make_mesh((1, -1, 2)).shape) == {"data": 1, "fsdp": 4, "tensor": 2}
  sharded = shard_params(params, mesh, cfg)
  spec = sharded["layers"]["attn"]["q_kernel"].sharding.spec
  assert tuple(spec) == (None, "fsdp", "tensor", None), spec
  assert tuple(sharded["embedding"].sharding.spec) == ("tensor", "fsdp")
  assert len(sharded["layers"]["mlp"]["up_kernel"].addressable_shards[0].data.shape) == 3
  assert sharded["layers"]["mlp"]["up_kernel"].addressable_shards[0].data.shape == (2, 32, 64)

  batch = logical_sharding(mesh, "batch", "length")
  assert tuple(batch.spec) == (("data", "fsdp"), None)
  tok_s, mask_s = jax.device_put(tokens, batch), jax.device_put(mask, batch)
  # (1) plain call on sharded inputs, (2) jit with explicit NamedShardings under jax.set_mesh.
  out1 = models.apply_lm(cfg, sharded, tok_s, mask_s)
  np.testing.assert_allclose(np.asarray(out1), ref, atol=1e-5, rtol=0)
  fn = jax.jit(lambda p, t, m: models.apply_lm(cfg, p, t, m),
               in_shardings=(param_shardings(cfg, params, mesh), batch, batch),
               out_shardings=logical_sharding(mesh, "batch", "length", "vocab"))
  with jax.set_mesh(mesh):
    out2 = fn(sharded, tok_s, mask_s)
  assert tuple(out2.sharding.spec) == (("data", "fsdp"), None, "tensor")
  np.testing.assert_allclose(np.asarray(out2), ref, atol=1e-5, rtol=0)

  # Gradients (remat on) agree too.
  def loss(p, c, t, m):
    return jnp.mean(models.apply_lm(c, p, t, m) ** 2)
  rc = cfg.replace(remat=True)
  with jax.set_mesh(mesh):
    g = jax.jit(jax.grad(loss), static_argnums=1)(sharded, rc, tok_s, mask_s)
  g0 = jax.grad(loss)(params, cfg, jax.device_put(tokens, dev0), jax.device_put(mask, dev0))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6), g, g0)

  # KV-cache path on a sharded cache.
  cache0 = models.init_cache(cfg, 4, 16)
  lref, _ = models.forward_cached(cfg, params, jax.device_put(tokens, dev0),
                                  models.init_cache(cfg, 4, 16), jnp.zeros(4, jnp.int32))
  cache = jax.device_put(cache0, cache_sharding(mesh, cache0))  # (forward_cached donates it)
  with jax.set_mesh(mesh):
    lsh, cache = models.forward_cached(cfg, sharded, tok_s, cache,
                                       jax.device_put(np.zeros(4, np.int32),
                                                      logical_sharding(mesh, "batch")))
  np.testing.assert_allclose(np.asarray(lsh), np.asarray(lref), atol=1e-5, rtol=0)

  # Loading straight onto shardings; init straight onto shardings.
  with tempfile.TemporaryDirectory() as d:
    models.save_pretrained(d, cfg, params)
    _, loaded = models.load_pretrained(d, mesh=mesh)
  want = param_shardings(cfg, params, mesh)
  jax.tree.map(lambda a, s: (a.sharding == s) or sys.exit(f"{a.sharding} != {s}"), loaded, want)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), loaded, params)
  inited = models.init_params(cfg, jax.random.key(0), mesh=mesh)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7),
               inited, params)
  v = models.init_value_params(cfg, jax.random.key(1), loaded, mesh=mesh)
  assert tuple(v["trunk"]["embedding"].sharding.spec) == ("tensor", "fsdp")
  print("MESH_OK")
""")


def test_mesh_2x2x2_equals_single_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                        timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert proc.returncode == 0 and "MESH_OK" in proc.stdout, proc.stderr[-4000:]


def test_rules_drop_axes_that_do_not_divide():
  spec = sharding.logical_to_spec(("kv_heads", "embed"), (1, 64), {"data": 1, "fsdp": 4,
                                                                    "tensor": 2})
  assert tuple(spec) == (None, "fsdp")
  spec = sharding.logical_to_spec(("batch", "length", "embed"), (8, 3, 64),
                                  {"data": 2, "fsdp": 2, "tensor": 2})
  assert tuple(spec) == (("data", "fsdp"), None, None)   # fsdp already used by batch
  with pytest.raises(ValueError, match="unknown logical axis 'bogus'"):
    sharding.logical_to_spec(("bogus",))
  with pytest.raises(ValueError, match="needs 16 devices"):
    sharding.make_mesh((2, 4, 2))



@pytest.mark.parametrize("kw", [dict(model_type="qwen2"),
                                dict(model_type="llama", tie_word_embeddings=False,
                                     param_dtype="bfloat16")])
def test_param_tables_match_the_built_model(kw):
  """params.py (what sharding reads) describes exactly the parameters decoder.py builds."""
  import jax
  from flax import nnx
  from stepsearch_jax import models
  from stepsearch_jax.models import decoder, params as params_lib
  cfg = models.ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_layers=2,
                           num_heads=4, num_kv_heads=2, head_dim=8, **kw)
  for value in (False, True):
    _, state = decoder.graph(cfg, value)
    built = {tuple(path): (var.shape, var.dtype, var.get_metadata()["logical_axes"])
             for path, var in nnx.to_flat_state(state)}
    leaves = jax.tree_util.tree_flatten_with_path(
        params_lib.layout(cfg, value), is_leaf=lambda x: isinstance(x, params_lib.ParamSpec))[0]
    table = {tuple(k.key for k in path): (spec.shape, spec.dtype, spec.axes)
             for path, spec in leaves}
    assert table == built


def test_sharding_and_params_never_import_the_model():
  """No import cycle: the model imports sharding and params, neither of them imports the model."""
  import ast
  import pathlib
  models_dir = pathlib.Path(sharding.__file__).parent
  for name, forbidden in (("sharding", {"decoder", "api", "hf"}),
                          ("params", {"decoder", "api", "hf", "sharding"})):
    tree = ast.parse((models_dir / f"{name}.py").read_text())
    imported = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module:
        imported |= {node.module.rsplit(".", 1)[-1]} | {a.name for a in node.names}
      elif isinstance(node, ast.Import):
        imported |= {a.name.rsplit(".", 1)[-1] for a in node.names}
    assert not imported & forbidden, f"{name}.py imports {imported & forbidden}"
