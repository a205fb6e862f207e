"""A deterministic synthetic multi-hop world: fictional entities, one-fact passages, 2-4 hop questions.

Why: the CPU demo trains a tiny word-level policy to search in minutes, and tests/benchmarks need
StepSearch-shaped data without downloads. So the world is small and regular on purpose:

- entities with invented names: people ("Vorna Kelthis"), places, countries, organisations
  ("Ostrel Guild") and works ("Silver Ferry"); every name is made of words from small pools, so the
  vocabulary stays modest;
- relations work->director->person, person->{birthplace, mentor, employer}, org->{founder,
  headquarters}, place->country; every fact is one passage ``The birthplace of Vorna Kelthis is
  Drumlow.`` titled by its subject, so one search for "Vorna Kelthis birthplace" finds it;
- distractor passages state the same relation for a similar, non-existent entity (same first
  name, same adjective ...), so retrieval has to match the whole name;
- a question chains 2-4 relations ("Where was the mentor of the director of Silver Ferry born?");
  its search keys are 3 phrasings per hop with the earlier hops' answers filled in (as MuSiQue's
  #k references are), its support docs are the hop passages verbatim, and its answer never occurs
  in its text, so it cannot be answered without the corpus.

Importable without jax. CLI: ``python -m stepsearch_jax.data.synthetic --out DIR [--seed ...]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import re
from collections import Counter, defaultdict
from typing import Sequence

from stepsearch_jax.data import templates
from stepsearch_jax.data.records import Record, write_records
from stepsearch_jax.texts import format_information

_FIRST_A = ["Vor", "Kel", "Dra", "Mi", "Sel", "Tor", "Ama", "Bri", "Cal", "Dun", "Eri", "Fen",
            "Gal", "Hes", "Iv", "Jor", "Lun", "Mar", "Nev", "Or", "Pel", "Quin", "Ras", "Sor"]
_FIRST_B = ["na", "is", "ric", "wen", "dor", "a", "on", "ith", "el", "ara"]
_LAST_A = ["Kel", "Mor", "Thal", "Brin", "Dask", "Fal", "Gor", "Hal", "Jen", "Lor", "Nar", "Pry",
           "Rook", "Stal", "Tre", "Vask", "Wend", "Yor"]
_LAST_B = ["this", "rel", "wick", "ford", "ham", "ley", "mont", "ser", "vane", "holt"]
_PLACE_A = ["Drum", "Oss", "Bel", "Cray", "Ash", "Fern", "Glen", "Hart", "Kil", "Lin", "Mist",
            "Nor", "Pen", "Red", "Sten", "Wil"]
_PLACE_B = ["low", "feld", "mere", "by", "ton", "wald", "haven", "moor"]
_COUNTRY = ["Velmar", "Ostrava", "Kesh", "Darnia", "Lumeria", "Tharos", "Brevia", "Solvane",
            "Caddor", "Ymbria", "Quarth", "Neloria"]
_ORG_A = ["Ostrel", "Varn", "Cobalt", "Helix", "Aldric", "Emberly", "Sable", "Torrin", "Wyvern",
          "Corvid", "Lantern", "Maelis", "Brightwater", "Ironleaf"]
_ORG_B = ["Guild", "Company", "Society", "Institute", "Works", "Trust"]
_WORK_A = ["Silver", "Hollow", "Crimson", "Quiet", "Broken", "Golden", "Distant", "Frozen",
           "Painted", "Burning", "Sleeping", "Wandering", "Hidden", "Last", "Northern", "Iron"]
_WORK_B = ["Ferry", "Lantern", "Harbor", "Garden", "Tower", "Mirror", "River", "Crown", "Orchard",
           "Bridge", "Winter", "Compass", "Lighthouse", "Meadow", "Anthem", "Voyage"]

# relation: (subject type, object type, noun, final-question forms, extra key phrasings)
RELATIONS = {
    "director": ("work", "person", "director", ["Who directed {s}?", "Who is the director of {s}?"],
                 ["who directed {s}"]),
    "birthplace": ("person", "place", "birthplace", ["Where was {s} born?",
                                                     "What is the birthplace of {s}?"],
                   ["where was {s} born"]),
    "mentor": ("person", "person", "mentor", ["Who trained {s}?", "Who was the mentor of {s}?"],
               ["who trained {s}"]),
    "employer": ("person", "org", "employer", ["Who does {s} work for?",
                                               "What is the employer of {s}?"],
                 ["who does {s} work for"]),
    "founder": ("org", "person", "founder", ["Who founded {s}?", "Who is the founder of {s}?"],
                ["who founded {s}"]),
    "headquarters": ("org", "place", "headquarters", ["Where is {s} based?",
                                                      "Where are the headquarters of {s}?"],
                     ["where is {s} based"]),
    "country": ("place", "country", "country", ["In which country is {s}?",
                                                "What is the country of {s}?"],
                ["which country is {s} in"]),
}
_BY_SUBJECT = defaultdict(list)
for _rel, (_st, *_rest) in RELATIONS.items():
  _BY_SUBJECT[_st].append(_rel)


def fact_text(subject: str, relation: str, obj: str) -> str:
  return f"The {RELATIONS[relation][2]} of {subject} is {obj}."


def search_keys_for(subject: str, relation: str) -> list[str]:
  """Phrasings of the one search that answers (subject, relation); the first is the best query."""
  noun = RELATIONS[relation][2]
  return [f"{subject} {noun}", f"{noun} of {subject}"] + [
      k.format(s=subject) for k in RELATIONS[relation][4]]


@dataclasses.dataclass
class World:
  """Entities by type, the fact table and the corpus; `search` is a small lexical retriever."""
  seed: int
  entities: dict[str, list[str]]                 # type -> names
  facts: dict[tuple[str, str], str]              # (subject, relation) -> object
  corpus: list[dict]                             # {id, title, content}
  fact_doc: dict[tuple[str, str], int]           # (subject, relation) -> corpus index

  def __post_init__(self):
    self.type_of = {n: t for t, names in self.entities.items() for n in names}
    self._postings: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for i, doc in enumerate(self.corpus):
      title = set(_words(doc["title"]))
      for w in set(_words(doc["content"])) | title:
        self._postings[w].append((i, 2.0 if w in title else 1.0))  # title words count double
    n = len(self.corpus)
    self._idf = {w: math.log(1 + n / len(p)) for w, p in self._postings.items()}

  def search(self, query: str, topk: int = 3) -> list[dict]:
    """Rank passages by the summed idf of query words they contain, title words doubled (ties:
    corpus order). A small stand-in for the retrieval server in tests, benchmarks and demos."""
    scores: Counter = Counter()
    for w in set(_words(query)):
      for i, boost in self._postings.get(w, ()):
        scores[i] += self._idf[w] * boost
    best = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:topk]
    return [self.corpus[i] for i, _ in best]

  def support_doc(self, subject: str, relation: str) -> dict:
    row = self.corpus[self.fact_doc[(subject, relation)]]
    return {"title": row["title"], "paragraph_text": row["content"]}


def _words(text: str) -> list[str]:
  return re.findall(r"\w+", text.lower())


def _pool(rng: random.Random, a: Sequence[str], b: Sequence[str], size: int) -> list[str]:
  combos = [x + y for x in a for y in b]
  rng.shuffle(combos)
  return combos[:min(size, len(combos))]


def _unique_names(rng, count, make, taken: set) -> list[str]:
  names, tries = [], 0
  while len(names) < count:
    tries += 1
    if tries > 100 * count + 1000:
      raise ValueError(f"cannot invent {count} distinct names from the word pools; lower the size")
    name = make()
    if name not in taken:
      taken.add(name)
      names.append(name)
  return names


def build_world(seed: int = 0, num_people: int = 200, distractors_per_fact: int = 1,
                compact_names: bool = False) -> World:
  """Invent entities and facts deterministically from `seed`; no files are written.

  compact_names: people, organisations and works get one-word names ("AmaaWendley" instead of
  "Amaa Wendley"), so a word-level tokenizer gives every entity one token. A tiny demo policy
  learns to copy one token from the retrieved passage into its next query far sooner than two.
  The random draws are the same either way, so the worlds differ only in spelling.
  """
  sep = "" if compact_names else " "
  if num_people < 4:
    raise ValueError(f"num_people={num_people} must be >= 4")
  rng = random.Random(seed)
  side = max(8, int(math.ceil(math.sqrt(num_people) * 1.5)))
  firsts = _pool(rng, _FIRST_A, _FIRST_B, side)
  lasts = _pool(rng, _LAST_A, _LAST_B, side)
  taken: set = set()
  people = _unique_names(rng, num_people, lambda: f"{rng.choice(firsts)}{sep}{rng.choice(lasts)}",
                         taken)
  n_places = max(6, num_people // 6)
  places = _unique_names(rng, n_places, lambda: rng.choice(_PLACE_A) + rng.choice(_PLACE_B), taken)
  countries = rng.sample(_COUNTRY, min(len(_COUNTRY), max(3, n_places // 4)))
  taken.update(countries)
  orgs = _unique_names(rng, max(4, num_people // 10),
                       lambda: f"{rng.choice(_ORG_A)}{sep}{rng.choice(_ORG_B)}", taken)
  works = _unique_names(rng, max(4, num_people // 2),
                        lambda: f"{rng.choice(_WORK_A)}{sep}{rng.choice(_WORK_B)}", taken)
  entities = {"person": people, "place": places, "country": countries, "org": orgs, "work": works}

  facts = {}
  for p in people:
    facts[(p, "birthplace")] = rng.choice(places)
    facts[(p, "mentor")] = rng.choice([q for q in rng.sample(people, 2) if q != p])
    facts[(p, "employer")] = rng.choice(orgs)
  for o in orgs:
    facts[(o, "founder")] = rng.choice(people)
    facts[(o, "headquarters")] = rng.choice(places)
  for w in works:
    facts[(w, "director")] = rng.choice(people)
  for pl in places:
    facts[(pl, "country")] = rng.choice(countries)

  def head(name: str, heads: Sequence[str]) -> str:
    if not compact_names:
      return name.split()[0]
    return next(h for h in sorted(heads, key=len, reverse=True) if name.startswith(h))

  makers = {
      "person": lambda s: f"{head(s, firsts)}{sep}{rng.choice(lasts)}",
      "org": lambda s: f"{head(s, _ORG_A)}{sep}{rng.choice(_ORG_B)}",
      "work": lambda s: f"{head(s, _WORK_A)}{sep}{rng.choice(_WORK_B)}",
      "place": lambda s: s[:3] + rng.choice(_PLACE_B) if len(s) > 3 else s + rng.choice(_PLACE_B),
  }
  corpus, fact_doc = [], {}
  for (subj, rel), obj in facts.items():
    fact_doc[(subj, rel)] = len(corpus)
    corpus.append({"title": subj, "content": fact_text(subj, rel, obj)})
    subj_type, obj_type = RELATIONS[rel][0], RELATIONS[rel][1]
    for _ in range(distractors_per_fact):
      for _try in range(20):  # a similar name that is no real entity
        shadow = makers[subj_type](subj)
        if shadow not in taken:
          break
      else:
        continue
      wrong = rng.choice([e for e in rng.sample(entities[obj_type], min(2, len(entities[obj_type])))
                          if e != obj] or entities[obj_type])
      corpus.append({"title": shadow, "content": fact_text(shadow, rel, wrong)})
  order = list(range(len(corpus)))
  rng.shuffle(order)
  where = {old: new for new, old in enumerate(order)}
  corpus = [dict(id=f"syn-{new}", **corpus[old]) for new, old in enumerate(order)]
  fact_doc = {k: where[v] for k, v in fact_doc.items()}
  return World(seed, entities, facts, corpus, fact_doc)


def _noun_phrase(relation: str, inner: str) -> str:
  return f"the {RELATIONS[relation][2]} of {inner}"


def _contains(text: str, name: str) -> bool:
  return re.search(r"\b" + re.escape(name.lower()) + r"\b", text.lower()) is not None


def sample_question(world: World, hops: int, rng: random.Random) -> dict | None:
  """One chain question of `hops` relations, or None when the random walk dead-ends."""
  start_type = rng.choice(["work", "org", "person"])
  chain = [rng.choice(world.entities[start_type])]
  relations = []
  for _ in range(hops):
    options = _BY_SUBJECT.get(world.type_of[chain[-1]], [])
    rng.shuffle(options := list(options))
    for rel in options:
      nxt = world.facts[(chain[-1], rel)]
      if nxt not in chain:
        break
    else:
      return None
    relations.append(rel)
    chain.append(nxt)
  phrase = chain[0]
  for rel in relations[:-1]:
    phrase = _noun_phrase(rel, phrase)
  question = rng.choice(RELATIONS[relations[-1]][3]).format(s=phrase)
  question = question[0].upper() + question[1:]
  if any(_contains(question, e) for e in chain[1:]):
    return None  # an intermediate or final answer would be visible in the question
  hop_list = [{"subject": chain[i], "relation": rel, "object": chain[i + 1]}
              for i, rel in enumerate(relations)]
  return {"question": question, "answer": chain[-1], "hops": hop_list}


def make_records(world: World, num: int, min_hops: int = 2, max_hops: int = 4, split: str = "train",
                 seed: int = 0, exclude: set | None = None, template: str = "think") -> list[Record]:
  """`num` distinct questions (none of them in `exclude`) as StepSearch Records."""
  if not 1 <= min_hops <= max_hops:
    raise ValueError(f"need 1 <= min_hops ({min_hops}) <= max_hops ({max_hops})")
  rng = random.Random(f"{world.seed}/{seed}/{split}")
  seen = set(exclude or ())
  records, tries = [], 0
  while len(records) < num:
    tries += 1
    if tries > 200 * num + 1000:
      raise ValueError(f"could only make {len(records)} of {num} distinct {split} questions; "
                       "grow num_people or widen the hop range")
    q = sample_question(world, rng.randint(min_hops, max_hops), rng)
    if q is None or q["question"] in seen:
      continue
    seen.add(q["question"])
    idx = len(records)
    records.append(Record(
        id=f"synthetic_{split}_{idx}", data_source="synthetic", question=q["question"],
        prompt=[{"role": "user", "content": templates.make_prompt(q["question"], template)}],
        targets=[q["answer"]],
        search_keys=[search_keys_for(h["subject"], h["relation"]) for h in q["hops"]],
        support_docs=[world.support_doc(h["subject"], h["relation"]) for h in q["hops"]],
        split=split, index=idx, extra={"hops": q["hops"]}))
  return records


def make_world(out_dir: str, seed: int = 0, num_people: int = 200, num_train: int = 512,
               num_test: int = 128, min_hops: int = 2, max_hops: int = 4,
               distractors_per_fact: int = 1, template: str = "think",
               compact_names: bool = False) -> dict:
  """Build the world and write corpus.jsonl, train.parquet and test.parquet under `out_dir`.

  Returns dict(corpus=path, train=path, test=path, world=World). Train and test questions are
  disjoint.
  """
  world = build_world(seed, num_people, distractors_per_fact, compact_names)
  train = make_records(world, num_train, min_hops, max_hops, "train", seed, template=template)
  test = make_records(world, num_test, min_hops, max_hops, "test", seed,
                      exclude={r.question for r in train}, template=template)
  os.makedirs(out_dir, exist_ok=True)
  corpus_path = os.path.join(out_dir, "corpus.jsonl")
  with open(corpus_path, "w", encoding="utf-8") as f:
    for row in world.corpus:
      f.write(json.dumps(row) + "\n")
  return {"corpus": corpus_path, "train": write_records(train, os.path.join(out_dir, "train.parquet")),
          "test": write_records(test, os.path.join(out_dir, "test.parquet")), "world": world}


def world_from_config(syn_cfg, out_dir: str, template: str = "think") -> dict:
  """make_world from the config section ``data.synthetic`` (same key names); `template` is
  ``data.template``, rendered into each record's prompt."""
  keys = ("seed", "num_people", "num_train", "num_test", "min_hops", "max_hops",
          "distractors_per_fact", "compact_names")
  return make_world(out_dir, template=template, **{k: syn_cfg[k] for k in keys if k in syn_cfg})


# --- demonstrations for a supervised warm start -------------------------------------------------

FLAWS = ("repeat", "skip", "vague", "early")


def parse_flaws(flaws: str | Sequence[str]) -> list[str]:
  """`config.sft.flaws` ("early,skip") or a sequence as a checked list of FLAWS."""
  names = [f.strip() for f in flaws.split(",")] if isinstance(flaws, str) else list(flaws)
  names = [f for f in names if f]
  unknown = sorted(set(names) - set(FLAWS))
  if unknown or not names:
    raise ValueError(f"demonstration flaws {flaws!r}: a non-empty list drawn from {list(FLAWS)}")
  return names


def demonstration(record: Record, world: World, quality: float = 1.0,
                  rng: random.Random | None = None, flaws: Sequence[str] = FLAWS) -> list[dict]:
  """The search sequence for `record` as alternating model turns and searches (`think` format).

  Returns ``[{"kind": "model", "text": ...}, {"kind": "search", "query": ...}, ...]`` ending with
  a model turn that holds ``<answer>``; each model turn before a search ends with ``</search>``.
  Feed the searches to a retriever and join with :func:`render_demonstration`. With quality 1 the
  demonstration is the ideal one (best query per hop, the right answer). With quality < 1 each hop
  is, with probability 1 - quality, flawed in one of four ways: the same query is repeated,
  the search is skipped and the entity guessed, the query leaves out the name (so the entity is
  guessed), or the answer is given early with the current entity. Later hops then follow the
  world's facts for the (possibly wrong) entity, so the trajectory stays coherent. `flaws` picks
  which of the four are drawn; an ``early`` flaw on the first hop is no flaw (nothing to answer yet).
  """
  rng = rng or random.Random(0)
  flaws = parse_flaws(flaws)
  hops = record.extra.get("hops")
  if not hops:
    raise ValueError(f"record {record.id} has no extra['hops'] (not a synthetic-world record)")
  rels = [h["relation"] for h in hops]
  current = hops[0]["subject"]
  plan = " ".join(f"({i + 1}) the {RELATIONS[r][2]}" for i, r in enumerate(rels))
  turns: list[dict] = []
  thought = f"I need {plan}. First: {_noun_phrase(rels[0], current)}."
  for i, rel in enumerate(rels):
    noun, obj_type = RELATIONS[rel][2], RELATIONS[rel][1]
    flaw = rng.choice(flaws) if rng.random() > quality else None
    if flaw == "early" and i > 0:
      turns.append({"kind": "model", "text": f"<think> {thought} </think>\n<answer> {current} </answer>"})
      return turns
    query = search_keys_for(current, rel)[0]
    if flaw == "skip":
      thought += f" I will guess the {noun} of {current}."
      current = rng.choice(world.entities[obj_type])
      thought += f" I guess it is {current}."
      continue
    if flaw == "vague":
      query = noun
    turns.append({"kind": "model", "text": f"<think> {thought} </think>\n<search> {query} </search>"})
    turns.append({"kind": "search", "query": query})
    if flaw == "repeat":
      turns.append({"kind": "model", "text": f"<think> Let me search again. </think>\n"
                                             f"<search> {query} </search>"})
      turns.append({"kind": "search", "query": query})
    if flaw == "vague":
      current = rng.choice(world.entities[obj_type])
      thought = f"The results are unclear; I guess the {noun} is {current}."
    else:
      obj = world.facts[(current, rel)]
      thought = f"The {noun} of {current} is {obj}."
      current = obj
    if i + 1 < len(rels):
      thought += f" Next: {_noun_phrase(rels[i + 1], current)}."
  turns.append({"kind": "model", "text": f"<think> {thought} </think>\n<answer> {current} </answer>"})
  return turns


def demonstration_segments(turns: Sequence[dict], search_fn, topk: int = 3
                           ) -> tuple[list[tuple[str, bool]], list]:
  """Turns as (text, is_model) segments with ``search_fn(query, topk)`` results inserted (§1.4).

  Tokenise each segment and set the loss mask to `is_model` to get a warm-start example whose
  inserted ``<information>`` text is context only. Returns (segments, retrieved rows per step).
  """
  segments, steps = [], []
  for turn in turns:
    if turn["kind"] == "model":
      segments.append((turn["text"], True))
    else:
      docs = list(search_fn(turn["query"], topk))
      steps.append(docs)
      segments.append((format_information(docs), False))
  return segments, steps


def render_demonstration(turns: Sequence[dict], search_fn, topk: int = 3) -> tuple[str, list]:
  """Join turns into one response text (as the reward reads it); returns (text, rows per step)."""
  segments, steps = demonstration_segments(turns, search_fn, topk)
  return "".join(t for t, _ in segments), steps


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description="Write a synthetic multi-hop world (corpus + records).")
  p.add_argument("--out", required=True)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--num_people", type=int, default=200)
  p.add_argument("--num_train", type=int, default=512)
  p.add_argument("--num_test", type=int, default=128)
  p.add_argument("--min_hops", type=int, default=2)
  p.add_argument("--max_hops", type=int, default=4)
  p.add_argument("--distractors_per_fact", type=int, default=1)
  p.add_argument("--template", choices=sorted(templates.TEMPLATES), default="think")
  a = vars(p.parse_args(argv))
  out = make_world(a.pop("out"), **a)
  print(json.dumps({k: v for k, v in out.items() if k != "world"} |
                   {"passages": len(out["world"].corpus)}))


if __name__ == "__main__":
  main()
