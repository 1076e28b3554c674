"""Plain PyTorch references for the three fused operations.

This file is the one source of truth for what each kernel computes. It is also what every stage
runs on a CPU (and on a GPU with `--kernels torch`), so it must be correct under autograd.

The references are written for reading, not for speed: each one builds the full `[N, V]`
log-probabilities in float32, which is exactly the memory traffic the Triton kernels avoid
(see the docstrings of `logprobs.py`, `kl.py` and `ppo_loss.py` for the arithmetic).

Conventions shared with the kernels:
  * `logits` is `[..., V]` in any float dtype; the distribution is softmax(logits / temperature).
  * Arithmetic is done in float32 whatever the input dtype (float64 stays float64, which the
    tests use); per-token outputs have the leading shape `[...]`.
  * Gradients flow to `logits` only: targets, old log-probs, advantages, masks and the reference
    model's logits / log-probs are treated as constants.
"""

import torch


def _compute_dtype(x):
    """float32 for fp32 / bf16 / fp16 inputs; float64 stays float64 (used by the tests)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def token_logprobs(logits, targets, temperature=1.0):
    """Log-prob of each target token and entropy of each distribution.

    logits: [..., V] float, targets: [...] int64  ->  (logp [...], entropy [...]), float32.
    """
    x = logits.to(_compute_dtype(logits)) / temperature      # [..., V]
    logp_all = torch.log_softmax(x, dim=-1)                   # [..., V]  <- the big tensor
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)            # H = -sum_v p_v log p_v
    return logp, entropy


def kl_divergence(logits, ref_logits, temperature=1.0):
    """Exact per-token KL(pi || pi_ref) = sum_v pi_v (log pi_v - log pi_ref_v), over the whole vocab.

    Both distributions at the same temperature; the reference model is a constant (no gradient).
    """
    logp = torch.log_softmax(logits.to(_compute_dtype(logits)) / temperature, dim=-1)
    ref_logp = torch.log_softmax(ref_logits.detach().to(logp.dtype) / temperature, dim=-1)
    return (logp.exp() * (logp - ref_logp)).sum(-1)


def ppo_policy_loss(logits, actions, old_logprobs, advantages, mask, clip_coef=0.2,
                    temperature=1.0, ref_logprobs=None, kl_coef=0.0, kl_estimator="k3",
                    ent_coef=0.0):
    """PPO clipped surrogate (+ optional KL-to-reference penalty, - optional entropy bonus).

    Per token t (all per-token inputs have the leading shape of `logits`):
        logp_t   = log pi(action_t)                           (at the temperature)
        ratio_t  = exp(logp_t - old_logprobs_t)
        pg_t     = max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - clip_coef, 1 + clip_coef))
        kl_t     = k1: logp_t - ref_t     k3: exp(ref_t - logp_t) - (ref_t - logp_t) - 1
        loss_t   = pg_t + kl_coef * kl_t - ent_coef * H_t
    loss = sum_t mask_t * loss_t / max(sum_t mask_t, 1)   (masked mean over the batch's real tokens)

    Returns (loss, stats): stats are detached 0-dim float32 tensors on the logits' device,
    each a masked mean: clipfrac, approx_kl ((ratio - 1) - log ratio, an estimate of KL(old||new)),
    entropy, ratio_mean, pg_loss, kl (0 when no ref_logprobs).
    """
    if kl_estimator not in ("k1", "k3"):
        raise ValueError(f"kl_estimator must be 'k1' or 'k3', got {kl_estimator!r}")
    logp, entropy = token_logprobs(logits, actions, temperature)
    f = logp.dtype
    m = mask.to(f)
    real = m != 0
    # Padding tokens may carry anything in old_logprobs / ref_logprobs: zero their log-ratios so
    # that exp() cannot overflow there (they are multiplied by mask = 0 below anyway).
    log_ratio = torch.where(real, logp - old_logprobs.detach().to(f), 0.0)
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().to(f)
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * torch.clamp(ratio, 1.0 - clip_coef, 1.0 + clip_coef)
    pg = torch.maximum(pg_unclipped, pg_clipped)
    if ref_logprobs is None:
        kl = torch.zeros_like(logp)
    else:
        d = torch.where(real, ref_logprobs.detach().to(f) - logp, 0.0)    # log(pi_ref / pi)
        kl = -d if kl_estimator == "k1" else torch.exp(d) - d - 1.0
    loss_tok = pg + kl_coef * kl - ent_coef * entropy

    denom = m.sum().clamp(min=1.0)

    def masked_mean(v):
        return (v * m).sum() / denom

    loss = masked_mean(loss_tok)
    with torch.no_grad():
        clipped = ((ratio - 1.0).abs() > clip_coef) & (pg_clipped > pg_unclipped)
        stats = {
            "clipfrac": masked_mean(clipped.to(f)),
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio),
            "entropy": masked_mean(entropy),
            "ratio_mean": masked_mean(ratio),
            "pg_loss": masked_mean(pg),
            "kl": masked_mean(kl),
        }
    return loss, {k: v.detach().to(torch.float32) for k, v in stats.items()}
