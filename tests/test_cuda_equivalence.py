"""One PPO update on the CPU backend and on the CUDA backend agree (skipped without a GPU).

Tolerances (float32, matmul precision 'highest' so the GPU does not use TF32):
  prepare log-probs / values: atol 1e-4; loss and grad-norm metrics: rtol 1e-3;
  parameters and optimizer moments after the update: atol 3e-5 (lr 1e-4, so the first Adam step
  moves weights by ~1e-4 and a sign flip of a near-zero gradient stays within the bound).
"""

import jax
import numpy as np
import pytest

from ppo_tiny import TINY, random_trajectories, tiny_cfg, tiny_params
from stepsearch_jax.models.sharding import make_mesh
from stepsearch_jax.ppo import make_learner


def _gpu():
  try:
    return jax.devices("gpu")[0]
  except RuntimeError:
    return None


@pytest.mark.skipif(_gpu() is None, reason="no GPU visible (jax.devices('gpu') failed)")
def test_update_cpu_equals_cuda():
  policy, critic, ref = jax.device_get(tiny_params())
  trajs, rewards = random_trajectories(8)
  results = {}
  with jax.default_matmul_precision("highest"):
    for name, device in (("cpu", jax.devices("cpu")[0]), ("gpu", _gpu())):
      mesh = make_mesh((1, 1, 1), [device])
      learner = make_learner(tiny_cfg(lr=1e-4), policy, critic, ref, mesh, policy_config=TINY)
      dev = learner.prepare(learner.make_batch(trajs, rewards))
      dev, _ = learner.advantages(dev)
      metrics = learner.update(dev)
      assert jax.tree.leaves(learner.policy_params)[0].devices() == {device}
      results[name] = (jax.device_get(dev), metrics, jax.device_get(learner.state))
  (b_cpu, m_cpu, s_cpu), (b_gpu, m_gpu, s_gpu) = results["cpu"], results["gpu"]
  np.testing.assert_allclose(b_cpu.old_logprobs, b_gpu.old_logprobs, atol=1e-4)
  np.testing.assert_allclose(b_cpu.values, b_gpu.values, atol=1e-4)
  for k in ("pg_loss", "vf_loss", "entropy", "actor_grad_norm", "critic_grad_norm"):
    np.testing.assert_allclose(m_cpu[k], m_gpu[k], rtol=1e-3, atol=1e-6, err_msg=k)
  moved = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                                           s_cpu["policy"], policy)))
  assert moved > 5e-5
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=3e-5), s_cpu, s_gpu)
