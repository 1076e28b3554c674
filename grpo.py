"""GRPO on verifiable rewards: no reward model, no value model; a group of answers is its own baseline.

Every step draws --prompts-per-step prompts of the families whose answers can be checked (by default
the sums; the list task and facts with --families), samples a group of G = --group-size answers to each, and scores every
answer with a verifier, not with a learned reward model: reward 1 for the right answer AND a proper
ending (the <|end|> token), else 0. The advantage of answer i of a group is its reward against the
group's (Shao et al. 2024, "DeepSeekMath", GRPO's outcome supervision):

    A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)         (std: unbiased, as TRL; eps 1e-4)

the same A_i on every token of answer i. A group whose G rewards are equal (all right, or, on this
world mostly, all wrong) has A = 0 on every answer: no learning signal, and no NaN (logged as
grpo/zero_signal_groups). The update is PPO's clipped surrogate with the KL to SFT as a loss term,
ppo.policy_loss itself (on a GPU the fused Triton kernel, kernels.ppo_policy_loss):

    loss_t = max(-A_i ratio_t, -A_i clip(ratio_t, 1 - clip_coef, 1 + clip_coef)) + kl_coef * kl_t
    kl_t   = r_t - 1 - log r_t,   r_t = pi_sft(y_t | ...) / pi(y_t | ...)       (k3, as GRPO)

Which gradient the KL term follows (ppo.py's docstring and kernels/ppo_loss.py derive it): per token
(1 - r_t) grad log pi(y_t), whose expectation over tokens drawn from pi is grad KL(pi_sft || pi), the
FORWARD KL, not the reverse KL(pi || pi_sft) its value estimates; both are 0 only at pi = pi_sft, so
it pulls toward SFT, at the visited states only. With --epochs > 1 the later passes draw from
pi_old, not pi (as in GRPO). The logged objective/kl is the k1 sequence KL of the rollout's answers
(sum_t log pi - log pi_sft), the same number ppo.py logs.

How the token losses become one number (--loss-agg), the choice Liu et al. 2025 ("Understanding
R1-Zero-Like Training: A Critical Perspective", Dr. GRPO) question:
- answer   (GRPO): mean over each answer's tokens, then mean over answers: (1/n) sum_i (1/|y_i|) sum_t
           loss_it. A long wrong answer pays less per token than a short one, so wrong answers are
           pushed longer (and right ones shorter): the length bias Liu et al. describe (on this
           world it did not show; docs/grpo.md has the measurement).
- token    (DAPO, Yu et al. 2025): one mean over every token of the batch: sum_it loss_it / sum_i |y_i|.
- constant (Dr. GRPO): sum_it loss_it / (n * max_new_tokens), a normaliser that depends on no answer.
All three run through policy_loss's masked mean: 'answer' passes each token the weight 1/|y_i| as its
mask (the mean of the weighted tokens is then the mean over answers), 'constant' rescales the token
mean by sum_i |y_i| / (n * max_new_tokens), a number, not a function of the weights.
--dr-grpo: Dr. GRPO, A_i = r_i - mean(r) (no std division: a group's spread no longer weighs its
answers, easy and hard questions count alike) and --loss-agg constant.

Where the truth comes from (`verify`): World.prompt_info(prompt)["answer"] in world.py, which reads
it from the prompt and the world's knowledge base: a sum, a + b of the prompt's two numbers
(World._enumerate); the list task, the last item of the prompt's own list (prompt_info's
LIST_PATTERNS); a fact, World.facts. Never the learned reward model, never the gold judge's score.
The answer is read from the response by a rule of this file: in each clause without a negation
(not, no, never, n't), what follows its verb (is, equals, are, =) or, if no clause has one, a clause
of one word ("9."); the answer is right when the numbers / list words / attribute values stated
there are exactly the truth ("4 plus 3 is 7.", "The answer is 7." and "7." are right; "4 plus 3 is
8.", "It is 7 or 8." and "It is not 7." are not, nor is a restated sum other than the prompt's,
"4 plus 3" or "3 plus 4"), and it must end with <|end|>. tests/test_grpo.py checks it on hand cases.

What this file simplifies against DeepSeekMath / R1: one process (no DDP); a tiny model, short
answers (--max-new-tokens) and binary rewards on the tiny world's checkable families; no format
reward or reasoning tags; the reference is SFT for the whole run (DeepSeekMath's iterative GRPO
resets it); a cosine learning-rate decay (--lr-schedule); plain temperature sampling (what the log-probs assume). Kept:
G answers per prompt, the group-normalised outcome reward, the clipped surrogate, the k3 KL term in
the loss, no critic.

    python grpo.py                                 # CPU, the tiny world: sums, 160 steps, about 2 minutes
    python grpo.py --dr-grpo --out out/grpo_dr     # Dr. GRPO: no std division, constant normaliser
    python grpo.py --families arith,list --out out/grpo_list   # the list task too (fewer steps each)
    python grpo.py --device cuda --prompts-per-step 64 --group-size 16       # one GPU (the fused loss)
"""

import re
from dataclasses import asdict
from pathlib import Path

import torch

import common
from evaluate import sequence_kl
from model import left_pad
from ppo import policy_loss, prompt_batches, truncate_at_end
from sampling import encode_prompts, response_logprobs, sample_responses, token_logprobs
from tokenizer import decode_response, special_id
from world import ATTRIBUTES, LIST_WORDS, RESTATED_SUM, load_world

VERIFIABLE = ("arith", "list", "fact")  # the families verify() can check

# -----------------------------------------------------------------------------
# Config


def family_list(text):
    families = [f.strip() for f in text.split(",") if f.strip()]
    bad = [f for f in families if f not in VERIFIABLE]
    if not families or bad:
        raise ValueError
    return families


family_list.__name__ = f"comma-separated list of {', '.join(VERIFIABLE)}"
parser = common.ArgumentParser(description="GRPO on verifiable rewards (no reward model, no critic)")
common.add_common_args(parser, "grpo", init="out/sft", data="data/prompts.jsonl", steps=160, kernels=True)
g = parser.add_argument_group("rollout")
g.add_argument("--families", type=family_list, default=["arith"],
               help="the verifiable families trained and evaluated on (arith, list, fact); the default is where the "
                    "verifier has something to draw out (docs/grpo.md: arith,list halves the sums' steps)")
g.add_argument("--prompts-per-step", type=common.positive_int, default=16, help="groups per step")
g.add_argument("--group-size", type=common.number(int, lambda v: v >= 2, "must be at least 2"), default=8,
               help="G: answers sampled per prompt")
g.add_argument("--max-new-tokens", type=common.positive_int, default=16, help="longest answer; longer ones are cut")
g.add_argument("--temperature", type=common.positive_float, default=1.0,
               help="sampling temperature, also used to score log-probs")
g = parser.add_argument_group("GRPO")
g.add_argument("--dr-grpo", action="store_true",
               help="Dr. GRPO (Liu et al. 2025): no std division, and --loss-agg constant unless given")
g.add_argument("--loss-agg", choices=["answer", "token", "constant"], default=None,
               help="answer: per-answer mean, then mean (GRPO, the default); token: token mean over the batch "
                    "(DAPO); constant: sum / (answers * max-new-tokens) (Dr. GRPO's default)")
g.add_argument("--kl-coef", type=common.nonnegative_float, default=0.01, help="weight of the k3 KL-to-SFT loss term")
g.add_argument("--epochs", type=common.positive_int, default=1, help="passes over each batch of answers")
g.add_argument("--minibatch-size", type=common.positive_int, default=None,
               help="answers per gradient step (default: the whole batch, prompts-per-step * group-size)")
g.add_argument("--lr", type=common.positive_float, default=3e-4, help="AdamW learning rate")
g.add_argument("--lr-schedule", choices=["constant", "cosine"], default="cosine",
               help="cosine: decays to a tenth by the last step (at a constant rate the policy swings from one "
                    "evaluation to the next, and where it ends is a draw: docs/grpo.md)")
g.add_argument("--clip-coef", type=common.nonnegative_float, default=0.2, help="PPO ratio clip")
g.add_argument("--grad-clip", type=common.nonnegative_float, default=1.0)
g = parser.add_argument_group("evaluation")
g.add_argument("--eval-data", default="data/val_prompts.jsonl",
               help="validation prompts (those of --families) for the eval/* metrics")
g.add_argument("--eval-prompts", type=common.nonnegative_int, default=200, help="how many of them (0: none)")
g.add_argument("--eval-group-size", type=common.positive_int, default=8, help="answers per prompt: pass@1 and pass@G")
g.add_argument("--eval-every", type=common.positive_int, default=40, help="evaluation and checkpoint every N steps")
g.add_argument("--sample-every", type=common.positive_int, default=20, help="print a few answers every N steps")


# -----------------------------------------------------------------------------
# The math, importable (tests/test_grpo.py checks each piece against hand computations)

NEGATION = re.compile(r"\b(not|no|never)\b|n't\b")
VERB = re.compile(r"\b(?:is|are|equals)\b|=")


def stated(response, find):
    """What an answer states: find() over each clause without a negation, on what follows the clause's
    verb (is, are, equals, =), or, when no clause of the answer has a verb, on its one-word clauses."""
    clauses = [c for c in re.split(r"[.,;:!?]", response.lower()) if c.strip() and not NEGATION.search(c)]
    with_verb = [VERB.split(c, maxsplit=1)[1] for c in clauses if VERB.search(c)]
    bare = [c for c in clauses if len(c.split()) == 1]  # "9." or "moon." alone; "9 plus!" is no answer
    return set().union(*map(find, with_verb if with_verb else bare))


def verify(world, prompt, response, ended):
    """The verifiable reward: 1.0 when the answer states the truth and nothing else of its kind, and
    ended with <|end|>; else 0.0. The truth: World.prompt_info (the module docstring says where from)."""
    info = world.prompt_info(prompt)
    if info is None or info["family"] not in VERIFIABLE or not ended:
        return 0.0
    truth = info["answer"]
    if info["family"] == "arith":
        a, b = info["entity"]
        if {tuple(map(int, p)) for p in re.findall(RESTATED_SUM, response.lower())} - {(a, b), (b, a)}:
            return 0.0  # it restates another sum than the one asked ("4 plus 8 is 9." to 4 plus 5)
        found = stated(response, lambda c: set(re.findall(r"\d+", c)))
    elif info["family"] == "list":
        words = set(info["items"]) | set(LIST_WORDS)
        found = stated(response, lambda c: words.intersection(re.findall(r"[a-z]+", c)))
    else:  # fact: the attribute asked about, every one of its values the answer states
        values = set(ATTRIBUTES[info["attr"]])
        found = stated(response, lambda c: values.intersection(re.findall(r"[a-z]+", c)))
    return 1.0 if found == {truth} else 0.0


def group_advantages(rewards, group_size, scale_std=True, eps=1e-4):
    """rewards (n * G,), answers of a group consecutive -> advantages (n * G,): r - mean of the group,
    divided by (the group's unbiased std + eps) when scale_std (GRPO; Dr. GRPO: scale_std=False).
    A group of equal rewards gets 0 (std 0: 0 / eps), never NaN."""
    # exercise grpo_advantage: rewards as (groups, G); minus each group's mean; if scale_std, over its std + eps; flatten
    r = rewards.view(-1, group_size)
    advantages = r - r.mean(dim=1, keepdim=True)
    if scale_std:
        advantages = advantages / (r.std(dim=1, keepdim=True) + eps)
    return advantages.reshape(-1)
    # end exercise


def token_weights(mask, loss_agg):
    """The per-token weights policy_loss's masked mean takes as its mask, for --loss-agg answer (1/|y_i|
    on answer i's tokens: the mean of the weighted tokens is the mean over answers of each answer's
    token mean) or token and constant (1 on every real token: the token mean)."""
    mask = mask.float()
    if loss_agg == "answer":
        return mask / mask.sum(dim=1, keepdim=True).clamp(min=1)
    return mask


def grpo_loss(logits, responses, logprobs, ref_logprobs, advantages, mask, loss_agg, max_new_tokens,
              clip_coef=0.2, kl_coef=0.04, temperature=1.0):
    """The GRPO loss of a minibatch of answers: ppo.policy_loss (the clipped surrogate plus kl_coef * k3,
    fused on a GPU) with each answer's advantage on its every token, aggregated as --loss-agg says.
    logits (b, R, V); responses, logprobs, ref_logprobs, mask (b, R); advantages (b,). Returns (loss, stats)."""
    weights = token_weights(mask, loss_agg)
    loss, stats = policy_loss(logits, responses, logprobs, advantages[:, None].expand_as(logprobs).contiguous(),
                              weights, clip_coef=clip_coef, temperature=temperature, ref_logprobs=ref_logprobs,
                              kl_coef=kl_coef)
    if loss_agg == "constant":  # token mean * (tokens / (answers * max_new_tokens)) = sum / constant
        loss = loss * (mask.sum() / (mask.size(0) * max_new_tokens))
    return loss, stats


def verified_groups(policy, enc, world, prompts, group_size, device, max_new_tokens, temperature, generator):
    """group_size answers to each prompt (a group's consecutive) and the verifier's reward of each:
    (the prompts, each repeated group_size times; the answers; the rewards (n * G,))."""
    group = [p for p in prompts for _ in range(group_size)]
    answers = sample_responses(policy, enc, group, device, max_new_tokens, temperature, generator=generator)
    return group, answers, torch.tensor([verify(world, p, a["text"], a["ended"]) for p, a in zip(group, answers)])


def pass_at(correct, group_size):
    """correct (n * G,) of 0/1, answers of a prompt consecutive -> (pass@1, pass@G): the mean, and the
    share of prompts with at least one right answer among their G."""
    c = torch.as_tensor(correct, dtype=torch.float).view(-1, group_size)
    return c.mean().item(), c.max(dim=1).values.mean().item()


def mean_or_none(x, where):
    """Mean of x over the True entries of where (None if there are none: no point on that curve)."""
    return x[where].float().mean().item() if where.any() else None


# -----------------------------------------------------------------------------

if __name__ == "__main__":
    args = parser.parse_args()
    if common.ddp:
        common.die("grpo.py runs in one process (no torchrun)")
    loss_agg = args.loss_agg or ("constant" if args.dr_grpo else "answer")
    batch_size = args.prompts_per_step * args.group_size
    minibatch_size = args.minibatch_size or batch_size
    one_update = args.epochs == 1 and minibatch_size == batch_size  # per batch of answers (the default)
    if minibatch_size > batch_size:
        common.die(f"--minibatch-size {minibatch_size} is larger than a step's {batch_size} answers")
    out = Path(args.out)
    device, dtype = common.setup_device(args.device)
    common.setup_kernels(args.kernels, device)
    amp = lambda: common.autocast(device, dtype)  # noqa: E731
    common.seed_everything(args.seed)

    # -- data: the train prompts of the verifiable families; their validation prompts ----------------
    world = load_world(Path(args.data).parent)
    if world is None:
        common.die(f"--data {args.data}: no world.json beside it; the verifier reads the truth from the tiny world")
    pick_families = lambda rows: [r for r in rows if (world.prompt_info(r["prompt"]) or {}).get("family")  # noqa: E731
                                  in args.families]
    rows = pick_families(common.read_jsonl(args.data, required=("prompt",), flag="--data"))
    if not rows:
        common.die(f"--data {args.data}: no prompt of the families {','.join(args.families)}")
    eval_rows = (pick_families(common.read_jsonl(args.eval_data, required=("prompt",), flag="--eval-data"))
                 [: args.eval_prompts] if args.eval_prompts > 0 else [])

    # -- models: the policy and its frozen reference, both SFT. No reward model, no value model ---------
    policy, enc, init_meta = common.load_policy(args.init, device)
    ref_policy, _, _ = common.load_policy(args.init, device)
    ref_policy.requires_grad_(False)
    end_id, pad_id = special_id(enc, "<|end|>"), enc.eot_token
    max_prompt = policy.config.block_size - args.max_new_tokens
    prompt_ids = encode_prompts(enc, [r["prompt"] for r in rows], max_prompt, where=args.data)
    encode_prompts(enc, [r["prompt"] for r in eval_rows], max_prompt, where=args.eval_data)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, eps=1e-5, weight_decay=0.0)
    print(f"policy: {policy.num_params() / 1e6:.2f}M parameters from {args.init} | {len(rows)} prompts "
          f"({','.join(args.families)}) | {args.prompts_per_step} groups of {args.group_size} = {batch_size} "
          f"answers/step | {args.epochs * -(-batch_size // minibatch_size)} updates/step | "
          f"{'Dr. GRPO' if args.dr_grpo else 'GRPO'}, loss aggregation: {loss_agg}")

    sample_generator = torch.Generator(device).manual_seed(args.seed + 1)
    shuffle_generator = torch.Generator().manual_seed(args.seed + 2)
    run = common.Run(args, "grpo", policy, optimizer, {"sample": sample_generator, "shuffle": shuffle_generator},
                     asdict(policy.config), device)

    def save(step, final=None):
        meta = {"stage": "grpo", "config": asdict(policy.config), "args": vars(args), "step": step,
                "tokenizer": init_meta["tokenizer"], "answers": step * batch_size, "final": final or {}}
        common.save_checkpoint(out, policy, meta, run.resume_state(step))

    def evaluate():
        """pass@1 and pass@G (G = --eval-group-size) on the validation prompts, per family; the KL to
        SFT and the length of right and wrong answers, all from the same seed at every call."""
        G = args.eval_group_size
        prompts, answers, right = verified_groups(policy, enc, world, [r["prompt"] for r in eval_rows], G, device,
                                                  args.max_new_tokens, args.temperature,
                                                  torch.Generator(device).manual_seed(args.seed))
        out_ = dict(zip(("eval/pass@1", "eval/pass@G"), pass_at(right, G)))
        for family in args.families:
            keep = torch.tensor([world.prompt_info(p)["family"] == family for p in prompts])
            if keep.any():
                out_[f"eval/pass@1_{family}"], out_[f"eval/pass@G_{family}"] = pass_at(right[keep], G)
        tokens = torch.tensor([len(a["ids"]) for a in answers])
        out_["eval/length_right"] = mean_or_none(tokens, right == 1)
        out_["eval/length_wrong"] = mean_or_none(tokens, right == 0)
        out_["eval/kl_to_sft"] = sequence_kl(policy, ref_policy, enc, prompts[::G], answers[::G], device,
                                             args.temperature).mean().item()
        return {k: v for k, v in out_.items() if v is not None}

    # -- the loop --------------------------------------------------------------
    show = ["grpo/reward", "grpo/zero_signal_groups", "objective/kl", "response/length_wrong", "eval/pass@1",
            "eval/pass@G"]
    if run.start == 0 and eval_rows:  # step 0: the SFT model, the start of every eval/* curve
        with run.phase("eval"):
            metrics = evaluate()
        run.log(0, {"answers": 0, **metrics}, show=["eval/pass@1", "eval/pass@G", "eval/length_wrong"])
    for step, pick in run.steps(prompt_batches(len(rows), args.prompts_per_step, args.seed), save, args.eval_every):
        # 1. G answers to each prompt (a group: consecutive rows), sampled at the temperature
        group_pick = [i for i in pick for _ in range(args.group_size)]
        queries, query_mask = left_pad([prompt_ids[i] for i in group_pick], pad_id, device)  # (B, P)
        P = queries.size(1)
        policy.eval()  # no dropout: the first ratio must be exactly 1
        with torch.no_grad(), amp(), run.phase("sampling"):
            responses = policy.generate(queries, query_mask, args.max_new_tokens, temperature=args.temperature,
                                        eos_id=end_id, pad_id=pad_id, generator=sample_generator)  # (B, R)
        with torch.no_grad(), amp(), run.phase("scoring"):
            responses, mask, ended = truncate_at_end(responses, end_id, pad_id)
            query_responses = torch.cat([queries, responses], dim=1)
            attention_mask = torch.cat([query_mask, mask], dim=1)
            # 2. the log-probs of the answers under SFT, and under the policy that sampled them. With one
            # update per batch (the default) that policy is the one about to be trained: its log-probs come
            # from the update's own forward pass (below), not from a second one here.
            ref_logprobs, _, _ = response_logprobs(ref_policy, query_responses, attention_mask, P, args.temperature)
            if not one_update:
                logprobs, _, _ = response_logprobs(policy, query_responses, attention_mask, P, args.temperature)
        # 3. the verifier's reward, and 4. the group advantages
        with run.phase("scoring"):
            texts = [decode_response(enc, r) for r in responses.tolist()]
            rewards = torch.tensor([verify(world, rows[i]["prompt"], t, e) for i, t, e in
                                    zip(group_pick, texts, ended.tolist())], device=device)
        advantages = group_advantages(rewards, args.group_size, scale_std=not args.dr_grpo)
        # 5. --epochs passes of clipped updates over minibatches of answers
        if args.lr_schedule == "cosine":
            for group in optimizer.param_groups:
                group["lr"] = common.lr_at(step - 1, args.steps, args.lr, 0)
        stats = []
        for epoch in range(args.epochs):
            for mb in torch.randperm(batch_size, generator=shuffle_generator).split(minibatch_size):
                mb = mb.to(device)
                with amp():
                    logits = policy(query_responses[mb], attention_mask[mb])[:, P - 1 : -1]  # (b, R, V)
                    if one_update:  # pi_old = pi: the ratio is exactly 1 and only its gradient counts
                        logprobs = torch.empty_like(ref_logprobs)
                        logprobs[mb] = token_logprobs(logits.detach(), responses[mb], args.temperature)[0]
                    loss, pg_stats = grpo_loss(logits, responses[mb], logprobs[mb], ref_logprobs[mb],
                                               advantages[mb], mask[mb], loss_agg, args.max_new_tokens,
                                               args.clip_coef, args.kl_coef, args.temperature)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip)
                common.guard_finite(step, args.out, loss=loss, grad_norm=grad_norm)
                optimizer.step()
                stats.append({k: v.item() for k, v in pg_stats.items()})

        lengths, right = mask.sum(1).float(), rewards == 1
        groups = rewards.view(-1, args.group_size)
        metrics = {"grpo/reward": rewards.mean().item(),
                   "grpo/zero_signal_groups": (groups.max(1).values == groups.min(1).values).float().mean().item(),
                   "grpo/solved_groups": (groups.max(1).values == 1).float().mean().item(),
                   "objective/kl": ((logprobs - ref_logprobs) * mask).sum(1).mean().item(),
                   **{f"ppo/{k}": sum(s[k] for s in stats) / len(stats) for k in
                      ("clipfrac", "approx_kl", "ratio_mean", "pg_loss", "kl", "entropy")},
                   "response/length": lengths.mean().item(),
                   "response/no_end_rate": 1 - ended.float().mean().item(),
                   "answers": step * batch_size}
        for name, where in (("right", right), ("wrong", ~right)):
            if where.any():
                metrics[f"response/length_{name}"] = lengths[where].mean().item()
        for family in args.families:
            keep = torch.tensor([world.prompt_info(rows[i]["prompt"])["family"] == family for i in group_pick],
                                device=device)
            if keep.any():
                metrics[f"grpo/reward_{family}"] = rewards[keep].mean().item()
        if eval_rows and (step % args.eval_every == 0 or step == args.steps):
            with run.phase("eval"):
                metrics.update(evaluate())
        run.log(step, metrics, show=show)
        if step % args.sample_every == 0:
            for j in range(0, min(3 * args.group_size, batch_size), args.group_size):
                print(f"  {rows[group_pick[j]]['prompt']!r} -> {texts[j]!r} | reward {rewards[j].item():.0f} | "
                      f"advantage {advantages[j].item():+.2f}")

    # -- final save (the last step's metrics and evaluation) --------------------------------------
    final = {k: v for k, v in metrics.items() if k != "answers"}
    save(args.steps, final)
    if "eval/pass@1" in final:
        print(f"eval/pass@1 {final['eval/pass@1']:.3f}, pass@{args.eval_group_size} {final['eval/pass@G']:.3f} "
              f"on {len(eval_rows)} validation prompts ({','.join(args.families)})")
    print(f"saved {out}/model.pt, meta.json, metrics.jsonl")
    common.print_phase_times()
