"""The CPU demo: StePPO teaches a small model to search a synthetic multi-hop world.

    python -m stepsearch_jax.train --config configs/demo.py --workdir runs/demo
    python -m stepsearch_jax.train --config configs/demo.py:smoke --workdir /tmp/smoke

A synthetic world (fictional people, places, works, organisations), a word-level tokenizer trained
on its text, a ~1M-parameter Qwen2-style policy, the retrieval sidecar (MiniLM encoder + exact FAISS)
started as a subprocess, a supervised warm start on imperfect demonstrations (the format is known,
the search policy is weak), then StePPO. `smoke` runs 2 steps on a tiny batch.

`credit` is the task of the step-reward study (bench/rl_compare.py, README "What the step rewards
buy"): a task where the outcome reward is sparse and credit assignment matters.
    python -m stepsearch_jax.train --config configs/demo.py:credit --workdir runs/credit
`sparse` is the same task with the outcome reward sparser still (design 3 of the study).
"""

from stepsearch_jax.config import base_config


def get_config(arg=None):
  c = base_config()
  c.seed = 0
  c.data.synthetic.enabled = True
  c.data.synthetic.num_people = 120
  c.data.synthetic.compact_names = True
  c.data.synthetic.num_train = 1024
  c.data.synthetic.num_test = 128
  c.data.synthetic.min_hops = 2
  c.data.synthetic.max_hops = 2
  c.data.template = "brief"          # the think loop in one sentence: short sequences, fast steps
  c.data.val_limit = 128
  c.data.val_batch_size = 128

  c.model.dtype = "float32"
  c.model.remat = False
  c.model.init.hidden_size = 128
  c.model.init.intermediate_size = 384
  c.model.init.num_layers = 4
  c.model.init.num_heads = 4
  c.model.init.num_kv_heads = 2
  c.model.init.head_dim = 32
  c.model.init.max_position_embeddings = 2048
  c.mesh.fsdp = 1

  # Imperfect demonstrations: 60% of them answer right after the first search with the bridge
  # entity (the `early` flaw), so the warm start knows the format and copies entities but stops
  # searching too soon. StePPO must teach it to finish the chain. Copying emerges after ~250 steps.
  c.sft.steps = 450
  c.sft.batch_size = 32
  c.sft.lr = 3e-3
  c.sft.quality = 0.4
  c.sft.flaws = "early"
  c.sft.num_examples = 1024

  c.retrieval.start_server = True
  c.rollout.max_turns = 4
  c.rollout.max_tokens_per_turn = 48
  c.rollout.max_obs_tokens = 160
  c.rollout.max_context = 1024
  c.rollout.max_start = 256
  c.rollout.num_slots = 128
  c.rollout.temperature = 0.7       # a 1M-parameter policy at T=1 rarely finishes a chain
  c.rollout.top_p = 1.0

  c.data.batch_size = 32
  c.algo.mini_batch = 16
  c.algo.micro_batch = 16
  c.algo.kl_coef = 0.001
  c.optim.actor_lr = 1e-4            # 5e-4 collapsed a warm start in 12 steps (entropy doubled)
  c.optim.critic_lr = 1e-3
  c.optim.actor_warmup = 1
  c.optim.critic_warmup = 1
  c.total_steps = 16
  c.eval_before_train = True
  c.eval_every = 0                  # held-out evaluation before and after RL only
  c.save_every = 8
  c.trajectories_every = 8          # python -m stepsearch_jax.report --workdir ... --kind train
  if arg == "smoke":
    c.data.synthetic.num_people = 40
    c.data.synthetic.num_train = 64
    c.data.synthetic.num_test = 16
    c.data.val_limit = 8
    c.data.val_batch_size = 8
    c.sft.steps = 20
    c.sft.num_examples = 64
    c.total_steps = 2
    c.data.batch_size = 8
    c.algo.mini_batch = 8
    c.algo.micro_batch = 8
    c.rollout.num_slots = 8
    c.eval_before_train = False
    c.eval_every = 0
    c.save_every = 1
  task = next((t for t in ("credit", "sparse") if arg and arg.startswith(t)), None)
  if task is not None:
    # Why step rewards should matter here: the chains are long (3 hops by default; credit2/3/4 pick
    # the count) and the warm start's demonstrations derail a hop half of the time, in the ways
    # the step rewards see and the answer F1 does not tell apart: a vague query (no name: the gold
    # passage is not retrieved, the entity is guessed), a skipped search (guessed entity), a
    # repeated search (the same passages again: a wasted turn). Every later hop follows the
    # (possibly wrong) entity coherently, so a trajectory that did hops 1..k-1 right and derailed
    # at hop k earns the same answer F1 (~0) as one that derailed at hop 1: only the information
    # gain of the gold passages it did retrieve, the redundancy penalty and the search-key reward
    # say which turns were good. With P(clean hop) ~ 0.5 the warm start finishes a 3-hop chain
    # ~1/8 of the time and a 4-hop chain ~1/16, so most sampled trajectories get no answer
    # reward. Two distractors per fact (a similar name, same relation) make a half-right query
    # retrieve a wrong passage.
    hops = int(arg[len(task):] or 3)
    c.data.synthetic.min_hops = hops
    c.data.synthetic.max_hops = hops
    c.data.synthetic.distractors_per_fact = 2
    c.sft.quality = 0.5
    c.sft.flaws = "vague,skip,repeat"
    c.rollout.max_turns = hops + 2          # every hop, the answer and one spare turn
    c.rollout.max_context = 2048
    c.rollout.max_start = 256
  if task == "sparse":
    # Design 3 of the study (README): the credit task with the outcome reward sparser still. A
    # demonstration's hop is clean with probability 0.25, as likely as each of the three flaws, so
    # no behaviour is the warm start's mode and a sampled 4-hop chain is clean ~0.25^4 = 1/256 of
    # the time: in a 16 x 32 trajectory budget outcome-only PPO sees about two fully right
    # trajectories, while every clean hop still earns information gain and the search-key reward.
    c.sft.quality = 0.25
  if arg == "test":   # the trainer's end-to-end tests: seconds per step, BM25 (no encoder)
    c.data.template = "think"
    c.data.synthetic.num_people = 20
    c.data.synthetic.num_train = 16
    c.data.synthetic.num_test = 4
    c.data.synthetic.max_hops = 2
    c.data.val_limit = 4
    c.data.val_batch_size = 4
    c.model.init.hidden_size = 64
    c.model.init.intermediate_size = 192
    c.model.init.num_layers = 2
    c.model.init.num_heads = 2
    c.model.init.num_kv_heads = 1
    c.model.init.head_dim = 32
    c.sft.steps = 80
    c.sft.batch_size = 8
    c.sft.lr = 1e-2
    c.sft.quality = 1.0
    c.sft.num_examples = 16
    c.retrieval.index_type = "bm25"
    c.rollout.max_turns = 3
    c.rollout.max_tokens_per_turn = 40
    c.rollout.max_obs_tokens = 128
    c.rollout.max_context = 512
    c.rollout.max_start = 128
    c.rollout.num_slots = 4
    c.rollout.prefill_buckets = (64, 128, 256, 512)
    c.data.batch_size = 4
    c.algo.mini_batch = 4
    c.algo.micro_batch = 4
    c.optim.actor_warmup = 1
    c.optim.critic_warmup = 1
    c.total_steps = 2
    c.eval_before_train = False
    c.eval_every = 0
    c.save_every = 1
    c.keep_checkpoints = 5
    c.curves_png = False
  return c
