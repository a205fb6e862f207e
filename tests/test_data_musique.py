"""MuSiQue conversion: a raw sample and a released-format sample written here become valid records."""

import json
import subprocess
import sys

import pytest

from stepsearch_jax.data.musique import convert_file
from stepsearch_jax.data.records import RecordError, load_records

RAW = {
    "id": "2hop__1_2", "question": "Who founded the company that made the Zorbex",
    "answer": "Ilse Varga", "answer_aliases": ["I. Varga"], "answerable": True,
    "question_decomposition": [
        {"id": 1, "question": "Zorbex >> manufacturer", "answer": "Quellwerk", "paragraph_support_idx": 2},
        {"id": 2, "question": "Who founded #1?", "answer": "Ilse Varga", "paragraph_support_idx": 0}],
    "paragraphs": [
        {"idx": 0, "title": "Quellwerk", "paragraph_text": "Quellwerk was founded by Ilse Varga.", "is_supporting": True},
        {"idx": 1, "title": "Other", "paragraph_text": "An unrelated paragraph.", "is_supporting": False},
        {"idx": 2, "title": "Zorbex", "paragraph_text": "The Zorbex is made by Quellwerk.", "is_supporting": True}],
}
RELEASED = {"question": "Where was the founder of Quellwerk born?", "final_answer": "Graz",
            "answer_aliases": [], "sub_searchs": [["Quellwerk founder", "who founded Quellwerk"],
                                                  ["Ilse Varga birthplace"]],
            "sub_support_docs": [{"title": "Quellwerk", "paragraph_text": "Quellwerk was founded by Ilse Varga."},
                                 {"title": "Ilse Varga", "paragraph_text": "Ilse Varga was born in Graz."}],
            "extra_column": 1}


def write(tmp_path, rows, name="raw.jsonl"):
  path = tmp_path / name
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def test_cli_converts_raw_and_released(tmp_path):
  unanswerable = dict(RAW, id="x", answerable=False)
  inp = write(tmp_path, [RAW, RELEASED, unanswerable])
  p = subprocess.run([sys.executable, "-m", "stepsearch_jax.data.musique", "--in", inp, "--out",
                      str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
  assert p.returncode == 0, p.stderr
  recs = load_records(str(tmp_path / "out" / "train.parquet"))
  assert len(recs) == 2
  raw, rel = recs
  assert raw.question == "Who founded the company that made the Zorbex?"
  assert raw.targets == ["Ilse Varga", "I. Varga"]
  assert raw.search_keys == [["Zorbex manufacturer", "manufacturer of Zorbex", "Zorbex >> manufacturer"],
                             ["Who founded Quellwerk?"]]   # #1 replaced by the first sub-answer
  assert [d["title"] for d in raw.support_docs] == ["Zorbex", "Quellwerk"]  # decomposition order
  assert rel.data_source == "musi" and rel.targets == ["Graz"]
  assert rel.search_keys == RELEASED["sub_searchs"] and rel.support_docs == RELEASED["sub_support_docs"]
  corpus = [json.loads(l) for l in open(tmp_path / "out" / "corpus.jsonl")]
  texts = {c["content"] for c in corpus}
  assert "An unrelated paragraph." in texts and "Ilse Varga was born in Graz." in texts
  assert len(texts) == len(corpus) == 4      # the shared Quellwerk paragraph appears once
  for r in recs:
    for d in r.support_docs:
      assert d["paragraph_text"] in texts


def test_test_split_drops_gold_unless_kept(tmp_path):
  inp = write(tmp_path, [RAW])
  recs, _ = convert_file(inp, split="test")
  assert recs[0].search_keys == [] and recs[0].support_docs == []
  recs, _ = convert_file(inp, split="test", keep_gold=True)
  assert len(recs[0].support_docs) == 2


@pytest.mark.parametrize("row,field", [
    (dict(RAW, answer=None), "answer"),
    (dict(RAW, question_decomposition=[]), "question_decomposition"),
    (dict(RAW, paragraphs=[{"title": "t"}]), "paragraphs[0].paragraph_text"),
    (dict(RELEASED, sub_searchs=["flat string"]), "sub_searchs"),
    (dict(RELEASED, sub_support_docs=[{"title": "t"}]), "sub_support_docs[0].paragraph_text"),
    ({"question": "q"}, "question_decomposition"),
])
def test_bad_rows_name_file_row_field(tmp_path, row, field):
  inp = write(tmp_path, [RAW, row])
  with pytest.raises(RecordError) as e:
    convert_file(inp)
  assert inp in str(e.value) and "row 1" in str(e.value) and f"'{field}" in str(e.value)
