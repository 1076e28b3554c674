"""GPU benchmark of the fused kernels: time, achieved bandwidth against the floor, peak memory.

    python kernels/bench.py                                   # every op, N x V grid below
    python kernels/bench.py --n 8192 --v 50257 --ops logprobs_fwd ppo_fwd_bwd
    python kernels/bench.py --out gpu_out/bench.md            # also gpu_out/bench.json
    python kernels/bench.py --sweep --n 8192 --out gpu_out/sweep.md   # our launch configurations

bf16 logits, N tokens (as B sequences of --seq-len), V in {50257 (GPT-2), 128256 (Llama 3)}.
For each op it runs, side by side:
  ours     the Triton kernels (kernels.*)
  eager    the stages' plain PyTorch that the kernels compute (sampling.token_logprobs,
           ppo.kl_per_token(..., "full"), ppo.policy_loss), run with --kernels torch
  compile  torch.compile of that plain PyTorch
  liger    Liger-Kernel where it has the op and is installed: its fused cross-entropy stands in
           for token log-probs (log-prob only, no entropy), its GRPO loss for the PPO loss
           (per-sequence advantages, inplace=False); it has no exact-KL-from-logits op

Columns:
  ms        median time of triton.testing.do_bench (CUDA events, L2 flushed between runs)
  GB/s      bytes that must move / time, with the bytes counted explicitly (bf16, 2 bytes each):
              logprobs_fwd       N V 2        read the logits once
              logprobs_fwd_bwd   N V 2 x 2    read them once, write dlogits once
              ppo_fwd            N V 2        the PPO loss's forward alone (no gradient)
              ppo_fwd_bwd        N V 2 x 2    same as logprobs_fwd_bwd
              kl_fwd_bwd         N V 2 x 3    read both logits once, write dlogits once
            (our kernels move 1, 3, 3 and 5 such units: the backward re-reads the logits rather
            than keep [N, V] probabilities; the small per-token vectors are left out)
  % floor   the bandwidth floor (bytes above / device-to-device copy bandwidth, measured in this
            run by timing a 2 GiB copy_) as a percentage of the time: 100 % = at the floor
  % pract.  the same against the practical floor of a kernel that keeps no [N, V] tensor between
            forward and backward (1, 3, 3 and 5 units: the backward reads the logits again)
  peak MiB  torch.cuda.max_memory_allocated during one call minus what was allocated before it
            (the inputs); includes the returned dlogits for the fwd+bwd ops
  extra MiB peak MiB minus the dlogits every implementation must return (N V 2 bytes; 0 for the
            forward): the memory an implementation adds, O(N) for ours

--sweep times our kernels alone under other launch configurations (BLOCK_V / num_warps of the
row-reduction forward and of the streaming backward, one kernel varied at a time) and writes that
table instead: the measurements the launch rule in kernels/logprobs.py is chosen from.

Configurations that run out of memory are reported as OOM and skipped. Needs a CUDA GPU; on a
machine without one it exits with a message (`--help` works anywhere).
"""

import argparse
import gc
import json
import os
import sys

# `python kernels/bench.py` puts kernels/ first on sys.path; we want the repo root instead
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = ROOT
elif ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DEVICE = "cuda"
OPS = ["logprobs_fwd", "logprobs_fwd_bwd", "ppo_fwd", "ppo_fwd_bwd", "kl_fwd_bwd"]
IMPLS = ["ours", "eager", "compile", "liger"]
FLOOR_UNITS = {"logprobs_fwd": 1, "logprobs_fwd_bwd": 2, "ppo_fwd": 1, "ppo_fwd_bwd": 2,
               "kl_fwd_bwd": 3}
PRACTICAL_UNITS = {"logprobs_fwd": 1, "logprobs_fwd_bwd": 3, "ppo_fwd": 1, "ppo_fwd_bwd": 3,
                   "kl_fwd_bwd": 5}
# --sweep: (kernel varied, op that times it, [(BLOCK_V, num_warps), ...])
SMALL = [(1024, 1), (2048, 1), (2048, 2), (2048, 4), (4096, 2), (4096, 4), (8192, 4), (16384, 32)]
SWEEP = [("fwd", "logprobs_fwd", SMALL), ("fwd", "ppo_fwd", SMALL),
         ("bwd", "logprobs_fwd_bwd", [(2048, 2), (4096, 4), (8192, 8), (16384, 32)]),
         ("kl", "kl_fwd_bwd", [(2048, 2), (4096, 4), (8192, 8), (8192, 16)])]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("grid")
    g.add_argument("--n", type=int, nargs="+", default=[8192, 32768], help="tokens per batch")
    g.add_argument("--v", type=int, nargs="+", default=[50257, 128256], help="vocabulary sizes")
    g.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (B = N / T)")
    g.add_argument("--ops", nargs="+", choices=OPS, default=OPS)
    g.add_argument("--impls", nargs="+", choices=IMPLS, default=IMPLS)
    g.add_argument("--sweep", action="store_true", help="time our kernels under the launch "
                   "configurations in SWEEP instead of the comparison table")
    t = p.add_argument_group("timing")
    t.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    t.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, help="also write the table here (Markdown) and "
                                               "the rows as JSON beside it (.json)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# measurement helpers
# ---------------------------------------------------------------------------------------------

def copy_bandwidth(do_bench, torch):
    """Device-to-device copy bandwidth in bytes/s (read + write), from a 2 GiB copy_."""
    n_bytes = 1 << 30
    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    del src, dst
    return 2 * n_bytes / (ms * 1e-3)


def measure(fn, do_bench, torch, args):
    """(median ms, peak extra MiB) of fn()."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    del out
    ms = do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")
    return ms, peak


def load_liger():
    """({"none": ce, "sum": ce} or None, grpo_apply or None), printing what is missing."""
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
        ce = {"none": LigerCrossEntropyLoss(reduction="none"),
              "sum": LigerCrossEntropyLoss(reduction="sum")}
    except Exception as e:  # not installed, or a version without it
        print(f"liger-kernel cross-entropy: not installed ({type(e).__name__}: {e})")
        ce = None
    try:
        from liger_kernel.ops.grpo_loss import GrpoLossFunction
        grpo = GrpoLossFunction.apply
    except Exception as e:
        print(f"liger-kernel GRPO loss: not installed ({type(e).__name__}: {e})")
        grpo = None
    return ce, grpo


# ---------------------------------------------------------------------------------------------
# the ops: each returns {impl: fn or reason-string}
# ---------------------------------------------------------------------------------------------

def build_logprobs(torch, kernels, reference, compiled, liger_ce, N, V, backward):
    logits = torch.randn(N, V, device=DEVICE, dtype=torch.bfloat16) * 2
    targets = torch.randint(0, V, (N,), device=DEVICE)
    g_logp = torch.randn(N, device=DEVICE)
    g_ent = torch.randn(N, device=DEVICE)
    if backward:
        logits.requires_grad_(True)

    def run(f):
        if not backward:
            def fwd():
                with torch.no_grad():
                    return f(logits, targets)
            return fwd

        def fwd_bwd():
            logp, entropy = f(logits, targets)
            return torch.autograd.grad((logp, entropy), logits, (g_logp, g_ent))
        return fwd_bwd

    fns = {
        "ours": run(lambda x, t: kernels.token_logprobs(x, t, 1.0)),
        "eager": run(lambda x, t: reference.token_logprobs(x, t, 1.0)),
        "compile": run(lambda x, t: compiled["token_logprobs"](x, t, 1.0)),
    }
    if liger_ce is None:
        fns["liger"] = "not installed"
    elif not backward:
        def liger_fwd():
            with torch.no_grad():
                return liger_ce["none"](logits, targets)
        fns["liger"] = liger_fwd
    else:
        # log-prob only (cross-entropy = -logp), summed (a scalar upstream gradient is what its
        # backward expects); runs last: Liger writes its gradient into the logits buffer
        fns["liger"] = lambda: torch.autograd.grad(liger_ce["sum"](logits, targets), logits)
    return fns


def build_ppo(torch, kernels, reference, compiled, liger_grpo, N, V, T, backward=True):
    B = N // T
    logits_full = (torch.randn(B, T + 1, V, device=DEVICE, dtype=torch.bfloat16) * 2)
    logits_full.requires_grad_(backward)
    actions = torch.randint(0, V, (B, T), device=DEVICE)
    with torch.no_grad():
        logp, _ = kernels.token_logprobs(logits_full[:, :-1], actions)
    old = logp + 0.1 * torch.randn_like(logp)
    ref = logp + 0.1 * torch.randn_like(logp)
    adv_seq = torch.randn(B, device=DEVICE)
    adv = adv_seq[:, None].expand(B, T).contiguous()
    mask = torch.rand(B, T, device=DEVICE) > 0.1
    kw = dict(clip_coef=0.2, temperature=1.0, ref_logprobs=ref, kl_coef=0.05)

    # ours and the references read the [B, T, V] view logits[:, :-1] (no copy for ours), and
    # the gradient is taken with respect to that view, so no slice-backward copy is timed
    logits = logits_full[:, :-1]

    def run(f):
        def fwd():
            with torch.no_grad():
                return f(logits, actions, old, adv, mask, **kw)

        def fwd_bwd():
            loss, _ = f(logits, actions, old, adv, mask, **kw)
            return torch.autograd.grad(loss, logits)
        return fwd_bwd if backward else fwd

    fns = {
        "ours": run(kernels.ppo_policy_loss),
        "eager": run(reference.ppo_policy_loss),
        "compile": run(lambda *a, **k: compiled["ppo_policy_loss"](*a, **k)),
    }
    if liger_grpo is None:
        fns["liger"] = "not installed"
    else:
        def liger():
            # (logits [B, T+1, V], old, ref, ids, advantages [B], mask, temperature, beta,
            #  eps_low, eps_high, inplace); older versions return per-token losses
            out = liger_grpo(logits_full, old, ref, actions, adv_seq, mask, 1.0, 0.05, 0.2, 0.2,
                             False)
            loss = out[0] if isinstance(out, (tuple, list)) else out
            if loss.dim() > 0:
                m = mask.float()
                loss = (loss * m).sum() / m.sum().clamp(min=1)
            return torch.autograd.grad(loss, logits_full) if backward else loss
        fns["liger"] = liger
    return fns


def build_kl(torch, kernels, reference, compiled, N, V):
    logits = (torch.randn(N, V, device=DEVICE, dtype=torch.bfloat16) * 2).requires_grad_(True)
    ref_logits = logits.detach() + torch.randn(N, V, device=DEVICE, dtype=torch.bfloat16) * 0.3
    g = torch.randn(N, device=DEVICE)

    def run(f):
        return lambda: torch.autograd.grad(f(logits, ref_logits), logits, g)

    return {
        "ours": run(lambda x, y: kernels.kl_divergence(x, y, 1.0)),
        "eager": run(lambda x, y: reference.kl_divergence(x, y, 1.0)),
        "compile": run(lambda x, y: compiled["kl_divergence"](x, y, 1.0)),
        "liger": "no exact-KL-from-logits op",
    }


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def markdown(rows):
    head = "| op | N | V | impl | ms | GB/s | % floor | % pract. | peak MiB | extra MiB | note |"
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        f = lambda k, fmt: (fmt % r[k]) if r.get(k) is not None else ""  # noqa: E731
        lines.append(f"| {r['op']} | {r['N']} | {r['V']} | {r['impl']} | {f('ms', '%.3f')} | "
                     f"{f('gbps', '%.0f')} | {f('floor_pct', '%.0f')} | {f('practical_pct', '%.0f')} | "
                     f"{f('peak_mib', '%.0f')} | {f('extra_mib', '%.0f')} | {r.get('note', '')} |")
    return "\n".join(lines)


def timed_row(base, impl, fn, bw, do_bench, torch, args):
    """One table row: time fn, convert to GB/s and % of the floors; errors become a note."""
    op, N, V = base["op"], base["N"], base["V"]
    row = {**base, "impl": impl}
    if isinstance(fn, str):
        row["note"] = fn
        return row
    try:
        ms, peak = measure(fn, do_bench, torch, args)
        floor_bytes = FLOOR_UNITS[op] * N * V * 2
        dlogits_mib = 0 if op.endswith("_fwd") else N * V * 2 / 2**20
        row.update(ms=ms, peak_mib=peak, extra_mib=peak - dlogits_mib,
                   gbps=floor_bytes / (ms * 1e-3) / 1e9,
                   floor_pct=100.0 * (floor_bytes / bw) / (ms * 1e-3),
                   practical_pct=100.0 * (PRACTICAL_UNITS[op] * N * V * 2 / bw) / (ms * 1e-3))
    except torch.cuda.OutOfMemoryError:
        row["note"] = "OOM"
    except Exception as e:  # a compile or liger failure must not stop the run
        row["note"] = f"error: {type(e).__name__}: {str(e)[:80]}"
    gc.collect()
    torch.cuda.empty_cache()
    return row


def build(op, torch, kernels, reference, compiled, liger_ce, liger_grpo, N, V, args):
    """{impl: fn or reason} for one op at one shape."""
    if op in ("logprobs_fwd", "logprobs_fwd_bwd"):
        return build_logprobs(torch, kernels, reference, compiled, liger_ce, N, V,
                              backward=op == "logprobs_fwd_bwd")
    if op in ("ppo_fwd", "ppo_fwd_bwd"):
        T = args.seq_len if N % args.seq_len == 0 else N
        return build_ppo(torch, kernels, reference, compiled, liger_grpo, N, V, T,
                         backward=op == "ppo_fwd_bwd")
    return build_kl(torch, kernels, reference, compiled, N, V)


def sweep(args, bw, do_bench, torch, kernels, reference, header, meta):
    """Our kernels alone under each launch configuration, one kernel varied at a time."""
    from kernels import logprobs
    rows = []
    for N in args.n:
        for V in args.v:
            for kind, op, configs in SWEEP:
                fns = build(op, torch, kernels, reference, {}, None, None, N, V, args)
                for block, warps in configs:
                    logprobs.LAUNCH_OVERRIDE.clear()
                    logprobs.LAUNCH_OVERRIDE[kind] = (block, warps)
                    row = timed_row({"op": op, "N": N, "V": V}, f"ours {kind} {block}/{warps}",
                                    fns["ours"], bw, do_bench, torch, args)
                    rows.append(row)
                    print(markdown([row]).splitlines()[-1], flush=True)
                    if args.out:
                        write_out(args.out, header, rows, meta)
                logprobs.LAUNCH_OVERRIDE.clear()
                default = timed_row({"op": op, "N": N, "V": V}, "ours default", fns["ours"], bw,
                                    do_bench, torch, args)
                rows.append(default)
                print(markdown([default]).splitlines()[-1], flush=True)
                del fns
                gc.collect()
                torch.cuda.empty_cache()
    print("\n" + header + markdown(rows))
    if args.out:
        write_out(args.out, header, rows, meta)
        print(f"wrote {args.out}")


def plain_pytorch(kernels):
    """The stages' plain PyTorch of the three ops (what the kernels compute and are tested against),
    under the names of the kernels: the 'eager' and 'compile' rows."""
    import types

    import ppo
    import sampling
    kernels.set_backend("torch")  # the stage functions run their plain PyTorch on CUDA tensors too
    return types.SimpleNamespace(
        token_logprobs=sampling.token_logprobs, ppo_policy_loss=ppo.policy_loss,
        kl_divergence=lambda logits, ref_logits, t: ppo.kl_per_token(None, None, "full", logits, ref_logits, t))


def main(argv=None):
    args = parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        sys.exit("kernels/bench.py: no CUDA device here; this benchmark needs a GPU "
                 "(the CPU tests are `python -m pytest tests/test_kernels.py`)")
    try:
        import triton
        from triton.testing import do_bench
    except ImportError:
        sys.exit("kernels/bench.py: triton is not installed")
    import kernels
    reference = plain_pytorch(kernels)

    dev = torch.cuda.get_device_name()
    bw = copy_bandwidth(do_bench, torch)
    print(f"device {dev} | torch {torch.__version__} | triton {triton.__version__} | "
          f"copy bandwidth {bw / 1e9:.0f} GB/s")
    header = (f"Device: {dev}; torch {torch.__version__}, triton {triton.__version__}; "
              f"measured copy bandwidth {bw / 1e9:.0f} GB/s; bf16 logits.\n\n")
    meta = {"device": dev, "torch": torch.__version__, "triton": triton.__version__,
            "copy_bandwidth_gbps": bw / 1e9}
    if args.sweep:
        return sweep(args, bw, do_bench, torch, kernels, reference, header, meta)
    args.impls = [i for i in IMPLS if i in args.impls]  # liger last: it overwrites its input
    liger_ce, liger_grpo = (None, None)
    if "liger" in args.impls:
        liger_ce, liger_grpo = load_liger()
    compiled = {}
    if "compile" in args.impls:
        compiled = {name: torch.compile(getattr(reference, name))
                    for name in ("token_logprobs", "kl_divergence", "ppo_policy_loss")}

    rows = []
    for N in args.n:
        for V in args.v:
            for op in args.ops:
                base = {"op": op, "N": N, "V": V}
                try:
                    fns = build(op, torch, kernels, reference, compiled, liger_ce, liger_grpo,
                                N, V, args)
                except torch.cuda.OutOfMemoryError:
                    rows.append({**base, "impl": "-", "note": "OOM allocating the inputs"})
                    if args.out:
                        write_out(args.out, header, rows, meta)
                    print(f"{op} N={N} V={V}: OOM allocating the inputs, skipped")
                    gc.collect()
                    torch.cuda.empty_cache()
                    continue
                for impl in args.impls:
                    row = timed_row(base, impl, fns.get(impl), bw, do_bench, torch, args)
                    rows.append(row)
                    print(markdown([row]).splitlines()[-1], flush=True)
                    if args.out:
                        write_out(args.out, header, rows, meta)
                del fns
                gc.collect()
                torch.cuda.empty_cache()

    print("\n" + header + markdown(rows))
    if args.out:
        print(f"wrote {args.out}")


def write_out(path, header, rows, meta):
    """Write the table (Markdown) and the rows (JSON beside it); called after every row so that
    a run cut short by a time limit still leaves what it measured."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(header + markdown(rows) + "\n")
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
