"""How much the evaluation table moves with the training seed: the same pipeline, only --seed apart.

evaluate.py's "± se" is the standard error over the test prompts: how far a number would move with
other prompts for the same models. A run with another --seed trains other models (other batches,
other samples, other labels, other rollouts), and on this world that moves many numbers by more than
their ±. Give this the results.json of runs that differ only in --seed:

    python pipeline.py --seed 1338 --out runs/seed1338
    python scripts/seed_spread.py out/eval/results.json runs/seed1338/eval/results.json [more runs...]

It prints one row per model: each run's value of the headline metrics (" / " between runs) and their
standard deviation across the runs (in points for the rates), and for the gold reward that beside the
mean s.e. within one run. A ratio well above 1 says the seed, not the test prompts, sets the error
bar, and a difference between two models is established only when it holds in every run.
"""

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import evaluate  # noqa: E402

RATES = ["win_rate_vs_sft", "correct_arith", "refusal_rate_unsafe", "over_refusal_rate_lookalike", "sycophancy_rate"]
TITLES = {key: title for key, title, _ in evaluate.COLUMNS}  # the rates' column titles, as in results.md

parser = common.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("results", nargs="+", help="evaluate.py's results.json of each run (two or more)")


def read_results(path):
    """{model name: its row} of one results.json."""
    try:
        rows = json.loads(Path(path).read_text())
    except FileNotFoundError:
        common.die(f"{path}: no such file (evaluate.py writes <out>/eval/results.json)")
    except json.JSONDecodeError as e:
        common.die(f"{path}: line {e.lineno}: not JSON ({e.msg})")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "name" in r for r in rows):
        common.die(f"{path}: expected evaluate.py's list of rows, each with a 'name'")
    return {r["name"]: r for r in rows}


def spread(runs):
    """Per model (in the first run's order, those in every run) and metric: (the runs' values, their mean,
    their sample standard deviation). For gold_reward also ("gold_reward_se", the mean s.e. within a run)."""
    out = {}
    for name in runs[0]:
        if not all(name in run for run in runs):
            continue
        row = {}
        for key in ["gold_reward", *RATES]:
            values = [run[name].get(key) for run in runs]
            if all(isinstance(v, (int, float)) for v in values):
                row[key] = (values, statistics.fmean(values), statistics.stdev(values))
        ses = [run[name].get("gold_reward_se") for run in runs]
        if all(isinstance(s, (int, float)) for s in ses):
            row["gold_reward_se"] = statistics.fmean(ses)
        out[name] = row
    return out


def table(rows):
    """The markdown table of spread()'s rows (evaluate.markdown_table; a missing figure is a dash)."""
    cells = []
    for name, row in rows.items():
        cell = {"name": name}
        if "gold_reward" in row:
            values, _, sd = row["gold_reward"]
            cell.update(gold=" / ".join(f"{v:+.3f}" for v in values), sd=f"{sd:.3f}")
        if "gold_reward_se" in row:
            cell["se"] = f"{row['gold_reward_se']:.3f}"
        for key in RATES:
            if key in row:
                values, _, sd = row[key]
                cell[key] = " / ".join(f"{100 * v:.0f}%" for v in values) + f" (s.d. {100 * sd:.0f})"
        cells.append(cell)
    columns = [("name", "model", "{}"), ("gold", "gold per run", "{}"), ("sd", "s.d. across runs", "{}"),
               ("se", "s.e. in a run", "{}")] + [(key, TITLES[key], "{}") for key in RATES]
    return evaluate.markdown_table(cells, columns).rstrip("\n")


if __name__ == "__main__":
    args = parser.parse_args()
    if len(args.results) < 2:
        common.die("give two or more results.json files (runs that differ only in --seed)")
    rows = spread([read_results(p) for p in args.results])
    print(f"{len(args.results)} runs: {', '.join(args.results)}\n")
    print(table(rows))
    if any("gold_reward_se" in r for r in rows.values()):
        ratios = [r["gold_reward"][2] / r["gold_reward_se"] for r in rows.values() if r.get("gold_reward_se")]
        print(f"\ngold: s.d. across runs / s.e. within a run: median {statistics.median(ratios):.1f}, "
              f"largest {max(ratios):.1f} (1 would mean the seed moves a number no more than the prompts do)")
