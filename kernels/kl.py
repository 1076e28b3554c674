"""Fused exact KL to a reference model: `kl_divergence(logits, ref_logits, temperature) -> kl`.

What is fused
-------------
For each row, with x = logits / temperature and y = ref_logits / temperature,

    KL_t = sum_v p_v (log p_v - log q_v),      p = softmax(x),  q = softmax(y)

over the whole vocabulary (not a one-sample estimate), and its gradient to the policy's logits
(the reference model is a constant):

    dKL/dx_v = p_v * ((log p_v - log q_v) - KL)         (times g / temperature)

The plain PyTorch of the stage (`ppo.kl_per_token(..., "full")`, which calls this kernel on CUDA
tensors) builds two float32 [N, V] log-softmax tensors, an exp, a product and a sum, and keeps
log p and log q for the backward.

Memory traffic, per row of V bf16 logits (2 bytes each)
-------------------------------------------------------
    naive forward   2 casts, 2 divides, 2 log_softmax, exp, subtract, multiply, sum, in float32
                    ~ 80 V bytes, and ~12 V bytes per row kept alive for the backward
    fused forward   read 2 x 2V (both rows once), write 16 bytes     =   4 V bytes
    fused backward  read 2 x 2V again, write 2V (dlogits)            =   6 V bytes

The forward is one online pass over both rows at once. Besides the two running maxima and sums
(m_x, d_x for p and m_y, d_y for q) it keeps, in base 2 (z = x log2 e, w = y log2 e),

    a = sum_v 2^(z_v - m_x) * ((z_v - m_x) - (w_v - m_y))

so that KL = ln2 * (a / d_x - log2 d_x + log2 d_y). When the maxima move (m_x -> m_x',
m_y -> m_y') every old term is scaled by 2^(m_x - m_x') and its bracket shifts by
(m_x - m_x') - (m_y - m_y'): a' = 2^(m_x - m_x') * (a + d_x * shift). Keeping the bracket relative
to the maxima avoids computing KL as the difference of two large numbers (it is often ~1e-3
while the logits are ~10-100).
"""

import torch
import triton
import triton.language as tl

from .logprobs import (LN2, LOG2E, block_config, check_logits, check_temperature, row_layout,
                       row_start)


@triton.jit
def _kl_fwd_kernel(
    x_ptr, x_inner, x_stride_outer, x_stride_inner,   # policy logits, row layout of row_layout()
    y_ptr, y_inner, y_stride_outer, y_stride_inner,   # reference logits, its own layout
    kl_ptr,                  # [N] fp32 out
    lse2_x_ptr, lse2_y_ptr,  # [N] fp32 out, saved for the backward
    V, inv_temperature,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row_start(row, x_inner, x_stride_outer, x_stride_inner)
    y_row = y_ptr + row_start(row, y_inner, y_stride_outer, y_stride_inner)
    scale = tl.cast(inv_temperature, tl.float32) * LOG2E
    offs = tl.arange(0, BLOCK_V)

    m_x = -1.0e30   # finite start: d * shift must be 0 (not NaN) on the first chunk
    d_x = 0.0
    m_y = -1.0e30
    d_y = 0.0
    a = 0.0
    for start in tl.range(0, V, BLOCK_V):
        cols = start + offs
        valid = cols < V
        # padded lanes load 0 (finite, so the bracket below is never -inf - -inf = NaN) and are
        # kept out of the maxima and the sums with tl.where
        z = tl.load(x_row + cols, mask=valid, other=0.0).to(tl.float32) * scale
        w = tl.load(y_row + cols, mask=valid, other=0.0).to(tl.float32) * scale
        m_x_new = tl.maximum(m_x, tl.max(tl.where(valid, z, float("-inf")), axis=0))
        m_y_new = tl.maximum(m_y, tl.max(tl.where(valid, w, float("-inf")), axis=0))
        alpha_x = tl.exp2(m_x - m_x_new)
        alpha_y = tl.exp2(m_y - m_y_new)
        e_x = tl.where(valid, tl.exp2(z - m_x_new), 0.0)
        e_y = tl.where(valid, tl.exp2(w - m_y_new), 0.0)
        bracket = (z - m_x_new) - (w - m_y_new)
        shift = (m_x - m_x_new) - (m_y - m_y_new)
        a = alpha_x * (a + d_x * shift) + tl.sum(e_x * bracket, axis=0)
        d_x = alpha_x * d_x + tl.sum(e_x, axis=0)
        d_y = alpha_y * d_y + tl.sum(e_y, axis=0)
        m_x = m_x_new
        m_y = m_y_new

    log2_dx = tl.log2(d_x)
    log2_dy = tl.log2(d_y)
    tl.store(kl_ptr + row, (a / d_x - log2_dx + log2_dy) * LN2)
    tl.store(lse2_x_ptr + row, m_x + log2_dx)
    tl.store(lse2_y_ptr + row, m_y + log2_dy)


@triton.jit
def _kl_bwd_kernel(
    x_ptr, x_inner, x_stride_outer, x_stride_inner,
    y_ptr, y_inner, y_stride_outer, y_stride_inner,
    kl_ptr, lse2_x_ptr, lse2_y_ptr,   # [N] fp32 from the forward
    g_ptr,                             # [N] fp32 upstream gradient of kl
    dx_ptr,                            # [N, V] contiguous, in the logits' dtype
    V, inv_temperature,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row_start(row, x_inner, x_stride_outer, x_stride_inner)
    y_row = y_ptr + row_start(row, y_inner, y_stride_outer, y_stride_inner)
    out_ptr = dx_ptr + row * V
    inv_t = tl.cast(inv_temperature, tl.float32)
    scale = inv_t * LOG2E
    offs = tl.arange(0, BLOCK_V)

    kl = tl.load(kl_ptr + row)
    lse2_x = tl.load(lse2_x_ptr + row)
    lse2_y = tl.load(lse2_y_ptr + row)
    g = tl.load(g_ptr + row).to(tl.float32) * inv_t    # fold the 1/temperature in once
    for start in tl.range(0, V, BLOCK_V):
        cols = start + offs
        valid = cols < V
        z = tl.load(x_row + cols, mask=valid, other=0.0).to(tl.float32) * scale
        w = tl.load(y_row + cols, mask=valid, other=0.0).to(tl.float32) * scale
        log2_p = z - lse2_x
        p = tl.exp2(log2_p)
        log_ratio = (log2_p - (w - lse2_y)) * LN2          # log p_v - log q_v
        grad = g * p * (log_ratio - kl)
        tl.store(out_ptr + cols, grad.to(dx_ptr.dtype.element_ty), mask=valid)


# ---------------------------------------------------------------------------------------------
# Host wrappers and autograd.Function
# ---------------------------------------------------------------------------------------------

def _kl_block_config(V):
    return block_config(V, kind="kl")


def kl_fwd(logits, ref_logits, temperature):
    x, n_rows, x_inner, x_so, x_si = row_layout(logits)
    y, _, y_inner, y_so, y_si = row_layout(ref_logits)
    V = logits.shape[-1]
    kl = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    lse2_x = torch.empty_like(kl)
    lse2_y = torch.empty_like(kl)
    if n_rows > 0:
        BLOCK_V, num_warps = _kl_block_config(V)
        _kl_fwd_kernel[(n_rows,)](
            x, x_inner, x_so, x_si, y, y_inner, y_so, y_si,
            kl, lse2_x, lse2_y, V, 1.0 / temperature,
            BLOCK_V=BLOCK_V, num_warps=num_warps,
        )
    return kl, lse2_x, lse2_y


def kl_bwd(logits, ref_logits, kl, lse2_x, lse2_y, grad_kl, temperature):
    x, n_rows, x_inner, x_so, x_si = row_layout(logits)
    y, _, y_inner, y_so, y_si = row_layout(ref_logits)
    V = logits.shape[-1]
    dlogits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if n_rows > 0:
        grad_kl = grad_kl.reshape(-1).to(torch.float32).contiguous()
        BLOCK_V, num_warps = _kl_block_config(V)
        _kl_bwd_kernel[(n_rows,)](
            x, x_inner, x_so, x_si, y, y_inner, y_so, y_si,
            kl, lse2_x, lse2_y, grad_kl, dlogits, V, 1.0 / temperature,
            BLOCK_V=BLOCK_V, num_warps=num_warps,
        )
    return dlogits


class KLDivergence(torch.autograd.Function):
    """(logits [..., V], ref_logits [..., V]) -> kl [...], differentiable in logits only."""

    @staticmethod
    def forward(ctx, logits, ref_logits, temperature):
        kl, lse2_x, lse2_y = kl_fwd(logits, ref_logits, temperature)
        ctx.save_for_backward(logits, ref_logits, kl, lse2_x, lse2_y)
        ctx.temperature = temperature
        return kl.view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_kl):
        logits, ref_logits, kl, lse2_x, lse2_y = ctx.saved_tensors
        dlogits = kl_bwd(logits, ref_logits, kl, lse2_x, lse2_y, grad_kl, ctx.temperature)
        return dlogits, None, None


def kl_divergence(logits, ref_logits, temperature=1.0):
    """The fused exact KL (call it as kernels.kl_divergence)."""
    check_logits(logits)
    check_logits(ref_logits, "ref_logits")
    if ref_logits.shape != logits.shape:
        raise ValueError(f"ref_logits must have the shape of logits {tuple(logits.shape)}, "
                         f"got {tuple(ref_logits.shape)}")
    if ref_logits.device != logits.device:
        raise ValueError(f"ref_logits are on {ref_logits.device} but logits on {logits.device}")
    temperature = check_temperature(temperature)
    return KLDivergence.apply(logits, ref_logits.detach(), temperature)
