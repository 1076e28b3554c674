"""The RLAIF figure: the AI labeller's agreement with gold per family beside the simulated humans', and
its position bias before averaging both orders, for each labeller measured (scripts/measure_rlaif.py).

    python scripts/plot_rlaif.py out/rlaif_labeller/measure_sample.json small/measure_sample.json \\
        --names "0.93M" "0.11M" --out docs/rlaif.png
"""

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("measures", nargs="+", help="scripts/measure_rlaif.py JSON files")
parser.add_argument("--names", nargs="+", default=None)
parser.add_argument("--out", default="docs/rlaif.png")
args = parser.parse_args()

runs = [json.load(open(p)) for p in args.measures]
names = args.names or [f"{r['params'] / 1e6:.2f}M" for r in runs]
families = ["all", "fact", "belief", "arith", "list", "greet", "unsafe", "lookalike"]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.2))
width = 0.8 / (len(runs) + 1)
x = range(len(families))
for k, (r, name) in enumerate(zip(runs, names)):
    ax1.bar([i + k * width for i in x], [r["by_family"][f]["agree_gold"] for f in families], width,
            label=f"AI labeller {name}")
    ax2.bar([i + k * width for i in x], [r["by_family"][f]["position_bias_before"] for f in families], width,
            label=f"AI labeller {name}")
ax1.bar([i + len(runs) * width for i in x], [runs[0]["by_family"][f]["human_agree_gold"] for f in families], width,
        label="simulated humans", color="grey")
ax1.axhline(0.5, color="black", lw=0.5, ls=":")
ax1.set_ylim(0.3, 1)
ax1.set_ylabel("agreement with the gold ranking")
ax1.set_title(f"Same pairs ({runs[0]['pairs']} of the default feedback run), pairs whose gold scores differ")
ax2.set_ylabel("prefers the same position in both orders")
ax2.set_title("Position bias before averaging both orders (after: 0)")
for ax in (ax1, ax2):
    ax.set_xticks([i + width * len(runs) / 2 for i in x], families)
    ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(args.out, dpi=110)
print(f"wrote {args.out}")
