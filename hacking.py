"""Reward hacking made visible: push harder and harder on the learned reward model, watch the gold judge.

The reward model is a proxy: trained on a few thousand noisy comparisons, it is right about the
answers SFT writes and guesses about anything else. PPO goes looking for "anything else". Gao,
Schulman & Hilton (2022, "Scaling Laws for Reward Model Overoptimization") measured what follows:
plotted against d = sqrt(KL(pi || pi_sft)), the proxy score keeps rising while the gold score (the
real humans' judgement, here world.gold_score) rises, peaks, and falls. The KL penalty is the
leash that stops the policy before the fall; best-of-n sampling shows the same curve without any
training (its KL estimated from the samples, evaluate.best_of_n_kl: log n - (n - 1) / n is only an
upper bound, drawn beside it). The proxy is the reward as PPO sees it everywhere: the reward
model's score, or --missing-end-penalty for an answer that never ended (evaluate.proxy_scores).

What this script does, on the tiny world (every PPO and DPO run is an ordinary ppo.py or dpo.py run,
so its learning curves plot with plot.py; a finished run is reused, a partial one resumed):

1. PPO at each --kl-coefs value, eval/* (gold, proxy, KL on held-out prompts) every --eval-every steps;
2. best-of-n from SFT, n = 1, 2, 4, ... --best-of, scored the same way;
3. DPO at each --dpo-betas value (its beta is the strength of the same KL leash);
4. writes <out>/results.json, <out>/hacking.png (gold and proxy against sqrt KL), <out>/frontier.png
   (gold against KL: the reward-KL frontier of PPO, DPO and best-of-n, as Rafailov et al. 2023
   plot it) and <out>/samples.md (what the least-leashed policy says, with both scores, beside SFT);
5. prints the verdict for the weakest leash: is its final gold score below its peak while its proxy
   score is above what it was at that peak? That is reward hacking, measured (overoptimisation: the
   peak is chosen on half of the held-out prompts and the fall measured on the other half, as the
   mean of paired per-prompt differences, so a peak that is only the luckiest of a dozen noisy
   measurements is not called a fall).

    python hacking.py                                      # CPU, after pipeline.py: about 40 minutes
    python hacking.py --kl-coefs 0 --steps 80 --dpo-betas "" --best-of 16   # a quicker look
    python hacking.py --device cuda --kl-coefs 0,0.01,0.03,0.1,0.3 --steps 400 --best-of 256
"""

import argparse
import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

import torch
from matplotlib.figure import Figure

import common
from evaluate import (MISSING_END_PENALTY, best_of_n, best_of_n_kl, best_of_n_kl_bound, gold_summary,
                      penalty_value, power_of_2_or_0, proxy_scores)
from sampling import sample_responses
from world import load_world


def numbers(ok, must, allow_empty=True):
    """argparse type=: comma-separated numbers, each ok(value) ("" is none, where allowed)."""
    def parse(text):
        try:
            values = [float(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be comma-separated numbers such as 0,0.03,0.3, got {text!r}")
        if not all(ok(v) for v in values) or not (values or allow_empty):
            raise argparse.ArgumentTypeError(f"{must}, got {text!r}")
        return values
    return parse


parser = common.ArgumentParser(description="Reward hacking: proxy and gold scores against KL to SFT")
g = parser.add_argument_group("inputs (a finished pipeline.py run)")
g.add_argument("--init", default="out/sft", help="the SFT model every run starts from")
g.add_argument("--reward", default="out/reward", help="the learned reward model (the proxy)")
g.add_argument("--preferences", default="out/feedback/preferences.jsonl", help="the pairs DPO trains on")
g.add_argument("--data", default="data/prompts.jsonl", help="RL prompts")
g.add_argument("--eval-data", default="data/val_prompts.jsonl", help="validation prompts (written by world.py)")
g = parser.add_argument_group("the sweep")
g.add_argument("--kl-coefs", type=numbers(lambda c: 0 <= c < math.inf, "must be one or more numbers >= 0", False),
               default="0,0.1", help="comma-separated PPO kl_coef values (0: no leash)")
g.add_argument("--steps", type=common.positive_int, default=120, help="PPO steps per run")
g.add_argument("--eval-every", type=common.positive_int, default=10, help="PPO steps between held-out measurements")
g.add_argument("--eval-prompts", type=common.positive_int, default=200, help="held-out prompts per measurement")
g.add_argument("--max-new-tokens", type=common.positive_int, default=32, help="as ppo.py samples (every method alike)")
g.add_argument("--missing-end-penalty", type=penalty_value, default=MISSING_END_PENALTY,
               help="proxy score of an answer that never ends, for PPO and every proxy measured (as ppo.py)")
g.add_argument("--best-of", type=power_of_2_or_0, default=64, help="largest n of best-of-n (a power of 2; 0 = skip)")
g.add_argument("--dpo-betas", type=numbers(lambda b: 0 < b < math.inf, "must be numbers > 0"), default="0.1,0.3,1",
               help="comma-separated DPO beta values (empty: no DPO)")
g.add_argument("--dpo-steps", type=common.positive_int, default=100)
g.add_argument("--ppo-args", default="", help='more ppo.py flags for every PPO run, e.g. "--lr 5e-5 --batch-size 128"')
g.add_argument("--dpo-args", default="", help="more dpo.py flags for every DPO run")
g.add_argument("--show", type=int, default=8, help="samples of the least-leashed policy in samples.md")
g = parser.add_argument_group("common")
g.add_argument("--out", default="out/hacking", help="folder for the runs, results.json and the figures")
g.add_argument("--seed", type=int, default=1337)
g.add_argument("--device", default="auto")
g.add_argument("--kernels", default="auto", choices=["auto", "triton", "torch"])


# -----------------------------------------------------------------------------
# The measurement


def curve(run_dir):
    """The held-out measurements of one run: [{step, kl, gold, gold_se, proxy, gold_scores}], step 0 (SFT)
    first; gold_scores: each prompt's gold score (PPO logs them; None where a run did not)."""
    points = []
    for row in common.read_metrics(Path(run_dir) / "metrics.jsonl"):
        if "eval/gold_reward" in row and "eval/kl_to_sft" in row:
            points.append({"step": row["step"], "kl": row["eval/kl_to_sft"], "gold": row["eval/gold_reward"],
                           "gold_se": row["eval/gold_reward_se"], "proxy": row.get("eval/proxy_score"),
                           "gold_scores": row.get("eval/gold_per_prompt")})
    return points


def mean_and_se(xs):
    n = len(xs)
    mean = sum(xs) / n
    return mean, (sum((x - mean) ** 2 for x in xs) / max(n - 1, 1)) ** 0.5 / n ** 0.5


def overoptimisation(points, z=3.0):
    """Did the gold score fall from its peak while the proxy kept above its peak-time value?

    points: one run's curve in training order, each with the gold score of every held-out prompt
    (gold_scores, the same prompts and sampling seed at every step). The prompts are split in two:
    the even-numbered ones choose the peak (the step where their mean gold score is highest), the
    odd-numbered ones measure the fall from that step to the last, as the mean over prompts of the
    paired difference gold(peak) - gold(last) with the standard error of that mean. Choosing the peak
    and measuring the fall on the same numbers would take the luckiest of a dozen noisy points as the
    peak (a fall found in noise); the per-prompt pairs cancel what the two steps share (how hard each
    prompt is). `hacked`: the fall exceeds z (3) standard errors and the proxy ended above its value
    at the peak.
    """
    scores = [p["gold_scores"] for p in points]
    if any(s is None for s in scores) or len({len(s) for s in scores}) != 1 or len(scores[0]) < 4:
        raise ValueError("overoptimisation needs every point's per-prompt gold scores (eval/gold_per_prompt), "
                         "at least 4 prompts, the same prompts at every point")
    select, measure = range(0, len(scores[0]), 2), range(1, len(scores[0]), 2)
    peak_index = max(range(len(points)), key=lambda k: sum(scores[k][i] for i in select))  # first of equals
    peak, last = points[peak_index], points[-1]
    drop, se = mean_and_se([scores[peak_index][i] - scores[-1][i] for i in measure])
    hacked = drop > z * se and drop > 0 and last["proxy"] is not None and last["proxy"] > peak["proxy"]
    return {"peak_step": peak["step"], "last_step": last["step"],
            "peak_gold_select": sum(scores[peak_index][i] for i in select) / len(select),
            "peak_gold": sum(scores[peak_index][i] for i in measure) / len(measure),
            "last_gold": sum(scores[-1][i] for i in measure) / len(measure),
            "peak_proxy": peak["proxy"], "last_proxy": last["proxy"], "peak_kl": peak["kl"], "last_kl": last["kl"],
            "gold_drop": drop, "gold_drop_se": se, "gold_drop_z": drop / se if se > 0 else 0.0,
            "prompts_select": len(select), "prompts_measure": len(measure), "z": z, "hacked": bool(hacked)}


@torch.no_grad()
def best_of_n_curve(args, device, world, rows):
    """Best-of-n of the SFT model on the held-out prompts: one point per n, as a PPO curve's points,
    with the KL estimated from the K samples of each prompt (kl) and its upper bound (kl_bound)."""
    sft, enc, _ = common.load_policy(args.init, device)
    reward_model, _, _ = common.load_scalar_model(args.reward, device)
    K, prompts = args.best_of, [r["prompt"] for r in rows]
    many_prompts = [p for p in prompts for _ in range(K)]  # prompt i's samples: rows i*K .. i*K + K - 1
    print(f"best-of-n: {K} samples of each of {len(prompts)} held-out prompts from {args.init}")
    many = sample_responses(sft, enc, many_prompts, device, args.max_new_tokens, temperature=1.0,
                            generator=torch.Generator(device).manual_seed(args.seed + 1))
    proxy = proxy_scores(reward_model, enc, many_prompts, many, device,
                         missing_end_penalty=args.missing_end_penalty).view(len(prompts), K)
    texts = [[r["text"] for r in many[i * K : (i + 1) * K]] for i in range(len(prompts))]
    points, n = [], 1
    while n <= K:
        pick = best_of_n(proxy, n).tolist()
        chosen = [many[i * K + j]["text"] for i, j in enumerate(pick)]
        summary = gold_summary(world, rows, chosen, prefix="")
        points.append({"n": n, "kl": best_of_n_kl(proxy, n, texts), "kl_bound": best_of_n_kl_bound(n),
                       "gold": summary["gold_reward"], "gold_se": summary["gold_reward_se"],
                       "proxy": proxy.gather(1, torch.tensor(pick)[:, None]).mean().item()})
        print(f"  best-of-{n}: gold {points[-1]['gold']:+.3f} | proxy {points[-1]['proxy']:+.3f} | "
              f"KL {points[-1]['kl']:.2f} (estimated; the bound log n - (n - 1)/n: {points[-1]['kl_bound']:.2f})")
        n *= 2
    return points


@torch.no_grad()
def samples_markdown(args, device, world, rows, run_dir, name):
    """The same held-out prompts answered by SFT and by a run's final policy, with proxy and gold scores."""
    reward_model, enc, _ = common.load_scalar_model(args.reward, device)
    rows = rows[: args.show]
    prompts = [r["prompt"] for r in rows]
    lines = [f"# What the policy says when it hacks the reward model ({name})", "",
             "Each held-out prompt answered by the SFT model and by the final policy of the run, one sample each "
             "(temperature 1, the same seed), with the proxy score as PPO sees it (the learned reward model's, or "
             f"{args.missing_end_penalty} for an answer that never ended: [no end]) and the gold judge's.", ""]
    answers = {}
    for label, path in (("SFT", args.init), (name, run_dir)):
        model, _, _ = common.load_policy(path, device)
        responses = sample_responses(model, enc, prompts, device, args.max_new_tokens, temperature=1.0,
                                     generator=torch.Generator(device).manual_seed(args.seed))
        answers[label] = (responses, proxy_scores(reward_model, enc, prompts, responses, device,
                                                  missing_end_penalty=args.missing_end_penalty).tolist())
    for i, prompt in enumerate(prompts):
        lines += [f"**{prompt}**", ""]
        for label, (responses, proxy) in answers.items():
            text, unfinished = responses[i]["text"], "" if responses[i]["ended"] else " [no end]"
            lines.append(f"- {label}: `{text}`{unfinished} (proxy {proxy[i]:+.2f}, "
                         f"gold {world.gold_score(prompt, text):+.2f})")  # the judge reads the answer, not the mark
        lines.append("")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# The figures


def hacking_figure(ppo_curves, bon):
    """Two panels against sqrt(KL): the gold score (left) and the proxy score (right)."""
    fig = Figure(figsize=(11, 4.4), dpi=110, layout="constrained")
    axes = [fig.add_subplot(1, 2, i + 1) for i in range(2)]
    for ax, key, title in zip(axes, ("gold", "proxy"), ("Gold score (the simulated humans)",
                                                         "Proxy score (the learned reward model)")):
        for i, (name, points) in enumerate(ppo_curves.items()):
            xs = [math.sqrt(max(p["kl"], 0.0)) for p in points]
            ax.plot(xs, [p[key] for p in points], color=f"C{i}", marker="o", markersize=3, linewidth=1.4, label=name)
            if key == "gold":
                ax.fill_between(xs, [p["gold"] - p["gold_se"] for p in points],
                                [p["gold"] + p["gold_se"] for p in points], color=f"C{i}", alpha=0.15, linewidth=0)
        if bon:
            ax.plot([math.sqrt(p["kl"]) for p in bon], [p[key] for p in bon], color="k", linestyle="--", marker="s",
                    markersize=3, linewidth=1.2, label="best-of-n (SFT), KL estimated")
            ax.plot([math.sqrt(p["kl_bound"]) for p in bon], [p[key] for p in bon], color="0.6", linestyle=":",
                    marker="s", markersize=2, linewidth=1.0, label="the same, at the bound log n - (n-1)/n")
        ax.set_title(title + (" (band ±1 s.e.)" if key == "gold" else ""), fontsize=10, fontweight="bold")
        ax.set_xlabel("sqrt(KL to SFT)   (KL in nats per answer)")
        ax.set_ylabel("score per answer")
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
        ax.legend(fontsize=8, frameon=False)
    fig.suptitle("Reward hacking: optimising the proxy harder (weaker KL leash, later steps) "
                 "moves right on these axes", fontsize=11)
    return fig


def frontier_figure(ppo_curves, dpo_curves, bon):
    """Gold score against KL to SFT for every measured policy: the reward-KL frontier."""
    fig = Figure(figsize=(7, 4.6), dpi=110, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    for i, (name, points) in enumerate(ppo_curves.items()):
        ax.scatter([p["kl"] for p in points], [p["gold"] for p in points], color=f"C{i}", marker="o", s=14,
                   label=f"PPO {name}")
    for i, (name, points) in enumerate(dpo_curves.items()):
        ax.scatter([p["kl"] for p in points], [p["gold"] for p in points], color=f"C{i + len(ppo_curves)}",
                   marker="^", s=18, label=f"DPO {name}")
    if bon:
        ax.plot([p["kl"] for p in bon], [p["gold"] for p in bon], color="k", linestyle="--", marker="s",
                markersize=3, linewidth=1.2, label="best-of-n (SFT), KL estimated")
        ax.plot([p["kl_bound"] for p in bon], [p["gold"] for p in bon], color="0.6", linestyle=":", marker="s",
                markersize=2, linewidth=1.0, label="best-of-n at the bound log n - (n-1)/n (too far right)")
    ax.set_title("Reward-KL frontier: gold score against KL to SFT\n(every held-out measurement of every run)",
                 fontsize=10, fontweight="bold")
    ax.set_xscale("symlog", linthresh=1.0)  # linear below 1 nat, logarithmic above: no leash reaches 100+
    ax.set_xlabel("KL to SFT (nats per answer; linear to 1, logarithmic beyond)")
    ax.set_ylabel("gold score per answer")
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(fontsize=8, frameon=False)
    return fig


def save_figure(fig, path):
    tmp = path.with_name(f".{path.name}.tmp")  # atomic: a reader never sees half a PNG
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    print(f"wrote {path}")


# -----------------------------------------------------------------------------

if __name__ == "__main__":
    args = parser.parse_args()
    kl_coefs, betas = args.kl_coefs, args.dpo_betas
    if args.eval_prompts < 4:
        common.die("--eval-prompts must be at least 4: the verdict chooses the peak on half of them, "
                   "measures on the rest")
    world = load_world(Path(args.eval_data).parent)
    if world is None:
        common.die(f"--eval-data {args.eval_data}: not written by world.py; reward hacking needs the gold judge")
    for flag, path in (("--init", args.init), ("--reward", args.reward)):
        common.load_meta(path, ("sft",) if flag == "--init" else ("reward",), flag)
    rows = common.read_jsonl(args.eval_data, required=("prompt",), flag="--eval-data")[: args.eval_prompts]
    out = Path(args.out)
    device, _ = common.setup_device(args.device)
    shared = ["--seed", str(args.seed), "--device", args.device, "--kernels", args.kernels, "--init", args.init,
              "--eval-data", args.eval_data, "--eval-prompts", str(args.eval_prompts),
              "--max-new-tokens", str(args.max_new_tokens)]
    penalty = ["--missing-end-penalty", str(args.missing_end_penalty).lower()]  # 'none' too

    def train(script, run_dir, steps, extra):
        """One ordinary stage run; reused when finished, resumed when interrupted."""
        meta = run_dir / "meta.json"
        if meta.exists() and json.loads(meta.read_text()).get("step") == steps:
            print(f"=== {run_dir}: finished earlier, reused")
            return
        cmd = [sys.executable, script, *shared, *extra, "--steps", str(steps), "--out", str(run_dir)]
        cmd += ["--resume"] * (run_dir / "resume.pt").exists()
        print(f"\n=== {' '.join(cmd[1:])}", flush=True)
        if subprocess.run(cmd).returncode != 0:
            common.die(f"{script} failed for {run_dir}; fix it and run hacking.py again (finished runs are kept)")

    ppo_curves, dpo_curves = {}, {}
    for c in kl_coefs:
        run_dir = out / f"ppo_kl{c:g}"
        train("ppo.py", run_dir, args.steps, ["--reward", args.reward, "--data", args.data, "--kl-coef", str(c),
                                              *penalty, "--eval-every", str(args.eval_every),
                                              "--sample-every", str(args.steps), *shlex.split(args.ppo_args)])
        ppo_curves[f"kl_coef {c:g}"] = curve(run_dir)
    for b in betas:
        run_dir = out / f"dpo_beta{b:g}"
        train("dpo.py", run_dir, args.dpo_steps, ["--data", args.preferences, "--beta", str(b),
                                                  "--eval-every", str(max(1, args.dpo_steps // 4)),
                                                  *shlex.split(args.dpo_args)])
        dpo_curves[f"beta {b:g}"] = curve(run_dir)
    bon = best_of_n_curve(args, device, world, rows) if args.best_of else []

    # -- the verdict: the weakest leash is the one that should hack ----------------------------------
    weakest = min(kl_coefs)
    run_dir = out / f"ppo_kl{weakest:g}"
    if any(p["gold_scores"] is None for p in ppo_curves[f"kl_coef {weakest:g}"]):
        common.die(f"{run_dir}: trained before ppo.py logged eval/gold_per_prompt; delete it and run hacking.py again")
    v = verdict = overoptimisation(ppo_curves[f"kl_coef {weakest:g}"])
    print(f"\nkl_coef {weakest:g}: the gold score peaked at step {v['peak_step']} (chosen on {v['prompts_select']} "
          f"held-out prompts: {v['peak_gold_select']:+.3f}). On the other {v['prompts_measure']}: "
          f"{v['peak_gold']:+.3f} there, {v['last_gold']:+.3f} at step {v['last_step']}, a fall of {v['gold_drop']:+.3f} ± "
          f"{v['gold_drop_se']:.3f} ({v['gold_drop_z']:.1f} s.e. of the paired differences); proxy "
          f"{v['peak_proxy']:+.3f} -> {v['last_proxy']:+.3f}, KL {v['peak_kl']:.2f} -> {v['last_kl']:.2f}")
    print("reward hacking: " + ("YES, the proxy went up while the gold score fell "
                                f"{v['gold_drop']:.3f} ({v['gold_drop_z']:.1f} s.e.) from its peak"
                                if v["hacked"] else f"not shown by this run (gold did not fall by > {v['z']:g} s.e. "
                                "from its peak while the proxy rose)"))

    results = {"ppo": ppo_curves, "dpo": dpo_curves, "best_of_n": bon, "weakest_kl_coef": weakest, "verdict": verdict,
               "args": vars(args)}
    common.atomic_write_json(out / "results.json", results)
    save_figure(hacking_figure(ppo_curves, bon), out / "hacking.png")
    save_figure(frontier_figure(ppo_curves, dpo_curves, bon), out / "frontier.png")
    common.atomic_write_text(out / "samples.md", samples_markdown(args, device, world, rows, run_dir,
                                                                  f"PPO, kl_coef {weakest:g}, step {args.steps}"))
    print(f"wrote {out}/results.json and {out}/samples.md")
