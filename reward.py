"""Stage 2b: the reward model. A GPT with a scalar head learns to score responses like the labellers.

The labels only say "a is better than b". Bradley-Terry turns that into a model of a score r:

    P(chosen > rejected) = sigmoid(r(prompt, chosen) - r(prompt, rejected))
    loss = -log sigmoid(r_chosen - r_rejected)        (bt_loss below, with F.logsigmoid)

A soft label p = P(chosen > rejected) (the AI labeller's "soft_label", RLAIF) makes it the
cross-entropy against p instead of 1, minimised where sigmoid(r_chosen - r_rejected) = p:

    loss = -[p log sigmoid(r_chosen - r_rejected) + (1 - p) log sigmoid(r_rejected - r_chosen)]

(a row without "soft_label" has p = 1: the hard label, the first formula.)

r is read at the last real token of <|user|> prompt <|assistant|> response <|end|> (of an answer
that ran out of tokens, its last token: it is trained as it was sampled): the one
position whose hidden state has seen the whole answer. Sequences are right-padded, so that
position moves from row to row; model.ScalarModel.score finds it from the attention mask.

The trunk starts as the SFT model (it already reads this world's language) and the head at small
random weights. After training, the reward model is normalised as lm-human-preferences does
(Ziegler et al. 2019; Stiennon et al. 2020): a gain and a bias are set so that fresh answers of the
policy PPO starts from score mean 0 and standard deviation 1. Here: --norm-samples answers of the
SFT model to train prompts drawn from --norm-data (the RL prompts, as PPO draws them), at
temperature 1 and --norm-max-new-tokens long (as PPO samples), and the score normalised is the
reward as PPO sees it: gain * score + bias for an answer that ended, the fixed --missing-end-penalty
for one that ran out of tokens (the original normalises the raw score and adds its penalty after;
with a fifth of our SFT answers cut short, that left PPO's reward of SFT answers at mean +0.1 and
std 0.7). gain_and_bias has the two equations. Both numbers are folded into the head (weight * gain,
bias * gain + bias), so score() is already normalised, and meta.json keeps them as "reward_norm".

How good is it? Against the noisy labels (val/acc_label) it cannot beat the labellers' own
noise; against the gold ranking (reward/acc_gold, on held-out pairs whose gold scores differ) it
can, because noise averages out over many labels: that is the figure that matters.

Simplified against InstructGPT: the K responses of a prompt give C(K, 2) pairs that are trained
as independent examples (InstructGPT keeps a prompt's comparisons in one batch element so they
cannot overfit together), the whole trunk is fine-tuned, and the held-out split is by prompt
text. Batches group pairs of similar length (epoch_batches): half the padding, same randomness.

    python reward.py                                       # CPU, the tiny world, ~2 minutes
    python reward.py --device cuda --batch-size 64         # one GPU
    python reward.py --data hh_rlhf_train.jsonl --out out/reward_hh   # TRL or Anthropic HH layout
    torchrun --standalone --nproc_per_node=4 reward.py --device cuda --batch-size 64   # 4 GPUs, 16 pairs each

Data: JSONL with {"prompt","chosen","rejected"} (TRL), or Anthropic HH's {"chosen","rejected"}
where each is a whole conversation "\\n\\nHuman: ...\\n\\nAssistant: ...". For HH rows the shared
prompt is everything before the LAST "\\n\\nAssistant:" (with its leading "\\n\\nHuman:" marker
removed; earlier turns of a longer conversation stay in the prompt as plain text), and the
response is what follows it; chosen and rejected must share that prompt.
"""

import itertools
import math
import random
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

import common
from evaluate import MISSING_END_PENALTY, penalise_unfinished, penalty_value, proxy_scores
from model import ScalarModel, last_token_index
from sampling import sample_responses
from tokenizer import encode_prompt, encode_response

# -----------------------------------------------------------------------------
# Config

parser = common.ArgumentParser(description="Stage 2b: Bradley-Terry reward model on preference pairs")
common.add_common_args(parser, "reward", init="out/sft", data="out/feedback/preferences.jsonl", steps=600)
g = parser.add_argument_group("optimisation")
g.add_argument("--batch-size", type=common.positive_int, default=32,
               help="preference pairs per step, over all processes")
g.add_argument("--grad-accum", type=common.positive_int, default=1,
               help="micro-batches per step and process (same step, less memory)")
g.add_argument("--lr", type=common.positive_float, default=3e-4, help="peak learning rate (AdamW)")
g.add_argument("--warmup-steps", type=common.nonnegative_int, default=20)
g.add_argument("--weight-decay", type=common.nonnegative_float, default=0.0)
g.add_argument("--grad-clip", type=common.positive_float, default=1.0)
g = parser.add_argument_group("evaluation")
g.add_argument("--val-fraction", type=common.fraction, default=0.1, help="share of prompts whose pairs are held out")
g.add_argument("--eval-every", type=common.positive_int, default=200,
               help="held-out loss and accuracies, and a checkpoint, every N steps (an evaluation of the 1,614 "
                    "held-out pairs costs about as much as 17 training steps)")
g = parser.add_argument_group("normalisation (after training)")
g.add_argument("--norm-samples", type=common.nonnegative_int, default=1024,
               help="fresh SFT answers to train prompts that set the gain and bias: they score mean 0, std 1 (0: none)")
g.add_argument("--norm-data", default="data/prompts.jsonl",
               help="the train prompts they answer (ppo.py's --data); if absent, those of the training pairs")
g.add_argument("--norm-max-new-tokens", type=common.positive_int, default=32, help="their length (as ppo.py samples)")
g.add_argument("--missing-end-penalty", type=penalty_value, default=MISSING_END_PENALTY,
               help="PPO's score of an answer that never ends (ppo.py's flag, 'none' included): normalised with it")

HH_ASSISTANT, HH_HUMAN = "\n\nAssistant:", "\n\nHuman:"


# -----------------------------------------------------------------------------
# Data: preference pairs in the TRL layout or Anthropic HH's single-string layout


def split_hh(text, where, field):
    """ "\\n\\nHuman: q\\n\\nAssistant: a" -> (prompt "q", response "a"), split at the last "\\n\\nAssistant:"."""
    cut = text.rfind(HH_ASSISTANT)
    if cut < 0:
        common.die(f"{where}: field '{field}' has no {HH_ASSISTANT!r} turn (expected Anthropic HH's "
                   f"\"\\n\\nHuman: ...\\n\\nAssistant: ...\")")
    prompt = text[:cut].strip()
    prompt = prompt.removeprefix(HH_HUMAN.strip()).strip()
    return prompt, text[cut + len(HH_ASSISTANT):].strip()


def load_preferences(path, flag="--data"):
    """Preference pairs from JSONL -> [{"prompt","chosen","rejected", ...other fields kept}].

    Each line is {"prompt","chosen","rejected"} (TRL), or {"chosen","rejected"} holding whole HH
    conversations (the prompt is split off at the last "\\n\\nAssistant:"). Any problem stops with
    file:line. dpo.py reads its data through this function too.
    """
    rows = common.read_jsonl(path, flag=flag)  # valid JSON objects, else file:line
    linenos = common.jsonl_line_numbers(path)
    out = []
    for row, lineno in zip(rows, linenos):
        where = f"{path}:{lineno}"
        for key in ("chosen", "rejected") + (("prompt",) if "prompt" in row else ()):
            if key not in row:
                common.die(f"{where}: missing field '{key}' (expected {{\"prompt\",\"chosen\",\"rejected\"}} "
                           f"or HH's {{\"chosen\",\"rejected\"}})")
            if not isinstance(row[key], str):
                common.die(f"{where}: field '{key}' must be a string, got {type(row[key]).__name__}")
        for key in ("chosen_ended", "rejected_ended"):  # optional (feedback.py writes them)
            if key in row and not isinstance(row[key], bool):
                common.die(f"{where}: field '{key}' must be true or false, got {row[key]!r}")
        soft = row.get("soft_label", 1.0)  # optional (the AI labeller writes it): P(chosen > rejected)
        if isinstance(soft, bool) or not isinstance(soft, (int, float)) or not 0 <= soft <= 1:
            common.die(f"{where}: field 'soft_label' must be a number from 0 to 1, got {soft!r}")
        if "prompt" not in row:
            prompt, chosen = split_hh(row["chosen"], where, "chosen")
            prompt_r, rejected = split_hh(row["rejected"], where, "rejected")
            if prompt != prompt_r:
                common.die(f"{where}: 'chosen' and 'rejected' do not share the conversation before their last "
                           f"{HH_ASSISTANT!r}")
            row = {**row, "prompt": prompt, "chosen": chosen, "rejected": rejected}
        out.append(row)
    return out


def tokenize_pairs(enc, rows, block_size):
    """Token ids of each pair in the chat template: {"prompt", "chosen", "rejected"} and its "row"; each
    response ends in <|end|> unless its row says it never ended ("chosen_ended" / "rejected_ended"
    false, from feedback.py: an answer cut at --max-new-tokens is trained as the policy wrote it, with
    no end token it never sampled). Pairs whose longer answer does not fit the context are skipped.
    dpo.py tokenizes its pairs through this function too."""
    pairs = []
    for r in rows:
        prompt, chosen, rejected = (encode_prompt(enc, r["prompt"]),
                                    encode_response(enc, r["chosen"], end=r.get("chosen_ended", True)),
                                    encode_response(enc, r["rejected"], end=r.get("rejected_ended", True)))
        if len(prompt) + max(len(chosen), len(rejected)) <= block_size:
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "row": r})
    return pairs


def epoch_batches(lengths, batch_size, seed, group=8):
    """One epoch of batches (lists of indices) with little padding, the same for the same seed.

    Shuffle, cut into chunks of `group` batches, sort each chunk by length and split it: a batch
    holds sequences of similar length (about half the padding of a random batch), and which ones
    meet in a batch stays random. The last partial batch is dropped.
    """
    perm = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    batches = []
    for start in range(0, len(perm), batch_size * group):
        chunk = sorted(perm[start : start + batch_size * group], key=lambda i: lengths[i])
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk) - batch_size + 1, batch_size)]
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed + 1)).tolist()
    return [batches[k] for k in order]


def batches(lengths, batch_size, seed):
    """The training batches, step after step: epoch after epoch of epoch_batches, epoch e seeded with
    seed + 1000 e (the same on every rank)."""
    for epoch in itertools.count():
        yield from epoch_batches(lengths, batch_size, seed + 1000 * epoch)


def collate(seqs, pad_id):
    """Right-pad token lists -> idx, attention_mask, both (N, T)."""
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for n, s in enumerate(seqs):
        idx[n, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[n, : len(s)] = 1
    return idx, mask


def score_pairs(model, pairs, pad_id, device):
    """(B,) r_chosen and (B,) r_rejected: both halves in one forward pass of 2B right-padded rows."""
    idx, mask = collate([p["prompt"] + p[k] for k in ("chosen", "rejected") for p in pairs], pad_id)
    idx, mask = idx.to(device), mask.to(device)
    values = model(idx, mask)  # (2B, T): forward, not .score(), as DDP all-reduces only through forward
    scores = values[torch.arange(len(idx), device=device), last_token_index(mask)]  # each row's last real token
    return scores[: len(pairs)], scores[len(pairs):]


# -----------------------------------------------------------------------------
# The loss


def bt_loss(r_chosen, r_rejected, target=None):
    """Bradley-Terry: mean of -log sigmoid(r_chosen - r_rejected); with soft labels target = p per pair,
    the mean of -[p log sigmoid(d) + (1 - p) log sigmoid(-d)], d = r_chosen - r_rejected (p = 1: the
    same). logsigmoid never overflows."""
    # exercise bt_loss: d = r_chosen - r_rejected; mean of -log sigmoid(d), or -[p log s(d) + (1-p) log s(-d)]
    d = r_chosen - r_rejected
    if target is None:
        return -F.logsigmoid(d).mean()
    return -(target * F.logsigmoid(d) + (1 - target) * F.logsigmoid(-d)).mean()
    # end exercise


def soft_targets(pairs, device=None):
    """(B,) p = P(chosen > rejected) of each pair: its row's "soft_label", else 1 (a hard label)."""
    return torch.tensor([float(p["row"].get("soft_label", 1.0)) for p in pairs], device=device)


# -----------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model, pairs, batch_size, pad_id, device):
    """val/loss and val/acc_label on held-out pairs; with gold scores also reward/acc_gold and friends."""
    model.eval()
    rc, rr = [], []
    for i in range(0, len(pairs), batch_size):
        c, j = score_pairs(model, pairs[i : i + batch_size], pad_id, device)
        rc.append(c.float().cpu())
        rr.append(j.float().cpu())
    model.train()
    rc, rr = torch.cat(rc), torch.cat(rr)
    out = {"val/loss": bt_loss(rc, rr, soft_targets(pairs)).item(), "val/acc_label": (rc > rr).float().mean().item()}
    rows = [p["row"] for p in pairs]
    if all("gold_chosen" in r for r in rows):
        gc = torch.tensor([r["gold_chosen"] for r in rows])
        gr = torch.tensor([r["gold_rejected"] for r in rows])
        differ = gc != gr
        if differ.any():  # does the model rank the pair as the gold judge does (whatever the label said)?
            model_right, label_right = (rc > rr) == (gc > gr), gc > gr  # per pair
            out["reward/acc_gold"] = model_right[differ].float().mean().item()
            # the labels' own accuracy against gold: about the best val/acc_label can reach (not a bound
            # on reward/acc_gold, which can pass it: the noise of many labels averages out)
            out["reward/label_acc_gold"] = label_right[differ].float().mean().item()
            families = sorted({r["family"] for r in rows if r.get("family")})
            for family in families if len(families) > 1 else []:  # where it ranks well, and where it cannot
                mine = differ & torch.tensor([r.get("family") == family for r in rows])
                if mine.any():
                    out[f"reward/acc_gold_{family}"] = model_right[mine].float().mean().item()
                    out[f"reward/label_acc_gold_{family}"] = label_right[mine].float().mean().item()
        scores, golds = torch.cat([rc, rr]), torch.cat([gc, gr])
        out["reward/gold_corr"] = torch.corrcoef(torch.stack([scores, golds]))[0, 1].item()
    return out


def gain_and_bias(scores, ended, penalty):
    """(gain, bias, how) so that the reward as PPO sees it, r = gain * score + bias where the answer
    ended and the fixed penalty p where it did not, has mean 0 and variance 1 over these answers.
    With e the share that ended, and m, v the mean and variance of their scores:

        mean 0:      e * mu + (1 - e) * p = 0                      ->  mu = -(1 - e) * p / e
        variance 1:  e * (gain^2 * v + mu^2) + (1 - e) * p^2 = 1   ->  gain^2 = (1 - (1 - e) p^2 - e mu^2) / (e v)

    and bias = mu - gain * m. Possible only when e / (1 - e) > p^2 (more than half ended, for p = -1):
    otherwise the penalty alone spreads the rewards by more than 1, and, as when p is None or every
    answer ended, the plain normalisation of all the scores is used: (score - mean) / std.
    """
    scores, ended = scores.double(), ended.bool()
    e = ended.double().mean().item()
    if penalty is not None and 0 < e < 1 and e / (1 - e) > penalty ** 2:
        mu = -(1 - e) * penalty / e
        m, v = scores[ended].mean().item(), scores[ended].var(unbiased=False).item()
        gain = math.sqrt((1 - (1 - e) * penalty ** 2 - e * mu ** 2) / v) / math.sqrt(e) if v > 0 else 1.0
        return gain, mu - gain * m, "the reward as PPO sees it"
    mean, std = scores.mean().item(), scores.std(unbiased=False).item()
    gain = 1.0 / std if std > 0 else 1.0
    too_few = penalty is not None and 0 < e < 1
    return gain, -mean * gain, "all scores" + (" (too few answers ended for the reward as PPO sees it)" * too_few)


@torch.no_grad()
def normalise(model, sft, enc, prompts, n, max_new_tokens, seed, device, penalty):
    """Fold gain_and_bias, measured on n fresh answers of the SFT model, into the head.

    The prompts are drawn (with replacement, seeded) from the list `prompts` (repeats count: it is the
    distribution PPO draws from, not a set of distinct strings); the answers are sampled at temperature
    1 and scored at their last token, as the reward model was trained on them (an unfinished one
    without <|end|>). Returns meta.json's "reward_norm": the gain, the bias, and what they were
    measured on, with the mean and std of the normalised reward on those answers (0 and 1).
    """
    rng = random.Random(seed)
    picked = [rng.choice(prompts) for _ in range(n)]
    with common.phase("sampling"):
        answers = sample_responses(sft, enc, picked, device, max_new_tokens, temperature=1.0,
                                   generator=torch.Generator(device).manual_seed(seed))
    with common.phase("scoring"):
        # (n,) raw scores, in sampling order: grouping 1,024 answers by length saves about a second, and would
        # move the gain in its 8th digit, which PPO (chaotic, like any RL run) turns into another run
        scores = proxy_scores(model, enc, picked, answers, device, missing_end_penalty=None, by_length=False)
    ended = torch.tensor([a["ended"] for a in answers])
    gain, bias, how = gain_and_bias(scores, ended, penalty)
    model.head.weight.mul_(gain)
    model.head.bias.mul_(gain).add_(bias)
    reward = penalise_unfinished(scores * gain + bias, ended, penalty)
    return {"gain": gain, "bias": bias, "normalised": how, "samples": n, "ended": ended.float().mean().item(),
            "raw_mean": scores.mean().item(), "raw_std": scores.std().item(), "mean": reward.mean().item(),
            "std": reward.std().item(), "max_new_tokens": max_new_tokens, "missing_end_penalty": penalty,
            "seed": seed}


# -----------------------------------------------------------------------------

if __name__ == "__main__":
    args = parser.parse_args()
    common.check_batch_split(args.batch_size, args.grad_accum)
    out = Path(args.out)
    device, dtype = common.setup_ddp(args.device)
    common.seed_everything(args.seed + common.ddp_rank)  # the head's init differs per rank; DDP copies rank 0's

    # -- data ------------------------------------------------------------------
    rows = load_preferences(args.data)  # read first: a bad line stops the run before anything is loaded
    norm_prompts = None  # the train prompts of the normalisation (read now: a bad line stops before training)
    if args.norm_samples and Path(args.norm_data).exists():
        norm_prompts = [r["prompt"] for r in common.read_jsonl(args.norm_data, required=("prompt",),
                                                               flag="--norm-data")]

    # -- model: the SFT trunk with a fresh scalar head -----------------------------
    gpt, enc, init_meta = common.load_policy(args.init, device, expect_stage="sft")
    model = ScalarModel.from_gpt(gpt)
    del gpt
    config, pad_id = model.config, enc.eot_token
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, trunk from {args.init}")

    pairs = tokenize_pairs(enc, rows, config.block_size)
    if len(pairs) < len(rows):
        print(f"note: skipped {len(rows) - len(pairs)} pairs longer than the context ({config.block_size} tokens)")
    # Hold out whole prompts (all their pairs), so no held-out prompt was seen in training.
    prompts = sorted({p["row"]["prompt"] for p in pairs})
    random.Random(args.seed).shuffle(prompts)
    val_prompts = set(prompts[: max(1, round(len(prompts) * args.val_fraction))])
    train_pairs = [p for p in pairs if p["row"]["prompt"] not in val_prompts]
    val_pairs = sorted((p for p in pairs if p["row"]["prompt"] in val_prompts),  # by length: little padding
                       key=lambda p: len(p["prompt"]) + max(len(p["chosen"]), len(p["rejected"])))
    if not train_pairs or not val_pairs:
        common.die(f"--data {args.data}: need pairs for both training and validation, got "
                   f"{len(train_pairs)} and {len(val_pairs)} (from {len(prompts)} distinct prompts)")
    print(f"data: {len(train_pairs)} train / {len(val_pairs)} val pairs ({len(prompts)} distinct prompts) | "
          f"{args.steps * args.batch_size / len(train_pairs):.1f} epochs")
    lengths = [len(p["prompt"]) + max(len(p["chosen"]), len(p["rejected"])) for p in train_pairs]
    if len(train_pairs) < args.batch_size:
        common.die(f"--batch-size {args.batch_size} is larger than the {len(train_pairs)} training pairs")

    # -- optimizer, resume -----------------------------------------------------
    train_model = common.wrap_ddp(model, device)  # trained through DDP on several ranks; `model` evaluates and saves
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    run = common.Run(args, "reward", model, optimizer, config=asdict(config), device=device)

    def save(step, final=None, norm=None):
        meta = {"stage": "reward", "config": asdict(config), "args": vars(args), "step": step,
                "tokenizer": init_meta["tokenizer"], "init": args.init, "reward_norm": norm, "final": final or {}}
        common.save_checkpoint(out, model, meta, run.resume_state(step))

    # -- the loop --------------------------------------------------------------
    model.train()
    for step, batch in run.steps(batches(lengths, args.batch_size, args.seed), save, args.eval_every):
        lr = common.lr_at(step - 1, args.steps, args.lr, args.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        sums = {"reward/loss": 0.0, "reward/accuracy": 0.0, "reward/margin": 0.0}
        for micro_step, micro in enumerate(common.micro_batches(batch, args.grad_accum)):
            if common.ddp:  # all-reduce the gradients once, after the last micro-batch (as nanoGPT)
                train_model.require_backward_grad_sync = micro_step == args.grad_accum - 1
            with common.autocast(device, dtype):
                r_chosen, r_rejected = score_pairs(train_model, [train_pairs[i] for i in micro], pad_id, device)  # (b,)
            # Equal micro-batches: the mean of their mean losses is the mean over the batch.
            target = soft_targets([train_pairs[i] for i in micro], device)  # 1 for hard labels
            loss = bt_loss(r_chosen.float(), r_rejected.float(), target) / args.grad_accum
            loss.backward()
            sums["reward/loss"] += loss.item()
            sums["reward/accuracy"] += (r_chosen > r_rejected).float().mean().item() / args.grad_accum
            sums["reward/margin"] += (r_chosen - r_rejected).mean().item() / args.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        common.guard_finite(step, out, loss=sums["reward/loss"], grad_norm=grad_norm)
        optimizer.step()
        metrics = {**common.all_reduce_mean(sums), "train/lr": lr, "train/grad_norm": grad_norm.item(),
                   "pairs": step * args.batch_size}
        if common.master_process and (step % args.eval_every == 0 or step == args.steps):
            with common.autocast(device, dtype):
                with common.phase("eval"):
                    metrics.update(evaluate(model, val_pairs, 2 * args.batch_size, pad_id, device))
        run.log(step, metrics, show=["reward/loss", "reward/accuracy", "val/acc_label", "reward/acc_gold", "train/lr"])

    # -- normalise: fresh SFT answers to train prompts score mean 0, std 1 (rank 0 alone from here) -----------
    norm = None
    if args.norm_samples:
        sft, _, _ = common.load_policy(args.init, device, expect_stage="sft")
        if norm_prompts is None:
            print(f"note: --norm-data {args.norm_data} not found: normalising on the prompts of the training pairs")
            norm_prompts = [p["row"]["prompt"] for p in train_pairs]
        room = config.block_size - args.norm_max_new_tokens  # prompts that leave room for the answer
        norm_prompts = [p for p in norm_prompts if len(encode_prompt(enc, p)) <= room]
        if not norm_prompts:
            common.die(f"--norm-max-new-tokens {args.norm_max_new_tokens}: no prompt of --norm-data leaves room for it")
        with common.autocast(device, dtype):
            norm = normalise(model, sft, enc, norm_prompts, args.norm_samples, args.norm_max_new_tokens, args.seed,
                             device, args.missing_end_penalty)
        print(f"normalised on {args.norm_samples} fresh SFT answers to train prompts ({norm['ended']:.0%} ended), "
              f"{norm['normalised']}: gain {norm['gain']:.3f} and bias {norm['bias']:+.3f} folded into the head "
              f"(meta.json: reward_norm); their reward now has mean {norm['mean']:+.3f} and std {norm['std']:.3f} "
              f"(raw scores: {norm['raw_mean']:+.3f} and {norm['raw_std']:.3f})")

    final = {k: v for k, v in metrics.items() if k not in ("train/lr", "pairs")}
    save(args.steps, final, norm=norm)
    if "reward/acc_gold" in final:
        print(f"held-out accuracy: {final['reward/acc_gold']:.3f} against the gold ranking "
              f"(labellers: {final['reward/label_acc_gold']:.3f}), {final['val/acc_label']:.3f} against the labels "
              f"| reward-gold correlation {final['reward/gold_corr']:.3f}")
        by_family = [k.removeprefix("reward/acc_gold_") for k in final if k.startswith("reward/acc_gold_")]
        if by_family:
            print("against gold, by family: " + " | ".join(
                f"{f} {final['reward/acc_gold_' + f]:.3f} (labels {final['reward/label_acc_gold_' + f]:.3f})" for f in by_family))
    print(f"saved {out}/model.pt, meta.json, metrics.jsonl")
    common.print_phase_times()
