"""The rewards CLI: score and eval subcommands, in-order output, markdown table, bad input."""

import json
import subprocess
import sys

import pytest

from stepsearch_jax.rewards.text import em, eval_answer, f1

INFO = ("\n\n<information> Doc 1<## Title: Drumlow ##> The country of Drumlow is Velmar. "
        "</information>\n\n")


def run(*args):
  return subprocess.run([sys.executable, "-m", "stepsearch_jax.rewards", *args],
                        capture_output=True, text=True, timeout=120)


def test_score_cli_both_presets(tmp_path):
  rows = [
      {"response": "<search> drumlow country </search>" + INFO + "<answer> Velmar </answer>",
       "ground_truth": {"target": ["Velmar"], "search_keys": [["drumlow country"]]},
       "support_docs": [{"title": "Drumlow", "paragraph_text": "The country of Drumlow is Velmar."}]},
      {"response": "no answer", "ground_truth": {"target": "x", "search_keys": []},
       "support_docs": []},
  ]
  inp = tmp_path / "roll.jsonl"
  inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
  for preset, scale in (("released", 1.6), ("paper", 0.6)):
    out = tmp_path / f"{preset}.jsonl"
    p = run("score", "--preset", preset, "--in", str(inp), "--out", str(out))
    assert p.returncode == 0, p.stderr
    got = [json.loads(l) for l in out.read_text().splitlines()]
    assert set(got[0]) == {"format_ok", "answer_f1", "search_key_score", "step_scores",
                           "final_score", "step_rewards"}
    assert got[0]["final_score"] == pytest.approx(1.618)
    assert got[0]["step_scores"][0] == pytest.approx(1.0)
    assert got[0]["step_rewards"][0] == pytest.approx(scale, rel=1e-6)
    assert got[1] == {"format_ok": False, "answer_f1": 0.0, "search_key_score": 0.0,
                      "step_scores": [], "final_score": -1.0, "step_rewards": []}


def test_eval_cli_table_and_rules(tmp_path):
  rows = [{"response": "<answer> \\boxed{Paris} </answer>", "targets": ["paris"], "data_source": "a"},
          {"response": "<answer> x </answer><answer> Paris, France </answer>", "targets": ["Paris"],
           "data_source": "a"},
          {"response": "nothing", "targets": ["Rome"], "data_source": "b"}]
  inp = tmp_path / "pred.jsonl"
  inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
  out = tmp_path / "per.jsonl"
  p = run("eval", "--in", str(inp), "--out", str(out))
  assert p.returncode == 0, p.stderr
  got = [json.loads(l) for l in out.read_text().splitlines()]
  assert got[0] == {"em": 1.0, "f1": 1.0}
  assert got[1]["em"] == 0.0 and got[1]["f1"] == pytest.approx(2 / 3)  # unrounded
  assert got[2] == {"em": 0.0, "f1": 0.0}
  assert "| a | 2 | 0.5000 | 0.8333 |" in p.stdout and "| b | 1 | 0.0000 | 0.0000 |" in p.stdout


def test_cli_bad_input_names_line_and_field(tmp_path):
  inp = tmp_path / "bad.jsonl"
  inp.write_text(json.dumps({"response": "x", "ground_truth": {"target": "a"}}) + "\n" +
                 json.dumps({"response": "x", "ground_truth": {}}) + "\n")
  p = run("score", "--in", str(inp), "--out", str(tmp_path / "o.jsonl"))
  assert p.returncode != 0 and "line 2" in p.stderr and "ground_truth.target" in p.stderr


def test_eval_answer_rules():
  assert eval_answer("<answer> {a} b {c </answer>") == "c"
  assert eval_answer("<answer> the {Paris} </answer>") == "Paris"
  assert eval_answer("no tags") is None
  assert em("The  Paris!", ["paris"]) == 1.0 and em(None, ["x"]) == 0.0
  assert f1("", ["a"]) == 0.0 and f1("paris", []) == 0.0
