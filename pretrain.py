"""Stage 0: pretraining. A GPT learns to predict the next token of plain text about the world.

This is where the model's knowledge comes from: which creature is which colour, what 3 plus 4 is,
how sentences end. Later stages only teach it how to *use* that knowledge as an assistant. We check
that it was learned with `eval/fact_accuracy`: the greedy completion of "The <creature>'s colour is"
(and home, and food) must name the right value; and `eval/sum_accuracy`: "7 plus 8 is" -> "15", all
81 sums (the verifiable rewards of grpo.py can only draw out sums the model already half knows).

Simplified against GPT-2: a tiny model, a tiny corpus, random windows instead of an epoch-ordered
data loader.

    python pretrain.py                                   # CPU, the tiny world, a few minutes
    python pretrain.py --device cuda --n-layer 12 --n-head 12 --n-embd 768 --batch-size 64   # one GPU
    torchrun --standalone --nproc_per_node=8 pretrain.py --device cuda --n-layer 12 --n-head 12 \
        --n-embd 768 --batch-size 512 --grad-accum 4     # 8 GPUs: 16 sequences per micro-batch each
    python pretrain.py --data my_corpus.txt --tokenizer gpt2 --out out/pretrain_gpt2         # any text
"""

import time
from dataclasses import asdict
from pathlib import Path

import torch

import common
from model import GPT, GPTConfig, left_pad
from world import World, load_world

# -----------------------------------------------------------------------------
# Config

parser = common.ArgumentParser(description="Stage 0: next-token pretraining on a text corpus")
common.add_common_args(parser, "pretrain", data="data/pretrain.txt", steps=500)
g = parser.add_argument_group("model")
g.add_argument("--tokenizer", default="out/tokenizer", help="folder written by tokenizer.py, or 'gpt2'")
g.add_argument("--block-size", type=common.positive_int, default=128, help="context length in tokens")
g.add_argument("--n-layer", type=common.positive_int, default=4)
g.add_argument("--n-head", type=common.positive_int, default=4)
g.add_argument("--n-embd", type=common.positive_int, default=128)
g.add_argument("--dropout", type=common.nonnegative_float, default=0.0)
g = parser.add_argument_group("optimisation")
g.add_argument("--batch-size", type=common.positive_int, default=32, help="sequences per step, over all processes")
g.add_argument("--grad-accum", type=common.positive_int, default=1,
               help="micro-batches per step and process (same step, less memory)")
g.add_argument("--lr", type=common.positive_float, default=3e-3, help="peak learning rate (AdamW)")
g.add_argument("--warmup-steps", type=common.nonnegative_int, default=30)
g.add_argument("--weight-decay", type=common.nonnegative_float, default=0.1)
g.add_argument("--grad-clip", type=common.positive_float, default=1.0)
g = parser.add_argument_group("evaluation")
g.add_argument("--eval-every", type=common.positive_int, default=100, help="validation loss and a sample every N steps")
g.add_argument("--eval-batches", type=common.positive_int, default=10)
g.add_argument("--val-fraction", type=common.fraction, default=0.05)


# -----------------------------------------------------------------------------
# The measurement that says pretraining worked


@torch.no_grad()
def completion_accuracy(model, enc, probes, device, max_new_tokens=6):
    """Fraction of (prompt, value) probes whose greedy completion names the value first
    ("The milt's colour is" -> "silver"; "7 plus 8 is" -> "15")."""
    eot = enc.eot_token
    idx, mask = left_pad([enc.encode_ordinary(p) for p, _ in probes], pad_id=eot)
    model.eval()
    out = model.generate(idx.to(device), mask.to(device), max_new_tokens, temperature=0.0, pad_id=eot)
    correct = 0
    for (prompt, value), ids in zip(probes, out.tolist()):
        words = enc.decode([t for t in ids if t != eot]).replace(".", " ").split()
        first = words[1] if words[:1] == ["the"] and len(words) > 1 else (words[0] if words else "")
        correct += first == value
    return correct / len(probes)


def get_batch(data, batch_size, block_size, generator):
    """Random windows of block_size + 1 tokens: inputs and the same shifted by one."""
    starts = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator)
    x = torch.stack([data[s : s + block_size] for s in starts])
    y = torch.stack([data[s + 1 : s + block_size + 1] for s in starts])
    return x, y  # (B, T), (B, T)


def batches(data, batch_size, block_size, seed):
    """The training batches, step after step: random windows drawn from --seed (the same on every rank)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield get_batch(data, batch_size, block_size, generator)


def configure_optimizer(model, lr, weight_decay):
    """AdamW with weight decay on matrices only (not on biases, LayerNorm gains or embeddings' positions)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


@torch.no_grad()
def estimate_loss(model, data, args, device, dtype, generator):
    model.eval()
    losses = []
    for _ in range(args.eval_batches):
        x, y = get_batch(data, args.batch_size, args.block_size, generator)
        with common.autocast(device, dtype):
            logits = model(x.to(device))
        losses.append(torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten()).item())
    model.train()
    return sum(losses) / len(losses)


# -----------------------------------------------------------------------------

if __name__ == "__main__":
    args = parser.parse_args()
    common.check_batch_split(args.batch_size, args.grad_accum)
    if args.n_embd % args.n_head:
        common.die(f"--n-embd {args.n_embd} must be a multiple of --n-head {args.n_head}")
    out = Path(args.out)
    device, dtype = common.setup_ddp(args.device)
    common.seed_everything(args.seed + common.ddp_rank)  # dropout differs per rank; rank 0 is the one-process run

    # -- data ------------------------------------------------------------------
    data_path = Path(args.data)
    if not data_path.exists():
        common.die(f"--data {data_path}: file not found (run `python world.py` to write the tiny world)")
    text = data_path.read_text(encoding="utf-8")
    if not text.strip():
        common.die(f"--data {data_path}: empty file (expected plain text)")
    enc = common.load_tokenizer_or_die(args.tokenizer, "--tokenizer")
    t0 = time.time()
    ids = []
    for paragraph in text.split("\n"):  # documents separated by <|endoftext|>, as GPT-2 does
        if paragraph.strip():
            ids += enc.encode_ordinary(paragraph) + [enc.eot_token]
    data = torch.tensor(ids, dtype=torch.long)
    n_val = max(args.block_size + 2, int(len(data) * args.val_fraction))
    train_data, val_data = data[:-n_val], data[-n_val:]
    if len(train_data) < args.block_size + 2:
        common.die(f"--data {data_path}: only {len(data)} tokens, too short for --block-size {args.block_size}")
    tokens_per_step = args.batch_size * args.block_size
    print(f"data: {len(data):,} tokens ({len(text) / len(data):.2f} chars/token, tokenized in {time.time() - t0:.1f}s) "
          f"| {tokens_per_step:,} tokens/step | {args.steps * tokens_per_step / len(train_data):.1f} epochs")
    world = load_world(data_path.parent)

    # -- model -----------------------------------------------------------------
    vocab_size = enc.n_vocab  # exact: padded rows would be sampled (and fail to decode) before they are learned
    config = GPTConfig(block_size=args.block_size, vocab_size=vocab_size, n_layer=args.n_layer,
                       n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout)
    model = GPT(config).to(device)
    train_model = common.wrap_ddp(model, device)  # DDP copies rank 0's initial weights to every rank
    optimizer = configure_optimizer(model, args.lr, args.weight_decay)
    print(f"model: {model.num_params() / 1e6:.2f}M parameters | {config}")

    val_generator_seed = args.seed + 1  # the same validation windows at every evaluation
    run = common.Run(args, "pretrain", model, optimizer, config=asdict(config), device=device)

    def save(step, final=None):
        meta = {"stage": "pretrain", "config": asdict(config), "args": vars(args), "step": step,
                "tokenizer": args.tokenizer, "final": final or {}}
        common.save_checkpoint(out, model, meta, run.resume_state(step))

    # -- the loop --------------------------------------------------------------
    model.train()
    val_loss = None
    for step, (x, y) in run.steps(batches(train_data, args.batch_size, args.block_size, args.seed), save,
                                  args.eval_every):  # the global batch, the same on every rank
        lr = common.lr_at(step - 1, args.steps, args.lr, args.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        train_loss = 0.0
        for micro_step, (mx, my) in enumerate(zip(common.micro_batches(x, args.grad_accum),
                                                  common.micro_batches(y, args.grad_accum))):
            if common.ddp:  # all-reduce the gradients once, after the last micro-batch (as nanoGPT)
                train_model.require_backward_grad_sync = micro_step == args.grad_accum - 1
            with common.autocast(device, dtype):
                logits = train_model(mx.to(device))  # (b, T, V)
            # Equal micro-batches: the mean of their mean losses is the mean over the batch.
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), my.to(device).flatten()) / args.grad_accum
            loss.backward()
            train_loss += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        common.guard_finite(step, out, loss=train_loss, grad_norm=grad_norm)
        optimizer.step()
        metrics = {"train/loss": common.all_reduce_mean({"loss": train_loss})["loss"], "train/lr": lr,
                   "train/grad_norm": grad_norm.item(), "tokens": step * tokens_per_step}
        if common.master_process and (step % args.eval_every == 0 or step == args.steps):
            with common.phase("eval"):
                val_loss = estimate_loss(model, val_data, args, device, dtype,
                                         torch.Generator().manual_seed(val_generator_seed))
                metrics["val/loss"] = val_loss
                if world is not None:
                    metrics["eval/fact_accuracy"] = completion_accuracy(model, enc, world.fact_prompts(), device)
                    metrics["eval/sum_accuracy"] = completion_accuracy(model, enc, world.sum_prompts(), device)
                    model.train()
        run.log(step, metrics, show=["train/loss", "val/loss", "eval/fact_accuracy", "eval/sum_accuracy", "train/lr"])
        if common.master_process and step % args.eval_every == 0 and step < args.steps:
            model.eval()
            with common.phase("eval"):
                prompt = "The " + (world.entities[0] + "'s colour is" if world else "")
                idx = torch.tensor([enc.encode_ordinary(prompt)], device=device)
                sample = model.generate(idx, torch.ones_like(idx), 16, temperature=0.8, eos_id=enc.eot_token,
                                        pad_id=enc.eot_token, generator=torch.Generator(device).manual_seed(step))
                print(f"  sample: {prompt}{enc.decode([t for t in sample[0].tolist() if t != enc.eot_token])!r}")
            model.train()

    # -- final metrics (the last step's evaluation) and save: rank 0 alone (every rank holds the same weights) --
    final = {"train/loss": metrics["train/loss"], "val/loss": val_loss}
    final.update({k: metrics[k] for k in ("eval/fact_accuracy", "eval/sum_accuracy") if k in metrics})  # last step's
    if "eval/fact_accuracy" in final:
        print(f"eval/fact_accuracy: {final['eval/fact_accuracy']:.3f} (greedy completion of "
              f"{len(world.fact_prompts())} facts), eval/sum_accuracy: {final['eval/sum_accuracy']:.3f} "
              f"({len(world.sum_prompts())} sums)")
    save(args.steps, final)
    print(f"saved {out}/model.pt, meta.json, metrics.jsonl")
    common.print_phase_times()
