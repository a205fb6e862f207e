"""See where the reward went: one static HTML page of a run's trajectories at one step.

    python -m stepsearch_jax.report --workdir runs/demo [--step N] [--kind val|train] [--out F]

Reads ``WORKDIR/trajectories/{kind}_step_{N}.jsonl`` (every validation writes one; training steps
when ``config.trajectories_every`` > 0), the workdir's tokenizer and config, and re-scores every
trajectory with the run's own reward (its preset, terms and algorithm), so the page shows exactly
what the update was given: the question and gold answer, every search with the passages it got
(gold passages marked), each step reward on the token where it lands (the search turn's last
token) and the final reward on the last token, model tokens and inserted tokens told apart, the
answer with its EM/F1; a filter by outcome (also from the URL: ``#outcome=wrong``). Writes
``WORKDIR/report/{kind}_step_{N}.html`` by default.
"""

from __future__ import annotations

import argparse
import glob
import html
import json
import os
import re
import sys

import ml_collections

from stepsearch_jax import metrics
from stepsearch_jax.data import templates
from stepsearch_jax.rewards import predictions, text as text_lib
from stepsearch_jax.rewards.score import RewardConfig, score, token_rewards
from stepsearch_jax.rollout.trajectory import Trajectory

OUTCOMES = ("correct", "partial", "wrong", "format")

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1100px;padding:16px;color:#222}
h1{font-size:20px} .meta{color:#555} table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
#filter label{margin-right:14px} .trajectory{border:1px solid #ccc;border-radius:6px;margin:14px 0;
padding:8px 12px} .trajectory[data-outcome=correct]{border-left:6px solid #2a9d4b}
.trajectory[data-outcome=partial]{border-left:6px solid #e0a100}
.trajectory[data-outcome=wrong]{border-left:6px solid #c43b3b}
.trajectory[data-outcome=format]{border-left:6px solid #777} .q{font-weight:600}
.tokens{white-space:pre-wrap;font:12px/1.6 ui-monospace,monospace;background:#fafafa;padding:6px;
border:1px solid #eee} .tok.model{color:#111} .tok.inserted{color:#667;background:#eef2f7}
.tok.rewarded{outline:2px solid #7b3fe4;border-radius:2px}
.reward{display:inline-block;font-size:10px;color:#fff;background:#7b3fe4;border-radius:8px;
padding:0 5px;margin:0 2px} .reward.neg{background:#c43b3b} .reward.final{background:#2a6fd1}
.passage{margin:2px 0;padding:2px 6px;border-left:3px solid #ddd}
.passage.gold{border-left-color:#2a9d4b;background:#eefaf1} .gold-tag{color:#2a9d4b;font-weight:600}
"""

_JS = """
function applyFilter(v){document.querySelectorAll('.trajectory').forEach(function(t){
  t.style.display=(v==='all'||t.dataset.outcome===v)?'':'none';});
  var shown=document.querySelectorAll('.trajectory:not([style*="none"])').length;
  document.getElementById('shown').textContent=shown;
  var r=document.querySelector('#filter input[value="'+v+'"]'); if(r){r.checked=true;}}
document.addEventListener('DOMContentLoaded',function(){
  document.querySelectorAll('#filter input').forEach(function(i){
    i.addEventListener('change',function(){applyFilter(i.value);});});
  var m=location.hash.match(/outcome=(\\w+)/); applyFilter(m?m[1]:'all');});
"""


def outcome(result, em: float, f1: float) -> str:
  if not result.format_ok:
    return "format"
  return "correct" if em == 1.0 else "partial" if f1 > 0 else "wrong"


def find_steps(workdir: str, kind: str) -> list[int]:
  pat = metrics.trajectories_path(workdir, kind, 0).replace("_step_0.jsonl", "_step_*.jsonl")
  return sorted(int(re.search(r"_step_(\d+)\.jsonl$", p).group(1)) for p in glob.glob(pat))


def load_trajectories(path: str) -> list[Trajectory]:
  out = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if line.strip():
        try:
          out.append(Trajectory.from_json(line))
        except (ValueError, TypeError) as e:
          raise ValueError(f"{path}: line {n}: not a trajectory ({e})") from None
  return out


def reward_config(cfg: dict) -> RewardConfig:
  """The run's reward as its update saw it: config.reward with the algorithm's terms."""
  from stepsearch_jax.ppo.algorithms import get_algorithm
  algo = get_algorithm(cfg["algo"]["name"])
  return RewardConfig.from_config(algo.reward_config(ml_collections.ConfigDict(cfg["reward"])))


def _segments(traj: Trajectory, rewards, decode) -> str:
  """The response as spans: runs of model / inserted tokens, each rewarded token on its own with
  its reward badge after it."""
  n = len(traj.response_ids)
  marks = {i for i in range(n) if rewards[i] != 0} | ({n - 1} if n else set())
  out = []
  def run(a, b):
    if a < b:
      cls = "model" if traj.loss_mask[a] else "inserted"
      out.append(f'<span class="tok {cls}">{html.escape(decode(traj.response_ids[a:b]))}</span>')
  i = 0
  while i < n:
    j = i
    while j < n and traj.loss_mask[j] == traj.loss_mask[i] and j not in marks:
      j += 1
    run(i, j)
    if j < n and j in marks:
      cls = "model" if traj.loss_mask[j] else "inserted"
      out.append(f'<span class="tok {cls} rewarded" data-index="{j}">'
                 f'{html.escape(decode(traj.response_ids[j:j + 1]))}</span>')
      kind = "final" if j == n - 1 else ("neg" if rewards[j] < 0 else "step")
      out.append(f'<span class="reward {kind}" data-index="{j}" data-value="{rewards[j]:.4f}" '
                 f'title="reward at token {j}">{rewards[j]:+.3f}</span>')
      j += 1
    i = j
  return decode.sep.join(out)


class Decoder:
  """tokenizer.decode of a span, and the separator between spans: a space for a word-level
  tokenizer (its decode joins tokens with spaces), nothing for BPE (spaces live in the tokens)."""

  def __init__(self, tokenizer, sample_ids):
    self.tok = tokenizer
    a, b = self([sample_ids[0]]), self([sample_ids[1]])
    self.sep = " " if a and b and self(sample_ids[:2]) == f"{a} {b}" else ""

  def __call__(self, ids) -> str:
    return self.tok.decode(list(ids), skip_special_tokens=False)


def render_trajectory(k: int, traj: Trajectory, rcfg: RewardConfig, decode) -> tuple[str, str]:
  res = score(traj.response_text, traj.ground_truth, traj.support_docs, rcfg,
              step_doc_ids=traj.doc_ids)
  rewards = token_rewards(res, traj.search_end_indices, len(traj.response_ids))
  golds = list(traj.ground_truth.get("target", []))
  em, f1 = predictions.em_f1(traj.response_text, golds, "ours")
  kind = outcome(res, em, f1)
  gold_texts = {text_lib.normalize(str(d.get("paragraph_text", ""))) for d in traj.support_docs}
  rows = []
  for t, query in enumerate(traj.queries):
    docs = traj.doc_texts[t] if t < len(traj.doc_texts) else []
    ids = traj.doc_ids[t] if t < len(traj.doc_ids) else []
    passages = []
    for d, text in enumerate(docs):
      is_gold = text_lib.normalize(text) in gold_texts
      tag = ' <span class="gold-tag">gold</span>' if is_gold else ""
      did = html.escape(str(ids[d])) if d < len(ids) else ""
      passages.append(f'<div class="passage{" gold" if is_gold else ""}" data-doc="{did}">'
                      f'[{did}] {html.escape(text)}{tag}</div>')
    sr = res.step_rewards[t] if t < len(res.step_rewards) else None
    ig = res.info_gains[t] if t < len(res.info_gains) else None
    red = res.redundancies[t] if t < len(res.redundancies) else None
    fmt = lambda v: "" if v is None else f"{round(v, 3) + 0.0:+.3f}"  # never "-0.000"
    rows.append(f'<tr class="search"><td>{t + 1}</td><td>{html.escape(query)}</td>'
                f'<td>{fmt(sr)}</td><td>{fmt(ig)}</td><td>{fmt(-red if red is not None else None)}'
                f'</td><td>{"".join(passages)}</td></tr>')
  searches = ("<table><tr><th>#</th><th>query</th><th>step reward</th><th>info gain</th>"
              "<th>redundancy</th><th>passages</th></tr>" + "".join(rows) + "</table>"
              if rows else "<p>no searches</p>")
  # the rendered chat prompt: the question is the line after the template's marker
  question = (templates.question_from_prompt(traj.prompt_text) or traj.prompt_text).splitlines()[0]
  card = (f'<section class="trajectory" id="t{k}" data-outcome="{kind}" data-f1="{f1:.4f}">'
          f'<div class="q">{k + 1}. {html.escape(question)}</div>'
          f'<div>gold: <b>{html.escape(" | ".join(map(str, golds)))}</b> &middot; answer: '
          f'<b class="answer">{html.escape(str(res.answer))}</b> &middot; EM {em:.0f} &middot; '
          f'F1 {f1:.3f} &middot; final reward {res.final_score:+.3f} &middot; {kind}'
          f' &middot; <span class="meta">{html.escape(traj.id)}</span></div>'
          f'{searches}<details><summary>prompt</summary><pre>{html.escape(traj.prompt_text)}'
          f'</pre></details><div class="tokens">{_segments(traj, rewards, decode)}</div>'
          f'</section>')
  return card, kind


def render_page(trajs: list[Trajectory], cfg: dict, decode, title: str) -> str:
  rcfg = reward_config(cfg)
  cards, kinds = [], []
  for k, t in enumerate(trajs):
    card, kind = render_trajectory(k, t, rcfg, decode)
    cards.append(card)
    kinds.append(kind)
  counts = {o: kinds.count(o) for o in OUTCOMES}
  radios = "".join(f'<label><input type="radio" name="outcome" value="{v}"> {v} '
                   f'({len(kinds) if v == "all" else counts[v]})</label>'
                   for v in ("all",) + OUTCOMES)
  legend = ('<span class="tok model">model tokens</span> &middot; <span class="tok inserted">'
            'inserted tokens (information / warnings)</span> &middot; <span class="reward step">'
            '+step</span> step reward at the search turn\'s last token &middot; '
            '<span class="reward final">+final</span> final reward at the last token')
  return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
          f"<style>{_CSS}</style><script>{_JS}</script></head><body>"
          f"<h1>{html.escape(title)}</h1><p class='meta'>algorithm {html.escape(cfg['algo']['name'])}"
          f", reward preset {html.escape(rcfg.name)}, terms {', '.join(rcfg.terms)}, step scale "
          f"{rcfg.effective_step_scale}; {len(trajs)} trajectories, <span id='shown'>"
          f"{len(trajs)}</span> shown</p><p>{legend}</p><form id='filter'>{radios}</form>"
          + "".join(cards) + "</body></html>")


def main(argv=None) -> str:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--workdir", required=True)
  p.add_argument("--step", type=int, default=None, help="default: the latest one written")
  p.add_argument("--kind", choices=("val", "train"), default="val")
  p.add_argument("--out", default=None)
  a = p.parse_args(argv)
  steps = find_steps(a.workdir, a.kind)
  if not steps:
    sys.exit(f"FATAL {a.workdir}: no {a.kind} trajectories under {a.workdir}/trajectories "
             "(validations write them; training steps when config.trajectories_every > 0)")
  step = steps[-1] if a.step is None else a.step
  if step not in steps:
    sys.exit(f"FATAL {a.workdir}: no {a.kind} trajectories at step {step} (have {steps})")
  cfg_path = os.path.join(a.workdir, "config.json")
  if not os.path.exists(cfg_path):
    sys.exit(f"FATAL {a.workdir}: no config.json (not a training workdir)")
  with open(cfg_path) as f:
    cfg = json.load(f)
  from stepsearch_jax.models.hf import load_tokenizer
  tok = load_tokenizer(os.path.join(a.workdir, "tokenizer"))
  trajs = load_trajectories(metrics.trajectories_path(a.workdir, a.kind, step))
  decode = Decoder(tok, next((t.response_ids for t in trajs if len(t.response_ids) > 1), [0, 0]))
  title = f"{os.path.basename(os.path.abspath(a.workdir))}: {a.kind} step {step}"
  out = a.out or os.path.join(a.workdir, "report", f"{a.kind}_step_{step}.html")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w", encoding="utf-8") as f:
    f.write(render_page(trajs, cfg, decode, title))
  print(out)
  return out


if __name__ == "__main__":
  main()
