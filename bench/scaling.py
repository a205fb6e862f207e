"""How our cost grows with model size, batch and context: one table and one PNG from the benches' JSON.

  .venv/bin/python bench/scaling.py   (reads bench/results/{rollout,rollout_scale,update}.json;
                                       writes bench/results/scaling.md and docs/scaling.png)

No new measurement: it gathers what `bench/rollout.py` (the 3.3M word-level toy, real search
episodes), `bench/rollout.py --models ...` (real shapes, scripted 5-search episodes) and
`bench/update.py` (the jitted StePPO update) measured, so that one place shows the trend. Rows a
bench has not run at a size say so instead of being extrapolated. Rollout tokens/s of the toy and
of the real shapes come from different episodes (the toy stops at `</search>`, the scripted ones
decode 24 tokens per turn), so they are comparable in trend, not digit for digit.
"""

import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")


def _load(name: str) -> dict | None:
  path = os.path.join(RESULTS, name)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def rows() -> tuple[list[dict], list[dict], list[dict]]:
  """(rollout rows, update rows, context rows), each a flat dict per measurement."""
  roll, upd, ctx = [], [], []
  toy = _load("rollout.json")
  if toy:
    for r in toy["results"]:
      n = r["native"]
      roll.append({"model": "toy (word-level)", "params": toy["model_params"], "batch": r["batch"],
                   "native_tok_s": n["tokens_per_s"],
                   "torch_tok_s": r.get("torch", {}).get("tokens_per_s"),
                   "decode_step_ms": 1e3 * n["phases"]["decode_call_s"] / n["decode_steps"],
                   "roofline_step_ms": None, "episodes": "real (toy policy searches)"})
  scale = _load("rollout_scale.json")
  if scale:
    for r in scale["results"]:
      roll.append({"model": r["model"], "params": r["params"], "batch": r["batch"],
                   "native_tok_s": r["native_tok_s"], "torch_tok_s": r["torch_tok_s"],
                   "decode_step_ms": r["decode_step_ms"], "roofline_step_ms": r["roofline_step_ms"],
                   "episodes": f"scripted ({scale['turn_tokens']} tokens per turn)"})
    params = {m["model"]: m["params"] for m in scale["models"]}
    for c in scale["contexts"]:
      ctx.append({**c, "params": params.get(c["model"])})
  update = _load("update.json")
  if update:
    for r in update["results"]:
      upd.append({"model": r["model"], "params": r["params"], "tokens": r["tokens_per_update"],
                  "update_tok_s": r["update_tokens_per_s"], "mfu": r["update_mfu"]})
  return roll, upd, ctx


def _f(x, digits=1) -> str:
  return "not run" if x is None else f"{x:.{digits}f}"


def markdown(roll, upd, ctx) -> str:
  out = ["Rollouts (native driver, float32 on this CPU; torch = transformers `generate`):", "",
         "| model | params | batch | native tok/s | torch tok/s | decode step ms | roofline ms | episodes |",
         "|---|---|---|---|---|---|---|---|"]
  for r in sorted(roll, key=lambda r: (r["params"], r["batch"])):
    out.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['batch']} | {_f(r['native_tok_s'], 0)}"
               f" | {_f(r['torch_tok_s'], 0)} | {_f(r['decode_step_ms'])} | "
               f"{_f(r['roofline_step_ms'])} | {r['episodes']} |")
  out += ["", "Decode step against cache length (engine alone, every row holding that many tokens):",
          "", "| model | context | batch | decode step ms | roofline ms | tok/s |", "|---|---|---|---|---|---|"]
  for c in ctx:
    out.append(f"| {c['model']} | {c['context']} | {c['batch']} | {c['decode_step_ms']:.1f} | "
               f"{c['roofline_step_ms']:.1f} | {c['tokens_per_s']:.0f} |")
  out += ["", "StePPO update (policy + critic, jitted, float32):", "",
          "| model | params | tokens per update | update tok/s | MFU |", "|---|---|---|---|---|"]
  for u in upd:
    out.append(f"| {u['model']} | {u['params'] / 1e6:.1f}M | {u['tokens']} | "
               f"{u['update_tok_s']:.1f} | {u['mfu']:.2f} |")
  return "\n".join(out) + "\n"


def plot(roll, upd, ctx, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(1, 3, figsize=(16, 4.6))
  for b in sorted({r["batch"] for r in roll}):
    pts = sorted((r["params"], r["native_tok_s"]) for r in roll if r["batch"] == b)
    ax[0].plot(*zip(*pts), "o-", label=f"batch {b}")
  ax[0].set(xscale="log", yscale="log", xlabel="parameters", ylabel="generated tokens/s",
            title="rollout tokens/s vs model size")
  for b in sorted({r["batch"] for r in roll}):
    pts = sorted((r["params"], r["decode_step_ms"]) for r in roll if r["batch"] == b)
    ax[1].plot(*zip(*pts), "o-", label=f"batch {b}")
  for b in sorted({c["batch"] for c in ctx}):
    pts = sorted((c["context"], c["decode_step_ms"], c["roofline_step_ms"])
                 for c in ctx if c["batch"] == b)
    line, = ax[2].plot([p[0] for p in pts], [p[1] for p in pts], "s-", label=f"batch {b} (ours)")
    ax[2].plot([p[0] for p in pts], [p[2] for p in pts], "--", color=line.get_color(),
               label=f"batch {b} bandwidth roofline")
  ax[1].set(xscale="log", yscale="log", xlabel="parameters", ylabel="ms per decode step",
            title="decode step vs model size")
  ax[2].set(xscale="log", yscale="log", xlabel="cache length per row (tokens)",
            ylabel="ms per decode step", title="decode step vs context (SmolLM2-135M)")
  if upd:
    t = ax[0].twinx()
    t.plot([u["params"] for u in upd], [u["update_tok_s"] for u in upd], "k^:", label="update tok/s")
    t.set(yscale="log", ylabel="update tokens/s (black)")
  for a in ax:
    a.grid(alpha=0.3, which="both")
    a.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main() -> None:
  roll, upd, ctx = rows()
  md = markdown(roll, upd, ctx)
  with open(os.path.join(RESULTS, "scaling.md"), "w") as f:
    f.write(md)
  plot(roll, upd, ctx, os.path.join(ROOT, "docs", "scaling.png"))
  print(md)


if __name__ == "__main__":
  main()
