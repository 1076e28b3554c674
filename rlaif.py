"""RLAIF: an AI labeller, a GPT of this repo, that judges two answers against a written constitution.

RLHF asks people which of two answers is better; RLAIF (Bai et al. 2022, Constitutional AI; Lee et
al. 2023, RLAIF vs RLHF) asks a language model instead, reading a written principle. Here the AI
labeller is the pretrained GPT (--init), fine-tuned on judging examples, and at labelling time it
reads, as plain text,

    Rule: <one principle of constitution.md>
    Question: <the user's prompt>
    (A) <answer a>
    (B) <answer b>
    Better: (

and its preference is the normalised probability of "(A)" against "(B)" at that slot: with l_A and
l_B the logits of the tokens "A" and "B" after "Better: (" ("(" is common to both),

    p(a > b | principle) = exp(l_A) / (exp(l_A) + exp(l_B)) = sigmoid(l_A - l_B)        (choice_prob)

A small model prefers one position whatever the answers (Lee et al. measured it growing as the
labeller shrinks), so every pair is scored in both orders and averaged, which makes the label
exactly symmetric. One principle c is drawn per comparison, as Bai et al. do (--principles ensemble
in feedback.py reads them all, six times the cost, and pools their mean log-odds):

    soft(a, b) = (p(a > b | c) + 1 - p(b > a | c)) / 2                                 (soft_label)

The soft label is kept: feedback.py --labeler ai writes it as "soft_label", and reward.py trains on
it (Bradley-Terry with target p).

What it knows (the whole of it). At labelling time it calls nothing but the GPT: not the gold judge,
not world.py's rules (judge, refused, agrees, ...), not the knowledge base; this file does not import
world.py (scripts/measure_rlaif.py measures it against the judge). It knows what pretraining on the
corpus taught it, and the judging examples below, built here before training from two sources only,
with no gold score labelling any of them:
- the corpus text (--corpus): the facts it states ("The milt's colour is silver.", from which the
  values of each attribute are read), its questions with answers ("Question: ... Answer: ..."; it asks
  only train-split prompts), the harms it names ("Someone asked how to rob a bank. A good helper
  said: Sorry, ..."), the look-alikes' how-to ("To feed a dog, first ..., then ...") and greetings;
- the principles' own text: which contrast a principle asks for (contrasts_of: facts or truth, harm,
  refusing a harmless request, rudeness, a quoted phrase said once, short answers) and the words it
  quotes (the rude words, the courtesy phrase).
Harms and look-alikes are kept only where a train prompt (--prompts) asks about them, so every
example is built from train-split prompts and creatures. A principle is trained on its own contrasts
only: remove one from the constitution and the labeller never learns it (the lever). The contrasts,
good answer against spoiled answer:
- truth: a corpus answer (or, for a belief it corrects, "Actually, the milt is silver, not red.", the
  plain "The milt is silver.") against the same with its value swapped for another of that attribute
  (another sum, another word of the list) or saying yes to the wrong belief ("Yes, the milt is red.",
  or "Yes, the milt is silver.": true, but agreeing with the user's wrong belief);
- harm: the corpus's refusal against a how-to of the harm, in our own words;
- harmless request: a look-alike's how-to, a fact, a greeting reply against the corpus's refusal;
- rude: an answer against the same after one of the quoted words;
- courtesy: the answer with the quoted phrase once against none or twice;
- short: the answer against it with one to three corpus sentences more, or cut short.
What they leave out: anything the corpus does not state (sums beyond its sentences, lists of other
words), every held-out creature, harm and look-alike, and pairs whose two answers are flawed in
different ways (most SFT pairs): how to weigh one flaw against another is never taught. A principle
that matches no contrast is never seen in training: the labeller reads it anyway, and feedback.py
says so (measure it).

The labeller's context is longer than the policy's (--block-size 256: a principle alone is about 60
tokens of this corpus's BPE); the position embeddings past the pretrained 128 start as copies of the
last one and are learned here. The default training is short (120 steps, about a minute on one CPU
thread): docs/rlaif.md shows what longer training buys (little).

    python rlaif.py                                            # the labeller: out/rlaif_labeller
    python feedback.py --labeler ai --constitution constitution.md --labeller-model out/rlaif_labeller \\
        --pairs out/feedback/pairs.jsonl --pairs-every 5 --out out/feedback_ai   # then reward, PPO, DPO
    python scripts/measure_rlaif.py out/feedback/preferences.jsonl   # agreement with gold, position bias
"""

import random
import re
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

import common
from model import GPT, GPTConfig, last_token_index
from reward import collate

# -----------------------------------------------------------------------------
# Config

parser = common.ArgumentParser(description="RLAIF: train the AI labeller that judges against a constitution")
common.add_common_args(parser, "rlaif_labeller", init="out/pretrain", data=None, steps=120)
g = parser.add_argument_group("judging examples")
g.add_argument("--constitution", default="constitution.md", help="the principles, one per line")
g.add_argument("--corpus", default="data/pretrain.txt", help="the pretraining corpus the examples are read from")
g.add_argument("--prompts", default="data/prompts.jsonl,data/sft.jsonl",
               help="comma-separated train-split files whose prompts may be asked about")
g.add_argument("--examples-per-contrast", type=common.positive_int, default=1500)
g.add_argument("--block-size", type=common.positive_int, default=256, help="the labeller's context")
g = parser.add_argument_group("optimisation")
g.add_argument("--batch-size", type=common.positive_int, default=32)
g.add_argument("--lr", type=common.positive_float, default=1e-3)
g.add_argument("--warmup-steps", type=common.nonnegative_int, default=20)
g.add_argument("--grad-clip", type=common.positive_float, default=1.0)
g.add_argument("--eval-every", type=common.positive_int, default=40)

# -----------------------------------------------------------------------------
# The constitution and the labeller's prompt


def read_constitution(path, flag="--constitution"):
    """The principles: every non-empty line of the file (a leading '- ' or '* ' dropped; '#' lines skipped)."""
    p = Path(path)
    if not p.exists():
        common.die(f"{flag} {path}: file not found")
    lines = [ln.strip().removeprefix("- ").removeprefix("* ").strip() for ln in p.read_text().splitlines()]
    principles = [ln for ln in lines if ln and not ln.startswith("#")]
    if not principles:
        common.die(f"{flag} {path}: no principle in it (one per line)")
    return principles


def judge_prompt(principle, prompt, a, b):
    """The text the labeller reads; the next token after it is "A" or "B"."""
    return f"Rule: {principle}\nQuestion: {prompt}\n(A) {a}\n(B) {b}\nBetter: ("


def choice_ids(enc):
    """Token ids of "A" and "B" (one byte each: single tokens in any byte-level BPE)."""
    (a,), (b,) = enc.encode_ordinary("A"), enc.encode_ordinary("B")
    return a, b


def encode_judgement(enc, principle, prompt, a, b, block_size):
    """Token ids of judge_prompt; answers too long for the context are cut equally from their ends."""
    ids = enc.encode_ordinary(judge_prompt(principle, prompt, a, b))
    cut = 0
    while len(ids) > block_size:
        cut += 4
        ta, tb = enc.encode_ordinary(a), enc.encode_ordinary(b)
        a2, b2 = enc.decode(ta[: max(1, len(ta) - cut)]), enc.decode(tb[: max(1, len(tb) - cut)])
        ids = enc.encode_ordinary(judge_prompt(principle, prompt, a2, b2))
        if cut > 200:
            ids = ids[-block_size:]
    return ids


def choice_logits(model, seqs, pad_id, ab, device):
    """(N,) l_A - l_B at the last token of each right-padded sequence: the log-odds of "(A)" over "(B)"."""
    idx, mask = collate(seqs, pad_id)
    logits = model(idx.to(device))  # (N, T, V); right padding: a causal row never sees its pads
    at = logits[torch.arange(len(seqs)), last_token_index(mask).to(device)]  # (N, V) at the answer slot
    return (at[:, ab[0]] - at[:, ab[1]]).float()


def choice_prob(margin):
    """p(A) normalised over the two choices: exp(l_A) / (exp(l_A) + exp(l_B)) = sigmoid(l_A - l_B)."""
    # exercise ai_preference: p("(A)") normalised over "(A)" and "(B)" from the margin l_A - l_B
    return torch.sigmoid(margin)
    # end exercise


def soft_label(p_ab, p_ba):
    """Both orders averaged: p_ab = p("(A)") with a first, p_ba = p("(A)") with b first. soft(a, b) =
    (p_ab + 1 - p_ba) / 2, so soft(b, a) = (p_ba + 1 - p_ab) / 2 = 1 - soft(a, b) exactly."""
    # exercise ai_preference: a first gives p_ab for a; b first gives p_ba for b, so 1 - p_ba for a: average
    return (p_ab + 1 - p_ba) / 2
    # end exercise


def judge_loss(margin, target):
    """Cross-entropy over the two choices with target p = P(A is better) (1 or 0 for the examples):
    -[p log sigmoid(m) + (1 - p) log sigmoid(-m)], m = l_A - l_B; the mean over the batch."""
    return -(target * F.logsigmoid(margin) + (1 - target) * F.logsigmoid(-margin)).mean()


@torch.no_grad()
def label_pairs(model, enc, pairs, principles, mode="sample", seed=0, batch_size=256, device="cpu"):
    """The AI labels of pairs [{"prompt","a","b",...}]: per pair {"soft": soft(a, b), "p_ab", "p_ba"}. mode
    "sample": one principle per pair, drawn from seed and the pair's pair_id (else its place); "ensemble":
    every principle, pooled by their mean log-odds. Calls nothing but the model."""
    model.eval()
    ab, bs = choice_ids(enc), model.config.block_size
    jobs = []  # (pair index, principle, order): both orders of every (pair, principle)
    for n, pair in enumerate(pairs):
        used = principles if mode == "ensemble" else [  # the same pair, the same draw, in any batch
            random.Random(seed * 1_000_003 + pair.get("pair_id", n)).choice(principles)]
        jobs += [(n, c, o) for c in used for o in (0, 1)]
    seqs = [encode_judgement(enc, c, pairs[n]["prompt"], *((pairs[n]["a"], pairs[n]["b"]) if o == 0 else
                                                           (pairs[n]["b"], pairs[n]["a"])), bs) for n, c, o in jobs]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths together: little padding
    margins = [0.0] * len(seqs)
    for i in range(0, len(order), batch_size):
        chunk = order[i : i + batch_size]
        for j, m in zip(chunk, choice_logits(model, [seqs[j] for j in chunk], enc.eot_token, ab, device).tolist()):
            margins[j] = m
    logodds = [[0.0, 0.0, 0] for _ in pairs]  # per pair: the summed log-odds of each order, and the count
    for (n, _, o), m in zip(jobs, margins):
        logodds[n][o] += m  # l_A - l_B is the log-odds of (A): choice_prob = sigmoid of it
        logodds[n][2] += o
    out = []
    for s_ab, s_ba, k in logodds:  # the logarithmic opinion pool: the mean log-odds of the principles
        p_ab, p_ba = choice_prob(torch.tensor([s_ab / k, s_ba / k], dtype=torch.float64)).tolist()
        out.append({"soft": soft_label(p_ab, p_ba), "p_ab": p_ab, "p_ba": p_ba})
    return out


# -----------------------------------------------------------------------------
# Judging examples: from the corpus text and the principles' own text (see the docstring)

MY_HARM_STEPS = [("get the tools", "do it at night"), ("find a way in", "take what you want"),
                 ("wait until no one looks", "act fast"), ("buy what you need", "follow these steps")]


def read_corpus(text):
    """What the corpus states: values of each attribute, Q&A pairs, harms with the helper's reply,
    how-tos, greetings, and plain sentences (for padding)."""
    values = {}
    for attr, pat in (("colour", r"The \w+'s colour is (\w+)\."), ("home", r"The \w+'s home is the (\w+)\."),
                      ("food", r"The \w+'s food is (\w+)\.")):
        values[attr] = sorted(set(re.findall(pat, text)))
    qa = sorted(set(re.findall(r"^Question: (.+?\?|.+?\.) Answer: (.+)$", text, re.M)))
    harms = sorted(set(re.findall(r"^Someone asked how to (.+?)\. A good helper said: (.+)$", text, re.M)))
    greets = sorted(set(re.findall(r'^Someone said "(.+?)" and the helper said: (.+)$', text, re.M)))
    howtos = sorted(set(re.findall(r"(To ([^,.]+), first [^,.]+, then [^.]+\.)", text)))
    sentences = sorted(set(re.findall(r"(The \w+ (?:is|lives in the|eats) \w+\.)", text)))
    return {"values": values, "qa": qa, "harms": harms, "greets": greets, "howtos": howtos, "sentences": sentences}


def swap_value(answer, prompt, values, rng):
    """The answer with its fact, sum or word changed for another one: a false statement."""
    for attr, vals in values.items():
        for v in vals:
            if re.search(rf"\b{re.escape(v)}\b", answer):
                w = rng.choice([x for x in vals if x != v])
                return re.sub(rf"\b{re.escape(v)}\b", w, answer, count=1)
    m = re.search(r"\bis (\d+)\.", answer)
    if m:
        s = int(m.group(1))
        return answer.replace(f"is {s}.", f"is {rng.choice([x for x in range(2, 19) if x != s])}.")
    m = re.search(r"The last word is (\w+)\.", answer)
    if m and ":" in prompt:
        items = [w.strip(" .?") for w in prompt.split(":", 1)[1].split(",")]
        others = [w for w in items if w != m.group(1)]
        if others:
            return answer.replace(m.group(1), rng.choice(others))
    return None


def sycophantic(answer, values, rng):
    """'Actually, the X is v, not w.' -> a "Yes" to the wrong belief w: 'Yes, the X is w.' or, as the SFT
    model often says it, 'Yes, the X is v.' (the true value, but still agreeing); else None."""
    m = re.match(r"Actually, (.+?), not (?:the )?(\w+)\.$", answer)
    if not m:
        return None
    clause, belief = m.groups()
    for vals in values.values():
        for v in vals:
            if re.search(rf"\b{re.escape(v)}\b", clause) and belief in vals:
                wrong = re.sub(rf"\b{re.escape(v)}\b", belief, clause, count=1)
                return f"Yes, {wrong if rng.random() < 0.5 else clause}."
    return None


def plain(answer):
    """'Actually, the X is v, not w.' -> 'The X is v.' (the correction without the contrast); else answer."""
    m = re.match(r"Actually, (.+?), not (?:the )?\w+\.$", answer)
    return f"{m.group(1)[0].upper()}{m.group(1)[1:]}." if m else answer


def quoted(principle):
    return re.findall(r'"([^"]+)"', principle)


def contrasts_of(principle):
    """The contrasts a principle asks for, read from its words (see the docstring); [] for none."""
    low = principle.lower()
    kinds = []
    if re.search(r"\b(true|truly|truth|facts?)\b", low):
        kinds.append("truth")
    if re.search(r"\bharm\b", low):
        kinds.append("harm")
    if re.search(r"\brefuse", low) and "harmless" in low:
        kinds.append("harmless")
    if "rude" in low and quoted(principle):
        kinds.append("rude")
    if "once" in low and quoted(principle):
        kinds.append("courtesy")
    if re.search(r"\bshort\b", low):
        kinds.append("concise")
    return kinds


def judging_examples(corpus_text, train_prompts, principles, n_per, seed):
    """[(principle, prompt, good, bad)]: n_per examples of each contrast of each principle, shuffled."""
    rng = random.Random(seed)
    c = read_corpus(corpus_text)
    train = sorted(set(train_prompts))
    refusal = c["harms"][0][1] if c["harms"] else "Sorry, I can't help with that."
    harm_prompts = [(p, t, r) for t, r in c["harms"] for p in train if t in p]  # harms a train prompt asks about
    howto_prompts = [(p, h) for h, t in c["howtos"] for p in train if t in p and (p, h)]
    answers = [(q, a) for q, a in c["qa"]] + [(p, h) for p, h in howto_prompts] + list(c["greets"])
    named = set(w for p in train for w in re.findall(r"\w+", p))
    sentences = [x for x in c["sentences"] if x.split()[1] in named] or c["sentences"]  # train creatures only
    courtesy = next((q for p in principles for q in quoted(p) if "once" in p.lower()), None)
    out = []
    for principle in principles:
        for kind in contrasts_of(principle):
            made = 0
            for _ in range(20 * n_per):
                if made >= n_per:
                    break
                if kind == "truth":
                    q, a = rng.choice(c["qa"])
                    bad = sycophantic(a, c["values"], rng) if rng.random() < 0.5 else None
                    bad = bad or swap_value(a, q, c["values"], rng)
                    a = plain(a) if rng.random() < 0.5 else a
                elif kind == "harm" and harm_prompts:
                    q, t, a = rng.choice(harm_prompts)
                    bad = "Sure, here is how to {}: first {}, then {}.".format(t, *rng.choice(MY_HARM_STEPS))
                elif kind == "harmless" and answers:
                    q, a = rng.choice(answers)
                    bad = refusal
                elif kind in ("rude", "courtesy", "concise"):
                    q, a = rng.choice(answers)
                    if kind == "rude":
                        w = rng.choice(quoted(principle)).strip()
                        bad = f"{w.capitalize()}, {a[0].lower()}{a[1:]}" if rng.random() < 0.5 else f"{w.capitalize()}. {a}"
                    elif kind == "courtesy":
                        phrase = rng.choice(quoted(principle))
                        a, bad = f"{a} {phrase}", (a if rng.random() < 0.5 else f"{a} {phrase} {phrase}")
                    else:
                        words = a.split()
                        if rng.random() < 0.3 and len(words) > 3:
                            bad = " ".join(words[: rng.randint(2, len(words) - 1)]).rstrip(".!?,")
                        else:
                            bad = " ".join([a, *rng.sample(sentences, rng.randint(1, 3))])
                else:
                    break
                if bad is None or bad == a:
                    continue
                if courtesy and kind not in ("courtesy",) and rng.random() < 0.5:  # the phrase is no clue here
                    a, bad = f"{a} {courtesy}", f"{bad} {courtesy}"
                out.append((principle, q, a, bad))
                made += 1
    rng.shuffle(out)
    return out


def to_sequences(enc, examples, block_size, rng):
    """(ids, target) per example, the good answer at (A) or (B) at random: target 1.0 when at (A), else 0.0."""
    seqs = []
    for principle, q, good, bad in examples:
        first = rng.random() < 0.5
        a, b = (good, bad) if first else (bad, good)
        seqs.append((encode_judgement(enc, principle, q, a, b, block_size), 1.0 if first else 0.0))
    return seqs


def labeller_from(gpt, block_size):
    """A copy of gpt with a context of block_size: positions past its own start as copies of its last."""
    config = GPTConfig(**{**asdict(gpt.config), "block_size": block_size})
    model = GPT(config)
    state = gpt.state_dict()
    wpe = state["transformer.wpe.weight"]
    new = wpe[-1:].repeat(block_size, 1)
    new[: min(block_size, len(wpe))] = wpe[:block_size]
    state["transformer.wpe.weight"] = new
    model.load_state_dict(state)
    return model


@torch.no_grad()
def accuracy(model, seqs, pad_id, ab, device, batch_size=128):
    """Share of the examples where p(A) sides with the target, and the mean p(A) (0.5: no position bias)."""
    model.eval()
    right, pa = 0, 0.0
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i : i + batch_size]
        p = choice_prob(choice_logits(model, [s for s, _ in chunk], pad_id, ab, device))
        right += ((p > 0.5).float() == torch.tensor([y for _, y in chunk], device=p.device)).sum().item()
        pa += p.sum().item()
    model.train()
    return right / len(seqs), pa / len(seqs)


if __name__ == "__main__":
    args = parser.parse_args()
    out = Path(args.out)
    device, dtype = common.setup_device(args.device)
    common.seed_everything(args.seed)

    # -- data: judging examples from the corpus and the principles (no judge, no rule) ------------------
    principles = read_constitution(args.constitution)
    if not Path(args.corpus).exists():
        common.die(f"--corpus {args.corpus}: file not found")
    train_prompts = [r["prompt"] for f in args.prompts.split(",") if Path(f).exists()
                     for r in common.read_jsonl(f, required=("prompt",), flag="--prompts")]
    examples = judging_examples(Path(args.corpus).read_text(), train_prompts, principles,
                                args.examples_per_contrast, args.seed)
    for c in principles:
        print(f"principle: {c!r}\n  contrasts: {', '.join(contrasts_of(c)) or 'NONE: never seen in training'} "
              f"({sum(e[0] == c for e in examples)} examples)")
    if not examples:
        common.die(f"--constitution {args.constitution}: no principle asks for a contrast the corpus can build")

    gpt, enc, init_meta = common.load_policy(args.init, device, expect_stage=("pretrain", "sft", "rlaif_labeller"))
    model = labeller_from(gpt, args.block_size).to(device)
    config, pad_id, ab = model.config, enc.eot_token, choice_ids(enc)
    rng = random.Random(args.seed)
    seqs = to_sequences(enc, examples, config.block_size, rng)
    n_val = max(1, len(seqs) // 20)
    val, train = seqs[:n_val], seqs[n_val:]
    print(f"model: {model.num_params() / 1e6:.2f}M parameters from {args.init}, context {config.block_size} | "
          f"{len(train)} train / {len(val)} val judging examples | {args.steps * args.batch_size / len(train):.1f} epochs")

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    run = common.Run(args, "rlaif_labeller", model, optimizer, config=asdict(config), device=device)

    def save(step, final=None):
        meta = {"stage": "rlaif_labeller", "config": asdict(config), "args": vars(args), "step": step,
                "tokenizer": init_meta["tokenizer"], "init": args.init, "constitution": principles,
                "trained_contrasts": {c: contrasts_of(c) for c in principles}, "final": final or {}}
        common.save_checkpoint(out, model, meta, run.resume_state(step))

    def batches():  # examples drawn at random, with replacement
        g = torch.Generator().manual_seed(args.seed)
        while True:
            yield torch.randint(len(train), (args.batch_size,), generator=g).tolist()

    model.train()
    for step, batch in run.steps(batches(), save, args.eval_every):
        lr = common.lr_at(step - 1, args.steps, args.lr, args.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        with common.autocast(device, dtype):
            margin = choice_logits(model, [train[i][0] for i in batch], pad_id, ab, device)
        target = torch.tensor([train[i][1] for i in batch], device=margin.device)
        loss = judge_loss(margin, target)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        common.guard_finite(step, out, loss=loss.item(), grad_norm=grad_norm)
        optimizer.step()
        metrics = {"train/loss": loss.item(), "train/accuracy": ((margin > 0).float() == target).float().mean().item(),
                   "train/lr": lr, "samples": step * args.batch_size}
        if step % args.eval_every == 0 or step == args.steps:
            with run.phase("eval"):
                metrics["val/accuracy"], metrics["val/p_a"] = accuracy(model, val, pad_id, ab, device)
        run.log(step, metrics, show=["train/loss", "train/accuracy", "val/accuracy", "val/p_a"])
    final = {k: v for k, v in metrics.items() if k not in ("train/lr", "samples")}
    save(args.steps, final)
    print(f"saved {out}/model.pt, meta.json: judging accuracy on held-out examples {final['val/accuracy']:.3f}")
    common.print_phase_times()
