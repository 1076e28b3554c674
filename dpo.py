"""DPO: Direct Preference Optimization, the alternative to reward model + PPO (Rafailov et al. 2023).

The policy starts from SFT and learns straight from the comparisons (prompt, chosen y_w, rejected
y_l). Why no reward model and no sampling loop? The KL-regularised RL objective that PPO chases,
max E[r] - beta * KL(pi || pi_ref), has a closed-form optimum pi*(y|x) = pi_ref(y|x) exp(r/beta) / Z(x).
Read backwards, every policy defines a reward: r(x, y) = beta log pi(y|x)/pi_ref(y|x) + beta log Z(x).
Put that in the Bradley-Terry likelihood of the labels, P(y_w > y_l) = sigmoid(r(y_w) - r(y_l)), and
log Z(x) cancels: the reward model's loss becomes a loss on the policy itself,

    loss = -log sigmoid(beta * [(log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))])

and plain supervised training on the fixed pairs replaces reward.py + ppo.py. With --label-smoothing eps
(the "conservative DPO" for noisy labels) each label is trusted with probability 1 - eps.

What it gives up against RLHF with PPO:
  - no on-policy exploration: it only sees the offline pairs, never its own new answers;
  - it can drift on answers it never saw compared (nothing holds probability mass there);
  - the KL to the reference is implicit (through beta), never measured or controlled in training:
    we estimate it separately on the policy's own samples (eval/kl_to_sft).
Simplified against the paper: the reference is simply the SFT model we start from (the paper first
fine-tunes on the preferred answers when no SFT model exists), single-turn prompts, pairs longer
than the context skipped.

    python dpo.py                                # CPU, the tiny world: out/sft + out/feedback -> out/dpo, ~2 min
    python dpo.py --device cuda --batch-size 64 --eval-prompts 600               # one GPU
    python dpo.py --device cuda --init out/sft_gpt2 --data hh.jsonl --lr 5e-6 --beta 0.1 \\
        --eval-prompts 0 --out out/dpo_hh          # real preference data (TRL or HH layout; no gold judge)
    torchrun --standalone --nproc_per_node=4 dpo.py --device cuda --batch-size 64   # 4 GPUs, 16 pairs each
"""

import itertools
import random
from pathlib import Path

import torch
import torch.nn.functional as F

import common
from evaluate import policy_eval
from reward import load_preferences, tokenize_pairs
from sampling import collate_responses, encode_prompts, response_logprobs
from world import load_world

# -----------------------------------------------------------------------------
# Config

parser = common.ArgumentParser(description="DPO: preference optimisation without a reward model")
common.add_common_args(parser, "dpo", init="out/sft", data="out/feedback/preferences.jsonl", steps=100, kernels=True)
g = parser.add_argument_group("dpo")
g.add_argument("--beta", type=common.positive_float, default=0.3,
               help="strength of the implicit KL: reward = beta log pi/pi_ref")
g.add_argument("--label-smoothing", type=common.number(float, lambda v: 0 <= v < 0.5, "must be in [0, 0.5)"),
               default=0.0, help="eps: share of labels assumed flipped (cDPO)")
g = parser.add_argument_group("optimisation")
g.add_argument("--batch-size", type=common.positive_int, default=32,
               help="preference pairs per step, over all processes")
g.add_argument("--grad-accum", type=common.positive_int, default=1,
               help="micro-batches per step and process (same step, less memory)")
g.add_argument("--lr", type=common.positive_float, default=1e-4, help="peak learning rate (AdamW)")
g.add_argument("--warmup-steps", type=common.nonnegative_int, default=10)
g.add_argument("--weight-decay", type=common.nonnegative_float, default=0.0)
g.add_argument("--grad-clip", type=common.positive_float, default=1.0)
g = parser.add_argument_group("evaluation")
g.add_argument("--val-fraction", type=common.number(float, lambda v: 0 <= v < 1, "must be in [0, 1)"), default=0.05,
               help="share of prompts whose pairs are held out")
g.add_argument("--eval-every", type=common.positive_int, default=25,
               help="held-out loss, gold reward and KL every N steps")
g.add_argument("--eval-data", default="data/val_prompts.jsonl", help="validation prompts for the eval/* metrics")
g.add_argument("--eval-prompts", type=common.nonnegative_int, default=200,
               help="how many of them to sample (0: no sampling)")
g.add_argument("--max-new-tokens", type=common.positive_int, default=48,
               help="longest evaluation sample (as evaluate.py)")
g.add_argument("--temperature", type=common.positive_float, default=1.0,
               help="of the evaluation samples and their log-probs (as evaluate.py)")


# -----------------------------------------------------------------------------
# Data: preference pairs (read and tokenized by reward.py) -> batches


def collate_pairs(batch, pad_id):
    """A batch of pairs as 2B left-padded rows: the B chosen answers, then the B rejected ones."""
    prompts = [p["prompt"] for p in batch]
    return collate_responses(prompts + prompts, [p["chosen"] for p in batch] + [p["rejected"] for p in batch], pad_id)


def batches(n, batch_size, seed):
    """The pairs of each step: epochs of a seeded shuffle of all n (epoch e from seed * 1000 + e), cut
    into consecutive batches, a batch running on into the next epoch (the same on every rank)."""
    order = []
    for epoch in itertools.count():
        order += torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
        while len(order) >= batch_size:
            yield order[:batch_size]
            order = order[batch_size:]


# -----------------------------------------------------------------------------
# The math


def sequence_logprobs(model, idx, attention_mask, response_mask, temperature=1.0):
    """log pi(y | x): the sum of log pi(y_t | x, y_<t) over the response tokens (<|end|> included), (B,).

    idx, attention_mask, response_mask: (B, T); response_mask marks which tokens of idx are response.
    The prompt and the padding are context, never scored.
    """
    logp, _, _ = response_logprobs(model, idx, attention_mask, temperature=temperature)  # (B, T-1): token t+1
    return (logp * response_mask[:, 1:].to(logp.dtype)).sum(dim=1)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
             label_smoothing=0.0):
    """Per-pair DPO loss and the implicit rewards beta * (log pi - log pi_ref) of both answers (detached).

    h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))
    loss = (1 - eps) * -log sigmoid(beta h) + eps * -log sigmoid(-beta h)
    """
    # exercise dpo_loss: log pi - log pi_ref of each answer; logits = beta * (chosen - rejected); the docstring's loss
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    logits = beta * (chosen_logratios - rejected_logratios)  # (B,) the Bradley-Terry logit of the label
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    # end exercise
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def pair_accuracy(chosen_rewards, rejected_rewards):
    """Share of pairs whose chosen answer has the higher implicit reward (ties, as at pi = pi_ref, count half)."""
    return ((chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()).mean()


def pairs_used(n, batch_size, seed, steps):
    """The indices of the pairs that the first `steps` batches hold, in order (each once)."""
    return sorted({i for ids in itertools.islice(batches(n, batch_size, seed), steps) for i in ids})


@torch.no_grad()
def all_sequence_logprobs(model, data, pad_id, device, dtype, batch_size=64):
    """(chosen, rejected) log-probs of every pair, (N,) each (the reference's once; the policy's on the held-out
    pairs). Pairs of similar length share a batch, shortest first: little of it is padding."""
    model.eval()
    chosen, rejected = torch.zeros(len(data)), torch.zeros(len(data))
    order = sorted(range(len(data)), key=lambda i: len(data[i]["prompt"]) + max(len(data[i]["chosen"]),
                                                                                 len(data[i]["rejected"])))
    for i in range(0, len(order), batch_size):
        rows = order[i : i + batch_size]
        idx, mask, resp = (t.to(device) for t in collate_pairs([data[j] for j in rows], pad_id))
        with common.autocast(device, dtype):
            logps = sequence_logprobs(model, idx, mask, resp)
        chosen[rows], rejected[rows] = logps[: len(rows)].float().cpu(), logps[len(rows) :].float().cpu()
    return chosen, rejected


# -----------------------------------------------------------------------------

if __name__ == "__main__":
    args = parser.parse_args()
    common.check_batch_split(args.batch_size, args.grad_accum)
    out = Path(args.out)
    device, dtype = common.setup_ddp(args.device)
    common.setup_kernels(args.kernels, device)
    common.seed_everything(args.seed + common.ddp_rank)  # dropout differs per rank; rank 0 is the one-process run

    # -- models: the policy and the frozen reference both start as the SFT model ---------------
    policy, enc, init_meta = common.load_policy(args.init, device, expect_stage=("sft", "pretrain"))
    ref, _, _ = common.load_policy(args.init, device, expect_stage=("sft", "pretrain"))
    ref.requires_grad_(False)
    # Dropout off everywhere: it would make pi differ from pi_ref on identical weights, a fake reward.
    policy.eval()
    ref.eval()
    if init_meta["stage"] != "sft":
        print(f"note: --init {args.init} is a '{init_meta['stage']}' checkpoint, not SFT")
    block_size = policy.config.block_size

    # -- data: pairs split by prompt into train and held-out --------------------------------------
    pairs = load_preferences(args.data)  # reward.py's loader: TRL and HH layouts, file:line errors
    prompts = sorted({p["prompt"] for p in pairs})
    random.Random(args.seed).shuffle(prompts)
    val_prompts = set(prompts[: int(len(prompts) * args.val_fraction)])
    train_pairs = [p for p in pairs if p["prompt"] not in val_prompts]
    val_pairs = [p for p in pairs if p["prompt"] in val_prompts]
    train_data, val_data = tokenize_pairs(enc, train_pairs, block_size), tokenize_pairs(enc, val_pairs, block_size)
    n_train, n_skipped = len(train_data), len(pairs) - len(train_data) - len(val_data)
    if n_train == 0:
        common.die(f"--data {args.data}: no training pair fits the context of {block_size} tokens")
    print(f"data: {len(pairs):,} pairs over {len(prompts):,} prompts | train {n_train:,}, held out {len(val_data):,} "
          f"| {args.batch_size} pairs/step = {args.steps * args.batch_size / n_train:.2f} epochs"
          + (f" | {n_skipped} pairs longer than block_size {block_size} skipped" if n_skipped else ""))

    eval_prompts, world = [], None
    if args.eval_prompts > 0:
        eval_prompts = common.read_jsonl(args.eval_data, required=("prompt",), flag="--eval-data")[: args.eval_prompts]
        encode_prompts(enc, [p["prompt"] for p in eval_prompts], block_size - args.max_new_tokens, args.eval_data)
        world = load_world(Path(args.eval_data).parent)
        if world is None:
            print(f"note: {args.eval_data} was not written by world.py: no gold judge, only eval/kl_to_sft")
    pad_id = enc.eot_token

    train_policy = common.wrap_ddp(policy, device)  # trained through DDP on several ranks; `policy` evaluates and saves
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    run = common.Run(args, "dpo", policy, optimizer, config=init_meta["config"], device=device)
    if run.state is not None:
        if run.state["n_train"] != n_train:
            common.die(f"--resume: {out} was trained on {run.state['n_train']} pairs, --data gives {n_train}")
        ref_logps = run.state["ref_logps"]
    else:
        # The reference's log-probs, once: pi_ref never changes, so neither do they. Only of the pairs the
        # --steps batches will use (3,200 of 13,611 at the defaults); NaN for the others, never read.
        # (Every rank computes them all: simpler than sharding and gathering, and done once.)
        used = pairs_used(n_train, args.batch_size, args.seed, args.steps)
        with common.phase("scoring"):
            chosen, rejected = all_sequence_logprobs(ref, [train_data[i] for i in used], pad_id, device, dtype)
            ref_logps = {"train": (torch.full((n_train,), float("nan")).index_copy(0, torch.tensor(used), chosen),
                                   torch.full((n_train,), float("nan")).index_copy(0, torch.tensor(used), rejected)),
                         "val": all_sequence_logprobs(ref, val_data, pad_id, device, dtype) if val_data else None}
        print(f"reference log-probs of {2 * (len(used) + len(val_data)):,} answers computed: the {len(used):,} "
              f"training pairs {args.steps} steps use and the held-out ones "
              f"(mean chosen {chosen.mean():.2f}, rejected {rejected.mean():.2f})")

    @torch.no_grad()
    @common.phase("eval")
    def evaluate():
        metrics = {}
        if val_data:
            chosen, rejected = all_sequence_logprobs(policy, val_data, pad_id, device, dtype)
            losses, cr, rr = dpo_loss(chosen, rejected, *ref_logps["val"], args.beta, args.label_smoothing)
            metrics.update({"val/loss": losses.mean().item(), "val/accuracy": pair_accuracy(cr, rr).item()})
        if eval_prompts:
            metrics.update(policy_eval(policy, ref, enc, eval_prompts, device, args.max_new_tokens, args.temperature,
                                       args.seed, world))
        return metrics

    def save(step, final=None):
        meta = {"stage": "dpo", "config": init_meta["config"], "args": vars(args), "step": step,
                "tokenizer": init_meta["tokenizer"], "init": args.init, "final": final or {}}
        common.save_checkpoint(out, policy, meta, run.resume_state(step, ref_logps=ref_logps, n_train=n_train))

    # -- the loop ----------------------------------------------------------------------------
    show = ["dpo/loss", "dpo/accuracy", "dpo/margin", "val/accuracy", "eval/gold_reward", "eval/kl_to_sft"]
    if run.start == 0 and common.master_process:  # step 0: the SFT model itself, the start of every curve
        run.log(0, {"pairs": 0, **evaluate()}, show=show)
    for step, ids in run.steps(batches(n_train, args.batch_size, args.seed), save, args.eval_every):
        lr = common.lr_at(step - 1, args.steps, args.lr, args.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        sums = dict.fromkeys(["dpo/loss", "dpo/accuracy", "dpo/margin", "dpo/chosen_reward", "dpo/rejected_reward",
                              "dpo/chosen_logp", "dpo/rejected_logp"], 0.0)
        for micro_step, micro in enumerate(common.micro_batches(ids, args.grad_accum)):
            if common.ddp:  # all-reduce the gradients once, after the last micro-batch (as nanoGPT)
                train_policy.require_backward_grad_sync = micro_step == args.grad_accum - 1
            idx, mask, resp = (t.to(device) for t in collate_pairs([train_data[i] for i in micro], pad_id))
            with common.autocast(device, dtype):
                logps = sequence_logprobs(train_policy, idx, mask, resp)  # (2b,) chosen then rejected
            chosen_logps, rejected_logps = logps[: len(micro)], logps[len(micro) :]
            ref_chosen, ref_rejected = (x[micro].to(device) for x in ref_logps["train"])
            losses, chosen_rewards, rejected_rewards = dpo_loss(chosen_logps, rejected_logps, ref_chosen, ref_rejected,
                                                                 args.beta, args.label_smoothing)
            loss = losses.mean() / args.grad_accum  # equal micro-batches: the mean of their means is the batch's
            loss.backward()
            for k, v in (("dpo/loss", losses.mean()),
                         ("dpo/accuracy", pair_accuracy(chosen_rewards, rejected_rewards)),
                         ("dpo/margin", (chosen_rewards - rejected_rewards).mean()),
                         ("dpo/chosen_reward", chosen_rewards.mean()), ("dpo/rejected_reward", rejected_rewards.mean()),
                         ("dpo/chosen_logp", chosen_logps.mean()), ("dpo/rejected_logp", rejected_logps.mean())):
                sums[k] += v.item() / args.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip)
        common.guard_finite(step, out, loss=sums["dpo/loss"], grad_norm=grad_norm)
        optimizer.step()

        metrics = {**common.all_reduce_mean(sums), "train/lr": lr, "train/grad_norm": grad_norm.item(),
                   "pairs": step * args.batch_size}
        if common.master_process and (step % args.eval_every == 0 or step == args.steps):
            metrics.update(evaluate())
        run.log(step, metrics, show=show)

    # -- final save: rank 0 alone (every rank holds the same weights) --------------------------------
    final = {k: v for k, v in metrics.items() if not k.startswith("train/")} or common.load_meta(out)["final"]
    save(args.steps, final)
    print("final: " + " | ".join(f"{k} {v:.4g}" for k, v in final.items() if isinstance(v, float) and "/" in k))
    print(f"saved {out}/model.pt, meta.json, metrics.jsonl")
    common.print_phase_times()
