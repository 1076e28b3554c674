"""Kernels against the stages' own plain PyTorch and an independent float64 computation, forward
and backward; and that plain PyTorch itself against float64 formulas written from the math.

    kernels.token_logprobs   vs  sampling.token_logprobs
    kernels.kl_divergence    vs  ppo.kl_per_token(..., "full")
    kernels.ppo_policy_loss  vs  ppo.policy_loss

On a CPU the Triton kernels run through the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 when there is no CUDA); on a GPU the same tests run natively on "cuda".
The interpreter checks arithmetic and indexing only (no races, no speed): shapes stay small and
blocks large so the whole file runs in well under a minute on two CPU cores.

Accuracy criterion for a kernel (from KERNELS-NOTES.md): |ours - ref64| <= |torch_same_dtype - ref64|
+ tol, where torch_same_dtype is the stage's plain PyTorch on the same (e.g. bf16) input. That bound
grows with the plain PyTorch's own error, so the plain PyTorch is also checked against float64
with a fixed tolerance (test_plain_ppo_policy_loss_is_the_formula).
"""

import os
import subprocess
import sys

import pytest
import torch

import kernels
import ppo
import sampling

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA"))]
DTYPES = [torch.float32, torch.bfloat16]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def triton_or_skip(device):
    if not kernels.triton_available():
        pytest.skip("triton is not installed")
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)")


@pytest.fixture(autouse=True)
def plain_pytorch_in_the_stages():
    """The stage functions run their plain PyTorch (even on CUDA tensors); the kernels are called directly."""
    kernels.set_backend("torch")
    yield
    kernels.set_backend("auto")


def kl_plain(logits, ref_logits, temperature):
    return ppo.kl_per_token(None, None, "full", logits, ref_logits, temperature)


# --------------------------------------------------------------------------------------------
# float64 computations, written from the math, independently of the stages' code
# --------------------------------------------------------------------------------------------

def logprobs64(logits, targets, temperature):
    x = logits.double() / temperature
    lse = torch.logsumexp(x, -1)
    p = torch.exp(x - lse[..., None])
    logp = x.gather(-1, targets[..., None])[..., 0] - lse
    entropy = lse - (p * x).sum(-1)                 # H = lse - E_p[x]
    return logp, entropy


def kl64(logits, ref_logits, temperature):
    logp = torch.log_softmax(logits.double() / temperature, -1)
    logq = torch.log_softmax(ref_logits.double() / temperature, -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def ppo64(logits, actions, old, adv, mask, clip_coef, temperature, ref, kl_coef, ent_coef):
    """PPO's clipped surrogate - ent_coef * entropy + kl_coef * k3 KL to the reference, masked mean."""
    logp, entropy = logprobs64(logits, actions, temperature)
    m = mask.double()
    ratio = torch.exp(logp - old.double())
    a = adv.double()
    pg = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip_coef, 1 + clip_coef))
    kl = torch.zeros_like(logp)
    if ref is not None:
        r = ref.double() - logp  # log(pi_ref / pi): k3 = pi_ref/pi - 1 - log(pi_ref/pi)
        kl = r.exp() - r - 1
    n = m.sum().clamp(min=1)
    loss = ((pg + kl_coef * kl - ent_coef * entropy) * m).sum() / n
    clipped = ((ratio - 1).abs() > clip_coef) & (-a * ratio.clamp(1 - clip_coef, 1 + clip_coef) > -a * ratio)
    stats = {"clipfrac": (clipped.double() * m).sum() / n, "entropy": (entropy * m).sum() / n,
             "approx_kl": ((ratio - 1 - (logp - old.double())) * m).sum() / n,
             "ratio_mean": (ratio * m).sum() / n, "pg_loss": (pg * m).sum() / n,
             "kl": (kl * m).sum() / n}
    return loss, {k: v.detach() for k, v in stats.items()}


def check(ours, same, ref64, atol, rtol=0.0, name=""):
    """|ours - ref64| <= |same - ref64| + atol + rtol |ref64|, elementwise; and finite."""
    ours, same, ref64 = (t.detach().double().cpu() for t in (ours, same, ref64))
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    err = (ours - ref64).abs()
    bound = (same - ref64).abs() + atol + rtol * ref64.abs()
    assert (err <= bound).all(), (f"{name}: max err {err.max():.3g}, exceeds the bound by "
                                  f"{(err - bound).max():.3g}")


def grad_rtol(dtype):
    # a gradient stored in bf16 carries up to 1 bf16 ulp (2^-7 relative): the interpreter's
    # fp32 -> bf16 cast truncates where the GPU rounds to nearest
    return 2.0 ** -7 if dtype == torch.bfloat16 else 1e-5


def make_logits(shape, dtype, device, scale=1.0, seed=0, sliced=False):
    """Random logits [..., V]; sliced=True returns a non-contiguous [B, T, V] view (x[:, :-1])."""
    g = torch.Generator().manual_seed(seed)
    if sliced:
        B, T, V = shape
        full = torch.randn(B, T + 1, V, generator=g) * scale
        return full.to(device=device, dtype=dtype)[:, :-1]
    return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)


# name: (shape, temperature, logit scale, sliced)
CASES = {
    "odd_rows_V1000": ((13, 1000), 1.0, 1.0, False),
    "V50257_tiny_N": ((2, 50257), 0.7, 1.0, False),
    "one_token_x30": ((1, 1000), 0.7, 30.0, False),
    "sliced_3d": ((2, 4, 777), 0.7, 3.0, True),
}


# --------------------------------------------------------------------------------------------
# token_logprobs
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_token_logprobs(case, dtype, device):
    triton_or_skip(device)
    shape, temperature, scale, sliced = CASES[case]
    logits = make_logits(shape, dtype, device, scale, sliced=sliced).requires_grad_()
    V = shape[-1]
    targets = torch.randint(0, V, logits.shape[:-1], generator=torch.Generator().manual_seed(1))
    targets = targets.to(device)
    targets.view(-1)[0] = V - 1    # the last column (in the last, partial block)

    logp, entropy = kernels.token_logprobs(logits, targets, temperature)
    assert logp.dtype == entropy.dtype == torch.float32
    assert logp.shape == entropy.shape == logits.shape[:-1]
    logp_ref, entropy_ref = sampling.token_logprobs(logits, targets, temperature)
    logits64 = logits.detach().double().requires_grad_()
    logp64, entropy64 = logprobs64(logits64, targets, temperature)

    atol = 2e-6 * max(1.0, scale / temperature)    # fp32 rounding of |logits| ~ scale / T
    check(logp, logp_ref, logp64, atol, 1e-6, "logp")
    check(entropy, entropy_ref, entropy64, atol, 1e-6, "entropy")
    torch.testing.assert_close(logp, logp_ref, atol=10 * atol, rtol=1e-5)
    torch.testing.assert_close(entropy, entropy_ref, atol=10 * atol, rtol=1e-5)

    # backward, upstream gradients != 1 on both outputs
    g = torch.Generator().manual_seed(2)
    g_logp = (torch.randn(logp.shape, generator=g) * 1.5).to(device)
    g_ent = (torch.randn(logp.shape, generator=g) * 0.7).to(device)
    (grad,) = torch.autograd.grad((logp, entropy), logits, (g_logp, g_ent))
    (grad_ref,) = torch.autograd.grad((logp_ref, entropy_ref), logits, (g_logp, g_ent))
    (grad64,) = torch.autograd.grad((logp64, entropy64), logits64, (g_logp.double(), g_ent.double()))
    assert grad.dtype == dtype and grad.shape == logits.shape
    check(grad, grad_ref, grad64, 1e-6 * max(1.0, scale / temperature), grad_rtol(dtype), "dlogits")


@pytest.mark.parametrize("device", DEVICES)
def test_token_logprobs_fp16_and_one_output(device):
    """fp16 logits, and a gradient through the log-prob alone (the entropy's grad is None)."""
    triton_or_skip(device)
    logits = make_logits((3, 2, 300), torch.float16, device, 2.0).requires_grad_()
    targets = torch.randint(0, 300, (3, 2)).to(device)
    logp, _ = kernels.token_logprobs(logits, targets, 1.3)
    logp_ref, _ = sampling.token_logprobs(logits, targets, 1.3)
    logits64 = logits.detach().double().requires_grad_()
    logp64, _ = logprobs64(logits64, targets, 1.3)
    check(logp, logp_ref, logp64, 2e-6, 1e-6, "logp")
    (grad,) = torch.autograd.grad(logp.sum() * 0.5, logits)
    (grad_ref,) = torch.autograd.grad(logp_ref.sum() * 0.5, logits)
    (grad64,) = torch.autograd.grad(logp64.sum() * 0.5, logits64)
    check(grad, grad_ref, grad64, 1e-6, 2.0 ** -10, "dlogits")


# --------------------------------------------------------------------------------------------
# kl_divergence
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_kl_divergence(case, dtype, device):
    triton_or_skip(device)
    shape, temperature, scale, sliced = CASES[case]
    logits = make_logits(shape, dtype, device, scale, seed=0, sliced=sliced).requires_grad_()
    # a nearby reference model: KL small (the hard case for cancellation) but not zero
    noise = make_logits(shape, torch.float32, device, 0.5 * scale, seed=3, sliced=sliced)
    ref_logits = (logits.detach().float() + noise).to(dtype)

    kl = kernels.kl_divergence(logits, ref_logits, temperature)
    assert kl.dtype == torch.float32 and kl.shape == logits.shape[:-1]
    kl_ref = kl_plain(logits, ref_logits, temperature)
    logits64 = logits.detach().double().requires_grad_()
    kl_64 = kl64(logits64, ref_logits, temperature)
    atol = 2e-6 * max(1.0, scale / temperature)
    check(kl, kl_ref, kl_64, atol, 1e-5, "kl")
    torch.testing.assert_close(kl, kl_ref, atol=10 * atol, rtol=1e-4)

    g = (torch.randn(kl.shape, generator=torch.Generator().manual_seed(4)) * 1.5).to(device)
    (grad,) = torch.autograd.grad(kl, logits, g)
    (grad_ref,) = torch.autograd.grad(kl_ref, logits, g)
    (grad64,) = torch.autograd.grad(kl_64, logits64, g.double())
    assert grad.dtype == dtype and grad.shape == logits.shape
    check(grad, grad_ref, grad64, 1e-6 * max(1.0, scale / temperature), grad_rtol(dtype), "dlogits")


@pytest.mark.parametrize("device", DEVICES)
def test_kl_identical_is_zero_and_ref_gets_no_grad(device):
    triton_or_skip(device)
    logits = make_logits((3, 500), torch.float32, device, 5.0).requires_grad_()
    ref_logits = logits.detach().clone().requires_grad_()
    kl = kernels.kl_divergence(logits, ref_logits, 0.7)
    assert kl.abs().max() < 1e-6
    grads = torch.autograd.grad(kl.sum(), (logits, ref_logits), allow_unused=True)
    assert grads[0].abs().max() < 1e-6
    assert grads[1] is None or grads[1].abs().max() == 0


# --------------------------------------------------------------------------------------------
# ppo_policy_loss
# --------------------------------------------------------------------------------------------

# name: (shape [B, T, V], dtype, temperature, scale, sliced, use ref (the k3 KL term), kl_coef,
#        ent_coef, float mask)
PPO_CASES = {
    "fp32_kl_ent": ((3, 5, 1000), torch.float32, 1.0, 1.0, False, True, 0.1, 0.01, False),
    "bf16_kl_T07": ((3, 5, 1000), torch.bfloat16, 0.7, 1.0, False, True, 0.2, 0.0, True),
    "fp32_x30_noref": ((2, 4, 1000), torch.float32, 0.7, 30.0, False, False, 0.0, 0.02, False),
    "bf16_V50257": ((1, 3, 50257), torch.bfloat16, 1.0, 1.0, False, True, 0.05, 0.01, False),
    "sliced_kl_ent": ((2, 4, 777), torch.float32, 0.7, 3.0, True, True, 0.1, 0.05, False),
}


def ppo_inputs(shape, dtype, device, temperature, scale, sliced, float_mask):
    logits = make_logits(shape, dtype, device, scale, sliced=sliced).requires_grad_()
    B, T, V = shape
    g = torch.Generator().manual_seed(5)
    actions = torch.randint(0, V, (B, T), generator=g).to(device)
    with torch.no_grad():
        logp, _ = sampling.token_logprobs(logits, actions, temperature)
    # old / ref log-probs near the current ones: ratios around 1, some beyond the clip range
    old = logp + 0.3 * torch.randn(B, T, generator=g).to(device)
    ref = logp + 0.3 * torch.randn(B, T, generator=g).to(device)
    adv = torch.randn(B, T, generator=g).to(device)
    mask = torch.rand(B, T, generator=g).to(device) > 0.25
    mask[:, 0] = True
    if B > 1:
        mask[-1] = False                                   # a fully masked row
    if float_mask:
        mask = mask.float()
    return logits, actions, old, ref, adv, mask


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(PPO_CASES))
def test_ppo_policy_loss(case, device):
    triton_or_skip(device)
    shape, dtype, temperature, scale, sliced, use_ref, kl_coef, ent_coef, fmask = PPO_CASES[case]
    logits, actions, old, ref, adv, mask = ppo_inputs(shape, dtype, device, temperature, scale,
                                                      sliced, fmask)
    kw = dict(clip_coef=0.2, temperature=temperature, ref_logprobs=ref if use_ref else None,
              kl_coef=kl_coef, ent_coef=ent_coef)
    loss, stats = kernels.ppo_policy_loss(logits, actions, old, adv, mask, **kw)
    loss_ref, stats_ref = ppo.policy_loss(logits, actions, old, adv, mask, **kw)
    logits64 = logits.detach().double().requires_grad_()
    loss64, stats64 = ppo64(logits64, actions, old, adv, mask, 0.2, temperature,
                            ref if use_ref else None, kl_coef, ent_coef)

    assert loss.shape == () and loss.dtype == torch.float32 and loss.device == logits.device
    assert set(stats) == {"clipfrac", "approx_kl", "entropy", "ratio_mean", "pg_loss", "kl"}
    atol = 2e-6 * max(1.0, scale / temperature)
    check(loss, loss_ref, loss64, atol, 1e-5, "loss")
    for name in stats:
        s = stats[name]
        assert s.shape == () and s.dtype == torch.float32 and s.device == logits.device, name
        assert not s.requires_grad, name
        check(s, stats_ref[name], stats64[name], atol, 1e-5, name)
        torch.testing.assert_close(s, stats_ref[name], atol=10 * atol, rtol=1e-4, msg=name)
    if mask.sum() >= 8:
        assert 0 < stats["clipfrac"] < 1, "the inputs should clip some tokens and not others"

    (grad,) = torch.autograd.grad(loss, logits, torch.tensor(1.7, device=device))
    (grad_ref,) = torch.autograd.grad(loss_ref, logits, torch.tensor(1.7, device=device))
    (grad64,) = torch.autograd.grad(loss64, logits64, torch.tensor(1.7, dtype=torch.float64))
    assert grad.dtype == dtype and grad.shape == logits.shape
    check(grad, grad_ref, grad64, 1e-7, grad_rtol(dtype), "dlogits")
    if not fmask:
        assert (grad[~mask] == 0).all(), "masked tokens must get exactly zero gradient"


@pytest.mark.parametrize("case", ["fp32_kl_ent", "fp32_x30_noref", "sliced_kl_ent"])
def test_plain_ppo_policy_loss_is_the_formula(case):
    """ppo.policy_loss (what the CPU runs, and what the kernel is checked against) against the float64
    formula with a fixed tolerance, loss, statistics and gradient: a sign error in its entropy bonus
    or its KL term is 0.01-0.1 off here, not within a bound that grows with its own error."""
    shape, dtype, temperature, scale, sliced, use_ref, kl_coef, ent_coef, fmask = PPO_CASES[case]
    logits, actions, old, ref, adv, mask = ppo_inputs(shape, dtype, "cpu", temperature, scale, sliced, fmask)
    ref = ref if use_ref else None
    loss, stats = ppo.policy_loss(logits, actions, old, adv, mask, 0.2, temperature, ref, kl_coef, ent_coef)
    logits64 = logits.detach().double().requires_grad_()
    loss64, stats64 = ppo64(logits64, actions, old, adv, mask, 0.2, temperature, ref, kl_coef, ent_coef)
    tol = 1e-6 * max(1.0, scale / temperature)
    assert loss.item() == pytest.approx(loss64.item(), rel=1e-5, abs=tol)
    for name in stats64:
        assert stats[name].item() == pytest.approx(stats64[name].item(), rel=1e-5, abs=tol), name
    (grad,) = torch.autograd.grad(loss, logits)
    (grad64,) = torch.autograd.grad(loss64, logits64)
    torch.testing.assert_close(grad.double(), grad64, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("op", ["token_logprobs", "kl_divergence"])
def test_plain_logprobs_and_kl_are_the_formula(op):
    """sampling.token_logprobs and ppo.kl_per_token(..., "full") against float64, fixed tolerance."""
    logits = make_logits((2, 4, 777), torch.float32, "cpu", 3.0, sliced=True).requires_grad_()
    logits64 = logits.detach().double().requires_grad_()
    if op == "token_logprobs":
        targets = torch.randint(0, 777, (2, 4), generator=torch.Generator().manual_seed(1))
        outs, outs64 = sampling.token_logprobs(logits, targets, 0.7), logprobs64(logits64, targets, 0.7)
    else:
        ref_logits = logits.detach() + make_logits((2, 4, 777), torch.float32, "cpu", 1.5, seed=3)
        outs, outs64 = (kl_plain(logits, ref_logits, 0.7),), (kl64(logits64, ref_logits, 0.7),)
    g = [torch.randn(outs[0].shape, generator=torch.Generator().manual_seed(2 + i)) for i in range(len(outs))]
    for out, out64 in zip(outs, outs64):
        torch.testing.assert_close(out.double(), out64, rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(outs, logits, g)
    (grad64,) = torch.autograd.grad(outs64, logits64, [x.double() for x in g])
    torch.testing.assert_close(grad.double(), grad64, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_ppo_kl_term_gradient_is_its_stated_formula(backend, device):
    """The k3 KL-in-loss term (kernels/ppo_loss.py's docstring; GRPO's KL to SFT) on a 6-way categorical
    at temperature 0.7, with every advantage 0 (no surrogate gradient) and the ratio 1:
    per token, its gradient is (1 - pi_ref(y) / pi(y)) grad log pi(y);
    in expectation over y ~ pi (each action as a token, weighted by pi(y) through a float mask), it is
    grad KL(pi_ref || pi), the forward KL, and not grad KL(pi || pi_ref)."""
    if backend == "triton":
        triton_or_skip(device)
    loss_fn = kernels.ppo_policy_loss if backend == "triton" else ppo.policy_loss
    V, T, kl_coef = 6, 0.7, 1.0
    g = torch.Generator().manual_seed(0)
    z = torch.randn(V, generator=g, dtype=torch.float64) * 2      # the policy's logits at one state
    z_ref = torch.randn(V, generator=g, dtype=torch.float64) * 2  # the reference's
    logp64, ref_logp64 = torch.log_softmax(z / T, -1), torch.log_softmax(z_ref / T, -1)
    pi, ref_pi = logp64.exp(), ref_logp64.exp()
    actions = torch.arange(V, device=device)[None]                # (1, V): every action once, one state
    zeros = torch.zeros(1, V, device=device)

    def grad_of(weights):
        """Gradient to the state's logits of the loss with per-token weights (float mask) `weights`."""
        logits = z.float().to(device).repeat(1, V, 1).requires_grad_()        # (1, V, V): the same row V times
        logp = logp64.float().to(device)[None]                                # old = logp: ratio 1
        loss, stats = loss_fn(logits, actions, logp, zeros, weights.float().to(device)[None], clip_coef=0.2,
                              temperature=T, ref_logprobs=ref_logp64.float().to(device)[None], kl_coef=kl_coef)
        (grad,) = torch.autograd.grad(loss, logits)
        return grad[0].sum(0).double().cpu(), stats  # the rows share the state: their gradients add up

    # expected: the loss is sum_y pi(y) k3(y) / sum_y pi(y) = E_pi[k3]
    expected_grad, stats = grad_of(pi)
    zz = z.clone().requires_grad_()
    forward_kl = (ref_pi * (ref_logp64 - torch.log_softmax(zz / T, -1))).sum()
    (grad_forward,) = torch.autograd.grad(forward_kl, zz)
    zz = z.clone().requires_grad_()
    logq = torch.log_softmax(zz / T, -1)
    (grad_reverse,) = torch.autograd.grad((logq.exp() * (logq - ref_logp64)).sum(), zz)
    torch.testing.assert_close(expected_grad, kl_coef * grad_forward, rtol=1e-4, atol=1e-6)
    assert (expected_grad - grad_reverse).abs().max() > 0.05  # a different vector: the reverse KL's is not it
    # its value is still k3's: an unbiased estimate of KL(pi || pi_ref)
    reverse_kl = (pi * (logp64 - ref_logp64)).sum().item()
    assert stats["kl"].item() == pytest.approx(reverse_kl, rel=1e-4)
    # per token: (1 - pi_ref / pi) * grad log pi, with grad log pi(y) = (onehot(y) - pi) / T
    for y in range(V):
        got, _ = grad_of(torch.nn.functional.one_hot(torch.tensor(y), V).double())
        formula = (1 - ref_pi[y] / pi[y]) * (torch.nn.functional.one_hot(torch.tensor(y), V).double() - pi) / T
        torch.testing.assert_close(got, kl_coef * formula, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_ppo_all_zero_mask(backend, device):
    if backend == "triton":
        triton_or_skip(device)
    logits, actions, old, ref, adv, _ = ppo_inputs((2, 3, 300), torch.float32, device, 1.0, 1.0,
                                                   False, False)
    mask = torch.zeros(2, 3, dtype=torch.bool, device=device)
    loss_fn = kernels.ppo_policy_loss if backend == "triton" else ppo.policy_loss
    loss, stats = loss_fn(logits, actions, old, adv, mask, ref_logprobs=ref, kl_coef=0.1, ent_coef=0.01)
    (grad,) = torch.autograd.grad(loss, logits)
    assert loss.item() == 0.0
    assert (grad == 0).all()
    assert all(v.item() == 0.0 for v in stats.values())


@pytest.mark.parametrize("device", DEVICES)
def test_ppo_first_step_ratio_is_one(device):
    """With old_logprobs = the current log-probs, ratio = 1, nothing clips, approx_kl = 0.

    Exactly on the CPU (the interpreter runs both kernels' arithmetic in the same order). On a GPU
    the log-prob kernel and the PPO kernel are compiled separately and the compiler may contract
    their arithmetic differently (fused multiply-adds): seen on an H200, logp differed by one ulp,
    the ratio was 1 + 2^-23 and approx_kl = (ratio - 1) - log ratio was -1.5e-8 (float32 rounding
    of two numbers near 1e-7). Within a few ulps of 1 is what a GPU can promise."""
    triton_or_skip(device)
    logits, actions, _, _, adv, mask = ppo_inputs((2, 3, 300), torch.bfloat16, device, 0.7, 1.0,
                                                  False, False)
    old, _ = kernels.token_logprobs(logits.detach(), actions, 0.7)
    loss, stats = kernels.ppo_policy_loss(logits, actions, old, adv, mask, temperature=0.7)
    ulps = 0 if device == "cpu" else 4 * 2.0**-23
    assert abs(stats["ratio_mean"].item() - 1.0) <= ulps
    assert stats["clipfrac"].item() == 0.0
    assert abs(stats["approx_kl"].item()) <= ulps


# --------------------------------------------------------------------------------------------
# large tensors (GPU only): row offsets must be int64 once N * V passes 2^31
# --------------------------------------------------------------------------------------------

@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU with ~5 GB free")
def test_int64_row_offsets_cuda():
    N, V = 16800, 128256                                   # N * V = 2.15e9 > 2^31
    logits = torch.randn(N, V, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, V, (N,), device="cuda")
    logp, entropy = kernels.token_logprobs(logits, targets)
    tail = slice(N - 8, N)
    logp_ref, entropy_ref = sampling.token_logprobs(logits[tail], targets[tail])
    torch.testing.assert_close(logp[tail], logp_ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(entropy[tail], entropy_ref, atol=1e-4, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# dispatch: a stage runs the kernel on CUDA tensors (auto) or when asked (--kernels triton), its
# plain PyTorch otherwise
# --------------------------------------------------------------------------------------------

ALL_OPS = ["kl_divergence", "ppo_policy_loss", "token_logprobs"]


def _spy_on_kernels(monkeypatch):
    calls = []
    for name in ALL_OPS:
        fn = getattr(kernels, name)

        def spy(*args, _fn=fn, _name=name, **kwargs):
            calls.append(_name)
            return _fn(*args, **kwargs)
        monkeypatch.setattr(kernels, name, spy)
    return calls


def _call_the_stage_functions(device="cpu", V=64):
    logits = torch.randn(2, 3, V, device=device)
    actions = torch.randint(0, V, (2, 3), device=device)
    zeros = torch.zeros(2, 3, device=device)
    sampling.token_logprobs(logits, actions)
    kl_plain(logits, logits + 1, 1.0)
    ppo.policy_loss(logits, actions, zeros, zeros, zeros > -1)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_the_stages_run_their_plain_pytorch_on_cpu_tensors(backend, monkeypatch):
    kernels.set_backend(backend)
    calls = _spy_on_kernels(monkeypatch)
    _call_the_stage_functions()
    assert calls == []


def test_set_backend_triton_runs_the_kernels_on_cpu_tensors_too(monkeypatch):
    triton_or_skip("cpu")
    calls = _spy_on_kernels(monkeypatch)
    kernels.set_backend("triton")
    assert kernels.get_backend() == "triton"
    _call_the_stage_functions()
    assert sorted(calls) == ALL_OPS


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA")
def test_dispatch_cuda(monkeypatch):
    calls = _spy_on_kernels(monkeypatch)
    kernels.set_backend("auto")
    _call_the_stage_functions("cuda")
    assert sorted(calls) == ALL_OPS       # auto on CUDA: Triton
    calls.clear()
    kernels.set_backend("torch")
    _call_the_stage_functions("cuda")
    assert calls == []                    # --kernels torch is respected on CUDA


def test_dispatch_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown kernels backend"):
        kernels.set_backend("cuda")
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="not installed"):
        kernels.token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long))


def test_input_checks():
    triton_or_skip("cpu")
    x = torch.randn(2, 3, 10)
    with pytest.raises(ValueError, match="targets must have shape"):
        kernels.token_logprobs(x, torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        kernels.token_logprobs(x, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="temperature"):
        kernels.token_logprobs(x, torch.zeros(2, 3, dtype=torch.long), 0.0)
    with pytest.raises(ValueError, match="ref_logits must have the shape"):
        kernels.kl_divergence(x, x[..., :5])
    with pytest.raises(ValueError, match="ref_logprobs must have shape"):
        kernels.ppo_policy_loss(x, torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3),
                                torch.zeros(2, 3), torch.ones(2, 3), ref_logprobs=torch.zeros(3, 2))


def test_import_without_triton():
    """`import kernels` (and the stages) must not import triton, and must work where triton is missing."""
    code = "\n".join([
        "import sys, torch",
        "import kernels, ppo, sampling",
        "assert 'triton' not in sys.modules, 'importing the stages imported triton'",
        "sys.modules['triton'] = None   # from here on, triton cannot be imported",
        "x = torch.randn(2, 3, 10); t = torch.randint(0, 10, (2, 3))",
        "logp, H = sampling.token_logprobs(x, t)",
        "assert logp.shape == (2, 3)",
        "try:",
        "    kernels.token_logprobs(x, t)",
        "    raise SystemExit('no error for the Triton kernels without triton')",
        "except RuntimeError as e:",
        "    assert 'not installed' in str(e)",
        "print('ok')",
    ])
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
