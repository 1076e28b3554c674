"""Fused PPO policy loss straight from the logits: `ppo_policy_loss(logits, actions, ...)`.

What is fused
-------------
What `ppo.policy_loss` computes in plain PyTorch (its docstring has the formulas as PPO states
them), per token t (row x = logits[t] / temperature), with A the advantage and old the log-prob of
the action under the policy that sampled it:

    logp   = x[action] - logsumexp(x)            H = entropy of softmax(x)
    ratio  = exp(logp - old)
    pg     = max(-A * ratio, -A * clip(ratio, 1 - clip_coef, 1 + clip_coef))
    kl     = exp(ref - logp) - (ref - logp) - 1     (k3; 0 without ref_logprobs)
    loss_t = pg + kl_coef * kl - ent_coef * H
    loss   = sum_t mask_t * loss_t / max(sum_t mask_t, 1)

and the statistics PPO logs (clip fraction, approx KL(old || new), mean ratio, ...).

The KL term is a KL-to-reference penalty in the loss: PPO's --kl-estimator k3, and GRPO's KL-to-SFT
term. Its value is Schulman's k3 estimator of KL(pi || pi_ref), always >= 0, but the gradient it
follows is not that of KL(pi || pi_ref). Per token, with r = pi_ref / pi at the sampled action y,

    d kl / d logp = 1 - r,        grad kl = (1 - pi_ref(y) / pi(y)) grad log pi(y)

and in expectation over actions sampled from pi, E_pi[(1 - pi_ref / pi) grad log pi] = 0 - sum_y
pi_ref(y) grad log pi(y) = grad KL(pi_ref || pi): the gradient of the FORWARD KL, from the reference
to the policy. It too is zero only at pi = pi_ref, so the term does pull the policy back to the
reference. Two limits to know: the expectation holds for actions drawn from pi itself, so after
PPO's first minibatch (actions from pi_old) it is off by the ratio pi / pi_old, as in GRPO; and it
acts at the visited states only. (k1 = logp - ref in the loss would follow E_pi[grad log pi] = 0:
no gradient at all in expectation, hence k3 only. tests/test_kernels.py checks the per-token and the
expected gradient against these formulas.)

loss_t depends on the logits only through (logp_t, H_t), so the backward is exactly the
token-log-prob backward (`logprobs.py`) with per-token upstream gradients

    g_logp_t = G * mask_t / denom * dloss_t/dlogp_t        g_H_t = G * mask_t / denom * (-ent_coef)

where G is the upstream gradient of the scalar loss. The forward kernel computes the two
derivatives per token (times mask_t) while it has everything in registers; the backward launches
the shared kernel with the device scalar G / denom folded into every row. No `.item()`, no host
synchronisation: denom = max(sum mask, 1) stays a device tensor.

    dloss_t/dlogp_t = ratio * (0 if the clipped branch is active else -A)    (clip is flat there)
                    + kl_coef * (1 - exp(ref - logp))

Tokens with mask 0 are skipped outright: the forward does not read their logits and the backward
writes zeros without reading them (PPO batches are often a third padding).

Memory traffic, per real token, V bf16 logits (2 bytes each)
-------------------------------------------------------------
    plain PyTorch fwd+bwd       token_logprobs in float32 (sampling.py): ~46 V bytes forward,
                                about twice that backward
    fused forward               read 2V, write 48 bytes (8 per-token sums, 2 derivatives, lse, H)
    fused backward              read 2V, write 2V
  = 6V bytes for the step, against a floor of 4V (one read, one write); the re-read is the price
    of not storing [N, V] probabilities between forward and backward.
The per-token sums are reduced with one `sum(0)` over an [N, 8] buffer: O(N) memory, deterministic.
"""

import torch
import triton
import triton.language as tl

from .logprobs import (LN2, LOG2E, block_config, check_logits, check_per_token,
                       check_temperature, online_logsumexp_entropy, row_layout, row_start,
                       token_logprobs_bwd)

# columns of the per-token buffer; each entry is already multiplied by the token's mask
# (the kernel stores them at these offsets: tok + 0 ... tok + 7)
COL_LOSS, COL_MASK, COL_PG, COL_KL, COL_ENTROPY, COL_RATIO, COL_APPROX_KL, COL_CLIPPED = range(8)
N_COLS = 8
STAT_NAMES = ["pg_loss", "kl", "entropy", "ratio_mean", "approx_kl", "clipfrac"]  # stats order


@triton.jit
def _ppo_loss_fwd_kernel(
    logits_ptr, actions_ptr, old_logp_ptr, adv_ptr, mask_ptr, ref_logp_ptr,   # inputs, [N] each
    tok_ptr,                 # [N, 8] fp32 out (zero-filled): mask * (loss, 1, pg, kl, H, ...)
    dlogp_ptr, dent_ptr,     # [N] fp32 out (zero-filled): mask * dloss_t/dlogp_t, dloss_t/dH_t
    lse2_ptr, entropy_ptr,   # [N] fp32 out (zero-filled): saved for the backward
    V, inner, stride_outer, stride_inner,
    inv_temperature, clip_coef, kl_coef, ent_coef,
    HAS_REF: tl.constexpr,   # ref_logprobs given: the k3 KL term
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    m = tl.load(mask_ptr + row)
    if m != 0.0:  # padding tokens: leave the zeros, never touch their logits
        row_ptr = logits_ptr + row_start(row, inner, stride_outer, stride_inner)
        scale = tl.cast(inv_temperature, tl.float32) * LOG2E
        # fp32 copies under new names (re-binding an argument inside a runtime `if` would make
        # it a value of the branch, which must then have the same type on both sides)
        clip = tl.cast(clip_coef, tl.float32)
        beta = tl.cast(kl_coef, tl.float32)
        ent = tl.cast(ent_coef, tl.float32)

        # 1. log-sum-exp and entropy: the one pass over the logits
        lse2, entropy = online_logsumexp_entropy(row_ptr, V, scale, BLOCK_V)
        action = tl.load(actions_ptr + row)
        z_a = tl.load(row_ptr + action, mask=(action >= 0) & (action < V), other=0.0)
        logp = (z_a.to(tl.float32) * scale - lse2) * LN2

        # 2. clipped surrogate
        old = tl.load(old_logp_ptr + row)
        adv = tl.load(adv_ptr + row)
        log_ratio = logp - old
        ratio = tl.exp(log_ratio)
        pg_unclipped = -adv * ratio
        pg_clipped = -adv * tl.minimum(tl.maximum(ratio, 1.0 - clip), 1.0 + clip)
        pg = tl.maximum(pg_unclipped, pg_clipped)
        clipped_active = pg_clipped > pg_unclipped     # then the ratio is outside the clip range
        clipped = (tl.abs(ratio - 1.0) > clip) & clipped_active
        dlogp = tl.where(clipped_active, 0.0, -adv * ratio)   # d pg / d logp

        # 3. KL penalty to the reference policy, per token, from its log-prob of the action (k3)
        kl = 0.0
        if HAS_REF:
            d = tl.load(ref_logp_ptr + row) - logp    # log(pi_ref / pi)
            kl = tl.exp(d) - d - 1.0
            dlogp += beta * (1.0 - tl.exp(d))

        # 4. per-token loss, statistics and derivatives, weighted by the mask
        loss = pg + beta * kl - ent * entropy
        tok = tok_ptr + row * 8
        tl.store(tok + 0, m * loss)
        tl.store(tok + 1, m)
        tl.store(tok + 2, m * pg)
        tl.store(tok + 3, m * kl)
        tl.store(tok + 4, m * entropy)
        tl.store(tok + 5, m * ratio)
        tl.store(tok + 6, m * ((ratio - 1.0) - log_ratio))   # approx KL(old || new), k3 form
        tl.store(tok + 7, m * clipped.to(tl.float32))
        tl.store(dlogp_ptr + row, m * dlogp)
        tl.store(dent_ptr + row, -m * ent)
        tl.store(lse2_ptr + row, lse2)
        tl.store(entropy_ptr + row, entropy)


def _flat_f32(t):
    return t.reshape(-1).to(torch.float32).contiguous()


def ppo_loss_fwd(logits, actions, old_logprobs, advantages, mask, ref_logprobs,
                 clip_coef, temperature, kl_coef, ent_coef):
    """Returns (loss, stats [6], denom, lse2, entropy, dlogp, dent); loss/stats/denom 0-dim or [6]
    device tensors, the rest flat [N] fp32 for the backward."""
    x, n_rows, inner, stride_outer, stride_inner = row_layout(logits)
    V = logits.shape[-1]
    dev = logits.device
    tok = torch.zeros(n_rows, N_COLS, dtype=torch.float32, device=dev)
    dlogp = torch.zeros(n_rows, dtype=torch.float32, device=dev)
    dent = torch.zeros_like(dlogp)
    lse2 = torch.zeros_like(dlogp)
    entropy = torch.zeros_like(dlogp)
    if n_rows > 0:
        m = _flat_f32(mask)
        ref = _flat_f32(ref_logprobs) if ref_logprobs is not None else m  # dummy when absent
        BLOCK_V, num_warps = block_config(V)
        _ppo_loss_fwd_kernel[(n_rows,)](
            x, actions.reshape(-1).to(torch.int64).contiguous(), _flat_f32(old_logprobs),
            _flat_f32(advantages), m, ref,
            tok, dlogp, dent, lse2, entropy,
            V, inner, stride_outer, stride_inner,
            1.0 / temperature, float(clip_coef), float(kl_coef), float(ent_coef),
            HAS_REF=ref_logprobs is not None,
            BLOCK_V=BLOCK_V, num_warps=num_warps,
        )
    sums = tok.sum(0)                       # [8], one deterministic reduction, on the device
    denom = sums[COL_MASK].clamp(min=1.0)   # max(sum mask, 1): stays a device tensor
    loss = sums[COL_LOSS] / denom
    # the six statistics are the columns COL_PG..COL_CLIPPED, a slice: indexing with a Python list
    # would copy an index tensor from pageable host memory, a host-device synchronisation
    stats = sums[COL_PG:COL_CLIPPED + 1] / denom
    return loss, stats, denom, lse2, entropy, dlogp, dent


class PPOPolicyLoss(torch.autograd.Function):
    """-> (loss 0-dim, stats [6]); differentiable in logits only."""

    @staticmethod
    def forward(ctx, logits, actions, old_logprobs, advantages, mask, ref_logprobs,
                clip_coef, temperature, kl_coef, ent_coef):
        loss, stats, denom, lse2, entropy, dlogp, dent = ppo_loss_fwd(
            logits, actions, old_logprobs, advantages, mask, ref_logprobs,
            clip_coef, temperature, kl_coef, ent_coef)
        flat_actions = actions.reshape(-1).to(torch.int64).contiguous()
        ctx.save_for_backward(logits, flat_actions, lse2, entropy, dlogp, dent, denom)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        logits, actions, lse2, entropy, dlogp, dent, denom = ctx.saved_tensors
        # the token's share of the masked mean, times the upstream gradient: a device scalar
        scale = (grad_loss.to(torch.float32) / denom).reshape(())
        dlogits = token_logprobs_bwd(logits, actions, lse2, entropy, dlogp, dent,
                                     ctx.temperature, scale=scale)
        return dlogits, None, None, None, None, None, None, None, None, None


def ppo_policy_loss(logits, actions, old_logprobs, advantages, mask, clip_coef=0.2,
                    temperature=1.0, ref_logprobs=None, kl_coef=0.0, ent_coef=0.0):
    """The fused PPO policy loss (call it as kernels.ppo_policy_loss)."""
    check_logits(logits)
    check_per_token(actions, logits, "actions", integer=True)
    for name, t in (("old_logprobs", old_logprobs), ("advantages", advantages), ("mask", mask)):
        check_per_token(t, logits, name)
    if ref_logprobs is not None:
        check_per_token(ref_logprobs, logits, "ref_logprobs")
    temperature = check_temperature(temperature)
    loss, stats = PPOPolicyLoss.apply(
        logits, actions, old_logprobs.detach(), advantages.detach(), mask.detach(),
        ref_logprobs.detach() if ref_logprobs is not None else None,
        clip_coef, temperature, kl_coef, ent_coef)
    return loss, {name: stats[i] for i, name in enumerate(STAT_NAMES)}
