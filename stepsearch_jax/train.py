"""Train a search agent with StePPO (or PPO / GRPO by name: config.algo.name).

    python -m stepsearch_jax.train --config configs/demo.py[:arg] --workdir DIR [--config.a.b=value]

One step: sample prompts -> rollout (engine + retrieval) -> rewards on host -> old/ref log-probs and
values (one jit) -> advantages -> mini-batch updates (one jit each) -> push weights to the engine.
A restart with the same DIR resumes from the latest checkpoint (policy, critic, optimizers, step,
data position, RNG); a different retrieval index stops with a clear message. `--config.total_steps`
sets where training ends, so re-running with a larger value continues a finished run.

Faults: a run killed at any point (even SIGKILL mid-step or mid-save) resumes from the last
committed checkpoint and, since every step's data and RNG are pure functions of (seed, step),
repeats the lost steps exactly; metrics.jsonl rows of lost steps are dropped on resume. A
non-finite loss or non-finite weights after an update stop the run before anything is saved.
Missing/corrupt data, an unreachable retrieval sidecar and an index that differs from the
checkpoint's stop with one `FATAL ...` line naming the file, URL or fingerprint (exit code 1).
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import numpy as np
from absl import flags, logging
from tqdm import tqdm

from stepsearch_jax import cli, metrics
from stepsearch_jax import config as config_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder: config, checkpoints, metrics.",
                               required=True)
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Parse, validate and write the config, then exit.")
_EXPORT_HF = flags.DEFINE_string("export_hf", None,
                                 "After training, write the final policy as a Hugging Face folder.")


def reward_stats(results, trajs) -> dict:
  """Means of every reward term (raw, steps summed; whether the algorithm uses it or not), the
  reward itself and the rollout shape over a batch."""
  from stepsearch_jax.rewards.terms import TERMS

  def mean(xs):
    return float(np.mean(xs)) if len(xs) else 0.0
  def total(v):
    return float(sum(v)) if isinstance(v, (list, tuple)) else float(v)
  return {
      **{f"reward/{name}": mean([total(r.terms.get(name, 0.0)) for r in results])
         for name in TERMS},
      "reward/final": mean([r.final_score for r in results]),
      "reward/format_ok": mean([float(r.format_ok) for r in results]),
      "rollout/searches": mean([len(t.queries) for t in trajs]),
      "rollout/response_len": mean([len(t.response_ids) for t in trajs]),
      "rollout/model_tokens": mean([sum(t.loss_mask) for t in trajs]),
  }


def batch_records(records, step: int, batch_size: int, seed: int, shuffle: bool):
  """The records of `step`: an epoch-wise permutation, so the position is a pure function of step."""
  n = len(records)
  start = step * batch_size
  out = []
  for pos in range(start, start + batch_size):
    epoch, i = divmod(pos, n)
    order = (np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n))
    out.append(records[int(order[i])])
  return out, start + batch_size


class Trainer:
  """Owns the run: workspace, engine, learner, checkpoints, metrics."""

  def __init__(self, cfg, workdir: str):
    from stepsearch_jax import distributed, workspace
    from stepsearch_jax.preemption import Preemption
    self.cfg, self.workdir = cfg, workdir
    self.preemption = Preemption(cfg.preempt_deadline_s)   # installed for the length of run()
    self.process_index, _ = distributed.maybe_initialize()
    self.main_process = self.process_index == 0
    # Process 0 builds the world, tokenizer and index into the workdir; the others reuse them
    # (each starts its own retrieval sidecar on loopback).
    self.ws = distributed.main_first("workspace", lambda: workspace.open_workspace(cfg, workdir))
    print(f"retrieval: {self.ws.retriever.where} (index fingerprint {self.ws.fingerprint})",
          flush=True)
    try:
      self._build(cfg, workdir)
    except BaseException:
      self.ws.close()          # never leave the retrieval subprocess behind
      raise

  def _build(self, cfg, workdir: str) -> None:
    from stepsearch_jax import distributed, models, ppo, workspace
    from stepsearch_jax.models import sharding
    from stepsearch_jax.rewards import RewardConfig
    self.key = jax.random.PRNGKey(cfg.seed)
    self.mesh = sharding.make_mesh(dict(cfg.mesh))
    self.algo = ppo.get_algorithm(cfg.algo.name)
    self.reward_cfg = RewardConfig.from_config(self.algo.reward_config(cfg.reward))
    self.ckpt = ppo.Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints)
    resuming = self.ckpt.latest_step() is not None
    if resuming:   # before any model is loaded: a wrong index must fail in seconds, not minutes
      self.check_fingerprint(self.ckpt.read_meta())

    t0 = time.time()
    self.model_config, params = workspace.init_policy(cfg, self.ws.tokenizer,
                                                      jax.random.fold_in(self.key, 1))
    # (resumed too: the reference model is the warm-started policy)
    params = distributed.main_first("warm_start", lambda: workspace.warm_started_policy(
        cfg, self.ws, self.model_config, params))
    if self.main_process:
      with open(os.path.join(workdir, "model_config.json"), "w") as f:
        json.dump(self.model_config.to_hf(), f, indent=2)
    critic = None
    if self.algo.uses_critic:
      critic = models.init_value_params(self.model_config, jax.random.fold_in(self.key, 2),
                                        policy_params=params)
    self.learner = ppo.make_learner(cfg, params, critic, params if cfg.algo.kl_coef else None,
                                    self.mesh, policy_config=self.model_config)
    self.start_step = 0
    if resuming:
      restored = self.ckpt.restore(self.learner.abstract_state(), fingerprint=self.ws.fingerprint)
      state, meta = restored
      self.learner.load_state(state)
      self.start_step = int(meta["step"])
      if int(meta.get("data_position", -1)) != self.start_step * cfg.data.batch_size:
        logging.warning("checkpoint %d was written with data position %s, but this config puts "
                        "step %d at %d (data.batch_size changed?)", self.start_step,
                        meta.get("data_position"), self.start_step,
                        self.start_step * cfg.data.batch_size)
      logging.info("resumed from %s at step %d", self.ckpt.directory, self.start_step)
      print(f"resumed from step {self.start_step}")
    if self.main_process:
      drop_lost_metrics(os.path.join(workdir, "metrics.jsonl"), self.start_step)
    self.engine = workspace.engine_for(cfg, self.model_config, self.learner.policy_params,
                                       self.ws.tokenizer, mesh=self.mesh)
    self.ws.timings["model_init_s"] = time.time() - t0
    self.writer = metrics.MetricsWriter(workdir, enabled=self.main_process)

  def check_fingerprint(self, meta: dict) -> None:
    from stepsearch_jax.ppo import FingerprintMismatchError
    if meta.get("fingerprint") != self.ws.fingerprint:
      raise FingerprintMismatchError(
          f"checkpoint step {meta.get('step')} in {self.ckpt.directory} was written with retrieval "
          f"index fingerprint {meta.get('fingerprint')!r}, but the index served at "
          f"{self.ws.retriever.where} has {self.ws.fingerprint!r}; resume with the same index "
          "(retrieval.index_dir / retrieval.url) or start a fresh workdir")

  # ------------------------------------------------------------------------------------------
  def validate(self, step: int, tag: str) -> dict:
    from stepsearch_jax.evaluate import run_validation
    if not self.ws.val_records:
      return {}
    out = os.path.join(self.workdir, "predictions", f"{tag}.jsonl") if self.main_process else None
    summary = run_validation(self.engine, self.ws.val_records, self.cfg, self.ws.retriever,
                             jax.random.fold_in(self.key, 10_000_000 + step), out, step,
                             trajectories_jsonl=out and metrics.trajectories_path(
                                 self.workdir, "val", step))
    self.writer.write(step, {"val/em": summary["em"], "val/f1": summary["f1"],
                             "val/searches": summary["searches"], "time/val_s": summary["seconds"]})
    for row in summary["per_source"]:
      self.writer.write(step, {f"val/{row['data_source']}/em": row["em"],
                               f"val/{row['data_source']}/f1": row["f1"]})
    print(f"[{tag}] held-out EM {summary['em']:.3f}  F1 {summary['f1']:.3f}  "
          f"searches/q {summary['searches']:.2f}  (n={summary['n']})")
    return summary

  def step(self, step: int) -> dict:
    from stepsearch_jax.rewards import score, token_rewards
    from stepsearch_jax.rollout.driver import rollout
    cfg, times = self.cfg, {}
    self.preemption.abandonable(True)     # until the update, SIGTERM may drop this step
    records, position = batch_records(self.ws.train_records, step, cfg.data.batch_size, cfg.seed,
                                      cfg.data.shuffle)
    t = time.time()
    trajs = rollout(self.engine, records, cfg.rollout, self.ws.retriever,
                    jax.random.fold_in(self.key, step), policy_version=step,
                    template=cfg.data.template)
    times["time/rollout_s"] = time.time() - t
    times["time/retrieval_s"] = float(trajs.stats.get("retrieval_s", 0.0))
    every = cfg.trajectories_every
    if self.main_process and every and (step + 1) % every == 0:
      from stepsearch_jax.evaluate import write_trajectories
      write_trajectories(trajs, metrics.trajectories_path(self.workdir, "train", step + 1))
    t = time.time()
    results = [score(tr.response_text, tr.ground_truth, tr.support_docs, self.reward_cfg,
                     step_doc_ids=tr.doc_ids) for tr in trajs]
    rewards = [token_rewards(r, tr.search_end_indices, len(tr.response_ids))
               for r, tr in zip(results, trajs)]
    times["time/reward_s"] = time.time() - t
    t = time.time()
    batch = self.learner.make_batch(trajs, rewards, pad_id=self.ws.tokenizer.pad_token_id)
    padding_share = batch.padding_share
    batch = self.learner.prepare(batch)
    batch, adv = self.learner.advantages(batch)
    jax.block_until_ready(batch)
    times["time/logprobs_values_s"] = time.time() - t
    self.preemption.abandonable(False)    # the update changes the learner state: finish the step
    t = time.time()
    upd = self.learner.update(batch)
    times["time/update_s"] = time.time() - t
    self.check_finite(step + 1, upd)
    t = time.time()
    self.engine.swap_params(self.learner.policy_params)
    times["time/weight_push_s"] = time.time() - t
    return {**reward_stats(results, trajs), **adv, **upd, **times,
            "update/padding_share": padding_share,
            "data/position": position, "rollout/tokens_per_s": trajs.stats.get("tokens_per_s", 0)}

  def check_finite(self, step: int, upd: dict) -> None:
    """Stop (FloatingPointError) on a non-finite loss or non-finite weights after an update.

    The loss is computed before the update, so a step whose update blows the weights up still
    reports a finite loss: the weights themselves are checked too (one reduction on device),
    before they can reach the engine or a checkpoint.
    """
    from stepsearch_jax import ppo
    losses = {k: v for k, v in upd.items() if k.endswith(("loss", "grad_norm"))}
    bad = {k: v for k, v in losses.items() if not np.isfinite(v)}
    if not bad and ppo.is_finite(self.learner.state):
      return
    self.ckpt.wait()
    what = (f"non-finite {', '.join(f'{k}={v}' for k, v in bad.items())}" if bad else
            "non-finite policy/critic weights or optimizer state after the update "
            f"(losses {losses})")
    raise FloatingPointError(
        f"{what} at step {step}; stopping without saving it. The last good checkpoint is step "
        f"{self.ckpt.latest_step()} in {self.ckpt.directory} (lower optim.actor_lr / "
        "optim.critic_lr or check the rewards before resuming)")

  def save(self, step: int, position: int) -> None:
    from stepsearch_jax import ppo
    meta = dict(config=self.cfg.to_dict(), data_position=int(position),
                rng=ppo.rng_to_json(jax.random.fold_in(self.key, step)))
    self.ckpt.save(step, self.learner.state, fingerprint=self.ws.fingerprint, meta=meta,
                   finite=ppo.is_finite(self.learner.state))

  def run(self) -> dict:
    from stepsearch_jax.preemption import Preemption
    self.preemption = Preemption(self.cfg.preempt_deadline_s,
                                 multi_process=jax.process_count() > 1)
    with self.preemption:
      return self._run()

  def _run(self) -> dict:
    from stepsearch_jax.preemption import Preempted
    cfg = self.cfg
    results = {}
    if cfg.eval_before_train and self.start_step == 0:
      results["before"] = self.validate(0, "step_0")
    elif cfg.eval_before_train:    # resumed: the first process logged it at step 0
      results["before"] = logged_validation(os.path.join(self.workdir, "metrics.jsonl"), 0)
    bar = tqdm(range(self.start_step, cfg.total_steps), desc=f"{cfg.algo.name}", unit="step",
               initial=self.start_step, total=cfg.total_steps, disable=not self.main_process)
    m = {}
    for step in bar:
      t0 = time.time()
      try:
        m = self.step(step)
      except Preempted:
        self.stop_preempted(step)          # the step was dropped: `step` is the last finished one
      m["time/step_s"] = time.time() - t0
      done = step + 1
      self.writer.write(done, m)
      bar.set_postfix(F1=f"{m['reward/answer_f1']:.2f}", srch=f"{m['rollout/searches']:.1f}",
                      pg=f"{m.get('pg_loss', 0):.3f}")
      if cfg.save_every and (done % cfg.save_every == 0 or done == cfg.total_steps):
        self.save(done, m["data/position"])
      if self.preemption.agreed():
        self.stop_preempted(done)
      if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.total_steps:
        self.validate(done, f"step_{done}")
    self.ckpt.wait()
    if cfg.eval_every or cfg.eval_before_train:
      results["after"] = self.validate(cfg.total_steps, f"step_{cfg.total_steps}")
    return results

  def stop_preempted(self, step: int) -> None:
    """Save `step` (the last finished one) unless it is saved already, then exit (SIGTERM)."""
    from stepsearch_jax.preemption import EXIT_CODE
    pre = self.preemption
    if step > 0 and self.ckpt.latest_step() != step:
      self.save(step, step * self.cfg.data.batch_size)
    self.ckpt.wait()
    spent = pre.deadline_s - pre.left_s()
    line = (f"preempted: step {self.ckpt.latest_step()} is saved in {self.ckpt.directory} "
            f"({spent:.1f} s after SIGTERM, deadline {pre.deadline_s:.0f} s); rerun the same "
            "command to resume")
    if pre.left_s() < 0:
      logging.warning("preemption save ran past config.preempt_deadline_s=%s", pre.deadline_s)
    print(line, flush=True)
    raise SystemExit(EXIT_CODE)

  def close(self) -> None:
    self.ckpt.close()
    self.writer.close()
    self.ws.close()


def drop_lost_metrics(path: str, start_step: int) -> int:
  """Keep only metrics.jsonl rows of steps <= start_step (later ones belong to a lost run); none
  when starting from scratch.

  A run killed after logging a step but before its checkpoint committed repeats that step on
  resume; without this the file would hold the step twice. Returns the number of rows dropped.
  """
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  keep = []
  for line in lines:
    try:
      step = int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
      continue                     # a row torn by the kill
    if 0 < start_step and step <= start_step:   # from scratch, step 0 (eval) is redone too
      keep.append(line if line.endswith("\n") else line + "\n")
  if len(keep) != len(lines):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, path)
  return len(lines) - len(keep)


def logged_validation(path: str, step: int) -> dict:
  """{'em', 'f1', 'searches'} of the validation logged at `step` in metrics.jsonl, or {}."""
  for row in metrics.read_metrics(path):
    if row.get("step") == step and "val/em" in row:
      return {"em": row["val/em"], "f1": row["val/f1"], "searches": row["val/searches"]}
  return {}


def fatal_errors() -> tuple[type, ...]:
  """Errors that stop a run with one clear line (their messages name file / URL / key)."""
  from stepsearch_jax.data.records import RecordError
  from stepsearch_jax.ppo import FingerprintMismatchError
  from stepsearch_jax.rollout.retriever import RetrievalError
  return (FloatingPointError, FingerprintMismatchError, RetrievalError, RecordError,
          FileNotFoundError)


def write_results(workdir: str, results: dict, timings: dict) -> None:
  """results.json (em/f1 before and after RL) and results.md, when both evaluations ran."""
  before, after = results.get("before"), results.get("after")
  out = {"timings": timings}
  if after:
    out.update(em_after=after["em"], f1_after=after["f1"], searches_after=after["searches"])
  if before:
    out.update(em_before=before["em"], f1_before=before["f1"], searches_before=before["searches"])
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(out, f, indent=2)
  if before and after:
    rows = [{"policy": "warm start (before RL)", "EM": before["em"], "F1": before["f1"],
             "searches/q": before["searches"]},
            {"policy": "after StePPO", "EM": after["em"], "F1": after["f1"],
             "searches/q": after["searches"]}]
    table = metrics.markdown_table(rows, ["policy", "EM", "F1", "searches/q"])
    with open(os.path.join(workdir, "results.md"), "w") as f:
      f.write(table + "\n")
    print(table)
    print(f"held-out EM before RL {before['em']:.3f} -> after {after['em']:.3f} "
          f"(gain {after['em'] - before['em']:+.3f})")


def main(argv):
  del argv
  cfg = cli.load()
  workdir = _WORKDIR.value
  path = config_lib.write_config(cfg, workdir)
  print(f"config: {path}")
  if _DRY_RUN.value:
    return
  try:
    train(cfg, workdir)
  except fatal_errors() as e:
    sys.exit(f"FATAL {type(e).__name__}: {e}")


def train(cfg, workdir: str) -> None:
  """Build the Trainer, run it, write results / curves / the HF export."""
  t0 = time.time()
  trainer = Trainer(cfg, workdir)
  try:
    results = trainer.run()
    timings = {**trainer.ws.timings, "total_s": time.time() - t0}
    if trainer.main_process:
      write_results(workdir, results, timings)
      if cfg.curves_png:
        png = metrics.plot_curves(os.path.join(workdir, "metrics.jsonl"),
                                  os.path.join(workdir, "curves.png"),
                                  title=f"{cfg.algo.name} on {workdir}")
        if png:
          print(f"training curves: {png}")
      if _EXPORT_HF.value:
        from stepsearch_jax import models
        models.save_pretrained(_EXPORT_HF.value, trainer.model_config,
                               jax.device_get(trainer.learner.policy_params))
        trainer.ws.tokenizer.save_pretrained(_EXPORT_HF.value)
        print(f"exported policy to {_EXPORT_HF.value}")
  finally:
    trainer.close()


if __name__ == "__main__":
  cli.run(main)
