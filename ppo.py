"""Stage 3: PPO. The SFT model learns to please the reward model, on a leash to where it started.

Every step samples answers to a batch of prompts, scores each finished answer with the reward model,
charges every token its KL divergence to the frozen SFT model, and takes a few epochs of clipped
PPO updates of the policy and of a value model (a ScalarModel initialised from the reward model).
The quantity maximised is, per prompt x and sampled answer y,

    score(x, y) - kl_coef * sum_t [log pi(y_t | x, y_<t) - log pi_sft(y_t | x, y_<t)]

so the policy may move away from SFT only where the reward model pays for it. The recipe of one
step is numbered 1-7 in `rollout` and `ppo_update` below. The update (step 7, `policy_loss` and
`value_loss`) is PPO's as cleanrl writes it: per real response token t, with A_t the whitened GAE
advantage, R_t = A_t + V_old_t the return, and means over the real tokens of a minibatch,

    ratio_t = pi(y_t | x, y_<t) / pi_old(y_t | x, y_<t) = exp(newlogprob_t - logprob_t)
    pg_loss = mean_t max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - clip_coef, 1 + clip_coef))
    v_loss  = 0.5 * mean_t max((V_t - R_t)^2, (V_old_t + clip(V_t - V_old_t, -eps_v, eps_v) - R_t)^2)
    loss    = pg_loss - ent_coef * mean_t H_t + vf_coef * v_loss           (eps_v: --cliprange-value)

The max is the pessimistic bound: once a token's ratio has moved past 1 +- clip_coef in the
direction its advantage pays for, it gives no more gradient, so several epochs of updates can reuse
one batch of samples. On a GPU, policy_loss runs as one fused Triton kernel (kernels/ppo_loss.py).

The KL leash (--kl-estimator), and the gradient each choice follows (Tang & Munos 2025, "On a few
pitfalls in KL divergence gradient estimation for RL"); r_t = pi_sft(y_t | ...) / pi(y_t | ...):
- k1 (default, as lm-human-preferences): kl_t = -log r_t, charged in the reward, -kl_coef * kl_t on
  every token. The policy gradient then follows E[sum_t kl_t grad log pi(y_t)] (REINFORCE through the
  return), which is grad KL(pi || pi_sft) of the whole answer: the leash the objective above states.
- k3: kl_t = r_t - 1 - log r_t (>= 0, unbiased for KL(pi || pi_sft)), added to the policy LOSS as
  kl_coef * mean_t kl_t (GRPO's KL term; fused in the PPO kernel). Its gradient per token is
  (1 - r_t) grad log pi(y_t), whose expectation at each visited state is grad KL(pi_sft || pi): the
  forward KL, not the reverse one above. Both are 0 only at pi = pi_sft, so it pulls toward SFT too.
- full: the exact kl_t = KL(pi(. | s_t) || pi_sft(. | s_t)) over the vocabulary at each visited
  state s_t, added to the policy LOSS as kl_coef * mean_t kl_t: its gradient is exactly grad KL(pi ||
  pi_sft) at each state, with no sampling noise (fused on a GPU: kernels/kl.py).
Why not k3 or full in the reward: there the KL value is a detached reward, so the gradient follows
E[kl(y) grad log pi(y)], which is grad KL(pi || pi_sft) only for k1. For k3 it is grad KL(pi || pi_sft)
- grad KL(pi_sft || pi) (it pushed KL(pi_sft || pi) up in our test); for full (the same value
whatever token is drawn at a state) it is 0 at that state: no leash at all. The two loss terms see
only the states the policy visited: they leave out the part of the answer's KL gradient that flows
through which states come next (k1 in the reward carries it, through the return), and after the
first minibatch their samples come from pi_old, not pi (as in GRPO). In the loss, kl_coef weighs
the KL against the whitened-advantage surrogate, not against the score: the same number is a
different leash than with k1. tests/test_ppo.py checks that each one pulls KL(pi || pi_sft) down.

What this file simplifies against Ziegler et al. 2019 ("Fine-Tuning Language Models from Human
Preferences"), Stiennon et al. 2020 ("Learning to summarize from human feedback") and OpenAI's
lm-human-preferences code (whose details cleanrl's lm-human-preference-details reproduces):
- The reward model is trained once, offline, on comparisons of SFT samples (reward.py); Ziegler et
  al. also collected new labels online while PPO ran.
- The reward model's gain and bias are set once in reward.py, after its training, so that the reward
  this file gives fresh SFT answers to train prompts (the score, or --missing-end-penalty for an
  answer that never ended) has mean 0 and standard deviation 1 (--reward's meta.json, "reward_norm";
  they are folded into the head, so reward_model.score() in step 3 is already normalised). The
  original normalises the same way, on samples of the policy PPO starts from, but before its penalty.
- Answers stop at the <|end|> token; the original samples a fixed length, cuts it after a chosen
  token (e.g. ".") and pads the rest. A response that never ends gets a fixed score
  (--missing-end-penalty), as there; every proxy score this project reports does the same
  (evaluate.proxy_scores).
- Policy and value are two separate networks (as in Stiennon et al.), trained by one AdamW on
  pg_loss + vf_coef * vf_loss with one gradient-norm clip. With Adam and no shared weights, vf_coef
  matters mostly through that shared clip.
- A constant learning rate (the original anneals it linearly), no dropout, no top-k/top-p while
  sampling (plain temperature sampling, which is what the log-probs assume), a tiny model and the
  tiny world instead of GPT-2 and books / TL;DR.
- Under torchrun each process samples its share of the prompts with its own seed and keeps its
  rollouts; whitening and the logged statistics use means over all processes, DDP averages the
  gradients. Each process's policy loss is its own token mean (the ranks' means are averaged, not
  one mean over all their tokens).
Kept as there: reward on the last real token only, per-token k1 KL penalty in the reward, the
adaptive KL controller, temperature applied when scoring log-probs, whitened advantages, optional
reward whitening, clipped value loss, gamma = 1 and lam = 0.95.

    python ppo.py                                   # CPU, the tiny world: 30 steps, about 2 minutes
    python ppo.py --adaptive-kl --target-kl 3       # let the controller choose kl_coef
    python ppo.py --kl-coef 0.05 --steps 150        # too little leash: watch the reward model get fooled
    python ppo.py --device cuda --batch-size 256 --minibatch-size 64 --max-new-tokens 64   # one GPU
    torchrun --standalone --nproc_per_node=4 ppo.py --device cuda --batch-size 1024 --minibatch-size 256 \
        --max-new-tokens 64                     # 4 GPUs: 256 episodes each, minibatches of 64 each
"""

import contextlib
from dataclasses import asdict
from pathlib import Path

import torch

import common
import kernels
from evaluate import MISSING_END_PENALTY, penalise_unfinished, penalty_value, policy_eval
from model import last_token_index, left_pad
from sampling import encode_prompts, response_logprobs, token_logprobs
from tokenizer import decode_response, special_id
from world import load_world

# -----------------------------------------------------------------------------
# Config


unit_interval = common.number(float, lambda v: 0 <= v <= 1, "must be between 0 and 1")  # --gamma, --lam


parser = common.ArgumentParser(description="Stage 3: PPO against the reward model with a KL penalty to SFT")
common.add_common_args(parser, "ppo", init="out/sft", data="data/prompts.jsonl", steps=30, kernels=True)
g = parser.add_argument_group("models")
g.add_argument("--reward", default="out/reward", help="reward model folder (reward.py); the value model starts from it")
g = parser.add_argument_group("rollout")
g.add_argument("--batch-size", type=common.positive_int, default=64,
               help="prompts (episodes) per PPO step, over all processes")
g.add_argument("--max-new-tokens", type=common.positive_int, default=32, help="longest response; longer ones are cut")
g.add_argument("--temperature", type=common.positive_float, default=1.0,
               help="sampling temperature, also used to score log-probs")
g.add_argument("--missing-end-penalty", type=penalty_value, default=MISSING_END_PENALTY,
               help="score of a response that never emits <|end|> ('none': keep the reward model's score)")
g = parser.add_argument_group("KL penalty")
# 0.3, above the usual 0.05-0.2: a short leash for a reward model this easy to fool. Chosen on the
# validation prompts (hacking.py --kl-coefs 0,0.1,0.3, docs/hacking.md): at 0.1 the gold
# score peaks by step 20 and then falls; at 0.3 it reaches its level by step 20 and holds it to step
# 120, hence 30 steps (the same curve as 60, in half the time).
g.add_argument("--kl-coef", type=common.nonnegative_float, default=0.3,
               help="KL penalty coefficient (the start value with --adaptive-kl)")
g.add_argument("--kl-estimator", default="k1", choices=["k1", "k3", "full"],
               help="k1 = log(pi/pi_sft) in the reward; k3 = r - 1 - log r (r = pi_sft/pi) or full = the "
                    "exact KL over the vocabulary, each as a loss term (the docstring says which gradient each "
                    "follows)")
g.add_argument("--adaptive-kl", action="store_true", help="adapt kl_coef towards --target-kl (Ziegler et al. 2019)")
g.add_argument("--target-kl", type=common.positive_float, default=1.5,
               help="target sequence KL (nats) of the adaptive controller")
g.add_argument("--kl-horizon", type=common.positive_int, default=1000,
               help="horizon (episodes) of the adaptive controller")
g.add_argument("--whiten-rewards", action="store_true", help="scale per-token rewards to unit variance")
g = parser.add_argument_group("PPO")
g.add_argument("--ppo-epochs", type=common.positive_int, default=4, help="passes over each batch of rollouts")
g.add_argument("--minibatch-size", type=common.positive_int, default=16,
               help="episodes per gradient step, over all processes")
g.add_argument("--lr", type=common.positive_float, default=1e-4, help="AdamW learning rate (policy and value)")
g.add_argument("--clip-coef", type=common.nonnegative_float, default=0.2, help="PPO ratio clip")
g.add_argument("--vf-coef", type=common.nonnegative_float, default=0.1, help="weight of the value loss")
g.add_argument("--cliprange-value", type=common.nonnegative_float, default=0.2,
               help="how far a value prediction may move per batch")
g.add_argument("--ent-coef", type=common.nonnegative_float, default=0.0, help="entropy bonus")
g.add_argument("--gamma", type=unit_interval, default=1.0, help="discount")
g.add_argument("--lam", type=unit_interval, default=0.95, help="GAE lambda")
g.add_argument("--grad-clip", type=common.nonnegative_float, default=1.0)
g = parser.add_argument_group("evaluation")
g.add_argument("--eval-data", default="data/val_prompts.jsonl", help="validation prompts for the eval/* metrics")
g.add_argument("--eval-prompts", type=int, default=200, help="how many of them to evaluate periodically (0: none)")
g.add_argument("--eval-every", type=common.positive_int, default=10,
               help="gold evaluation and checkpoint every N steps")
g.add_argument("--sample-every", type=common.positive_int, default=10, help="print a few samples every N steps")
g.add_argument("--show-samples", type=int, default=3)


# -----------------------------------------------------------------------------
# The math, importable (tests/test_ppo.py checks each piece against a plain reference)


def masked_mean(x, mask, across_ranks=False):
    """Mean over the real tokens (mask 1) only; across_ranks: over the real tokens of every DDP process."""
    total, count = (x * mask).sum(), mask.sum()
    if across_ranks:
        total, count = common.all_reduce_sum(total), common.all_reduce_sum(count)
    return total / count.clamp(min=1)


def masked_var(x, mask, across_ranks=False):
    """Unbiased variance over the real tokens only."""
    n = common.all_reduce_sum(mask.sum()) if across_ranks else mask.sum()
    var = masked_mean((x - masked_mean(x, mask, across_ranks)) ** 2, mask, across_ranks)
    return var * n / (n - 1).clamp(min=1)


def whiten(x, mask, shift_mean=True, eps=1e-8, across_ranks=False):
    """Zero mean, unit variance over the real tokens; padding stays 0 and changes nothing.
    shift_mean=False returns (x - mean) / std + mean: unit variance, the mean put back (used for
    rewards, as lm-human-preferences does; it is not a pure rescaling, x / std).
    across_ranks: the mean and variance of every DDP process's tokens, as one process would see them."""
    mean, var = masked_mean(x, mask, across_ranks), masked_var(x, mask, across_ranks)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def truncate_at_end(responses, end_id, pad_id):
    """(B, R) sampled tokens -> (responses padded after the first end token, mask (B, R), ended (B,)).
    The end token itself is a real token: its log-prob is trained and the score is read on it."""
    is_end = responses == end_id
    ended = is_end.any(dim=1)
    R = responses.size(1)
    first_end = torch.where(ended, is_end.float().argmax(dim=1), R - 1)  # argmax: the first max
    mask = torch.arange(R, device=responses.device)[None, :] <= first_end[:, None]  # (B, R)
    return responses.masked_fill(~mask, pad_id), mask.long(), ended


def kl_per_token(logprobs, ref_logprobs, estimator="k1", logits=None, ref_logits=None, temperature=1.0):
    """Per-token estimate of KL(pi || pi_ref) at the sampled tokens (Schulman, "Approximating KL").
    k1 = log(pi/pi_ref): unbiased, can be negative. k3 = r - 1 - log r with r = pi_ref/pi: unbiased
    and >= 0. full: the exact KL over the whole vocabulary at each position (no sampling noise),
    sum_v pi_v (log pi_v - log pi_ref_v), both at the temperature; on CUDA the fused kernel
    (kernels/kl.py: one pass over both logits, no [N, V] log-probs in memory). These are values, all
    three estimating the same KL; which gradient each gives depends on where it goes: k1 in the
    reward, k3 and full in the loss (the module docstring says why, and what each follows)."""
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k3":
        log_r = ref_logprobs - logprobs
        return torch.exp(log_r) - 1 - log_r
    if estimator == "full":
        if kernels.use_triton(logits):
            return kernels.kl_divergence(logits, ref_logits, temperature)
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (B, R, V)
        ref_logp = torch.log_softmax(ref_logits.detach().float() / temperature, dim=-1)  # the reference: a constant
        return (logp.exp() * (logp - ref_logp)).sum(-1)
    raise ValueError(f"unknown KL estimator {estimator!r}")


def compute_rewards(scores, kl, mask, kl_coef):
    """Per-token rewards (B, R): -kl_coef * KL on every real token, plus the score on the last one."""
    # exercise kl_penalty: -kl_coef * kl on every real token, plus each row's score on its last real token
    rewards = -kl_coef * kl * mask
    rows = torch.arange(rewards.size(0), device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores
    return rewards
    # end exercise


def compute_gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation (Schulman et al. 2016) over right-padded responses.

    A_t = sum_k (gamma lam)^k delta_{t+k}, delta_t = r_t + gamma V_{t+1} - V_t, with V = 0 after the
    last real token (the episode is over). Vectorised over the batch, a loop over time.
    Returns (advantages, returns = advantages + values), both zero on padding.
    """
    # exercise gae: t from last to first: delta = r_t + gamma V_t+1 - V_t; A_t = delta + gamma lam A_t+1; zero padding
    rewards, values = rewards * mask, values * mask
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t + 1 < T else torch.zeros_like(lastgaelam)
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam  # padding: delta = 0 and lastgaelam stays 0
        advantages[:, t] = lastgaelam
    return advantages * mask, (advantages + values) * mask
    # end exercise


def policy_loss(logits, responses, logprobs, advantages, mask, clip_coef=0.2, temperature=1.0, ref_logprobs=None,
                kl_coef=0.0, ent_coef=0.0):
    """PPO's clipped surrogate from the policy's logits (the formulas above), masked mean over real tokens:
    mean(pg_loss + kl_coef * kl - ent_coef * entropy). The ratio is exactly 1 on the first minibatch.
    ent_coef > 0 is a bonus: the loss falls as the entropy rises. ref_logprobs: an optional KL-to-
    reference term (--kl-estimator k3; GRPO's), kl = r - 1 - log r with r = pi_ref / pi: per token its
    gradient is (1 - r) grad log pi, whose expectation over tokens sampled from pi is grad KL(pi_ref || pi),
    the forward KL (kernels/ppo_loss.py; tests/test_kernels.py checks both against the formula).

    logits (B, R, V) predicting responses (B, R); logprobs (the rollout's), advantages, mask (B, R).
    Returns (loss, stats): the masked means PPO logs, detached. On CUDA tensors: kernels.ppo_policy_loss,
    the same computation fused (tests/test_kernels.py checks it against this function).
    """
    if kernels.use_triton(logits):
        return kernels.ppo_policy_loss(logits, responses, logprobs, advantages, mask, clip_coef, temperature,
                                       ref_logprobs, kl_coef, ent_coef)
    newlogprob, entropy = token_logprobs(logits, responses, temperature)  # (B, R) each
    real = mask.bool()
    logratio = torch.where(real, newlogprob - logprobs, 0.0)  # padding: ratio 1, so exp() cannot overflow there
    # exercise ppo_clip: ratio = exp(logratio); -A ratio and -A clamp(ratio, 1 -+ clip_coef); their elementwise max
    ratio = logratio.exp()
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef)
    pg_loss_max = torch.max(pg_losses, pg_losses2)
    # end exercise
    kl = torch.zeros_like(newlogprob)
    if ref_logprobs is not None:
        log_r = torch.where(real, ref_logprobs - newlogprob, 0.0)  # log(pi_ref / pi)
        kl = log_r.exp() - log_r - 1
    loss = masked_mean(pg_loss_max + kl_coef * kl - ent_coef * entropy, mask)
    with torch.no_grad():
        clipped = ((ratio - 1).abs() > clip_coef) & (pg_losses2 > pg_losses)  # the clipped side was the max
        stats = {"clipfrac": clipped.float(), "approx_kl": (ratio - 1) - logratio,  # approx_kl: k3 of KL(old || new)
                 "entropy": entropy, "ratio_mean": ratio, "pg_loss": pg_loss_max, "kl": kl}
        stats = {k: masked_mean(v, mask) for k, v in stats.items()}
    return loss, stats


def value_loss(vpred, values, returns, mask, cliprange_value):
    """Clipped value loss (as PPO2 / lm-human-preferences): the worse of the new prediction and the
    prediction kept within cliprange_value of the rollout's. Returns (loss, clipfrac)."""
    vpredclipped = values + torch.clamp(vpred - values, -cliprange_value, cliprange_value)
    vf_losses1 = (vpred - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(vf_losses1, vf_losses2), mask)
    return loss, masked_mean((vf_losses2 > vf_losses1).float(), mask)


def adaptive_kl_coef(kl_coef, kl, target_kl, n_steps, horizon):
    """The adaptive controller of Ziegler et al. 2019 (eq. 2):
    e = clip(KL / target - 1, -0.2, 0.2), kl_coef <- kl_coef * (1 + e * n_steps / horizon)."""
    error = min(max(kl / target_kl - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n_steps / horizon)


@torch.no_grad()
def rollout(policy, ref_policy, value_model, reward_model, queries, query_mask, args, kl_coef, end_id, pad_id,
            generator=None, amp=contextlib.nullcontext):
    """Steps 1-6 of the recipe on one batch of left-padded prompts (B, P). Returns a dict of tensors.
    reward_model: anything with .score(idx, attention_mask) -> (B,), e.g. a rule in a test."""
    P = queries.size(1)
    for m in (policy, ref_policy, value_model):
        m.eval()  # no dropout: these log-probs and values must be the ones ppo_update recomputes
    with amp(), common.phase("sampling"):
        # 1. sample responses (KV cache) at the temperature; tokens after <|end|> come back as pad
        responses = policy.generate(queries, query_mask, args.max_new_tokens, temperature=args.temperature,
                                    eos_id=end_id, pad_id=pad_id, generator=generator)  # (B, R)
    with amp(), common.phase("scoring"):
        # 2. truncate at the end token; mask = real response tokens, end token included
        responses, mask, ended = truncate_at_end(responses, end_id, pad_id)
        query_responses = torch.cat([queries, responses], dim=1)  # (B, P + R)
        attention_mask = torch.cat([query_mask, mask], dim=1)
        # 3. score at the last real token; a response that never ended gets the fixed penalty
        scores = penalise_unfinished(reward_model.score(query_responses, attention_mask).float(), ended,
                                     args.missing_end_penalty)  # (B,): the proxy score, as evaluate.py reports it
        # 4. log-probs of the sampled tokens under the policy and the reference, same temperature
        logprobs, entropy, logits = response_logprobs(policy, query_responses, attention_mask, P, args.temperature)
        ref_logprobs, _, ref_logits = response_logprobs(ref_policy, query_responses, attention_mask, P,
                                                        args.temperature)
        values = value_model(query_responses, attention_mask)[:, P - 1 : -1].float()  # (B, R): V before token t
    # 5. per-token reward: the score on the last real token, and with k1 -kl_coef * KL on every token
    #    (k3 and full are loss terms, step 7: as rewards they would not pull toward SFT; see the docstring)
    kl = kl_per_token(logprobs, ref_logprobs, args.kl_estimator, logits, ref_logits, args.temperature) * mask
    rewards = compute_rewards(scores, kl if args.kl_estimator == "k1" else torch.zeros_like(kl), mask, kl_coef)
    if args.whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False, across_ranks=True)
    # 6. GAE advantages and returns; advantages whitened over the real tokens only (of every rank)
    values = values * mask
    advantages, returns = compute_gae(rewards, values, mask, args.gamma, args.lam)
    advantages = whiten(advantages, mask, across_ranks=True)
    return dict(query_responses=query_responses, attention_mask=attention_mask, context_length=P,
                responses=responses, mask=mask, ended=ended, scores=scores, logprobs=logprobs,
                ref_logprobs=ref_logprobs, entropy=entropy, kl=kl, values=values, rewards=rewards,
                advantages=advantages, returns=returns, kl_coef=kl_coef,
                # full: the reference's logits, (B, R, V), for the loss term (as much memory as the rollout's own)
                ref_logits=ref_logits if args.kl_estimator == "full" else None)


def ppo_update(policy, value_model, optimizer, batch, args, generator=None, amp=contextlib.nullcontext, step=0):
    """Step 7: --ppo-epochs passes over shuffled minibatches, with the KL in the loss for k3 and full.
    Returns the stats of each minibatch, in order."""
    B, P = batch["responses"].size(0), batch["context_length"]
    for m in (policy, value_model):
        m.eval()  # no dropout: the first ratio must compare the same function (so it is exactly 1)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    stats = []
    for epoch in range(args.ppo_epochs):  # under DDP, B is this rank's share and so is each minibatch
        for mb in torch.randperm(B, generator=generator).split(args.minibatch_size // common.ddp_world_size):
            mb = mb.to(batch["responses"].device)
            qr, am, mask = batch["query_responses"][mb], batch["attention_mask"][mb], batch["mask"][mb]
            with amp():
                logits = policy(qr, am)[:, P - 1 : -1]  # (b, R, V): the logits that predicted the response tokens
                k3 = args.kl_estimator == "k3"  # k3's loss term kl_coef * mean_t (r - 1 - log r), fused with pg
                pi_loss, pg_stats = policy_loss(logits, batch["responses"][mb], batch["logprobs"][mb],
                                                batch["advantages"][mb], mask, clip_coef=args.clip_coef,
                                                temperature=args.temperature, ent_coef=args.ent_coef,
                                                ref_logprobs=batch["ref_logprobs"][mb] if k3 else None,
                                                kl_coef=batch["kl_coef"] if k3 else 0.0)
                if args.kl_estimator == "full":  # the loss term kl_coef * mean_t KL(pi || pi_sft) at each visited state
                    kl = kl_per_token(None, None, "full", logits, batch["ref_logits"][mb], args.temperature)
                    pi_loss = pi_loss + batch["kl_coef"] * masked_mean(kl, mask)
                vpred = value_model(qr, am)[:, P - 1 : -1].float()  # (b, R)
            vf_loss, vf_clipfrac = value_loss(vpred, batch["values"][mb], batch["returns"][mb], mask,
                                              args.cliprange_value)
            loss = pi_loss + args.vf_coef * vf_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            common.guard_finite(step, args.out, loss=loss, grad_norm=grad_norm)
            optimizer.step()
            stats.append({"ppo/approx_kl": pg_stats["approx_kl"].item(), "ppo/clipfrac": pg_stats["clipfrac"].item(),
                          "ppo/ratio_mean": pg_stats["ratio_mean"].item(), "ppo/pg_loss": pg_stats["pg_loss"].item(),
                          "value/loss": vf_loss.item(), "value/clipfrac": vf_clipfrac.item()})
    return stats


def explained_variance(values, returns, mask, across_ranks=False):
    """1 - Var(returns - values) / Var(returns) over real tokens: 1 is a perfect value model, 0 a constant."""
    return (1 - masked_var(returns - values, mask, across_ranks)
            / masked_var(returns, mask, across_ranks).clamp(min=1e-8)).item()


def prompt_batches(n, batch_size, seed):
    """Which prompts each step: the first batch_size of a fresh shuffle of all n, from --seed (the same on
    every rank, each then taking its share)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randperm(n, generator=generator)[:batch_size].tolist()


# -----------------------------------------------------------------------------

if __name__ == "__main__":
    args = parser.parse_args()
    common.check_batch_split(args.batch_size)
    common.check_batch_split(args.minibatch_size, flag="--minibatch-size")
    if args.minibatch_size > args.batch_size:
        common.die(f"--batch-size {args.batch_size} is smaller than --minibatch-size {args.minibatch_size}")
    out = Path(args.out)
    device, dtype = common.setup_ddp(args.device)
    common.setup_kernels(args.kernels, device)
    amp = lambda: common.autocast(device, dtype)  # noqa: E731
    common.seed_everything(args.seed + common.ddp_rank)  # rank 0 is the one-process run

    # -- data ------------------------------------------------------------------
    rows = common.read_jsonl(args.data, required=("prompt",), flag="--data")
    eval_rows = (common.read_jsonl(args.eval_data, required=("prompt",), flag="--eval-data")[: args.eval_prompts]
                 if args.eval_prompts > 0 else [])
    world = load_world(Path(args.eval_data).parent)
    if world is None:
        print(f"note: {args.eval_data} was not written by world.py: no gold judge, only eval/kl_to_sft and eval/proxy_score")

    # -- models: the policy and its frozen reference (both SFT), the reward model and the value model
    policy, enc, init_meta = common.load_policy(args.init, device)
    ref_policy, _, _ = common.load_policy(args.init, device)
    reward_model, rm_enc, rm_meta = common.load_scalar_model(args.reward, device)
    value_model, _, _ = common.load_scalar_model(args.reward, device)
    if rm_enc.n_vocab != enc.n_vocab or rm_enc.encode(rows[0]["prompt"]) != enc.encode(rows[0]["prompt"]):
        common.die(f"--reward {args.reward}: its tokenizer differs from the policy's (--init {args.init})")
    norm = rm_meta.get("reward_norm") or {}  # reward.py's normalisation: mean 0, std 1 on SFT answers, as scored here
    if norm and norm.get("missing_end_penalty") != args.missing_end_penalty:
        print(f"note: --reward {args.reward} was normalised with a missing-end penalty of "
              f"{norm.get('missing_end_penalty')}, this run uses {args.missing_end_penalty}: SFT answers will not "
              f"score mean 0, std 1")
    for m in (ref_policy, reward_model):
        m.requires_grad_(False)
    reward_model.eval()
    end_id, pad_id = special_id(enc, "<|end|>"), enc.eot_token
    max_prompt = min(policy.config.block_size, reward_model.config.block_size) - args.max_new_tokens
    prompt_ids = encode_prompts(enc, [r["prompt"] for r in rows], max_prompt, where=args.data)
    encode_prompts(enc, [r["prompt"] for r in eval_rows], max_prompt, where=args.eval_data)
    # The rollouts use the models themselves; the PPO updates go through DDP, which all-reduces the gradients.
    train_policy, train_value_model = common.wrap_ddp(policy, device), common.wrap_ddp(value_model, device)
    optimizer = torch.optim.AdamW(list(policy.parameters()) + list(value_model.parameters()), lr=args.lr,
                                  eps=1e-5, weight_decay=0.0)
    updates = args.ppo_epochs * -(-args.batch_size // args.minibatch_size)
    print(f"policy: {policy.num_params() / 1e6:.2f}M parameters from {args.init} | {len(rows)} prompts | "
          f"{args.batch_size} episodes/step, {args.steps * args.batch_size} in all | {updates} updates/step"
          + (f" | {args.batch_size // common.ddp_world_size} episodes per process" if common.ddp else ""))

    # -- resume: the policy, the optimizer and the generators; then the value model and the adaptive KL
    sample_generator = torch.Generator(device).manual_seed(args.seed + 1 + 1000 * common.ddp_rank)  # tokens: per rank
    shuffle_generator = torch.Generator().manual_seed(args.seed + 2)  # the minibatches
    run = common.Run(args, "ppo", policy, optimizer, {"sample": sample_generator, "shuffle": shuffle_generator},
                     asdict(policy.config), device)
    kl_coef = args.kl_coef
    if run.state is not None:
        value_model.load_state_dict(run.state["value_model"])
        kl_coef = run.state["kl_coef"]
        if common.ddp_rank > 0:  # rank 0's sampling stream was saved; the other ranks start fresh ones of their own
            sample_generator.manual_seed(args.seed + 1 + 1000 * common.ddp_rank + run.start)
        print(f"  kl_coef {kl_coef:.4g}, {run.start * args.batch_size} episodes done")

    def save(step, final=None):
        meta = {"stage": "ppo", "config": asdict(policy.config), "args": vars(args), "step": step,
                "tokenizer": init_meta["tokenizer"], "episodes": step * args.batch_size, "final": final or {}}
        resume = run.resume_state(step, value_model=value_model.state_dict(), kl_coef=kl_coef,
                                  episodes=step * args.batch_size)
        common.save_checkpoint(out, policy, meta, resume)

    def evaluate():
        return policy_eval(policy, ref_policy, enc, eval_rows, device, args.max_new_tokens, args.temperature,
                           args.seed, world, reward_model, args.missing_end_penalty, per_prompt=True)

    # -- the loop --------------------------------------------------------------
    show = ["objective/score", "objective/kl"] + ["objective/kl_coef"] * args.adaptive_kl + [
        "ppo/clipfrac", "value/explained_variance", "response/length", "eval/gold_reward"]
    if run.start == 0 and eval_rows and common.master_process:  # step 0: the SFT model, the start of every eval/* curve
        with run.phase("eval"):
            metrics = evaluate()
        run.log(0, {"episodes": 0, **metrics}, show=["eval/gold_reward", "eval/proxy_score"])
    for step, pick in run.steps(prompt_batches(len(rows), args.batch_size, args.seed), save, args.eval_every):
        pick = common.micro_batches(pick)[0]  # this rank's share of the prompts (all of them in one process)
        queries, query_mask = left_pad([prompt_ids[i] for i in pick], pad_id, device)  # (B, P), left-padded
        batch = rollout(policy, ref_policy, value_model, reward_model, queries, query_mask, args, kl_coef,
                        end_id, pad_id, sample_generator, amp)
        mb_stats = ppo_update(train_policy, train_value_model, optimizer, batch, args, shuffle_generator, amp, step)

        mask, seq_kl = batch["mask"], batch["kl"].sum(1)  # (B,) sequence KL to the reference
        # Means over episodes or minibatches, the same number on every rank: the mean of the ranks' means is global.
        metrics = common.all_reduce_mean({
            "objective/score": batch["scores"].mean().item(), "objective/kl": seq_kl.mean().item(),
            "objective/reward": (batch["scores"] - kl_coef * seq_kl).mean().item(),
            **{k: sum(s[k] for s in mb_stats) / len(mb_stats) for k in mb_stats[0]},
            "response/length": mask.sum(1).float().mean().item(),
            "response/no_end_rate": 1 - batch["ended"].float().mean().item()})
        # Means over tokens, whose number differs between ranks: sums and counts all-reduced.
        metrics.update({"objective/entropy": masked_mean(batch["entropy"], mask, across_ranks=True).item(),
                        "value/explained_variance": explained_variance(batch["values"], batch["returns"], mask,
                                                                       across_ranks=True),
                        "objective/kl_coef": kl_coef, "episodes": step * args.batch_size})
        if common.master_process and eval_rows and (step % args.eval_every == 0 or step == args.steps):
            with run.phase("eval"):
                metrics.update(evaluate())
        run.log(step, metrics, show=show)
        if args.adaptive_kl:  # the global KL and the global batch: every rank computes the same kl_coef
            kl_coef = adaptive_kl_coef(kl_coef, metrics["objective/kl"], args.target_kl, args.batch_size,
                                       args.kl_horizon)
        if common.master_process and step % args.sample_every == 0:
            for i in range(min(args.show_samples, len(pick))):
                prompt, text = rows[pick[i]]["prompt"], decode_response(enc, batch["responses"][i].tolist())
                gold = f" | gold {world.gold_score(prompt, text):+.2f}" if world is not None else ""
                print(f"  {prompt!r} -> {text!r}\n    score {batch['scores'][i].item():+.2f} | "
                      f"kl {seq_kl[i].item():+.2f}{gold}")

    # -- final save (the last step's metrics and evaluation): rank 0 alone -------------------
    final = {k: v for k, v in metrics.items() if k not in ("episodes", "eval/gold_per_prompt")}
    save(args.steps, final)
    if "eval/gold_reward" in final:
        print(f"eval/gold_reward {final['eval/gold_reward']:.3f} ± {final['eval/gold_reward_se']:.3f} "
              f"on {len(eval_rows)} held-out prompts")
    print(f"saved {out}/model.pt, meta.json, metrics.jsonl")
    common.print_phase_times()
