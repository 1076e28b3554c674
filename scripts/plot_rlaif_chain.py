"""The RLAIF chain's figure: gold reward (± s.e.) per family on the test split, for the models of one
or more evaluate.py results.json files (e.g. SFT, human-feedback PPO and DPO, RLAIF PPO and DPO, and
RLAIF PPO with a principle removed from the constitution).

    python scripts/plot_rlaif_chain.py out/eval/results.json ablation/eval/results.json \\
        --models sft ppo dpo ppo_rlaif dpo_rlaif "ppo_rlaif (no harm principle)" --out docs/rlaif_chain.png
"""

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("results", nargs="+", help="evaluate.py results.json files")
parser.add_argument("--models", nargs="+", default=None, help="rows to show, in this order (default: all)")
parser.add_argument("--rename", nargs="*", default=[], help="OLD=NEW row names")
parser.add_argument("--out", default="docs/rlaif_chain.png")
args = parser.parse_args()

rename = dict(r.split("=", 1) for r in args.rename)
rows = {rename.get(r["name"], r["name"]): r for path in args.results for r in json.load(open(path))}
models = args.models or list(rows)
groups = ["all", "fact", "belief", "arith", "list", "greet", "unsafe", "lookalike"]
fig, ax = plt.subplots(figsize=(13, 4.2))
width = 0.85 / len(models)
for k, m in enumerate(models):
    r = rows[m]
    mean = [r["gold_reward"] if g == "all" else r[f"gold_{g}"] for g in groups]
    se = [r["gold_reward_se"] if g == "all" else r[f"gold_{g}_se"] for g in groups]
    ax.bar([i + k * width for i in range(len(groups))], mean, width, yerr=se, capsize=2,
           label=f"{m} (win vs SFT {100 * r['win_rate_vs_sft']:.0f} %)")
ax.axhline(0, color="black", lw=0.5)
ax.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(groups))], groups)
ax.set_ylabel("gold reward (mean ± s.e.)")
ax.set_title("Test split: human feedback against AI feedback (the RLAIF chain)")
ax.legend(fontsize=8, ncol=2)
fig.tight_layout()
fig.savefig(args.out, dpi=110)
print(f"wrote {args.out}")
