"""Prediction-file interop: FlashRAG QA -> records, evaluate's files -> rewards eval, and
`--preset released` against a restatement of the released scripts/eval.py on edge cases.

No model and no retrieval server: trajectories are built by hand from converted records and
scored with the same function evaluate uses (`predictions.score_predictions`).
"""

import json
import re
import string
import subprocess
import sys
from collections import Counter

import pytest

from stepsearch_jax.data import flashrag, templates
from stepsearch_jax.data.records import RecordError, load_records
from stepsearch_jax.rewards import predictions
from stepsearch_jax.rewards.__main__ import main as rewards_main
from stepsearch_jax.rollout.trajectory import Trajectory

# --- oracle -------------------------------------------------------------------------------------
# The rules of scripts/eval.py in github.com/Zillwang/StepSearch (the released StepSearch code),
# commit 43215bab9118a4c8e01b15082f74b2aea30c1fc8, restated line by line: read a JSON file (a
# non-list is wrapped, any error gives no data), group by data_source ('all' when no item has one),
# EM = share of items whose normalised extracted answer equals some normalised gold, F1 = mean
# over items of the max over golds of SQuAD token F1.


def o_extract(text):
  found = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
  if not found:
    return ""                                      # no answer block reads as the empty answer
  ans = found[-1].strip()
  if "{" in ans:
    ans = ans.split("{")[-1]
    if "}" in ans:                                 # the script's `"}" in m in m` chain means this
      ans = ans.split("}")[0]
  return ans.strip()


def o_norm(s):
  s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
  return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def o_token_f1(pred, gold):
  p, g = o_norm(pred).split(), o_norm(gold).split()
  common = sum((Counter(p) & Counter(g)).values())
  if common == 0:
    return 0.0
  prec, rec = common / len(p), common / len(g)
  return 2 * prec * rec / (prec + rec)


def o_golds(item):
  gt = item["ground_truth"]
  return [gt] if type(gt) == str else gt


def o_em(items):
  if not items:
    return 0.0
  hits = sum(1 for it in items
             if any(o_norm(o_extract(it["response"])) == o_norm(g) for g in o_golds(it)))
  return hits / len(items)


def o_f1(items):
  if not items:
    return 0.0
  per = [max(o_token_f1(o_extract(it["response"]).lower().strip(), g.lower().strip())
             for g in o_golds(it)) for it in items]
  return sum(per) / len(per)


def o_evaluate(path):
  try:
    with open(path, encoding="utf-8") as f:
      data = json.loads(f.read())
    data = data if isinstance(data, list) else [data]
  except Exception:
    data = []
  sources = {it["data_source"] for it in data if "data_source" in it}
  groups = {s: [it for it in data if it["data_source"] == s] for s in sources} or {"all": data}
  return {s: {"em": o_em(items), "f1": o_f1(items)} for s, items in groups.items()}


# --- helpers ------------------------------------------------------------------------------------

def write_jsonl(path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                  encoding="utf-8")
  return path


def run_eval(capsys, path, out, preset=None):
  """rewards eval in-process; returns (per-example rows, {source: (n, em, f1)} from the table)."""
  rewards_main(["eval", "--in", str(path), "--out", str(out)] +
               (["--preset", preset] if preset else []))
  table = {}
  for line in capsys.readouterr().out.splitlines()[2:]:
    source, n, e, f = [c.strip() for c in line.strip("|").split("|")]
    table[source] = (int(n), float(e), float(f))
  return [json.loads(l) for l in out.read_text().splitlines()], table


FLASHRAG_NQ = [
    {"id": "test_0", "question": " who wrote hamlet ",
     "golden_answers": ["Shakespeare", "William Shakespeare"]},
    {"id": "test_1", "question": "capital of france?", "golden_answers": ["Paris"],
     "metadata": {"ignored": True}}]
FLASHRAG_HOTPOT = [
    {"id": "dev_7", "question": "Which is older, Ur or Uruk?", "golden_answers": ["Uruk"]}]


# --- A: FlashRAG conversion ---------------------------------------------------------------------

def test_flashrag_cli_names_sources_from_file_names(tmp_path, capsys):
  nq = write_jsonl(tmp_path / "nq" / "test.jsonl", FLASHRAG_NQ)
  hp = write_jsonl(tmp_path / "hotpotqa_dev.jsonl", FLASHRAG_HOTPOT)
  flashrag.main(["--in", f"{nq},{hp}", "--out", str(tmp_path / "out"), "--template", "plan"])
  written = json.loads(capsys.readouterr().out)["records"]
  assert {p.rsplit("/", 1)[-1]: n for p, n in written.items()} == {
      "nq_test.parquet": 2, "hotpotqa_dev.parquet": 1}
  recs = load_records(sorted(written))
  by_id = {r.id: r for r in recs}
  assert set(by_id) == {"nq_test_0", "nq_test_1", "hotpotqa_dev_7"}
  r = by_id["nq_test_0"]
  assert (r.data_source, r.split, r.question, r.targets, r.search_keys, r.support_docs) == (
      "nq", "test", "who wrote hamlet?", ["Shakespeare", "William Shakespeare"], [], [])
  assert r.prompt == [{"role": "user",
                       "content": templates.make_prompt("who wrote hamlet", "plan")}]
  assert r.ground_truth["target"] == ["Shakespeare", "William Shakespeare"]
  assert (by_id["hotpotqa_dev_7"].data_source, by_id["hotpotqa_dev_7"].split) == ("hotpotqa", "dev")
  # --data_source overrides the file name
  assert flashrag.convert_file(str(hp), data_source="hp")[0].data_source == "hp"
  assert flashrag.source_and_split("x/bamboogle.jsonl") == ("bamboogle", "test")


@pytest.mark.parametrize("row,field", [
    ({"id": "t", "question": "q"}, "golden_answers"),
    ({"id": "t", "question": "q", "golden_answers": []}, "golden_answers"),
    ({"id": "t", "question": "q", "golden_answers": ["a", 3]}, "golden_answers"),
    ({"id": "t", "question": "  ", "golden_answers": ["a"]}, "question"),
    ({"id": ["t"], "question": "q", "golden_answers": ["a"]}, "id"),
])
def test_flashrag_bad_row_names_file_line_field(tmp_path, capsys, row, field):
  path = tmp_path / "popqa_test.jsonl"
  path.write_text(json.dumps(FLASHRAG_NQ[0]) + "\n\n" + json.dumps(row) + "\n")
  msg = f"{path}: line 3: field '{field}'"
  with pytest.raises(RecordError) as e:
    flashrag.convert_file(str(path))
  assert msg in str(e.value)
  with pytest.raises(RecordError) as e:  # the same converter behind load_records / evaluate --data
    load_records(str(path))
  assert msg in str(e.value)
  with pytest.raises(SystemExit) as e:
    flashrag.main(["--in", str(path), "--out", str(tmp_path / "o")])
  assert msg in str(e.value)


def test_load_records_reads_flashrag_jsonl_directly(tmp_path):
  nq = write_jsonl(tmp_path / "nq" / "test.jsonl", FLASHRAG_NQ)
  direct = load_records(str(nq), template="brief")
  assert direct == flashrag.convert_file(str(nq), template="brief")
  # a record file next to a FlashRAG file: each row goes through its own path
  from stepsearch_jax.data.records import write_records
  rec = write_records(direct[:1], str(tmp_path / "rec.jsonl"))
  assert [r.id for r in load_records(f"{rec},{nq}")] == ["nq_test_0", "nq_test_0", "nq_test_1"]


# --- B: evaluate's files -> rewards eval --------------------------------------------------------

RESPONSES = {"nq_test_0": "<search> hamlet author </search>"
                          "<answer> {William Shakespeare} </answer>",
             "nq_test_1": "<answer> Paris, France </answer>",
             "hotpotqa_dev_7": "I do not know."}


def trajectories(records):
  return [Trajectory(id=r.id, data_source=r.data_source, prompt_text=r.prompt[0]["content"],
                     prompt_ids=[], response_text=RESPONSES[r.id], ground_truth=r.ground_truth,
                     queries=re.findall(r"<search>(.*?)</search>", RESPONSES[r.id]))
          for r in records]


def test_evaluate_files_round_trip_through_rewards_eval(tmp_path, capsys):
  write_jsonl(tmp_path / "nq" / "test.jsonl", FLASHRAG_NQ)
  write_jsonl(tmp_path / "hotpotqa_dev.jsonl", FLASHRAG_HOTPOT)
  recs = load_records([str(tmp_path / "nq" / "test.jsonl"), str(tmp_path / "hotpotqa_dev.jsonl")])
  rows = predictions.score_predictions(trajectories(recs))
  assert [(r["em"], r["searches"]) for r in rows] == [(1.0, 1), (0.0, 0), (0.0, 0)]
  assert rows[1]["f1"] == pytest.approx(2 / 3) and rows[2]["prediction"] is None
  ours = predictions.write_jsonl(rows, str(tmp_path / "eval" / "predictions.jsonl"))
  released = predictions.write_released_json(rows, str(tmp_path / "eval" / "predictions.json"))

  items = json.load(open(released, encoding="utf-8"))
  assert isinstance(items, list) and [sorted(i) for i in items] == [
      ["data_source", "ground_truth", "id", "prompt", "response"]] * 3
  assert items[0]["ground_truth"] == ["Shakespeare", "William Shakespeare"]

  want = [{"em": r["em"], "f1": r["f1"]} for r in rows]
  oracle = o_evaluate(released)
  for path in (ours, released):
    for preset in ("ours", "released"):
      got, table = run_eval(capsys, path, tmp_path / "per.jsonl", preset)
      assert got == want, (path, preset)
      assert table == {"hotpotqa": (1, 0.0, 0.0), "nq": (2, 0.5, round((1 + 2 / 3) / 2, 4))}
      for source, m in oracle.items():
        assert table[source][1:] == (round(m["em"], 4), round(m["f1"], 4))


def test_released_json_array_read_with_item_lines(tmp_path, capsys):
  items = [{"id": 0, "data_source": "musi", "prompt": "p", "response": "<answer> Köln </answer>",
            "ground_truth": "köln"},
           {"id": 1, "data_source": "musi", "prompt": "p", "response": "<answer>x</answer>",
            "ground_truth": ["y", "x"]}]
  path = tmp_path / "20250515_233049.json"
  path.write_text(json.dumps(items, ensure_ascii=False, indent=2), encoding="utf-8")
  got, table = run_eval(capsys, path, tmp_path / "per.jsonl", "released")
  assert got == [{"em": 1.0, "f1": 1.0}] * 2 and table == {"musi": (2, 1.0, 1.0)}
  # a bad item is named by the line it starts on
  del items[1]["response"]
  path.write_text(json.dumps(items, indent=2))
  start = path.read_text().splitlines().index("  {", 2) + 1  # the second item's first line
  with pytest.raises(SystemExit, match=rf"line {start}: field 'response'"):
    run_eval(capsys, path, tmp_path / "per.jsonl")


def test_evaluate_defines_released_json_flag():
  """evaluate.py is probed in a subprocess: its absl flags would clash with serve.py's here."""
  code = ("import stepsearch_jax.evaluate as e; from absl import flags; "
          "print(flags.FLAGS['released_json'].default, e.score_predictions is "
          "__import__('stepsearch_jax.rewards.predictions', fromlist=['x']).score_predictions)")
  p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert p.returncode == 0, p.stderr
  assert p.stdout.split() == ["False", "True"]


# --- --preset released against the oracle ------------------------------------------------------

EDGE = [  # (data_source, response, ground_truth)
    ("a", "no answer block at all", ["the"]),                          # released EM 1, ours 0
    ("a", "I do not know.", ["B", "A"]),                               # gold "A" normalises to ""
    ("a", "no answer block", ["Paris"]),
    ("a", "<answer></answer>", [""]),                                  # empty answer, empty gold
    ("a", "<answer> \\boxed{Paris} </answer>", ["paris"]),             # braces rule
    ("a", "<answer> {a} b {c </answer>", ["c"]),                       # last '{', no '}'
    ("a", "<answer> {} </answer>", ["x"]),
    ("a", "<answer>x</answer> and <answer> The Eiffel-Tower! </answer>",
     ["eiffeltower", "Eiffel Tower"]),                                 # last block, several golds
    ("b", "<answer> Paris, France </answer>", "Paris"),                # string gold, F1 2/3
    ("b", "<answer>\nNew\nYork\n</answer>", ["new york city", "NYC"]),  # DOTALL, F1 0.8
    ("b", "<answer> unclosed", ["unclosed"]),
    ("b", "<answer> a an the </answer>", ["."]),                       # both normalise to ""
    ("b", "<answer>1,000</answer>", ["1000"]),                         # punctuation deleted
    ("b", "<answer> the the cat cat </answer>", ["cat"]),              # F1 2/3, unrounded
    ("b", "<answer> Köln </answer>", ["KÖLN"]),
]


def edge_items():
  return [{"id": i, "data_source": s, "prompt": "", "response": r, "ground_truth": g}
          for i, (s, r, g) in enumerate(EDGE)]


def test_released_preset_equals_released_script_on_edge_cases(tmp_path, capsys):
  items = edge_items()
  released = tmp_path / "pred.json"
  released.write_text(json.dumps(items, indent=2))
  shape1 = write_jsonl(tmp_path / "pred.jsonl", [
      {"response": it["response"], "targets": it["ground_truth"], "data_source": it["data_source"]}
      for it in items])
  oracle = o_evaluate(released)
  per_item = [(o_em([it]), o_f1([it])) for it in items]
  for path in (released, shape1):
    got, table = run_eval(capsys, path, tmp_path / "per.jsonl", "released")
    assert [(g["em"], g["f1"]) for g in got] == per_item
    assert table == {s: (sum(1 for it in items if it["data_source"] == s),
                         round(m["em"], 4), round(m["f1"], 4)) for s, m in oracle.items()}
  # ours differs from the released rules only where there is no <answer> block
  ours, _ = run_eval(capsys, released, tmp_path / "per.jsonl")
  differs = [i for i, (o, (e, f)) in enumerate(zip(ours, per_item)) if (o["em"], o["f1"]) != (e, f)]
  assert differs == [0, 1] and ours[0] == ours[1] == {"em": 0.0, "f1": 0.0}
  assert per_item[0] == per_item[1] == (1.0, 0.0)
  assert per_item[8][1] == pytest.approx(2 / 3) and per_item[9][1] == pytest.approx(0.8)


def test_released_preset_rejects_what_crashes_the_released_script(tmp_path, capsys):
  cases = [([{"data_source": "a", "response": "<answer>x</answer>", "ground_truth": []}],
            "ground_truth", ValueError),
           ([{"data_source": "a", "response": "<answer>x</answer>", "ground_truth": [3]}],
            "ground_truth", AttributeError),
           ([{"data_source": "a", "response": "x", "ground_truth": ["x"]},
             {"response": "x", "ground_truth": ["x"]}], "data_source", KeyError)]
  for items, field, crash in cases:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(items, indent=2))
    with pytest.raises(crash):
      o_evaluate(path)
    with pytest.raises(SystemExit, match=f"field '{field}'"):
      run_eval(capsys, path, tmp_path / "per.jsonl", "released")
    run_eval(capsys, path, tmp_path / "per.jsonl")      # ours scores these


def test_rewards_eval_cli_preset_released(tmp_path):
  path = tmp_path / "pred.json"
  path.write_text(json.dumps(edge_items()[:3], indent=2))
  p = subprocess.run([sys.executable, "-m", "stepsearch_jax.rewards", "eval", "--preset",
                      "released", "--in", str(path), "--out", str(tmp_path / "o.jsonl")],
                     capture_output=True, text=True, timeout=120)
  assert p.returncode == 0, p.stderr
  assert "| a | 3 | 0.6667 | 0.0000 |" in p.stdout
