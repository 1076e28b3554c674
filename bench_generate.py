"""How much the KV cache buys: batched sampling with and without it, on the CPU by default.

Without the cache, step t runs the model on the whole sequence so far (prompt + t tokens), so the
work grows with t; with it, step t runs on one new token per row and attends to the stored keys
and values. A benchmark, not a test.

    python bench_generate.py                      # default GPTConfig, batch 64, 64 new tokens
    python bench_generate.py --device cuda --batch-size 256
"""

import argparse
import statistics
import time

import torch

from model import GPT, GPTConfig, left_pad

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--prompt-len", type=int, default=16, help="longest prompt; others are 8..prompt-len")
parser.add_argument("--new-tokens", type=int, default=64)
parser.add_argument("--runs", type=int, default=3, help="timed runs per mode (median reported)")
parser.add_argument("--device", default="cpu")
parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)

config = GPTConfig()
torch.manual_seed(0)
model = GPT(config).to(args.device).eval()
g = torch.Generator().manual_seed(0)
lengths = torch.randint(max(1, args.prompt_len // 2), args.prompt_len + 1, (args.batch_size,), generator=g)
prompts = [torch.randint(0, config.vocab_size, (int(n),), generator=g).tolist() for n in lengths]
idx, mask = left_pad(prompts, pad_id=0, device=args.device)
print(f"model: {model.num_params() / 1e6:.2f}M params ({config.n_layer} layers, {config.n_embd} wide) | "
      f"device {args.device}, {torch.get_num_threads()} threads | batch {args.batch_size}, "
      f"prompts {idx.size(1)} tokens (left-padded), {args.new_tokens} new tokens")


def timed(use_cache):
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(idx, mask, args.new_tokens, temperature=1.0, use_cache=use_cache,
                         generator=torch.Generator(args.device).manual_seed(1))
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


results = {}
for use_cache in (True, False):
    timed(use_cache)  # warm-up
    runs = [timed(use_cache) for _ in range(args.runs)]
    results[use_cache] = statistics.median(t for t, _ in runs)
    n_tokens = runs[0][1].numel()

print(f"\n{'mode':<12}{'median s':>10}{'tokens/s':>12}{'speedup':>9}")
for use_cache, name in ((False, "no cache"), (True, "KV cache")):
    t = results[use_cache]
    print(f"{name:<12}{t:>10.3f}{n_tokens / t:>12,.0f}{results[False] / t:>8.1f}x")
