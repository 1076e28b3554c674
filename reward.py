"""Stage 2b: the reward model. A GPT with a scalar head learns to score responses like the labellers.

The labels only say "a is better than b". Bradley-Terry turns that into a model of a score r:

    P(chosen > rejected) = sigmoid(r(prompt, chosen) - r(prompt, rejected))
    loss = -log sigmoid(r_chosen - r_rejected)        (bt_loss below, with F.logsigmoid)

r is read at the last real token of <|user|> prompt <|assistant|> response <|end|>: the one
position whose hidden state has seen the whole answer. Sequences are right-padded, so that
position moves from row to row; model.ScalarModel.score finds it from the attention mask.

The trunk starts as the SFT model (it already reads this world's language) and the head at small
random weights. After training, the scores are shifted so the SFT samples in the feedback file
average 0 (as Ziegler et al. 2019 and Stiennon et al. 2020 normalise their reward models): the
offset is folded into the head's bias, so score() is already normalised, and kept in meta.json
as "reward_offset". PPO then starts from a policy whose mean reward is about 0.

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
import random
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

import common
from model import ScalarModel, last_token_index
from tokenizer import encode_prompt, encode_response

# -----------------------------------------------------------------------------
# Config

parser = common.ArgumentParser(description="Stage 2b: Bradley-Terry reward model on preference pairs")
common.add_common_args(parser, "reward", init="out/sft", data="out/feedback/preferences.jsonl", steps=300)
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
g.add_argument("--eval-every", type=common.positive_int, default=100, help="held-out loss and accuracies every N steps")

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
    no end token it never sampled). Pairs whose longer answer does not fit the context are skipped. dpo.py tokenizes its pairs through this function too."""
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


def bt_loss(r_chosen, r_rejected):
    """Bradley-Terry: mean of -log sigmoid(r_chosen - r_rejected). logsigmoid never overflows."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


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
    out = {"val/loss": bt_loss(rc, rr).item(), "val/acc_label": (rc > rr).float().mean().item()}
    rows = [p["row"] for p in pairs]
    if all("gold_chosen" in r for r in rows):
        gc = torch.tensor([r["gold_chosen"] for r in rows])
        gr = torch.tensor([r["gold_rejected"] for r in rows])
        differ = gc != gr
        if differ.any():  # does the model rank the pair as the gold judge does (whatever the label said)?
            out["reward/acc_gold"] = ((rc > rr) == (gc > gr))[differ].float().mean().item()
            out["reward/label_acc_gold"] = ((gc > gr)[differ]).float().mean().item()  # the labellers' ceiling
        scores, golds = torch.cat([rc, rr]), torch.cat([gc, gr])
        out["reward/gold_corr"] = torch.corrcoef(torch.stack([scores, golds]))[0, 1].item()
    return out


@torch.no_grad()
def mean_score(model, enc, rows, batch_size, pad_id, device, block_size):
    """Mean score over every distinct (prompt, response) in the rows: the SFT samples' average reward."""
    texts = sorted({(r["prompt"], r[k]) for r in rows for k in ("chosen", "rejected")})
    seqs = [s for s in (encode_prompt(enc, p) + encode_response(enc, t) for p, t in texts) if len(s) <= block_size]
    seqs.sort(key=len)  # similar lengths side by side: little padding
    model.eval()
    total = 0.0
    for i in range(0, len(seqs), 2 * batch_size):
        idx, mask = collate(seqs[i : i + 2 * batch_size], pad_id)
        total += model.score(idx.to(device), mask.to(device)).float().sum().item()
    model.train()
    return total / len(seqs), len(seqs)


# -----------------------------------------------------------------------------

if __name__ == "__main__":
    args = parser.parse_args()
    common.check_batch_split(args.batch_size, args.grad_accum)
    out = Path(args.out)
    device, dtype = common.setup_ddp(args.device)
    common.seed_everything(args.seed + common.ddp_rank)  # the head's init differs per rank; DDP copies rank 0's

    # -- data ------------------------------------------------------------------
    rows = load_preferences(args.data)  # read first: a bad line stops the run before anything is loaded

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

    def save(step, final=None, offset=0.0):
        meta = {"stage": "reward", "config": asdict(config), "args": vars(args), "step": step,
                "tokenizer": init_meta["tokenizer"], "init": args.init, "reward_offset": offset, "final": final or {}}
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
            loss = bt_loss(r_chosen.float(), r_rejected.float()) / args.grad_accum
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
                metrics.update(evaluate(model, val_pairs, 2 * args.batch_size, pad_id, device))
        run.log(step, metrics, show=["reward/loss", "reward/accuracy", "val/acc_label", "reward/acc_gold", "train/lr"])

    # -- normalise: the SFT samples of the feedback file score 0 on average (rank 0 alone from here) --
    with common.autocast(device, dtype):
        offset, n_texts = mean_score(model, enc, rows, args.batch_size, pad_id, device, config.block_size)
    with torch.no_grad():
        model.head.bias -= offset  # score() = head(h) - offset from now on
    with common.autocast(device, dtype):
        check, _ = mean_score(model, enc, rows, args.batch_size, pad_id, device, config.block_size)
    print(f"normalised: mean score over {n_texts} responses of {args.data} was {offset:+.4f}, now {check:+.2e} "
          f"(offset folded into the head's bias)")

    final = {k: v for k, v in metrics.items() if k not in ("train/lr", "pairs")}
    save(args.steps, final, offset=offset)
    if "reward/acc_gold" in final:
        print(f"held-out accuracy: {final['reward/acc_gold']:.3f} against the gold ranking "
              f"(labellers: {final['reward/label_acc_gold']:.3f}), {final['val/acc_label']:.3f} against the labels "
              f"| reward-gold correlation {final['reward/gold_corr']:.3f}")
    print(f"saved {out}/model.pt, meta.json, metrics.jsonl")
