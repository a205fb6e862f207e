"""Records: round trip through parquet and jsonl, errors naming file/row/field, prompt rendering."""

import json

import pytest

from stepsearch_jax.data import templates
from stepsearch_jax.data.records import (Record, RecordError, load_records, record_from_row,
                                         render_prompt, write_records)


def make(i=0, **kw):
  base = dict(id=f"r{i}", data_source="musi", question="Where was Ünal born",
              prompt=[{"role": "user", "content": templates.make_prompt("Where was Ünal born")}],
              targets=["Köln", "Cologne"], search_keys=[["Ünal birthplace", "where was Ünal born"]],
              support_docs=[{"title": "Ünal", "paragraph_text": "Ünal was born in Köln."}],
              split="train", index=i, extra={"hops": [1, 2]})
  base.update(kw)
  return Record(**base)


@pytest.mark.parametrize("ext", ["parquet", "jsonl"])
def test_round_trip(tmp_path, ext):
  recs = [make(0), make(1, search_keys=[], support_docs=[], split="test")]
  path = write_records(recs, str(tmp_path / f"x.{ext}"))
  back = load_records(path)
  assert back == recs
  assert back[0].ground_truth == {"target": ["Köln", "Cologne"],
                                  "search_keys": [["Ünal birthplace", "where was Ünal born"]]}
  # comma-separated list of files
  assert len(load_records(f"{path},{path}")) == 4


def good_row():
  return make().to_row()


@pytest.mark.parametrize("mutate,field", [
    (lambda r: r.pop("prompt"), "prompt"),
    (lambda r: r.update(data_source=3), "data_source"),
    (lambda r: r["reward_model"]["ground_truth"].pop("target"), "reward_model.ground_truth.target"),
    (lambda r: r["reward_model"]["ground_truth"].update(target=[1]),
     "reward_model.ground_truth.target"),
    (lambda r: r["reward_model"]["ground_truth"].update(search_keys=[["ok"], [5]]),
     "reward_model.ground_truth.search_keys[1]"),
    (lambda r: r["extra_info"]["support_docs"].append({"title": "t"}),
     "extra_info.support_docs[1].paragraph_text"),
    (lambda r: r["extra_info"].update(index="7"), "extra_info.index"),
])
def test_bad_rows_name_file_row_field(tmp_path, mutate, field):
  rows = [good_row(), good_row()]
  mutate(rows[1])
  path = tmp_path / "bad.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  with pytest.raises(RecordError) as e:
    load_records(str(path))
  assert str(path) in str(e.value) and "row 1" in str(e.value) and f"'{field}'" in str(e.value)


def test_bad_json_and_missing_file(tmp_path):
  path = tmp_path / "b.jsonl"
  path.write_text(json.dumps(good_row()) + "\n{oops\n")
  with pytest.raises(RecordError, match=r"row 1 \(line 2\): not valid JSON"):
    load_records(str(path))
  with pytest.raises(RecordError, match="no such file"):
    load_records(str(tmp_path / "none.parquet"))


def test_minimal_released_row_defaults():
  row = {"data_source": "musi", "prompt": [{"role": "user", "content": templates.make_prompt("Q x")}],
         "reward_model": {"ground_truth": {"target": "A"}}, "extra_info": {"split": "test", "index": 4}}
  rec = record_from_row(row, "f", 0)
  assert (rec.id, rec.question, rec.targets, rec.search_keys, rec.support_docs) == (
      "musi_test_4", "Q x?", ["A"], [], [])


def test_templates_and_render_prompt():
  assert templates.clean_question("  who? ") == "who?"
  assert templates.make_prompt("who", "think").endswith("The Question you need to answer: who?\n")
  plan = templates.make_prompt("who", "plan")
  assert "<plan>" in plan and "<observation>" in plan and plan.endswith("Question: who?\n")
  with pytest.raises(ValueError, match="template"):
    templates.make_prompt("x", "nope")
  rec = make()
  assert render_prompt(None, rec) == templates.make_prompt(rec.question)
  assert render_prompt(None, "who", "plan") == plan

  from tokenizers import Tokenizer, models
  from transformers import PreTrainedTokenizerFast
  tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, "<unk>")),
                                unk_token="<unk>")
  tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                       "{% if add_generation_prompt %}<|assistant|>{% endif %}")
  text = render_prompt(tok, rec, "think")
  assert text == "<|user|>" + templates.make_prompt(rec.question) + "<|assistant|>"
  assert render_prompt(tok, rec, None) == "<|user|>" + rec.prompt[0]["content"] + "<|assistant|>"
