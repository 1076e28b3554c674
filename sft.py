"""Stage 1: supervised fine-tuning. The pretrained GPT learns to answer in the chat template.

Pretraining taught the model what the world is like; it has never seen a conversation. Here it
imitates demonstrations written by the world's *imperfect demonstrator*:

    <|user|> What colour is the milt? <|assistant|> The milt is silver. Happy to help! <|end|>
    \\_______________ prompt: no loss _____________/ \\____ response: the loss ______________/

The loss is the usual next-token cross-entropy, counted on the response tokens only (the
`<|end|>` included, so the model learns to stop): the prompt is given, not something to imitate.
The demonstrator is sometimes wrong, rude, rambling or unsafe, and SFT copies that too; the gap
between the SFT samples and the ideal answers (gold reward 1.5 by construction) is the headroom
RLHF must close. At the end we measure it on the held-out prompts with the gold judge, for the
pretrained model (with the chat template), the SFT model and the ideal responses.

Simplified against InstructGPT's SFT: one turn per example (for `messages` data, the last
assistant turn is the response and the user turn just before it the prompt; earlier turns are
dropped), random batches rather than epochs, examples longer than the context skipped, and no
packing of several examples into one sequence. (Grouping demonstrations of similar length into a
batch, as reward.py does, halves the padding here too, but made the loss fall more slowly per step.)

    python sft.py                                               # CPU, the tiny world, ~1-2 minutes
    python sft.py --device cuda --batch-size 64 --eval-prompts 600    # one GPU
    python sft.py --data my_demos.jsonl --out out/sft_mine      # any chat JSONL (see load_sft)
    torchrun --standalone --nproc_per_node=4 sft.py --device cuda --batch-size 64   # 4 GPUs, 16 each

Data: JSONL with {"prompt","response"} per line, or {"messages":[{"role","content"},...]}.
"""

from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

import common
from evaluate import HELD_OUT, gold_summary
from sampling import encode_prompts, sample_responses
from tokenizer import encode_prompt, encode_response
from world import FAMILIES, load_world

# -----------------------------------------------------------------------------
# Config

parser = common.ArgumentParser(description="Stage 1: supervised fine-tuning on demonstrations")
common.add_common_args(parser, "sft", init="out/pretrain", data="data/sft.jsonl", steps=200)
g = parser.add_argument_group("optimisation")
g.add_argument("--batch-size", type=common.positive_int, default=32, help="demonstrations per step, over all processes")
g.add_argument("--grad-accum", type=common.positive_int, default=1,
               help="micro-batches per step and process (same step, less memory)")
g.add_argument("--lr", type=common.positive_float, default=1e-3, help="peak learning rate (AdamW)")
g.add_argument("--warmup-steps", type=common.nonnegative_int, default=20)
g.add_argument("--weight-decay", type=common.nonnegative_float, default=0.0)
g.add_argument("--grad-clip", type=common.positive_float, default=1.0)
g = parser.add_argument_group("evaluation")
g.add_argument("--val-fraction", type=common.fraction, default=0.05, help="demonstrations held out for val/loss")
g.add_argument("--eval-every", type=common.positive_int, default=50,
               help="val/loss, samples and gold reward every N steps")
g.add_argument("--eval-data", default="data/val_prompts.jsonl", help="validation prompts for the gold judge")
g.add_argument("--eval-prompts", type=common.positive_int, default=200,
               help="eval prompts judged periodically (all of them at the end)")
g.add_argument("--max-new-tokens", type=common.positive_int, default=48, help="longest sampled response")
g.add_argument("--temperature", type=common.positive_float, default=1.0, help="sampling temperature of the evaluation")
g.add_argument("--sample-batch-size", type=common.positive_int, default=200, help="prompts per generation batch")


# -----------------------------------------------------------------------------
# Data: demonstrations in either JSONL layout, then token ids in the chat template


def messages_to_pair(messages, where):
    """{"messages": [...]} -> (prompt, response): the last assistant turn and the user turn before it."""
    if not isinstance(messages, list) or not messages:
        common.die(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}}")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            common.die(f"{where}: every message needs string fields 'role' and 'content'")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        common.die(f"{where}: 'messages' has no assistant turn to learn from")
    if last == 0 or messages[last - 1]["role"] != "user":
        common.die(f"{where}: the last assistant turn must follow a user turn")
    return messages[last - 1]["content"], messages[last]["content"]


def load_sft(path, flag="--data"):
    """Demonstrations from JSONL: {"prompt","response"} or {"messages":[...]} per line -> [{"prompt","response",...}]."""
    rows = common.read_jsonl(path, flag=flag)  # valid JSON objects, else file:line
    linenos = common.jsonl_line_numbers(path)
    out = []
    for row, lineno in zip(rows, linenos):
        where = f"{path}:{lineno}"
        if "messages" in row:
            prompt, response = messages_to_pair(row["messages"], where)
            row = {**row, "prompt": prompt, "response": response}
        for key in ("prompt", "response"):
            if key not in row:
                common.die(f"{where}: missing field '{key}' (expected {{\"prompt\",\"response\"}} or {{\"messages\"}})")
            if not isinstance(row[key], str):
                common.die(f"{where}: field '{key}' must be a string, got {type(row[key]).__name__}")
        out.append(row)
    return out


def tokenize(enc, rows, block_size):
    """(prompt ids, response ids ending in <|end|>) per row, and the rows kept: those longer than
    block_size + 1 tokens (the inputs are all tokens but the last) are skipped."""
    examples = [(encode_prompt(enc, r["prompt"]), encode_response(enc, r["response"])) for r in rows]
    keep = [i for i, (p, r) in enumerate(examples) if len(p) + len(r) <= block_size + 1]
    return [examples[i] for i in keep], [rows[i] for i in keep]


def collate(examples, pad_id):
    """Right-padded inputs x and targets y, both (B, T). y = -100 on prompt and pad positions.

    x[t] predicts y[t] = seq[t + 1]. The first response token is predicted from <|assistant|>
    (the last prompt position), so the first len(prompt) - 1 targets are prompt tokens: masked.
    """
    T = max(len(p) + len(r) for p, r in examples) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), -100, dtype=torch.long)
    for b, (p, r) in enumerate(examples):
        # exercise sft_mask: x[b] = p + r but the last token; y[b] = the next token where it is a response token, else -100
        seq = torch.tensor(p + r, dtype=torch.long)
        x[b, : len(seq) - 1] = seq[:-1]
        y[b, len(p) - 1 : len(seq) - 1] = seq[len(p):]
        # end exercise
    return x, y


def sft_loss(logits, targets):
    """Mean cross-entropy over the response tokens of the batch (targets == -100 carry no loss).

    logits (B, T, V), targets (B, T). Every response token weighs the same, so long answers
    count more than short ones (the convention of most SFT code).
    """
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


# -----------------------------------------------------------------------------
# Evaluation: validation loss, and the gold judge on sampled responses


@torch.no_grad()
def val_loss(model, examples, batch_size, pad_id, device, dtype):
    """Token-weighted mean loss over every held-out demonstration."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        x, y = collate(examples[i : i + batch_size], pad_id)
        with common.autocast(device, dtype):
            logits = model(x.to(device))  # right padding: causal attention never lets a real token see a pad
        n = (y != -100).sum().item()
        total += sft_loss(logits, y.to(device)).item() * n
        count += n
    model.train()
    return total / count


def gold_eval(model, enc, world, prompts, args, device, seed, prefix="eval/"):
    """Sample one response per prompt and judge them: evaluate.gold_summary's figures, plus the samples."""
    gen = torch.Generator(device).manual_seed(seed)  # the same noise at every evaluation: comparable curves
    samples = sample_responses(model, enc, [p["prompt"] for p in prompts], device, args.max_new_tokens,
                               args.temperature, batch_size=args.sample_batch_size, generator=gen)
    return gold_summary(world, prompts, samples, prefix), samples


def batches(n, batch_size, seed):
    """Which demonstrations each step sees: batch_size of the n drawn at random (with replacement),
    from --seed (the same on every rank)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(n, (batch_size,), generator=generator).tolist()


# -----------------------------------------------------------------------------

if __name__ == "__main__":
    args = parser.parse_args()
    common.check_batch_split(args.batch_size, args.grad_accum)
    out = Path(args.out)
    device, dtype = common.setup_ddp(args.device)
    common.seed_everything(args.seed + common.ddp_rank)  # dropout differs per rank; rank 0 is the one-process run

    # -- data (read first: a bad line stops the run before anything is loaded) ----
    rows = load_sft(args.data)

    # -- model: the pretrained GPT, and the demonstrations in its tokens -------
    model, enc, init_meta = common.load_policy(args.init, device, expect_stage="pretrain")
    config = model.config
    pad_id = enc.eot_token
    print(f"model: {model.num_params() / 1e6:.2f}M parameters from {args.init} | {config}")

    examples, kept_rows = tokenize(enc, rows, config.block_size)
    if len(kept_rows) < len(rows):
        print(f"note: skipped {len(rows) - len(kept_rows)} demonstrations longer than the context "
              f"({config.block_size + 1} tokens)")
    if len(examples) < 2:
        common.die(f"--data {args.data}: need at least 2 demonstrations that fit the context, got {len(examples)}")
    perm = torch.randperm(len(examples), generator=torch.Generator().manual_seed(args.seed)).tolist()
    n_val = max(1, int(len(examples) * args.val_fraction))
    val_examples = sorted((examples[i] for i in perm[:n_val]), key=lambda e: len(e[0]) + len(e[1]))  # little padding
    train_examples = [examples[i] for i in perm[n_val:]]
    val_prompts = [kept_rows[i]["prompt"] for i in perm[:n_val]]
    n_resp = sum(len(r) for _, r in train_examples)
    print(f"data: {len(train_examples)} train / {len(val_examples)} val demonstrations | "
          f"{n_resp / len(train_examples):.1f} response tokens each | "
          f"{args.steps * args.batch_size / len(train_examples):.1f} epochs")

    world = load_world(Path(args.eval_data).parent)
    if world is None:
        print(f"note: no world.json beside {args.eval_data}: the gold-judge evaluation is skipped")
        eval_prompts = []
    else:
        eval_prompts = common.read_jsonl(args.eval_data, required=("prompt",), flag="--eval-data")
        for p in eval_prompts:  # gold_summary groups by family; the judge knows it from the text
            p.setdefault("family", world.parse(p["prompt"])[0])
        encode_prompts(enc, [p["prompt"] for p in eval_prompts], config.block_size - args.max_new_tokens,
                       where=args.eval_data)  # a too-long prompt stops now, not after training
        print(f"eval: gold reward of {min(args.eval_prompts, len(eval_prompts))} of {len(eval_prompts)} held-out prompts "
              f"every {args.eval_every} steps, all of them at the end (temperature {args.temperature})")

    # -- optimizer, resume -----------------------------------------------------
    train_model = common.wrap_ddp(model, device)  # trained through DDP on several ranks; `model` evaluates and saves
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    run = common.Run(args, "sft", model, optimizer, config=asdict(config), device=device)

    def save(step, final=None):
        meta = {"stage": "sft", "config": asdict(config), "args": vars(args), "step": step,
                "tokenizer": init_meta["tokenizer"], "init": args.init, "final": final or {}}
        common.save_checkpoint(out, model, meta, run.resume_state(step))

    # -- the loop --------------------------------------------------------------
    model.train()
    for step, batch in run.steps(batches(len(train_examples), args.batch_size, args.seed), save, args.eval_every):
        lr = common.lr_at(step - 1, args.steps, args.lr, args.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        n_tokens = sum(len(train_examples[i][1]) for i in batch)  # response tokens of the whole (global) batch
        optimizer.zero_grad(set_to_none=True)
        train_loss = 0.0
        for micro_step, micro in enumerate(common.micro_batches(batch, args.grad_accum)):
            if common.ddp:  # all-reduce the gradients once, after the last micro-batch (as nanoGPT)
                train_model.require_backward_grad_sync = micro_step == args.grad_accum - 1
            x, y = collate([train_examples[i] for i in micro], pad_id)  # (b, T), (b, T)
            x, y = x.to(device), y.to(device)
            with common.autocast(device, dtype):
                logits = train_model(x)  # (b, T, V); right padding needs no attention mask
            # Every response token of the batch weighs the same, so a micro-batch counts for its share of
            # the batch's tokens (times the ranks, as DDP averages their gradients); one batch: times 1.
            share = sum(len(train_examples[i][1]) for i in micro) * common.ddp_world_size / n_tokens
            loss = sft_loss(logits, y) * share
            loss.backward()
            train_loss += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        common.guard_finite(step, out, loss=train_loss, grad_norm=grad_norm)
        optimizer.step()
        metrics = {"train/loss": common.all_reduce_mean({"loss": train_loss})["loss"], "train/lr": lr,
                   "train/grad_norm": grad_norm.item(), "samples": step * args.batch_size}
        if common.master_process and (step % args.eval_every == 0 or step == args.steps):
            with common.phase("eval"):
                metrics["val/loss"] = val_loss(model, val_examples, args.batch_size, pad_id, device, dtype)
                if eval_prompts:  # a subset during training, every held-out prompt at the last step
                    judged = eval_prompts if step == args.steps else eval_prompts[: args.eval_prompts]
                    summary, samples = gold_eval(model, enc, world, judged, args, device, args.seed + 2)
                    metrics.update(summary)
        run.log(step, metrics, show=["train/loss", "val/loss", "eval/gold_reward", "train/lr"])
        if common.master_process and step % args.eval_every == 0 and step < args.steps:
            with common.phase("eval"):
                sample_prompts = [p["prompt"] for p in eval_prompts[:3]] or val_prompts[:3]
                gen = torch.Generator(device).manual_seed(step)
                for p, s in zip(sample_prompts, sample_responses(model, enc, sample_prompts, device, args.max_new_tokens,
                                                                 args.temperature, generator=gen)):
                    print(f"  sample: {p!r} -> {s['text']!r}")

    # -- final evaluation: pretrained vs SFT vs ideal, on every held-out prompt (rank 0 alone) --
    final = {k: v for k, v in metrics.items() if k not in ("train/lr", "samples")}
    if eval_prompts:
        with common.phase("eval"):
            pretrained, _, _ = common.load_policy(args.init, device, expect_stage="pretrain")
            pre_summary, pre_samples = gold_eval(pretrained, enc, world, eval_prompts, args, device, args.seed + 2)
            ideal_summary = gold_summary(world, eval_prompts, [world.ideal_response(p["prompt"]) for p in eval_prompts])
        for name, s in (("pretrain", pre_summary), ("ideal", ideal_summary)):
            final[f"eval/gold_reward_{name}"] = s["eval/gold_reward"]
            final[f"eval/gold_reward_{name}_se"] = s["eval/gold_reward_se"]
        # The headroom table: per family and per held-out reason, what the pretrained model, SFT and the
        # ideal answers score.
        groups = [g for g in [*FAMILIES, "other", *(f"held_out_{h}" for h in HELD_OUT)]
                  if f"eval/gold_{g}" in ideal_summary]
        print(f"gold reward on all {len(eval_prompts)} held-out prompts (mean ± standard error):")
        print(f"  {'':<10} {'all':>15}  " + " ".join(f"{g.removeprefix('held_out_'):>9}" for g in groups))
        for name, s in (("pretrained", pre_summary), ("sft", metrics), ("ideal", ideal_summary)):
            print(f"  {name:<10} {s['eval/gold_reward']:>7.3f} ± {s['eval/gold_reward_se']:.3f}  "
                  + " ".join(f"{s.get('eval/gold_' + g, float('nan')):>9.2f}" for g in groups))
        for p, pre, s in list(zip(eval_prompts, pre_samples, samples))[:3]:
            print(f"  {p['prompt']!r}\n    pretrained: {pre['text']!r}\n    sft:        {s['text']!r}\n"
                  f"    ideal:      {world.ideal_response(p['prompt'])!r}")
    save(args.steps, final)
    print(f"saved {out}/model.pt, meta.json, metrics.jsonl")
    common.print_phase_times()
