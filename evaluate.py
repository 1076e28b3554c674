"""Evaluation: how much did RLHF help, by the judge we actually care about, and at what cost?

Every model answers the same test prompts (data/test_prompts.jsonl: the split no training stage or
tuning ever reads), one sample each at the same temperature and seed, and we report:

    gold_reward ± se   the simulated humans' mean score (world.gold_score) and its standard error
    win_rate_vs_sft    fraction of prompts where the gold judge prefers the model's answer to the
                       baseline's (SFT, --baseline); ties count half
    kl_to_sft          mean over the model's own samples of sum_t [log pi(y_t) - log pi_sft(y_t)],
                       in nats per answer, both at the sampling temperature
    proxy_score        mean of the reward as PPO sees it, the thing PPO optimised: the learned reward
                       model's (normalised) score, or --missing-end-penalty for an answer that never
                       emitted <|end|> (proxy_scores; ppo.py, hacking.py and best-of-n use the same)
    length             mean words per answer
    failure modes      refusal rate on unsafe requests, over-refusal rate on benign requests and on
                       the harmless look-alikes of unsafe ones, sycophancy rate on belief prompts
                       whose belief is wrong (each read from the judge: world.judge's info)
    by held-out reason gold ± se on the train-like prompts (held_out "fresh": seen creatures and
                       phrasings, the exact string kept out) and on the held-out ones (a creature,
                       request or sum never asked in training: "entity"; a way of asking never
                       used: "phrasing"): what RLHF taught, against what carries over
    per family         gold ± se and correctness per prompt family

plus best-of-n of the baseline for n = 1, 2, 4, ... --best-of: sample K = --best-of answers per
prompt once, and for each n keep the one of the first n with the highest proxy score. It needs no
training. Its KL to the baseline is NOT log n - (n - 1) / n: that is an upper bound (Beirami et al.
2024, "Theoretical guarantees on the best-of-n alignment policy"), reached only when answers never
repeat and never tie, and far above the truth when they do (short answers repeat often here). We
estimate it (best_of_n_kl) from the K samples of each prompt: over their empirical distribution
(each sample 1/K, ties broken uniformly at random), best-of-n chooses the g-th lowest group of equal
scores with probability F_g^n - F_(g-1)^n, F_g the share of samples scoring at most its score, so

    KL_estimate = mean over prompts of  sum_g (F_g^n - F_(g-1)^n) log[(F_g^n - F_(g-1)^n) / (F_g - F_(g-1))]

which converges to the true KL as K grows (tests/test_evaluate.py checks it against the exact KL of a
known categorical, with ties, and against the bound, which it never exceeds). results.json keeps
the bound beside it (kl_to_sft_bound). This places the trained policies on a gold-reward-versus-KL
curve (Gao et al. 2022 plot the same).

The table's header names the split of its prompts. Prompts that also occur in the training files
beside them (prompts.jsonl, sft.jsonl) or given with --train-data get a one-line warning: figures on
them are not held out.

Simplified: one sample per prompt and model (the win rate's noise is that of the samples too),
the judge is the tiny world's rule-based gold judge, and no confidence interval for the win rate
or the rates.

    python evaluate.py out/sft out/ppo out/dpo --reward out/reward --out out/eval
    python evaluate.py out/sft out/ppo --n-prompts 100 --best-of 4        # a quick look
    python evaluate.py out/sft out/ppo --data data/val_prompts.jsonl      # while tuning: validation
"""

import argparse
import math
import sys
from pathlib import Path

import torch

import common
from sampling import collate_responses, encode_prompts, response_logprobs, sample_responses
from tokenizer import encode_prompt
from world import FAMILIES, load_world

power_of_2_or_0 = common.number(int, lambda n: n >= 0 and not n & (n - 1), "must be 0 or a power of 2")  # --best-of
MISSING_END_PENALTY = -1.0  # the proxy score of an answer that never ended: ppo.py's default, used everywhere


def penalty_value(s):
    """--missing-end-penalty: a finite number, or 'none' (ppo.py, evaluate.py, hacking.py)."""
    value = None if s.lower() == "none" else float(s)
    if value is not None and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number or none, got {value}")
    return value


parser = common.ArgumentParser(description="Gold reward, win rate vs SFT, KL to SFT, proxy score, best-of-n")
parser.add_argument("models", nargs="+", help="GPT checkpoint folders to evaluate (sft, ppo, dpo, ...)")
g = parser.add_argument_group("what to compare")
g.add_argument("--baseline", default="out/sft", help="the reference for win rate, KL and best-of-n")
g.add_argument("--reward", default="out/reward", help="the learned reward model (proxy score, best-of-n)")
g.add_argument("--missing-end-penalty", type=penalty_value, default=MISSING_END_PENALTY,
               help="proxy score of an answer that never emits <|end|>, as ppo.py (its default; 'none': the "
                    "reward model's score)")
g.add_argument("--data", default="data/test_prompts.jsonl", help="test prompts (JSONL with 'prompt')")
g.add_argument("--train-data", action="append", default=None, metavar="PATH",
               help="a training file (JSONL with 'prompt' or 'messages') whose prompts --data should not repeat: "
                    "a warning if it does (repeat the flag for several; default: prompts.jsonl and sft.jsonl "
                    "beside --data)")
g.add_argument("--n-prompts", type=common.positive_int, default=600, help="evaluate on the first N prompts")
g.add_argument("--best-of", type=power_of_2_or_0, default=16, help="largest n of best-of-n (a power of 2; 0 = skip)")
g = parser.add_argument_group("sampling")
g.add_argument("--max-new-tokens", type=common.positive_int, default=48, help="as sft.py and feedback.py sample")
g.add_argument("--temperature", type=common.positive_float, default=1.0,
               help="the same for every model (and as PPO samples)")
g.add_argument("--batch-size", type=common.positive_int, default=200, help="sequences per forward pass")
g = parser.add_argument_group("common")
g.add_argument("--out", default="out/eval", help="folder for results.json and results.md")
g.add_argument("--seed", type=int, default=1337, help="every model samples with this seed (common random numbers)")
g.add_argument("--device", default="auto")
g.add_argument("--kernels", default="auto", choices=["auto", "triton", "torch"])


# -----------------------------------------------------------------------------
# The measurements (the training stages and the reward-hacking experiments call these too)


def mean_se(xs):
    """Mean and standard error of the mean (sample standard deviation / sqrt n; 0 for one value)."""
    n = len(xs)
    mean = sum(xs) / n
    return mean, (sum((x - mean) ** 2 for x in xs) / max(n - 1, 1)) ** 0.5 / n ** 0.5


HELD_OUT = ("fresh", "entity", "phrasing")  # why a prompt is out of training (world.py): train-like first


def prompt_groups(world, prompt):
    """(family, held_out) of a prompt, as the world knows it: held_out is why it is out of training
    ("fresh", "entity", "phrasing"), None for a training prompt or one in no split."""
    info = world.prompt_info(prompt) or {"family": "other", "held_out": None}
    return info["family"], info["held_out"]


def gold_summary(world, prompts, responses, prefix="eval/"):
    """Mean gold reward with its standard error, and the figures the evaluation reports by group.

    prompts: list of {"prompt", ...}; responses: list of strings (or sample_responses dicts). Every
    figure is read from the judge (world.gold_score, and world.judge's info: refused, correct,
    sycophantic), never from a rule of its own:

        gold_reward, _se                  all prompts
        gold_<family>, _se                per prompt family
        gold_held_out_<reason>, _se       per reason a prompt is out of training: fresh (train-like),
                                          entity, phrasing (prompts of the training split: in none)
        correct_<family>                  share answered right (the answerable families)
        refusal_rate_unsafe               share of unsafe requests declined
        over_refusal_rate                 share of every other prompt answered with a refusal
        over_refusal_rate_lookalike       the same on the harmless look-alikes of unsafe requests
        sycophancy_rate                   share of belief prompts with a wrong belief whose answer agrees with it
        length                            words per answer
    """
    scores, correct, rates = {"reward": []}, {}, {}  # gold scores by group; True/False by family; by rate
    for p, r in zip(prompts, responses):
        text = r["text"] if isinstance(r, dict) else r
        score = world.gold_score(p["prompt"], text)
        _, info = world.judge(p["prompt"], text)
        family, held_out = prompt_groups(world, p["prompt"])
        for group in ("reward", family) + ((f"held_out_{held_out}",) if held_out else ()):
            scores.setdefault(group, []).append(score)
        if info["correct"] is not None:
            correct.setdefault(family, []).append(info["correct"])
        refusal = "refusal_rate_unsafe" if family == "unsafe" else "over_refusal_rate"
        rates.setdefault(refusal, []).append(info["refused"])
        if family == "lookalike":
            rates.setdefault("over_refusal_rate_lookalike", []).append(info["refused"])
        if info["sycophantic"] is not None:
            rates.setdefault("sycophancy_rate", []).append(info["sycophantic"])
    families = sorted(g for g in scores if g != "reward" and not g.startswith("held_out_"))
    out = {}
    for group in ["reward", *families, *(f"held_out_{h}" for h in HELD_OUT if f"held_out_{h}" in scores)]:
        out[f"{prefix}gold_{group}"], out[f"{prefix}gold_{group}_se"] = mean_se(scores[group])
    for family, cs in sorted(correct.items()):
        out[f"{prefix}correct_{family}"] = sum(cs) / len(cs)
    for name in ("refusal_rate_unsafe", "over_refusal_rate", "over_refusal_rate_lookalike", "sycophancy_rate"):
        if name in rates:
            out[f"{prefix}{name}"] = sum(rates[name]) / len(rates[name])
    texts = [r["text"] if isinstance(r, dict) else r for r in responses]
    out[f"{prefix}length"] = sum(len(t.split()) for t in texts) / len(texts)
    return out


def answer_batches(enc, prompts, responses, batch_size, by_length=True):
    """(rows, idx, attention_mask, response_mask) of prompt + answer, batch_size answers at a time, shortest
    first: answers of similar length share a batch, so little of it is padding (by_length=False: in the
    order given). rows: which answers the batch holds. Either way the same numbers, up to float rounding."""
    prompt_ids = [encode_prompt(enc, p) for p in prompts]
    order = list(range(len(prompts)))
    if by_length:
        order.sort(key=lambda i: len(prompt_ids[i]) + len(responses[i]["ids"]))  # stable: ties keep their order
    for i in range(0, len(order), batch_size):
        rows = order[i : i + batch_size]
        batch = collate_responses([prompt_ids[j] for j in rows], [responses[j]["ids"] for j in rows], enc.eot_token)
        yield (torch.tensor(rows), *batch)


@torch.no_grad()
def sequence_kl(policy, ref, enc, prompts, responses, device, temperature=1.0, batch_size=200):
    """(N,) log pi(y|x) - log pi_ref(y|x) of each answer y, summed over its tokens at the temperature.
    On answers sampled from pi, its mean estimates the sequence KL(pi || pi_ref) (nats per answer)."""
    models = (policy, ref)
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    out = torch.zeros(len(prompts))
    for rows, idx, mask, response_mask in answer_batches(enc, prompts, responses, batch_size):
        idx, mask, targets = idx.to(device), mask.to(device), response_mask[:, 1:].to(device)
        logp, ref_logp = (response_logprobs(m, idx, mask, temperature=temperature)[0] for m in models)
        out[rows] = (logp * targets).sum(1).float().cpu() - (ref_logp * targets).sum(1).float().cpu()
    for m, training in zip(models, was_training):
        m.train(training)
    return out


def penalise_unfinished(scores, ended, missing_end_penalty=MISSING_END_PENALTY):
    """The reward as PPO sees it: the reward model's score where the answer ended, the fixed
    missing_end_penalty where it ran out of tokens first (None: the reward model's score everywhere)."""
    if missing_end_penalty is None:
        return scores
    return torch.where(ended, scores, torch.full_like(scores, missing_end_penalty))


@torch.no_grad()
def proxy_scores(reward_model, enc, prompts, responses, device, batch_size=200,
                 missing_end_penalty=MISSING_END_PENALTY, by_length=True):
    """(N,) the proxy score of each answer, as PPO scores it: the learned reward model read at the
    answer's last token, or missing_end_penalty for an answer that never ended (responses: sample
    dicts; one without "ended" counts as ended). by_length: answer_batches'."""
    reward_model.eval()
    scores = torch.zeros(len(prompts))
    for rows, idx, mask, _ in answer_batches(enc, prompts, responses, batch_size, by_length):
        scores[rows] = reward_model.score(idx.to(device), mask.to(device)).float().cpu()
    ended = torch.tensor([r.get("ended", True) for r in responses], dtype=torch.bool)
    return penalise_unfinished(scores, ended, missing_end_penalty)


@torch.no_grad()
def policy_eval(policy, ref, enc, rows, device, max_new_tokens, temperature, seed, world=None, reward_model=None,
                missing_end_penalty=MISSING_END_PENALTY, per_prompt=False):
    """The eval/* metrics of a policy during training (ppo.py, dpo.py), on its own samples of the
    held-out prompts: eval/kl_to_sft (sequence_kl), eval/proxy_score (the mean proxy score, as PPO
    scores it: proxy_scores), eval/gold_* (gold_summary), and with per_prompt eval/gold_per_prompt (the
    list of each prompt's gold score, in order: hacking.py's verdict pairs them across steps). The same
    seed at every call (common random numbers), so a curve's wiggles are the policy's, not the sampler's."""
    prompts = [r["prompt"] for r in rows]
    responses = sample_responses(policy, enc, prompts, device, max_new_tokens, temperature,
                                 generator=torch.Generator(device).manual_seed(seed))
    out = {"eval/kl_to_sft": sequence_kl(policy, ref, enc, prompts, responses, device, temperature).mean().item()}
    if reward_model is not None:
        out["eval/proxy_score"] = proxy_scores(reward_model, enc, prompts, responses, device,
                                               missing_end_penalty=missing_end_penalty).mean().item()
    if world is not None:
        out.update(gold_summary(world, rows, responses))
        if per_prompt:
            out["eval/gold_per_prompt"] = [world.gold_score(p, r["text"]) for p, r in zip(prompts, responses)]
    return out



def win_rate(gold, baseline_gold):
    """P(model's answer beats the baseline's on the same prompt) by the gold scores; ties count half."""
    if len(gold) != len(baseline_gold) or not gold:
        raise ValueError("win_rate needs two equally long, non-empty lists of scores")
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(gold, baseline_gold)) / len(gold)


def best_of_n(proxy, n):
    """proxy: (N, K) proxy scores of K samples per prompt -> (N,) index of the best of the first n.
    Ties: the first one, which is a uniformly random one of them (the samples are exchangeable)."""
    return proxy[:, :n].argmax(dim=1)


def best_of_n_kl_bound(n):
    """log n - (n - 1) / n: an upper bound on KL(best-of-n || base) in nats (Beirami et al. 2024),
    reached only when no two answers ever score the same."""
    return math.log(n) - (n - 1) / n


def best_of_n_kl(proxy, n, texts=None):
    """The estimate of KL(best-of-n || base) (the docstring's formula), mean over prompts, in nats.

    proxy: (N, K) proxy scores of K samples per prompt from the base policy; texts: N lists of K
    answers, so that copies of one answer count as one outcome whatever float noise their scores carry.
    Over the empirical distribution of a prompt's K samples, best-of-n picks the group of samples tied
    at the g-th lowest score with probability F_g^n - F_(g-1)^n (each of them equally likely), where
    F_g = (samples scoring at most that score) / K; its KL to the empirical distribution is that of
    the groups, sum_g P_g log(P_g / (F_g - F_(g-1))).
    """
    total = 0.0
    for i, row in enumerate(proxy.double().tolist()):
        if texts is not None:  # one score per distinct answer: its first copy's
            first = {}
            row = [first.setdefault(t, s) for t, s in zip(texts[i], row)]
        K, below, kl = len(row), 0, 0.0
        counts = {}
        for s in row:
            counts[s] = counts.get(s, 0) + 1
        for s in sorted(counts):  # the groups of equal scores, lowest first
            m = counts[s]
            p_bon = ((below + m) / K) ** n - (below / K) ** n
            if p_bon > 0:
                kl += p_bon * math.log(p_bon * K / m)
            below += m
        total += kl
    return total / len(proxy)


@common.phase("sampling")
def sample(model, enc, prompts, args, device, seed):
    return sample_responses(model, enc, prompts, device, args.max_new_tokens, temperature=args.temperature,
                                   batch_size=args.batch_size, generator=torch.Generator(device).manual_seed(seed))


def evaluate_model(name, rows, responses, world, baseline_gold, kl, proxy):
    """One row of the results table from a model's answers (and their KL and proxy scores)."""
    result = {"name": name, "gold_reward": None, "gold_reward_se": None, "win_rate_vs_sft": None,
              "kl_to_sft": kl, "proxy_score": proxy.mean().item() if proxy is not None else None}
    if world is not None:
        summary = gold_summary(world, rows, responses, prefix="")
        gold = [world.gold_score(r["prompt"], resp["text"]) for r, resp in zip(rows, responses)]
        result.update(summary, win_rate_vs_sft=win_rate(gold, baseline_gold))
    else:
        result["length"] = sum(len(r["text"].split()) for r in responses) / len(responses)
    return result


# -----------------------------------------------------------------------------
# What the prompts are: their split, and whether training saw them


def split_label(world, rows):
    """The split(s) of the tiny world the prompts belong to ("test", "validation", "train", or several,
    "unknown" for a prompt the world does not know), by world.split_of, else by their "split" field."""
    names = {"train": "train", "val": "validation", "test": "test"}
    if world is not None:
        splits = [(world.split_of(r["prompt"]) or (None,))[0] for r in rows]
    else:
        splits = [r.get("split") for r in rows]
    return ", ".join(sorted({names.get(s, "unknown") for s in splits}))


def training_prompts(paths):
    """The prompts of training files: each row's "prompt", and the user turns of its "messages"."""
    seen = set()
    for path in paths:
        for row in common.read_jsonl(path, flag="--train-data", allow_empty=True):
            texts = [row.get("prompt")] + [m.get("content") for m in row.get("messages") or []
                                          if isinstance(m, dict) and m.get("role") == "user"]
            seen.update(t.strip().lower() for t in texts if isinstance(t, str))
    return seen


def training_overlap(prompts, paths):
    """The prompts that also occur in the training files (compared as the world reads a prompt: case and
    surrounding spaces aside). Figures on them are not held out."""
    seen = training_prompts(paths)
    return [p for p in prompts if p.strip().lower() in seen]


# -----------------------------------------------------------------------------
# results.md: the headline table, gold by held-out reason, gold per family

COLUMNS = [("name", "model", "{}"), ("gold_reward", "gold", "{:+.3f}"), ("gold_reward_se", "± se", "{:.3f}"),
           ("win_rate_vs_sft", "win vs SFT", "{:.1%}"), ("kl_to_sft", "KL to SFT", "{:.2f}"),
           ("proxy_score", "proxy", "{:+.3f}"), ("length", "words", "{:.1f}"),
           ("correct_fact", "fact ok", "{:.0%}"), ("correct_arith", "arith ok", "{:.0%}"),
           ("correct_list", "list ok", "{:.0%}"), ("refusal_rate_unsafe", "refuses unsafe", "{:.0%}"),
           ("over_refusal_rate", "over-refuses", "{:.0%}"),
           ("over_refusal_rate_lookalike", "over-refuses look-alikes", "{:.0%}"),
           ("sycophancy_rate", "sycophancy", "{:.0%}")]
HELD_OUT_TITLES = {"fresh": "train-like: fresh", "entity": "held out: entity", "phrasing": "held out: phrasing"}


def markdown_table(results, columns=COLUMNS):
    """columns: (key, title, format); a missing figure is a dash."""
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in results:
        cells = ["—" if r.get(key) is None else fmt.format(r[key]) for key, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def gold_table(results, groups, title):
    """model | one column per group: gold ± se (gold_<group>, gold_<group>_se); groups: [(group, column title)]."""
    rows = [{"name": r["name"], **{g: f"{r[f'gold_{g}']:+.3f} ± {r[f'gold_{g}_se']:.3f}" for g, _ in groups
                                   if r.get(f"gold_{g}") is not None}} for r in results]
    return f"{title}\n\n" + markdown_table(rows, [("name", "model", "{}")] + [(g, t, "{}") for g, t in groups])


def markdown(results, world, rows):
    """results.md: the headline table, then (with the tiny world's judge) the gold score by why a prompt
    is out of training and per family, each column titled with its number of prompts."""
    text = markdown_table(results)
    if world is None:
        return text
    groups = [prompt_groups(world, r["prompt"]) for r in rows]
    n_held = {h: sum(g[1] == h for g in groups) for h in HELD_OUT}
    held = [(f"held_out_{h}", f"{HELD_OUT_TITLES[h]} (n = {n})") for h, n in n_held.items() if n]
    if held:
        text += "\n" + gold_table(results, held, "Gold by why the prompt is out of training (mean ± se):")
    n_family = {f: sum(g[0] == f for g in groups) for f in [*FAMILIES, "other"]}
    families = [(f, f"{f} (n = {n})") for f, n in n_family.items() if n]
    return text + "\n" + gold_table(results, families, "Gold per family (mean ± se):")


# -----------------------------------------------------------------------------

if __name__ == "__main__":
    args = parser.parse_args()
    device, _ = common.setup_device(args.device)
    common.setup_kernels(args.kernels, device)
    common.seed_everything(args.seed)

    rows = common.read_jsonl(args.data, required=("prompt",), flag="--data")[: args.n_prompts]
    prompts = [r["prompt"] for r in rows]
    world = load_world(Path(args.data).parent)
    if world is None:
        print(f"note: {args.data} was not written by world.py: no gold judge, gold reward and win rate are skipped")
    split = split_label(world, rows)
    train_files = (args.train_data if args.train_data is not None else
                   [f for f in (Path(args.data).parent / n for n in ("prompts.jsonl", "sft.jsonl")) if f.exists()])
    seen = training_overlap(prompts, train_files)
    if seen:
        print(f"warning: {len(seen)} of {len(prompts)} prompts of {args.data} also occur in training data "
              f"({', '.join(map(str, train_files))}), e.g. {seen[0]!r}: the figures on them are not held out",
              file=sys.stderr, flush=True)
    for path in args.models:  # every checkpoint checked before any sampling starts
        common.load_meta(path, ("pretrain", "sft", "ppo", "dpo", "grpo"), flag="model")
    baseline, enc, _ = common.load_policy(args.baseline, device, flag="--baseline")
    reward_model, _, _ = common.load_scalar_model(args.reward, device)
    encode_prompts(enc, prompts, baseline.config.block_size - args.max_new_tokens, where=args.data)
    print(f"{len(rows)} prompts from {args.data} (split: {split}) | temperature {args.temperature} | seed {args.seed}")

    def gold_of(responses):
        return [world.gold_score(p, r["text"]) for p, r in zip(prompts, responses)] if world else None

    base_responses = sample(baseline, enc, prompts, args, device, args.seed)
    base_gold = gold_of(base_responses)
    results = []
    names = [Path(p).name for p in args.models]
    names = names if len(set(names)) == len(names) else args.models  # runs/a/ppo and runs/b/ppo: full paths
    for path, name in zip(args.models, names):
        if Path(path).resolve() == Path(args.baseline).resolve():
            model, responses = baseline, base_responses  # the baseline against itself: KL 0, win rate 1/2
        else:
            model, model_enc, _ = common.load_policy(path, device, flag="model")
            if model_enc.n_vocab != enc.n_vocab:
                common.die(f"{path}: its tokenizer has {model_enc.n_vocab} tokens, the baseline's {enc.n_vocab}")
            responses = sample(model, enc, prompts, args, device, args.seed)
        with common.phase("scoring"):
            kl = (torch.zeros(len(prompts)) if model is baseline else  # log pi - log pi = 0: nothing to compute
                  sequence_kl(model, baseline, enc, prompts, responses, device, args.temperature, args.batch_size))
            proxy = proxy_scores(reward_model, enc, prompts, responses, device, args.batch_size,
                                 args.missing_end_penalty)
        with common.phase("judge"):
            results.append(evaluate_model(name, rows, responses, world, base_gold, kl.mean().item(), proxy))
        gold = results[-1]["gold_reward"]
        print(f"  {name}: " + (f"gold {gold:+.3f} | " if gold is not None else "")
              + f"KL to baseline {kl.mean().item():.2f}")

    if args.best_of:
        # K answers per prompt from the baseline, in one go: prompt i's samples are rows i*K .. i*K + K - 1
        K = args.best_of
        many = sample(baseline, enc, [p for p in prompts for _ in range(K)], args, device, args.seed + 1)
        with common.phase("scoring"):
            proxy = proxy_scores(reward_model, enc, [p for p in prompts for _ in range(K)], many, device,
                                 args.batch_size, args.missing_end_penalty).view(len(prompts), K)
        texts = [[r["text"] for r in many[i * K : (i + 1) * K]] for i in range(len(prompts))]
        n = 1
        while n <= K:
            with common.phase("judge"):
                pick = best_of_n(proxy, n)
                chosen = [many[i * K + j] for i, j in enumerate(pick.tolist())]
                kl = best_of_n_kl(proxy, n, texts)
                results.append(evaluate_model(f"best-of-{n}", rows, chosen, world, base_gold, kl,
                                              proxy.gather(1, pick[:, None]).squeeze(1)))
                results[-1]["kl_to_sft_bound"] = best_of_n_kl_bound(n)
            n *= 2

    out = Path(args.out)
    common.atomic_write_json(out / "results.json", results)
    table = markdown(results, world, rows)
    header = (f"Evaluation on {len(rows)} prompts of {args.data} "
              f"(split: {split}; temperature {args.temperature}, baseline {args.baseline})")
    penalty = args.missing_end_penalty
    table += ("\nproxy: the reward as PPO sees it, the reward model's score"
              + (f" ({penalty:+g} for an answer that never ended)" if penalty is not None else "") + "\n")
    if args.best_of:
        table += (f"best-of-n: KL to SFT estimated from the {args.best_of} samples of each prompt (best_of_n_kl); "
                  f"the bound log n - (n - 1)/n would say {best_of_n_kl_bound(args.best_of):.2f} "
                  f"at n = {args.best_of}\n")
    common.atomic_write_text(out / "results.md", f"{header}\n\n{table}")
    print("\n" + table)
    print(f"wrote {out}/results.json and results.md")
    common.print_phase_times()
