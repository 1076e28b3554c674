"""The AI labeller measured against the gold judge and the simulated humans, on the same pairs.

This is the one RLAIF file that calls the gold judge: to measure the labeller, never to teach it
(rlaif.py does not import world.py). For each family of prompts: agreement of the AI's label with
the gold ranking (pairs whose gold scores differ) and with the simulated humans' label of the same
pair; its position bias, the share of pairs where it prefers the same position in both orders before
averaging them (after averaging it is 0 by construction); on belief pairs where one answer agrees
with the user's wrong belief and the other states the truth, how often each labeller prefers the
truth; and labels per second.

    python scripts/measure_rlaif.py out/feedback/preferences.jsonl --labeller-model out/rlaif_labeller
    python scripts/measure_rlaif.py out/feedback/preferences.jsonl --family belief --constitution mine.md
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import rlaif  # noqa: E402
from world import load_world  # noqa: E402

parser = common.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("preferences", help="feedback.py's preferences.jsonl of the simulated humans (with world.json beside its --data)")
parser.add_argument("--labeller-model", default="out/rlaif_labeller")
parser.add_argument("--constitution", default="constitution.md")
parser.add_argument("--principles", default="sample", choices=["ensemble", "sample"])
parser.add_argument("--family", default=None, help="only the pairs of this family (e.g. belief)")
parser.add_argument("--n-pairs", type=common.positive_int, default=1500, help="pairs measured (the first N)")
parser.add_argument("--data", default="data", help="the tiny world's folder (world.json), for the gold judge")
parser.add_argument("--seed", type=int, default=1337)
parser.add_argument("--out", default=None, help="the JSON (default: measure_<principles>.json in the labeller's folder)")

if __name__ == "__main__":
    args = parser.parse_args()
    model, enc, meta = common.load_policy(args.labeller_model, "cpu", expect_stage="rlaif_labeller", flag="--labeller-model")
    principles = rlaif.read_constitution(args.constitution)
    world = load_world(Path(args.data))
    if world is None:
        common.die(f"--data {args.data}: no world.json there (the gold judge is needed to measure)")
    rows = common.read_jsonl(args.preferences, required=("prompt", "chosen", "rejected"), flag="preferences")
    rows = [r for r in rows if args.family in (None, r.get("family"))][: args.n_pairs]
    # a fixed order unrelated to the labels: (a, b) sorted by text
    pairs = [{"prompt": r["prompt"], "a": min(r["chosen"], r["rejected"]), "b": max(r["chosen"], r["rejected"]),
              "family": r.get("family"), "pair_id": r.get("pair_id", n),
              "human_a": r["chosen"] == min(r["chosen"], r["rejected"])} for n, r in enumerate(rows)]
    t0 = time.time()
    labels = rlaif.label_pairs(model, enc, pairs, principles, args.principles, args.seed)
    seconds = time.time() - t0

    fam = {}
    for pair, lab in zip(pairs, labels):
        ga, gb = world.gold_score(pair["prompt"], pair["a"]), world.gold_score(pair["prompt"], pair["b"])
        ai_a = lab["soft"] > 0.5
        for f in (pair["family"], "all"):
            d = fam.setdefault(f, {"n": 0, "gold_n": 0, "gold_agree": 0, "human_agree": 0, "same_position": 0,
                                   "human_gold_agree": 0})
            d["n"] += 1
            d["human_agree"] += ai_a == pair["human_a"]
            d["same_position"] += (lab["p_ab"] > 0.5) == (lab["p_ba"] > 0.5)
            if ga != gb:
                d["gold_n"] += 1
                d["gold_agree"] += ai_a == (ga > gb)
                d["human_gold_agree"] += pair["human_a"] == (ga > gb)
    table = {f: {"pairs": d["n"], "agree_gold": d["gold_agree"] / max(1, d["gold_n"]), "agree_human": d["human_agree"] / d["n"],
                 "human_agree_gold": d["human_gold_agree"] / max(1, d["gold_n"]),
                 "position_bias_before": d["same_position"] / d["n"], "position_bias_after": 0.0}
             for f, d in fam.items()}

    def truthful(p, x):
        return bool(world.judge(p["prompt"], x)[1]["correct"])
    # belief pairs where one answer agrees with the wrong belief and the other states the truth
    syc = [(p, lab, truthful(p, p["a"])) for p, lab in zip(pairs, labels) if p["family"] == "belief" and
           {(world.sycophantic(p["prompt"], x), truthful(p, x)) for x in (p["a"], p["b"])} == {(True, False), (False, True)}]
    result = {"labeller": args.labeller_model, "constitution": principles, "principles": args.principles,
              "pairs": len(pairs), "seconds": seconds, "labels_per_second": len(pairs) / seconds,
              "params": model.num_params(), "by_family": table, "sycophancy_pairs": len(syc),
              "ai_prefers_truthful": sum((lab["soft"] > 0.5) == t for _, lab, t in syc) / max(1, len(syc)),
              "human_prefers_truthful": sum(p["human_a"] == t for p, _, t in syc) / max(1, len(syc))}
    print(f"labeller {args.labeller_model} ({model.num_params() / 1e6:.2f}M parameters), {len(principles)} principles "
          f"({args.principles}), {len(pairs)} pairs of {args.preferences}: {result['labels_per_second']:.1f} labels/s")
    print(f"  {'family':10s} {'pairs':>6s} {'AI~gold':>8s} {'AI~human':>9s} {'human~gold':>11s} {'same pos.':>10s}")
    for f, t in sorted(table.items()):
        print(f"  {f:10s} {t['pairs']:6d} {t['agree_gold']:8.3f} {t['agree_human']:9.3f} {t['human_agree_gold']:11.3f} "
              f"{t['position_bias_before']:10.3f}")
    print(f"  belief pairs, wrong belief against truth: {len(syc)}; the truth preferred by the AI labeller "
          f"{result['ai_prefers_truthful']:.3f}, by the simulated humans {result['human_prefers_truthful']:.3f}")
    print("  (same pos.: prefers the same position in both orders, before averaging them; after: 0 by construction)")
    common.atomic_write_json(args.out or Path(args.labeller_model) / f"measure_{args.principles}.json", result)
