"""Fused Triton kernels for the log-prob, KL and PPO-loss work: the fast path on a GPU.

    from kernels import token_logprobs, kl_divergence, ppo_policy_loss    # always Triton

Each one computes what a stage writes in plain PyTorch, and is tested against that function and a
float64 formula (tests/test_kernels.py):

    token_logprobs(logits, targets, temperature)   sampling.token_logprobs       (logprobs.py)
    kl_divergence(logits, ref_logits, temperature)  ppo.kl_per_token(..., "full") (kl.py)
    ppo_policy_loss(logits, actions, ...)           ppo.policy_loss                (ppo_loss.py)

The stages decide with `use_triton(x)`, which follows the global `set_backend` (--kernels):
  "auto"   (default) Triton for CUDA tensors when triton is importable, plain PyTorch otherwise
  "triton" always Triton; on CPU tensors this needs TRITON_INTERPRET=1 set before triton is
           imported (how the tests run the kernels)
  "torch"  always the stage's plain PyTorch

`import kernels` never imports triton: the kernel modules load on first use, so this package
imports on machines without triton (macOS, CPU boxes), where the stages run their plain PyTorch.
bench.py measures the kernels on a GPU.
"""

import importlib.util
import os

__all__ = ["set_backend", "get_backend", "use_triton", "token_logprobs", "kl_divergence", "ppo_policy_loss"]

BACKENDS = ("auto", "triton", "torch")
_backend = "auto"


def set_backend(name: str) -> None:
    """Choose for every later use_triton(): "auto" | "triton" | "torch"."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown kernels backend {name!r}: choose one of {', '.join(BACKENDS)}")
    _backend = name


def get_backend() -> str:
    return _backend


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(x) -> bool:
    """Should a stage run the fused kernel on tensor x (else its own plain PyTorch)?"""
    if _backend == "torch":
        return False
    if _backend == "auto":
        return x.is_cuda and triton_available()
    return True


def _check_triton(x):
    """The Triton kernels need triton, and a CUDA tensor or the interpreter: one clear error otherwise."""
    if not triton_available():
        raise RuntimeError("the Triton kernels were asked for but triton is not installed "
                           "(pip install triton, on Linux); use the 'torch' or 'auto' backend")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the Triton kernels on CPU tensors need the Triton interpreter: "
                           "set TRITON_INTERPRET=1 before triton is imported, or use a CUDA device")


def token_logprobs(logits, targets, temperature=1.0):
    """Log-prob of `targets` and entropy under softmax(logits / temperature), fused.

    logits [..., V] (fp32/bf16/fp16), targets [...] int64 -> (logp [...], entropy [...]) float32;
    differentiable in logits through both outputs.
    """
    _check_triton(logits)
    from .logprobs import token_logprobs as fused
    return fused(logits, targets, temperature)


def kl_divergence(logits, ref_logits, temperature=1.0):
    """Exact per-token KL(pi || pi_ref) over the vocabulary, both at `temperature`, fused.

    logits, ref_logits [..., V] -> kl [...] float32; gradient to `logits` only.
    """
    _check_triton(logits)
    from .kl import kl_divergence as fused
    return fused(logits, ref_logits, temperature)


def ppo_policy_loss(logits, actions, old_logprobs, advantages, mask, clip_coef=0.2, temperature=1.0,
                    ref_logprobs=None, kl_coef=0.0, ent_coef=0.0):
    """PPO's clipped-surrogate loss straight from the logits, masked mean over real tokens, fused.

    Returns (loss, stats): loss a 0-dim float32 tensor differentiable in logits; stats a dict of
    0-dim float32 device tensors (clipfrac, approx_kl, entropy, ratio_mean, pg_loss, kl).
    The formulas: ppo.policy_loss, and kernels/ppo_loss.py's docstring.
    """
    _check_triton(logits)
    from .ppo_loss import ppo_policy_loss as fused
    return fused(logits, actions, old_logprobs, advantages, mask, clip_coef, temperature,
                 ref_logprobs, kl_coef, ent_coef)
