"""Fused kernels for the log-prob, KL and PPO-loss work, each beside its PyTorch reference.

    from kernels import set_backend, token_logprobs, kl_divergence, ppo_policy_loss

Which implementation runs (the `backend` argument if given, else the global `set_backend`):
  "auto"   (default) Triton for CUDA tensors when triton is importable, the reference otherwise
  "triton" always the Triton kernels; on CPU tensors this needs TRITON_INTERPRET=1 set before
           triton is imported (how the tests run them)
  "torch"  always the plain PyTorch reference (`kernels/reference.py`)

`import kernels` never imports triton: the kernel modules load on first use, so this package
works on machines without triton (macOS, CPU boxes), where only the reference is available.

Files: reference.py (the math, in plain PyTorch), logprobs.py, kl.py, ppo_loss.py (one fused op
each, written like a Triton tutorial), bench.py (GPU benchmark).
"""

import importlib.util
import os

from . import reference

__all__ = ["set_backend", "get_backend", "token_logprobs", "kl_divergence", "ppo_policy_loss"]

BACKENDS = ("auto", "triton", "torch")
_backend = "auto"


def set_backend(name: str) -> None:
    """Choose the implementation for every later call: "auto" | "triton" | "torch"."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown kernels backend {name!r}: choose one of {', '.join(BACKENDS)}")
    _backend = name


def get_backend() -> str:
    return _backend


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _use_triton(x, backend):
    """True when this call should run the Triton kernels on tensor x."""
    name = _backend if backend is None else backend
    if name not in BACKENDS:
        raise ValueError(f"unknown kernels backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if name == "torch":
        return False
    if name == "auto":
        return x.is_cuda and triton_available()
    if not triton_available():
        raise RuntimeError("kernels backend 'triton' was asked for but triton is not installed "
                           "(pip install triton, on Linux); use the 'torch' or 'auto' backend")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("kernels backend 'triton' on CPU tensors needs the Triton interpreter: "
                           "set TRITON_INTERPRET=1 before triton is imported, or use a CUDA device")
    return True


def token_logprobs(logits, targets, temperature=1.0, backend=None):
    """Log-prob of `targets` and entropy under softmax(logits / temperature).

    logits [..., V] (fp32/bf16/fp16), targets [...] int64 -> (logp [...], entropy [...]) float32;
    differentiable in logits through both outputs.
    """
    if _use_triton(logits, backend):
        from .logprobs import token_logprobs as fused
        return fused(logits, targets, temperature)
    return reference.token_logprobs(logits, targets, temperature)


def kl_divergence(logits, ref_logits, temperature=1.0, backend=None):
    """Exact per-token KL(pi || pi_ref) over the vocabulary, both at `temperature`.

    logits, ref_logits [..., V] -> kl [...] float32; gradient to `logits` only.
    """
    if _use_triton(logits, backend):
        from .kl import kl_divergence as fused
        return fused(logits, ref_logits, temperature)
    return reference.kl_divergence(logits, ref_logits, temperature)


def ppo_policy_loss(logits, actions, old_logprobs, advantages, mask, clip_coef=0.2,
                    temperature=1.0, ref_logprobs=None, kl_coef=0.0, kl_estimator="k3",
                    ent_coef=0.0, backend=None):
    """PPO clipped-surrogate loss straight from the logits, masked mean over real tokens.

    Returns (loss, stats): loss a 0-dim float32 tensor differentiable in logits; stats a dict of
    0-dim float32 device tensors (clipfrac, approx_kl, entropy, ratio_mean, pg_loss, kl).
    See kernels/reference.py::ppo_policy_loss for the exact formulas.
    """
    args = (logits, actions, old_logprobs, advantages, mask, clip_coef, temperature,
            ref_logprobs, kl_coef, kl_estimator, ent_coef)
    if _use_triton(logits, backend):
        from .ppo_loss import ppo_policy_loss as fused
        return fused(*args)
    return reference.ppo_policy_loss(*args)
