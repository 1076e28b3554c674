"""Learning curves: each stage's metrics.jsonl drawn as a grid of small panels, one PNG per stage.

    python plot.py out                              # every stage folder inside out/ -> out/plots/<stage>.png
    python plot.py out/ppo                          # one run -> out/plots/ppo.png
    python plot.py out/ppo_kl0.02 out/ppo_kl0.2     # runs of one stage overlaid, legend named after the folders
    python plot.py out --x tokens --smooth 0.9      # another x-axis; smooth the noisy per-step curves

What each stage's figure shows is the table PANELS below: which metrics share a panel and the unit
of its y-axis. The table is only a wish list: a panel is drawn when at least one of its metrics is
in the file, so a metric a stage does not log (or has renamed) is skipped, never an error, and a
stage the table does not know gets one panel per metric it logged.

Two kinds of metric: per-step ones, measured on one training batch (noisy, a point at every step),
and periodic ones (val/, eval/: a held-out measurement every N steps). --smooth draws an
exponential moving average of the per-step ones over their faint raw curve, as TensorBoard does;
periodic points are drawn as they are, with markers, since each is already an average over many
examples.

Which stage a folder holds comes from its meta.json ("stage"), or else from its name ("ppo_kl0.2"
is a PPO run), so a run still in progress (no meta.json yet) plots too. In an overlay the colour
is the run and the line style the metric (train solid, val dashed, ...).

From Python (pipeline.py): `plot.plot_runs(["out"], "out/plots", x="step", smooth=0.0)` returns the
paths written; `plot.make_figure(stage, runs)` returns the matplotlib Figure without saving it.
"""

import json
import math
import os
import re
from pathlib import Path

from matplotlib import rc_context
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

import common

# -----------------------------------------------------------------------------
# What to draw: per stage, panels of (title, y-axis unit, [(metric, legend label), ...])

STAGES = ["pretrain", "sft", "feedback", "reward", "ppo", "dpo", "grpo"]  # figure order
STAGE_TITLES = {"pretrain": "Stage 0: pretraining", "sft": "Stage 1: supervised fine-tuning",
                "feedback": "Stage 2a: human feedback (samples to label)", "reward": "Stage 2b: reward model",
                "ppo": "Stage 3: PPO against the reward model", "dpo": "DPO on the preference pairs",
                "grpo": "GRPO on verifiable rewards"}
LR = ("Learning rate", "learning rate", [("train/lr", "lr")])
GRAD_NORM = ("Gradient norm (before clipping)", "L2 norm", [("train/grad_norm", "grad norm")])
GOLD = ("Gold reward, held out", "gold score per answer", [("eval/gold_reward", "gold reward")])
GOLD_HELD_OUT = ("Gold reward by why a prompt is held out", "gold score per answer",
                 [("eval/gold_held_out_fresh", "train-like (fresh)"), ("eval/gold_held_out_entity", "held-out entity"),
                  ("eval/gold_held_out_phrasing", "held-out phrasing")])
FAILURES = ("Failure modes, held-out prompts", "fraction",
            [("eval/refusal_rate_unsafe", "unsafe refused (good)"), ("eval/over_refusal_rate", "benign refused (bad)"),
             ("eval/over_refusal_rate_lookalike", "look-alikes refused (bad)"),
             ("eval/sycophancy_rate", "wrong beliefs agreed with (bad)")])

PANELS = {
    "pretrain": [
        ("Loss", "nats/token", [("train/loss", "train"), ("val/loss", "val")]),
        ("Facts and sums (greedy completion)", "fraction correct",
         [("eval/fact_accuracy", "facts"), ("eval/sum_accuracy", "sums")]),
        LR, GRAD_NORM,
    ],
    "sft": [
        ("Loss on response tokens", "nats/token", [("train/loss", "train"), ("val/loss", "val")]),
        GOLD, GOLD_HELD_OUT, FAILURES,
        ("Answer length, held-out prompts", "words", [("eval/length", "length")]),
        LR, GRAD_NORM,
    ],
    "feedback": [
        ("Gold score of the sampled answers", "gold score per answer", [("feedback/gold_mean", "mean")]),
        ("Answers that ended with <|end|>", "fraction", [("feedback/ended", "ended")]),
    ],
    "reward": [
        ("Bradley-Terry loss", "nats/pair", [("reward/loss", "train"), ("val/loss", "val")]),
        ("Pair accuracy", "fraction of pairs", [("reward/accuracy", "train vs labels"),
                                                ("val/acc_label", "held out vs labels"),
                                                ("reward/acc_gold", "held out vs gold"),
                                                ("reward/label_acc_gold", "labellers vs gold")]),
        ("Score margin, chosen - rejected", "reward units", [("reward/margin", "margin")]),
        ("Reward-gold correlation, held out", "Pearson r", [("reward/gold_corr", "corr")]),
        LR, GRAD_NORM,
    ],
    "ppo": [
        ("Reward-model score", "score per answer", [("objective/score", "score"),
                                                    ("objective/reward", "score - kl_coef * KL"),
                                                    ("eval/proxy_score", "score, held out")]),
        GOLD, GOLD_HELD_OUT, FAILURES,
        ("KL to the SFT model", "nats/sequence", [("objective/kl", "KL"), ("eval/kl_to_sft", "KL, held out")]),
        ("KL coefficient", "kl_coef", [("objective/kl_coef", "kl_coef")]),
        ("Policy entropy", "nats/token", [("objective/entropy", "entropy")]),
        ("Clip fraction", "fraction of tokens", [("ppo/clipfrac", "policy"), ("value/clipfrac", "value")]),
        ("Approx. KL, old to new policy", "nats/token", [("ppo/approx_kl", "approx KL")]),
        ("Probability ratio, mean", "ratio", [("ppo/ratio_mean", "ratio")]),
        ("Policy-gradient loss", "loss per token", [("ppo/pg_loss", "pg loss")]),
        ("Value loss", "squared error", [("value/loss", "value loss")]),
        ("Value explained variance", "fraction (1 = perfect)", [("value/explained_variance", "expl. var.")]),
        ("Response length", "tokens", [("response/length", "length")]),
        ("Answers without <|end|>", "fraction", [("response/no_end_rate", "no end")]),
    ],
    "dpo": [
        ("DPO loss", "nats/pair", [("dpo/loss", "train"), ("val/loss", "val")]),
        ("Preference accuracy", "fraction of pairs", [("dpo/accuracy", "train"), ("val/accuracy", "val")]),
        ("Implicit reward margin", "beta * log-ratio (nats)", [("dpo/margin", "chosen - rejected")]),
        ("Implicit rewards", "beta * log-ratio (nats)", [("dpo/chosen_reward", "chosen"),
                                                         ("dpo/rejected_reward", "rejected")]),
        ("Log-probs of the answers", "nats/sequence", [("dpo/chosen_logp", "chosen"),
                                                       ("dpo/rejected_logp", "rejected")]),
        GOLD, GOLD_HELD_OUT, FAILURES,
        ("KL to the SFT model (own samples)", "nats/sequence", [("eval/kl_to_sft", "KL")]),
        LR, GRAD_NORM,
    ],
    "grpo": [
        ("Verifier reward (training answers)", "fraction right and ended",
         [("grpo/reward", "all"), ("grpo/reward_arith", "arith"), ("grpo/reward_list", "list"),
          ("grpo/reward_fact", "fact")]),
        ("pass@1, validation", "fraction right and ended",
         [("eval/pass@1", "all"), ("eval/pass@1_arith", "arith"), ("eval/pass@1_list", "list"),
          ("eval/pass@1_fact", "fact")]),
        ("pass@G, validation", "fraction of prompts", [("eval/pass@G", "all"), ("eval/pass@G_arith", "arith"),
                                                       ("eval/pass@G_list", "list"), ("eval/pass@G_fact", "fact")]),
        ("Groups with no learning signal", "fraction of groups",
         [("grpo/zero_signal_groups", "all rewards equal"), ("grpo/solved_groups", "at least one right")]),
        ("Answer length, right and wrong", "tokens",
         [("response/length_right", "right"), ("response/length_wrong", "wrong"),
          ("eval/length_right", "right, validation"), ("eval/length_wrong", "wrong, validation")]),
        ("KL to the SFT model", "nats/sequence", [("objective/kl", "KL (k1)"), ("eval/kl_to_sft", "KL, validation")]),
        ("Answer length, all answers", "tokens", [("response/length", "length")]),
        ("KL loss term (k3)", "nats/token", [("ppo/kl", "k3")]),
        ("Policy entropy", "nats/token", [("ppo/entropy", "entropy")]),
        ("Clip fraction", "fraction of tokens", [("ppo/clipfrac", "policy")]),
        ("Answers without <|end|>", "fraction", [("response/no_end_rate", "no end")]),
    ],
}

# --x choice -> the metrics.jsonl columns that can serve (first found wins) and the axis label
X_AXES = {"step": (["step"], "step"), "tokens": (["tokens"], "tokens"),
          "samples": (["samples", "episodes"], "samples"), "episodes": (["episodes", "samples"], "episodes"),
          "pairs": (["pairs"], "preference pairs"), "time": (["time/elapsed_s"], "wall-clock time (s)")}
X_COLUMNS = {c for cols, _ in X_AXES.values() for c in cols}
LINESTYLES = ["-", "--", ":", "-."]
SETTINGS = {"train/lr", "objective/kl_coef"}  # schedules, not noisy measurements: never smoothed

# -----------------------------------------------------------------------------
# Reading runs


class Run:
    """One stage folder: its name (for legends), its stage, and its metrics rows."""

    def __init__(self, path, stage, rows):
        self.path, self.stage, self.rows, self.name = Path(path), stage, rows, Path(path).name


def stage_of(folder):
    """meta.json's "stage", else the stage the folder's name starts with, else the name itself."""
    meta = folder / "meta.json"
    if meta.exists():
        try:
            stage = json.loads(meta.read_text()).get("stage")
        except (json.JSONDecodeError, AttributeError):
            common.die(f"{meta}: not a valid JSON object")
        if isinstance(stage, str) and stage:
            return stage
    for stage in STAGES:
        if re.match(rf"{stage}(\b|[_\-.0-9])", folder.name):
            return stage
    return re.sub(r"[^\w.-]", "_", folder.name)


def find_runs(paths):
    """Stage folders from the paths given: a folder with metrics.jsonl, or a parent of such folders
    (searched two levels down, e.g. out/ or runs/ holding out-like folders)."""
    folders = []
    for p in map(Path, paths):
        if not p.is_dir():
            common.die(f"{p}: no such folder")
        if (p / "metrics.jsonl").is_file():
            folders.append(p)
            continue
        found = (sorted(f.parent for f in p.glob("*/metrics.jsonl"))
                 or sorted(f.parent for f in p.glob("*/*/metrics.jsonl")))
        if not found:
            common.die(f"{p}: no metrics.jsonl in it nor in its subfolders (is it a stage's --out folder?)")
        folders += found
    runs = [Run(f, stage_of(f), common.read_metrics(f / "metrics.jsonl")) for f in dict.fromkeys(folders)]
    # Two runs called "ppo" (runs/a/ppo, runs/b/ppo): name them by as many trailing folders as tell them apart.
    for name in {r.name for r in runs}:
        group = [r for r in runs if r.name == name]
        parts = [r.path.resolve().parts for r in group]
        k = 1
        while len(group) > 1 and len({p[-k:] for p in parts}) < len(group) and k < max(map(len, parts)):
            k += 1
        for run, p in zip(group, parts):
            run.name = "/".join(p[-k:])
    return runs


# -----------------------------------------------------------------------------
# Series: (x, y) points of one metric of one run, smoothed or not


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def series(run, metric, x_col):
    """Points (x, y) where the row has both; the ±1 s.e. from `<metric>_se` when logged alongside."""
    xs, ys, ses = [], [], []
    for row in run.rows:
        if _is_number(row.get(x_col)) and _is_number(row.get(metric)):
            xs.append(row[x_col])
            ys.append(row[metric])
            ses.append(row.get(metric + "_se"))
    if not all(_is_number(s) for s in ses):
        ses = None
    return xs, ys, ses


def is_periodic(run, metric):
    """Held-out measurements: val/ and eval/ names, or anything logged on under half of the steps."""
    present = sum(_is_number(row.get(metric)) for row in run.rows)
    return metric.startswith(("val/", "eval/")) or present < 0.5 * len(run.rows)


def ema(ys, smooth):
    """Exponential moving average, debiased at the start (TensorBoard's smoothing)."""
    out, avg = [], 0.0
    for i, y in enumerate(ys, 1):
        avg = smooth * avg + (1 - smooth) * y
        out.append(avg / (1 - smooth ** i))
    return out


def _short(v, _pos=None):
    """Tick labels people read at a glance: 250k, 1.5M."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.4g}{suffix}"
    return f"{v:.4g}"


# -----------------------------------------------------------------------------
# One figure per stage


def panels_for(stage, runs):
    """The stage's panels whose metrics are present; for an unknown stage (or none present), one per metric."""
    present = {k for run in runs for row in run.rows for k, v in row.items() if _is_number(v)}
    known = [(t, u, [s for s in ss if s[0] in present]) for t, u, ss in PANELS.get(stage, [])]
    known = [p for p in known if p[2]]
    if known:
        return known
    metrics = sorted(present - X_COLUMNS - {m for m in present if m.endswith("_se") and m[:-3] in present})
    return [(m, "value", [(m, m)]) for m in metrics]


def pick_x(runs, x):
    """The x column of each run for --x, or "step" for all of them when one run lacks it."""
    columns, label = X_AXES[x]
    cols = []
    for run in runs:
        have = [c for c in columns if any(_is_number(row.get(c)) for row in run.rows)]
        if not have:
            print(f"note: {run.path} has no '{x}' column: its figure uses step as the x-axis")
            return ["step"] * len(runs), "step"
        cols.append(have[0])
    if x in ("samples", "episodes") and len(set(cols)) == 1:
        label = cols[0]  # PPO counts its samples as episodes
    return cols, label


def make_figure(stage, runs, x="step", smooth=0.0):
    """A grid of small panels for runs of one stage; several runs are overlaid, one colour each."""
    panels = panels_for(stage, runs)
    x_cols, x_label = pick_x(runs, x)
    time_div = 1
    if x_cols[0] == "time/elapsed_s" and max(row.get(x_cols[0], 0) for run in runs for row in run.rows) > 600:
        time_div, x_label = 60, "wall-clock time (min)"  # long runs read better in minutes
    multi = len(runs) > 1
    ncols = len(panels) if len(panels) <= 3 else (2 if len(panels) == 4 else 3 if len(panels) in (5, 6, 9) else 4)
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(max(4.0 * ncols, 9.0), 2.9 * nrows + 0.9), dpi=110, layout="constrained")
    colors = [f"C{i % 10}" for i in range(10)]

    first = None
    for i, (title, unit, wanted) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1, sharex=first)  # one x range: a sparse panel lines up with the rest
        first = first or ax
        drawn, band = [], False  # (label, linestyle, color, marker) of each series drawn
        for j, (metric, label) in enumerate(wanted):
            for r, (run, x_col) in enumerate(zip(runs, x_cols)):
                xs, ys, ses = series(run, metric, x_col)
                if not xs:
                    continue
                xs = [v / time_div for v in xs]
                color = colors[r % 10] if multi else colors[j % 10]
                style = LINESTYLES[j % len(LINESTYLES)] if multi else "-"
                periodic = is_periodic(run, metric)
                marker = "o" if periodic or len(xs) == 1 else None
                if smooth > 0 and not periodic and metric not in SETTINGS:
                    ax.plot(xs, ys, color=color, linestyle=style, alpha=0.25, linewidth=0.8)
                    ys = ema(ys, smooth)
                ax.plot(xs, ys, color=color, linestyle=style, marker=marker, markersize=3.5, linewidth=1.4)
                if ses is not None:
                    ax.fill_between(xs, [y - s for y, s in zip(ys, ses)], [y + s for y, s in zip(ys, ses)],
                                    color=color, alpha=0.15, linewidth=0)
                    band = True
                if (label, style) not in [d[:2] for d in drawn]:
                    drawn.append((label, style, "0.25" if multi else color, marker))
        ax.set_title(title + (" (band ±1 s.e.)" if band else ""), fontsize=10)
        ax.set_xlabel(x_label)
        ax.set_ylabel(unit)
        ax.xaxis.set_major_formatter(FuncFormatter(_short))
        ax.yaxis.set_major_formatter(FuncFormatter(_short))  # no "1e-5" offset text above a panel
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
        if len(wanted) > 1:  # which line is which metric (in an overlay, colours are runs, line styles metrics)
            handles = [Line2D([], [], color=c, linestyle=s, marker=m, markersize=3.5) for _, s, c, m in drawn]
            ax.legend(handles, [d[0] for d in drawn], fontsize=7.5, frameon=False)

    title = STAGE_TITLES.get(stage, f"Stage '{stage}'")
    note = f"per-step curves smoothed (EMA {smooth})" if smooth > 0 else ""
    if not multi:
        title += f"\n{runs[0].path}" + (f" | {note}" if note else "")
    elif note:
        title += f"\n{note}"
    if multi:  # which colour is which run: one legend under the title (as the legend's title, so they never overlap)
        handles = [Line2D([], [], color=colors[r % 10], linewidth=2) for r in range(len(runs))]
        legend = fig.legend(handles, [run.name for run in runs], loc="outside upper center", ncol=min(len(runs), 6),
                            frameon=False, fontsize=10, title=title, title_fontsize=12, alignment="center")
        legend.get_title().set_multialignment("center")
    else:
        fig.suptitle(title, fontsize=12)
    return fig


def plot_runs(run_dirs, out_dir="out/plots", x="step", smooth=0.0):
    """Read every run (stopping at the first bad file, before any PNG is written), then write one
    PNG per stage into out_dir. Returns the paths written."""
    if x not in X_AXES:
        common.die(f"--x {x}: expected one of {', '.join(X_AXES)}")
    if not 0 <= smooth < 1:
        common.die(f"--smooth {smooth}: expected a factor in [0, 1) (0 = no smoothing, 0.9 = strong)")
    runs = find_runs(run_dirs)
    stages = sorted({r.stage for r in runs}, key=lambda s: (STAGES.index(s) if s in STAGES else len(STAGES), s))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with rc_context({"font.size": 9, "axes.titleweight": "bold", "legend.handlelength": 2.5}):
        for stage in stages:
            group = [r for r in runs if r.stage == stage]
            fig = make_figure(stage, group, x=x, smooth=smooth)
            path = out_dir / f"{stage}.png"
            tmp = out_dir / f".{stage}.png.tmp"  # atomic: a reader never sees half a PNG
            fig.savefig(tmp, format="png")
            os.replace(tmp, path)
            drawn = {m for t, u, ss in panels_for(stage, group) for m, _ in ss}
            logged = {k for r in group for row in r.rows for k, v in row.items() if _is_number(v)}
            left = sorted(logged - drawn - X_COLUMNS - {m for m in logged if m.endswith("_se")})
            print(f"wrote {path}: {len(fig.axes)} panels, {len(group)} run{'s' if len(group) > 1 else ''} "
                  f"({', '.join(r.name for r in group)})" + (f" | not drawn: {', '.join(left)}" if left else ""))
            written.append(path)
    return written


if __name__ == "__main__":
    parser = common.ArgumentParser(description="Learning curves from metrics.jsonl, one PNG per stage")
    parser.add_argument("runs", nargs="+", help="stage folders (out/ppo), or a folder holding them (out)")
    parser.add_argument("--out", default="out/plots", help="folder for the PNGs")
    parser.add_argument("--x", default="step", choices=list(X_AXES), help="x-axis (step when a run lacks it)")
    parser.add_argument("--smooth", type=float, default=0.0,
                        help="EMA factor in [0, 1) for the noisy per-step curves (e.g. 0.8); 0 = raw")
    args = parser.parse_args()
    plot_runs(args.runs, args.out, x=args.x, smooth=args.smooth)
