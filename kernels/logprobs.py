"""Fused token log-probs and entropy: `token_logprobs(logits, targets, temperature) -> (logp, H)`.

What is fused
-------------
For each row x = logits[t] / temperature (V entries) we want

    logp_t = x[target_t] - logsumexp(x)          H_t = -sum_v p_v log p_v,   p = softmax(x)

and, in the backward, the gradient for upstream gradients (g_logp, g_H):

    dlogits_v = ( g_logp * (1[v == target] - p_v)  -  g_H * p_v * (log p_v + H) ) / temperature

The plain PyTorch of the stages (`sampling.token_logprobs`, which calls this kernel on CUDA
tensors) runs `.float()`, `/ temperature`, `log_softmax`, `gather`, `exp`, `*`, `sum`: each a
separate pass over an [N, V] tensor, and it keeps the float32 [N, V] log-probs alive for the
backward.

Memory traffic, per row of V bf16 logits (2 bytes each)
-------------------------------------------------------
    naive forward   cast 6V + divide 8V + log_softmax 8V + exp 8V + multiply 12V + sum 4V
                    ~ 46 V bytes, and 8V bytes per row (log p and p, float32) kept alive for
                    the backward, which moves about twice as much again
    fused forward   read 2V, write 12 bytes (logp, H, lse)                 =   2 V bytes
    fused backward  read 2V again, write 2V (dlogits in bf16)              =   4 V bytes

The forward is one online pass (the running max trick of "Online normalizer calculation for
softmax", Milakov & Gimelshein 2018) extended with a third running sum for the entropy. Only one
statistic per row (the log-sum-exp) is saved; the backward recomputes p from it. At N = 8192,
V = 50257 that is 0.8 GB read per pass instead of several GB, and no [N, V] float32 buffer.

Layout of this file: block-size rule and row layout -> the shared @triton.jit helpers -> forward
kernel -> backward kernel (shared with `ppo_loss.py`) -> host wrappers -> autograd.Function.
"""

import torch
import triton
import triton.language as tl

# Constants visible inside @triton.jit functions must be constexpr.
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): e^x = 2^(x * log2(e))
LN2 = tl.constexpr(0.6931471805599453)    # ln(2):   ln(y) = log2(y) * ln(2)


# ---------------------------------------------------------------------------------------------
# Launch rule (no autotuning: a multi-config autotuner cannot run without a GPU, and the only
# honest tuning is on the GPU; see kernels/bench.py).
# ---------------------------------------------------------------------------------------------

# kernels/bench.py --sweep times other launches by setting this: {"fwd": (BLOCK_V, num_warps),
# "bwd": (...)} for the row-reduction kernels (forward, KL) and the streaming backward.
LAUNCH_OVERRIDE = {}


def block_config(V, max_block=4096, kind="fwd"):
    """BLOCK_V: the whole row when it fits, else chunks of `max_block`, with 4 warps (2 and 1 for
    short rows). Measured on an H200 (kernels/bench.py --sweep, docs/gpu.md): many small programs
    per multiprocessor keep more loads in flight than one big one; 4096/4 warps ran the forward at
    92 % of the bandwidth floor (V = 128256) where 16384/32 warps ran at 43 %, and the backward was
    within 2 % under every configuration tried."""
    if kind in LAUNCH_OVERRIDE:
        return LAUNCH_OVERRIDE[kind]
    BLOCK_V = min(triton.next_power_of_2(V), max_block)
    num_warps = max(1, min(4, BLOCK_V // 1024))
    return BLOCK_V, num_warps


def row_layout(logits):
    """See `logits` [..., V] as rows without copying it when possible.

    Returns (x, n_rows, inner, stride_outer, stride_inner): row r starts at element
        (r // inner) * stride_outer + (r % inner) * stride_inner
    of x. A contiguous [N, V] (or [B, T, V]) tensor has inner = n_rows; a [B, T, V] slice such as
    `logits[:, :-1]` (the usual "predict the next token" view) keeps its strides, inner = T.
    Anything else, or a last dimension that is not contiguous, is copied once.
    """
    V = logits.shape[-1]
    n_rows = logits.numel() // V if V > 0 else 0
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    try:
        flat = logits.view(n_rows, V)  # works whenever the leading dims merge
        return flat, n_rows, max(n_rows, 1), 0, flat.stride(0)
    except RuntimeError:
        pass
    if logits.dim() == 3:
        B, T, _ = logits.shape
        return logits, n_rows, T, logits.stride(0), logits.stride(1)
    flat = logits.contiguous().view(n_rows, V)
    return flat, n_rows, max(n_rows, 1), 0, flat.stride(0)


def check_logits(logits, name="logits"):
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got "
                        f"{getattr(logits, 'dtype', type(logits))}")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"{name} must have shape [..., V] with V > 0, got {tuple(logits.shape)}")


def check_per_token(t, logits, name, integer=False):
    """A per-token tensor must have the leading shape of the logits and live on the same device."""
    if t.shape != logits.shape[:-1]:
        raise ValueError(f"{name} must have shape {tuple(logits.shape[:-1])} (the leading shape "
                         f"of logits {tuple(logits.shape)}), got {tuple(t.shape)}")
    if t.device != logits.device:
        raise ValueError(f"{name} is on {t.device} but logits are on {logits.device}")
    if integer and (t.is_floating_point() or t.is_complex()):
        raise TypeError(f"{name} must be an integer tensor (token ids), got {t.dtype}")


def check_temperature(temperature):
    if isinstance(temperature, torch.Tensor) or not float(temperature) > 0.0:
        raise ValueError(f"temperature must be a positive Python number, got {temperature!r}")
    return float(temperature)


# ---------------------------------------------------------------------------------------------
# Shared @triton.jit helpers
# ---------------------------------------------------------------------------------------------

@triton.jit
def row_start(row, inner, stride_outer, stride_inner):
    """Element offset of row `row` (an int64) in the layout described by `row_layout`."""
    return (row // inner) * stride_outer + (row % inner) * stride_inner


@triton.jit
def online_logsumexp_entropy(row_ptr, V, scale, BLOCK_V: tl.constexpr):
    """One pass over a row of V logits; returns (lse2, H).

    We work in base 2 (exp2 is the native instruction): z = logit * scale with
    scale = log2(e) / temperature, so p_v = 2^(z_v - lse2). Running over chunks we keep
        m = max z so far,   d = sum 2^(z - m),   s = sum 2^(z - m) * (z - m)
    and when the max grows from m to m', every old term is multiplied by a = 2^(m - m'), and
    (z - m) becomes (z - m') = (z - m) + (m - m'), so  s' = a * (s + d * (m - m')).
    At the end lse2 = m + log2(d) and (in nats) H = ln2 * (log2(d) - s / d); both pieces are
    small (0 <= log2 d <= log2 V), so no large numbers are subtracted.
    """
    offs = tl.arange(0, BLOCK_V)
    # m starts finite, not -inf: on the first chunk d = 0, and d * (m - m') must be 0, not NaN.
    m = -1.0e30
    d = 0.0
    s = 0.0
    for start in tl.range(0, V, BLOCK_V):
        cols = start + offs
        valid = cols < V
        # load in the input dtype, then fp32 for all arithmetic (raw bf16 math is wrong/lossy)
        z = tl.load(row_ptr + cols, mask=valid, other=float("-inf")).to(tl.float32) * scale
        m_new = tl.maximum(m, tl.max(z, axis=0))     # every chunk has >= 1 valid lane
        alpha = tl.exp2(m - m_new)                   # rescale factor of the old sums
        e = tl.exp2(z - m_new)                       # padded lanes: 2^-inf = 0
        zc = tl.where(valid, z - m_new, 0.0)         # padded lanes: avoid 0 * -inf = NaN
        s = alpha * (s + d * (m - m_new)) + tl.sum(e * zc, axis=0)
        d = alpha * d + tl.sum(e, axis=0)
        m = m_new
    log2_d = tl.log2(d)
    lse2 = m + log2_d
    entropy = (log2_d - s / d) * LN2
    return lse2, entropy


# ---------------------------------------------------------------------------------------------
# Forward kernel: one program per row
# ---------------------------------------------------------------------------------------------

@triton.jit
def _token_logprobs_fwd_kernel(
    logits_ptr,        # [rows, V] in the layout of row_layout(), any float dtype
    targets_ptr,       # [N] int64
    logp_ptr,          # [N] fp32 out: log p(target)
    entropy_ptr,       # [N] fp32 out: H
    lse2_ptr,          # [N] fp32 out: log2-sum-exp2 of the scaled row, saved for the backward
    V, inner, stride_outer, stride_inner,
    inv_temperature,   # 1 / temperature
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)            # int64: N * V passes 2^31 at 32K x 128K
    row_ptr = logits_ptr + row_start(row, inner, stride_outer, stride_inner)
    scale = tl.cast(inv_temperature, tl.float32) * LOG2E  # fp32 even if handed an fp64

    lse2, entropy = online_logsumexp_entropy(row_ptr, V, scale, BLOCK_V)

    # the target's logit: one scalar load (ids outside [0, V) are not checked; they read 0)
    target = tl.load(targets_ptr + row)
    z_t = tl.load(row_ptr + target, mask=(target >= 0) & (target < V), other=0.0)
    z_t = z_t.to(tl.float32) * scale

    tl.store(logp_ptr + row, (z_t - lse2) * LN2)
    tl.store(entropy_ptr + row, entropy)
    tl.store(lse2_ptr + row, lse2)


# ---------------------------------------------------------------------------------------------
# Backward kernel: one program per row; recompute p from lse, write dlogits once.
# Also used by ppo_loss.py, which passes its per-token coefficients as g_logp / g_H and the
# loss's upstream gradient divided by the mask count as `scale_ptr` (a device scalar).
# ---------------------------------------------------------------------------------------------

@triton.jit
def token_logprobs_bwd_kernel(
    logits_ptr, targets_ptr,
    lse2_ptr, entropy_ptr,   # [N] fp32, saved by the forward
    g_logp_ptr, g_ent_ptr,   # [N] fp32, upstream gradients of logp and H
    scale_ptr,               # fp32 scalar multiplying both (only read when HAS_SCALE)
    dlogits_ptr,             # [N, V] contiguous, in the logits' dtype
    V, inner, stride_outer, stride_inner,
    inv_temperature,
    HAS_SCALE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_V)
    out_ptr = dlogits_ptr + row * V
    g_logp = tl.load(g_logp_ptr + row).to(tl.float32)
    g_ent = tl.load(g_ent_ptr + row).to(tl.float32)
    if HAS_SCALE:
        k = tl.load(scale_ptr).to(tl.float32)
        g_logp = g_logp * k
        g_ent = g_ent * k

    if (g_logp == 0.0) & (g_ent == 0.0):
        # e.g. a padding token of the PPO loss: the gradient is 0, do not read the logits
        for start in tl.range(0, V, BLOCK_V):
            cols = start + offs
            tl.store(out_ptr + cols, tl.zeros([BLOCK_V], tl.float32).to(dlogits_ptr.dtype.element_ty),
                     mask=cols < V)
    else:
        row_ptr = logits_ptr + row_start(row, inner, stride_outer, stride_inner)
        inv_t = tl.cast(inv_temperature, tl.float32)
        scale = inv_t * LOG2E
        lse2 = tl.load(lse2_ptr + row)
        entropy = tl.load(entropy_ptr + row)
        target = tl.load(targets_ptr + row)
        for start in tl.range(0, V, BLOCK_V):
            cols = start + offs
            valid = cols < V
            z = tl.load(row_ptr + cols, mask=valid, other=0.0).to(tl.float32) * scale
            log2_p = z - lse2
            p = tl.exp2(log2_p)
            log_p = log2_p * LN2
            # g_logp * (onehot - p) - g_H * p * (log p + H), all in fp32
            grad = tl.where(cols == target, g_logp, 0.0) - p * (g_logp + g_ent * (log_p + entropy))
            tl.store(out_ptr + cols, (grad * inv_t).to(dlogits_ptr.dtype.element_ty), mask=valid)


# ---------------------------------------------------------------------------------------------
# Host wrappers: check, allocate, launch
# ---------------------------------------------------------------------------------------------

def token_logprobs_fwd(logits, targets, temperature):
    """Returns flat fp32 (logp [N], entropy [N], lse2 [N])."""
    x, n_rows, inner, stride_outer, stride_inner = row_layout(logits)
    V = logits.shape[-1]
    targets = targets.reshape(-1).to(torch.int64).contiguous()
    logp = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    entropy = torch.empty_like(logp)
    lse2 = torch.empty_like(logp)
    if n_rows > 0:
        BLOCK_V, num_warps = block_config(V)
        _token_logprobs_fwd_kernel[(n_rows,)](
            x, targets, logp, entropy, lse2,
            V, inner, stride_outer, stride_inner, 1.0 / temperature,
            BLOCK_V=BLOCK_V, num_warps=num_warps,
        )
    return logp, entropy, lse2


def token_logprobs_bwd(logits, targets, lse2, entropy, g_logp, g_ent, temperature, scale=None):
    """dlogits with the shape of `logits` (contiguous, in logits.dtype). `targets`, `lse2`,
    `entropy`, `g_logp`, `g_ent` are flat [N]; `scale` an optional 0-dim fp32 device tensor."""
    x, n_rows, inner, stride_outer, stride_inner = row_layout(logits)
    V = logits.shape[-1]
    dlogits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if n_rows > 0:
        g_logp = g_logp.reshape(-1).to(torch.float32).contiguous()
        g_ent = g_ent.reshape(-1).to(torch.float32).contiguous()
        BLOCK_V, num_warps = block_config(V, kind="bwd")
        token_logprobs_bwd_kernel[(n_rows,)](
            x, targets, lse2, entropy, g_logp, g_ent,
            scale if scale is not None else g_logp,  # dummy pointer when HAS_SCALE is False
            dlogits,
            V, inner, stride_outer, stride_inner, 1.0 / temperature,
            HAS_SCALE=scale is not None, BLOCK_V=BLOCK_V, num_warps=num_warps,
        )
    return dlogits


class TokenLogprobs(torch.autograd.Function):
    """(logits [..., V], targets [...]) -> (logp [...], entropy [...]), differentiable in logits."""

    @staticmethod
    def forward(ctx, logits, targets, temperature):
        logp, entropy, lse2 = token_logprobs_fwd(logits, targets, temperature)
        flat_targets = targets.reshape(-1).to(torch.int64).contiguous()
        ctx.save_for_backward(logits, flat_targets, lse2, entropy)
        ctx.temperature = temperature
        lead = logits.shape[:-1]
        return logp.view(lead), entropy.view(lead)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, targets, lse2, entropy = ctx.saved_tensors
        dlogits = token_logprobs_bwd(logits, targets, lse2, entropy,
                                     grad_logp, grad_entropy, ctx.temperature)
        return dlogits, None, None


def token_logprobs(logits, targets, temperature=1.0):
    """The fused token log-probs and entropy (call it as kernels.token_logprobs)."""
    check_logits(logits)
    check_per_token(targets, logits, "targets", integer=True)
    temperature = check_temperature(temperature)
    return TokenLogprobs.apply(logits, targets, temperature)
