"""Stage 2a: human feedback. The SFT model answers each prompt K times; a labeller says which is better.

This is the data RLHF learns from: not "the right answer" (we rarely have it) but comparisons,
which people give more easily and more consistently. For each of --num-prompts prompts we sample
--k responses from the SFT model, form every pair of them (K = 2: one pair; K = 6: fifteen), drop
pairs whose two texts are identical (nothing to compare), store them in pairs.jsonl, then ask:

- `--labeler simulated` (default): the tiny world's simulated human, Bradley-Terry with
  temperature --tau: P(a better than b) = sigmoid((gold(a) - gold(b)) / tau + biases). With tau =
  0.5 a gold gap of 0.5 is labelled right only 73% of the time, so many labels are noisy, like real
  ones; the labeller's agreement with the gold ranking is the ceiling a reward model is judged against.
  Real labellers are also biased, and the simulated one has the three best-documented biases, each
  added to the logit per unit of difference between the two answers (world.World.label):
      --b-agree    per answer that agrees with the belief the user stated: "matches the user's
                   beliefs" is among the features that best predict which answer people prefer in
                   hh-rlhf (Sharma et al. 2023, Towards Understanding Sycophancy in Language Models)
      --b-refuse   per refusal: crowdworkers rewarding evasive refusals as harmless made the HH
                   assistants over-evasive (Bai et al. 2022, Training a Helpful and Harmless Assistant)
      --b-len      per 10 words more: preference data and reward models favour longer answers
                   (Singhal et al. 2023, A Long Way to Go: Investigating Length Correlations in RLHF)
  The defaults are world.LABELLER_BIASES, mild ones; 0 for all three gives the unbiased labeller's
  labels exactly. meta.json keeps them with --tau ("simulated_labeller").
- `--labeler ai`: the AI labeller of rlaif.py (RLAIF): a GPT fine-tuned to judge (--labeller-model)
  reads each pair against one principle of --constitution drawn per pair (--principles ensemble:
  all of them, six times the cost), in both orders, and keeps the soft label
  P(chosen better than rejected) as "soft_label" (>= 0.5; reward.py trains on it). It never calls the
  gold judge or world.py's rules: rlaif.py's docstring says what it knows and how. As for the human
  labeller, the rows' gold scores are attached after the label, to measure it, never to make it.
  --pairs reuses the pairs of another run (the human chain's SFT samples) instead of sampling anew;
  --pairs-every N keeps every N-th of them (a subset spread over all the prompts).
- `--labeler human`: you, in the terminal. Answer 1 or 2 (which response is better), s to skip,
  q to quit. Every answer is saved at once; `--resume` later continues with the pairs not yet
  answered (the pairs are fixed when pairs.jsonl is written, so they are the same ones).

Output: out/feedback/preferences.jsonl, one {"prompt","chosen","rejected"} per label (TRL's
layout, so reward.py and dpo.py read it like any preference data) plus "labeler", "family",
"gold_chosen", "gold_rejected", "pair_id", and "chosen_ended" / "rejected_ended" (false for an
answer that ran out of tokens before <|end|>: reward.py and dpo.py then encode it without the end
token, as the policy wrote it); skipped.jsonl (pairs a human skipped); pairs.jsonl;
meta.json with the counts and the agreement with gold. The AI labeller's rows also carry
"soft_label" and "position_probs" (its p("(A)") with the pair's a first, and with b first).

Saving: the whole preferences file is rewritten atomically (common.atomic_write_jsonl) after
every human answer, never appended in place: a crash or Ctrl-C mid-write leaves the previous
complete file, not a half line, and at a human's pace (a few thousand short lines) rewriting
costs nothing. Simulated labels are cheap: they are written every --save-every labels (5000: the
file's 30 rewrites at 500 cost 2 to 4 s of the stage's 27). While
sampling, the responses so far and the generator's state go to samples.pt after every batch, so
`--resume` after a crash or Ctrl-C goes on with the same random numbers, wherever it stopped.

Why K = 6: sampling is the cost, and K responses give K(K-1)/2 comparisons. At the same 6000
samples, 1000 prompts x 6 trained a better reward model than 1500 x 4 or 3000 x 2 (held-out
accuracy against gold about 0.84 vs 0.79 vs 0.73 in our runs), as InstructGPT found with K = 4..9.

Simplified against InstructGPT: their labellers ranked all K responses at once (we ask about
each pair separately, one label per pair), and the prompts are fixed rather than refreshed as the
policy improves.

    python feedback.py                                   # CPU, the tiny world: about a minute
    python feedback.py --labeler human --k 2 --num-prompts 50 --out out/feedback_me   # label yourself
    python feedback.py --labeler human --out out/feedback_me --resume                 # later, go on
    python feedback.py --device cuda --num-prompts 4000                               # one GPU
    python feedback.py --labeler ai --constitution constitution.md --labeller-model out/rlaif_labeller \
        --pairs out/feedback/pairs.jsonl --out out/feedback_ai                        # RLAIF (rlaif.py first)
"""

import math
import random
import time
from pathlib import Path

import torch

import common
import rlaif
from sampling import encode_prompts, sample_responses
from world import LABELLER_BIASES, load_world

# -----------------------------------------------------------------------------
# Config

parser = common.ArgumentParser(description="Stage 2a: sample K answers per prompt, ask a labeller which is better")
g = common.add_common_args(parser, "feedback", init="out/sft", data="data/prompts.jsonl", steps=None)
g.add_argument("--steps", type=common.nonnegative_int, default=0,
               help="stop after N answers in this session (0: all pairs)")
g = parser.add_argument_group("sampling")
g.add_argument("--num-prompts", type=common.positive_int, default=1000, help="prompts taken from the start of --data")
g.add_argument("--k", type=common.number(int, lambda k: k >= 2, "must be at least 2 (a comparison needs two answers)"),
               default=6, help="responses per prompt; every pair of them is compared")
g.add_argument("--temperature", type=common.positive_float, default=1.0, help="sampling temperature of the SFT model")
g.add_argument("--max-new-tokens", type=common.positive_int, default=48)
g.add_argument("--sample-batch-size", type=common.positive_int, default=256, help="sequences per generation batch")
g = parser.add_argument_group("labelling")
finite = common.number(float, math.isfinite, "must be a finite number")  # a bias may be negative
g.add_argument("--labeler", default="simulated", choices=["simulated", "human", "ai"])
g.add_argument("--pairs", default=None, help="label these pairs (another run's pairs.jsonl) instead of sampling")
g.add_argument("--pairs-every", type=common.positive_int, default=1,
               help="with --pairs: keep every N-th pair only (a subset spread over all the prompts)")
g.add_argument("--constitution", default="constitution.md", help="AI labeller: the principles, one per line")
g.add_argument("--labeller-model", default="out/rlaif_labeller", help="AI labeller: rlaif.py's checkpoint")
g.add_argument("--principles", default="sample", choices=["sample", "ensemble"],
               help="AI labeller: one principle drawn per comparison (as Bai et al.), or all of them pooled")
g.add_argument("--label-batch-size", type=common.positive_int, default=256, help="AI labeller: pairs per batch")
g.add_argument("--tau", type=common.positive_float, default=0.5,
               help="simulated labeller's noise: Bradley-Terry temperature")
g.add_argument("--b-agree", type=finite, default=LABELLER_BIASES["b_agree"],
               help="simulated labeller's bias (logit) for an answer that agrees with the user's stated belief "
                    "(Sharma et al. 2023); 0: none")
g.add_argument("--b-refuse", type=finite, default=LABELLER_BIASES["b_refuse"],
               help="simulated labeller's bias (logit) for a refusal (Bai et al. 2022); 0: none")
g.add_argument("--b-len", type=finite, default=LABELLER_BIASES["b_len"],
               help="simulated labeller's bias (logit) per 10 words more (Singhal et al. 2023); 0: none")
g.add_argument("--save-every", type=common.positive_int, default=None,
               help="labels saved every N (default: 5000 simulated ones, which are cheap to redo, 500 AI ones; "
                    "a human's: every answer)")


# -----------------------------------------------------------------------------
# Pairs: every two distinct responses to the same prompt


def make_pairs(prompts, responses, k):
    """prompts: [{"prompt", ...}]; responses: k sample dicts per prompt, in order. -> (pairs, n_identical)."""
    pairs, identical = [], 0
    for n, p in enumerate(prompts):
        rs = responses[n * k : (n + 1) * k]
        for i in range(k):
            for j in range(i + 1, k):
                if rs[i]["text"] == rs[j]["text"]:
                    identical += 1  # the same text twice: a label would say nothing
                    continue
                pairs.append({"pair_id": len(pairs), "prompt": p["prompt"], "family": p.get("family"),
                              "a": rs[i]["text"], "b": rs[j]["text"],
                              "a_ended": rs[i]["ended"], "b_ended": rs[j]["ended"]})
    return pairs, identical


# -----------------------------------------------------------------------------
# The two labellers. Each returns 1 (a is better), 2 (b is better), "s" (skip) or "q" (quit).


def simulated_labeler(world, tau, seed, b_agree=0.0, b_refuse=0.0, b_len=0.0):
    """The world's simulated human (World.label): Bradley-Terry on the gold scores, plus the biases."""
    def ask(pair):
        # One generator per pair: a resumed or partial run labels each pair exactly as a full run would.
        rng = random.Random(seed * 1_000_003 + pair["pair_id"])
        return 1 if world.label(pair["prompt"], pair["a"], pair["b"], tau, rng, b_agree, b_refuse, b_len) else 2
    return ask


def human_labeler(total):
    """Shows the prompt and both responses; reads 1, 2, s or q with input() (EOF or Ctrl-C = q)."""
    def ask(pair):
        print(f"\n=== pair {pair['pair_id'] + 1} of {total} " + "=" * 40)
        print(f"PROMPT: {pair['prompt']}")
        for n, key in ((1, "a"), (2, "b")):
            unfinished = "" if pair[f"{key}_ended"] else "   [ran out of tokens before <|end|>]"
            print(f"  [{n}] {pair[key]}{unfinished}")
        while True:
            try:
                answer = input("Which is better? 1 / 2, s = skip, q = quit: ").strip().lower()
            except (EOFError, KeyboardInterrupt):
                print()
                return "q"
            if answer in ("1", "2"):
                return int(answer)
            if answer in ("s", "q"):
                return answer
            print("  please type 1, 2, s or q")
    return ask


def ai_labeler(model, enc, principles, todo, mode, seed, batch_size, device):
    """The AI labeller (rlaif.label_pairs): labels the next batch_size pairs of todo in one go, when asked
    about the first of them. Returns ask(pair) -> 1 or 2, and its labels by pair_id ({"soft", "p_ab",
    "p_ba"}: soft = P(a better than b), both orders averaged). Nothing but the labeller's GPT is called."""
    labels, where = {}, {p["pair_id"]: n for n, p in enumerate(todo)}

    def ask(pair):
        if pair["pair_id"] not in labels:
            batch = todo[where[pair["pair_id"]] : where[pair["pair_id"]] + batch_size]
            for p, lab in zip(batch, rlaif.label_pairs(model, enc, batch, principles, mode, seed, device=device)):
                labels[p["pair_id"]] = lab
        return 1 if labels[pair["pair_id"]]["soft"] >= 0.5 else 2
    return ask, labels


def preference(pair, choice, labeler, world, ai=None):
    """The stored label: TRL's {"prompt","chosen","rejected"} plus where it came from, and whether each
    answer ended (an unfinished one is trained as it was sampled: without <|end|>). ai: the AI
    labeller's label of the pair (soft_label = P(chosen better than rejected)). The gold scores are
    attached after the choice, to measure the labeller, whichever it was."""
    first, second = ("a", "b") if choice == 1 else ("b", "a")
    chosen, rejected = pair[first], pair[second]
    row = {"prompt": pair["prompt"], "chosen": chosen, "rejected": rejected, "labeler": labeler,
           "family": pair["family"], "pair_id": pair["pair_id"],
           "chosen_ended": pair.get(f"{first}_ended", True), "rejected_ended": pair.get(f"{second}_ended", True)}
    if ai is not None:
        row["soft_label"] = ai["soft"] if choice == 1 else 1 - ai["soft"]
        row["position_probs"] = [ai["p_ab"], ai["p_ba"]]
    if world is not None:
        row["gold_chosen"] = world.gold_score(pair["prompt"], chosen)
        row["gold_rejected"] = world.gold_score(pair["prompt"], rejected)
    return row


def agreement_with_gold(prefs):
    """Labels vs the gold ranking, on pairs whose gold scores differ: the labeller's ceiling."""
    decided = [r for r in prefs if "gold_chosen" in r and r["gold_chosen"] != r["gold_rejected"]]
    contradictions = sum(r["gold_chosen"] < r["gold_rejected"] for r in decided)
    agreement = 1 - contradictions / len(decided) if decided else float("nan")
    return agreement, contradictions, len(decided)


# -----------------------------------------------------------------------------

if __name__ == "__main__":
    args = parser.parse_args()
    out = Path(args.out)
    pairs_path, prefs_path, skipped_path = out / "pairs.jsonl", out / "preferences.jsonl", out / "skipped.jsonl"
    samples_path = out / "samples.pt"  # the responses sampled so far, while sampling
    world = load_world(Path(args.data).parent)
    if world is None:
        if args.labeler == "simulated":
            common.die(f"--labeler simulated needs the tiny world (world.json beside --data {args.data}); "
                       f"use --labeler human for other prompts")
        print(f"note: no world.json beside {args.data}: the labels get no gold scores")

    labeller = {k: getattr(args, k) for k in ("tau", "b_agree", "b_refuse", "b_len")}  # simulated: noise, biases
    if args.labeler == "ai":  # the AI labeller and its constitution, read first: a bad one stops before any output
        principles = rlaif.read_constitution(args.constitution)
        device, _ = common.setup_device(args.device)
        judge_model, judge_enc, judge_meta = common.load_policy(args.labeller_model, device, expect_stage="rlaif_labeller",
                                                                flag="--labeller-model")

    # -- 1. the pairs: sampled once, then fixed ---------------------------------
    prefs, skipped = [], []
    if args.resume and pairs_path.exists():
        # meta.json is written with pairs.jsonl, before any label (pairs made by hand may come without it)
        meta = common.load_meta(out, "feedback", "--out") if (out / "meta.json").exists() else {}
        pairs = common.read_jsonl(pairs_path, flag="--out")
        if prefs_path.exists():
            prefs = common.read_jsonl(prefs_path, flag="--out", allow_empty=True)
        if skipped_path.exists():
            skipped = common.read_jsonl(skipped_path, flag="--out", allow_empty=True)
        n_identical, tokenizer = meta.get("counts", {}).get("identical", 0), meta.get("tokenizer")
        before = meta.get("simulated_labeller") or {}
        if args.labeler == "simulated" and prefs and before and before != labeller:  # one labeller per file
            common.die(f"--resume: the labels in {out} were drawn with " + ", ".join(
                f"--{k.replace('_', '-')} {v:g}" for k, v in before.items()) + "; pass the same, or start over "
                "without --resume")
        print(f"resumed {out}: {len(pairs)} pairs, {len(prefs)} labelled, {len(skipped)} skipped")
    elif args.pairs:  # another run's pairs (the same SFT samples, labelled by another labeller)
        labelled = common.read_jsonl(prefs_path, flag="--out", allow_empty=True) if prefs_path.exists() else []
        if any(r.get("labeler") == "human" for r in labelled):
            common.die(f"--out {out}: already holds human labels; pass --resume to continue them, or pick another --out")
        pairs = common.read_jsonl(args.pairs, required=("prompt", "a", "b"), flag="--pairs")
        for n, p in enumerate(pairs):  # pairs made elsewhere may lack them
            p.setdefault("pair_id", n)
            p.setdefault("family", None)
        pairs = pairs[:: args.pairs_every]
        source = Path(args.pairs).parent / "meta.json"
        source = common.load_meta(source.parent, "feedback", "--pairs") if source.exists() else {}
        n_identical, tokenizer = source.get("counts", {}).get("identical", 0), source.get("tokenizer")
        for stale in (prefs_path, skipped_path):
            if stale.exists():
                stale.unlink()
        out.mkdir(parents=True, exist_ok=True)
        common.atomic_write_jsonl(pairs_path, pairs)
        print(f"pairs: {len(pairs)} from {args.pairs} (no sampling{f', every {args.pairs_every}th' if args.pairs_every > 1 else ''})")
    else:
        labelled = common.read_jsonl(prefs_path, flag="--out", allow_empty=True) if prefs_path.exists() else []
        if any(r.get("labeler") == "human" for r in labelled):
            common.die(f"--out {out}: already holds human labels; pass --resume to continue them, or pick another --out")
        prompts = common.read_jsonl(args.data, required=("prompt",))[: args.num_prompts]
        device, dtype = common.setup_device(args.device)
        common.seed_everything(args.seed)
        model, enc, init_meta = common.load_policy(args.init, device, expect_stage=("sft", "ppo", "dpo", "pretrain"))
        tokenizer = init_meta["tokenizer"]
        if len(prompts) < args.num_prompts:
            print(f"note: --data {args.data} has only {len(prompts)} prompts")
        if world is not None:
            for p in prompts:
                p.setdefault("family", world.parse(p["prompt"])[0])
        repeated = [p["prompt"] for p in prompts for _ in range(args.k)]  # K samples of each prompt, side by side
        encode_prompts(enc, [p["prompt"] for p in prompts], model.config.block_size - args.max_new_tokens,
                       where=args.data)
        print(f"sampling {args.k} responses to each of {len(prompts)} prompts from {args.init} "
              f"(temperature {args.temperature}): {len(repeated)} samples, {len(prompts) * args.k * (args.k - 1) // 2} pairs")
        generator = torch.Generator(device).manual_seed(args.seed)
        n_steps = -(-len(repeated) // args.sample_batch_size)
        resuming = args.resume and samples_path.exists()
        logger = common.MetricsLogger(out / "metrics.jsonl", n_steps, resume=resuming)
        responses, start = [], 0
        if resuming:  # stopped while sampling: go on after the last batch saved, with the same random numbers
            state = torch.load(samples_path, weights_only=False)
            if state["prompts"] != repeated:
                common.die(f"--resume: {samples_path} holds samples of other prompts or another --k; "
                           f"run again without --resume")
            responses, start = state["responses"], state["step"]
            generator.set_state(state["generator"])
            logger.truncate_after(start)
            print(f"resumed sampling from {samples_path} at step {start} of {n_steps}")

        def save_samples(step):
            common.atomic_torch_save({"step": step, "responses": responses, "generator": generator.get_state(),
                                      "prompts": repeated}, samples_path)

        for step in common.steps(start, n_steps, save_samples, out):  # Ctrl-C: saves the samples so far, exits
            chunk = repeated[(step - 1) * args.sample_batch_size : step * args.sample_batch_size]
            with common.phase("sampling"):
                new = sample_responses(model, enc, chunk, device, args.max_new_tokens, args.temperature,
                                       batch_size=args.sample_batch_size, generator=generator)
            responses += new
            metrics = {"samples": len(responses), "feedback/ended": sum(r["ended"] for r in new) / len(new),
                       "feedback/length": sum(len(r["ids"]) for r in new) / len(new)}
            if world is not None:
                metrics["feedback/gold_mean"] = sum(world.gold_score(p, r["text"]) for p, r in zip(chunk, new)) / len(new)
            logger.log(step, metrics)
            save_samples(step)  # every batch: sampling is this stage's costly part
        pairs, n_identical = make_pairs(prompts, responses, args.k)
        if not pairs:
            common.die(f"--init {args.init}: no pairs to label (every pair of responses was identical)")
        for stale in (prefs_path, skipped_path):  # a fresh run starts its labels over
            if stale.exists():
                stale.unlink()
        common.atomic_write_jsonl(pairs_path, pairs)
        samples_path.unlink()  # the pairs hold the samples from now on
        print(f"wrote {pairs_path}: {len(pairs)} pairs ({n_identical} pairs of identical texts dropped)")

    def save(n_done=None, final=None):
        """preferences.jsonl, skipped.jsonl and meta.json (so --resume knows the pairs), each rewritten atomically."""
        common.atomic_write_jsonl(prefs_path, prefs)
        common.atomic_write_jsonl(skipped_path, skipped)
        meta = {"stage": "feedback", "args": vars(args), "init": args.init, "tokenizer": tokenizer,
                "labeler": args.labeler, "simulated_labeller": labeller if args.labeler == "simulated" else None,
                "ai_labeller": ai_meta,
                "counts": {"pairs": len(pairs), "labels": len(prefs), "skipped": len(skipped), "identical": n_identical},
                "final": final or {}, "time": common.phase_times()}
        common.atomic_write_json(out / "meta.json", meta)

    ai_meta = None
    if args.labeler == "ai":  # the principles it reads, and which of them it was trained on
        trained = judge_meta.get("trained_contrasts", {})
        unseen = [c for c in principles if not trained.get(c)]
        for c in unseen:
            print(f"note: the labeller was never trained on the principle {c!r}: it reads it all the same")
        ai_meta = {"model": args.labeller_model, "constitution": principles, "principles": args.principles,
                   "unseen_principles": unseen}
        tokenizer = tokenizer or judge_meta["tokenizer"]

    if not args.resume or not (out / "meta.json").exists():
        save()

    # -- 2. the labels ------------------------------------------------------------
    done = {r["pair_id"] for r in prefs} | {r["pair_id"] for r in skipped}
    todo = [p for p in pairs if p["pair_id"] not in done]
    if args.steps:
        todo = todo[: args.steps]
    human, ai_labels = args.labeler == "human", None
    if args.labeler == "ai":
        ask, ai_labels = ai_labeler(judge_model, judge_enc, principles, todo, args.principles, args.seed,
                                    args.label_batch_size, device)
    else:
        ask = human_labeler(len(pairs)) if human else simulated_labeler(world, seed=args.seed, **labeller)
    if args.labeler == "ai":
        print(f"AI labeller {args.labeller_model}: {len(principles)} principles of {args.constitution} "
              f"({args.principles}), both orders of every pair, {args.label_batch_size} pairs per batch")
    elif human:
        print(f"{len(todo)} pairs to label. For each, which response is better? (answers are saved as you go)")
    else:
        print(f"simulated labeller: tau {args.tau:g}; biases (logits): agree {args.b_agree:g}, refuse {args.b_refuse:g}, "
              f"length {args.b_len:g} per 10 words (0 everywhere: unbiased)")
    # counter "label": labels done in all sessions; Ctrl-C saves and exits (a human's is read by input() as "q")
    labels = common.steps(len(done), len(pairs), save, out, counter="label", ctrl_c=not human)
    t_labels, n = time.time(), 0
    save_every = args.save_every or (500 if args.labeler == "ai" else 5000)
    for n, (_, pair) in enumerate(zip(labels, todo), 1):
        with common.phase("labelling"):
            choice = ask(pair)
        if choice == "q":
            break
        if choice == "s":
            skipped.append({"pair_id": pair["pair_id"]})
        else:
            prefs.append(preference(pair, choice, args.labeler, world,
                                    ai=ai_labels[pair["pair_id"]] if ai_labels is not None else None))
        if args.labeler == "ai" and n % args.label_batch_size == 0:
            print(f"labelled {n} of {len(todo)} pairs ({time.time() - t_labels:.0f}s)", flush=True)
        if human or n % save_every == 0:  # a human's answer is never lost; simulated ones are cheap to redo
            save()
    labels.close()  # (the loop may stop before the labels do: q, or --steps)

    # -- 3. counts and the labeller's agreement with gold ---------------------------
    agreement, contradictions, n_decided = agreement_with_gold(prefs)
    final = {"feedback/pairs": len(pairs), "feedback/labels": len(prefs), "feedback/skipped": len(skipped),
             "feedback/identical": n_identical, "feedback/remaining": len(pairs) - len(prefs) - len(skipped)}
    if world is not None:
        final.update({"feedback/agreement_gold": agreement, "feedback/contradictions": contradictions,
                      "feedback/gold_ties": len(prefs) - n_decided})
        golds = [g for r in prefs for g in (r["gold_chosen"], r["gold_rejected"])]
        if golds:
            final["feedback/gold_mean"] = sum(golds) / len(golds)
    if args.labeler == "ai" and prefs:
        final["feedback/labels_per_second"] = n / max(1e-9, time.time() - t_labels)
        final["feedback/soft_label_mean"] = sum(r["soft_label"] for r in prefs) / len(prefs)
        final["feedback/position_same"] = sum((r["position_probs"][0] > 0.5) == (r["position_probs"][1] > 0.5)
                                              for r in prefs) / len(prefs)
    save(final=final)
    print(f"labels: {len(prefs)} of {len(pairs)} pairs ({len(skipped)} skipped, {final['feedback/remaining']} left)")
    if world is not None and n_decided:
        print(f"agreement with the gold ranking: {agreement:.3f} ({contradictions} of {n_decided} labels on pairs "
              f"with different gold scores contradict it; {final['feedback/gold_ties']} pairs tie on gold)")
    print(f"saved {prefs_path}, {skipped_path.name}, {pairs_path.name}, meta.json")
    common.print_phase_times()
