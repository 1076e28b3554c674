"""The main job: every stage of RLHF in order on the built-in tiny world, then the evaluation.

    python pipeline.py                 # the whole thing on a laptop CPU (see the README for timings)
    python pipeline.py --quick         # every stage at a few-second size: checks the plumbing
    python pipeline.py --out runs/a    # a whole run somewhere else, to compare runs side by side
    python pipeline.py --from ppo      # re-run from one stage on, keeping the earlier ones

Each stage is its own script (read them in this order); this file only calls them one after
another, each in a fresh process, exactly as you would by hand. A stage that fails stops the job.
"""

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

import common

parser = argparse.ArgumentParser(description="Run every RLHF stage on the tiny world")
parser.add_argument("--out", default="out", help="folder for every stage's checkpoint and metrics")
parser.add_argument("--data", default=None, help="folder for the tiny world's data (default: data/, or <out>/data with --out)")
parser.add_argument("--quick", action="store_true", help="every stage at a few-second size")
parser.add_argument("--from", dest="start", default=None, help="first stage to run (earlier ones must exist)")
parser.add_argument("--only", default=None, help="comma-separated stages to run")
parser.add_argument("--device", default="auto")
parser.add_argument("--kernels", default="auto", choices=["auto", "triton", "torch"])
parser.add_argument("--seed", type=int, default=1337)


def stages(out, data, quick):
    """(name, script, arguments, quick-size arguments) in the order they run."""
    o, d = Path(out), Path(data)
    return [
        ("world", "world.py", ["--out", d], ["--n-sft", 400, "--n-prompts", 200, "--n-eval", 64, "--n-paragraphs", 1500]),
        ("tokenizer", "tokenizer.py", ["--data", d / "pretrain.txt", "--out", o / "tokenizer"], ["--vocab-size", 512]),
        ("pretrain", "pretrain.py", ["--data", d / "pretrain.txt", "--tokenizer", o / "tokenizer", "--out", o / "pretrain"],
         ["--steps", 30, "--n-layer", 2, "--n-embd", 64, "--batch-size", 8, "--eval-every", 15]),
    ]


if __name__ == "__main__":
    args = parser.parse_args()
    data = args.data or ("data" if args.out == "out" else str(Path(args.out) / "data"))
    plan = stages(args.out, data, args.quick)
    names = [name for name, *_ in plan]
    if args.start and args.start not in names:
        common.die(f"--from {args.start}: no such stage (stages: {', '.join(names)})")
    only = args.only.split(",") if args.only else None
    for name in only or []:
        if name not in names:
            common.die(f"--only {name}: no such stage (stages: {', '.join(names)})")
    first = names.index(args.start) if args.start else 0

    times = {}
    t_start = time.time()
    for i, (name, script, stage_args, quick_args) in enumerate(plan):
        if i < first or (only and name not in only):
            continue
        cmd = [sys.executable, script, *map(str, stage_args)]
        if name not in ("world", "tokenizer"):
            cmd += ["--seed", str(args.seed), "--device", args.device, "--kernels", args.kernels]
        if args.quick:
            cmd += list(map(str, quick_args))
        print(f"\n=== {name}: {' '.join(shlex.quote(c) for c in cmd[1:])}", flush=True)
        t0 = time.time()
        result = subprocess.run(cmd)
        times[name] = time.time() - t0
        if result.returncode != 0:
            print(f"\npipeline: stage '{name}' failed (exit {result.returncode}); fix it and continue with "
                  f"`python pipeline.py --from {name}{' --quick' if args.quick else ''}`", file=sys.stderr)
            sys.exit(result.returncode)

    print("\n=== done in " + common.format_seconds(time.time() - t_start))
    for name, seconds in times.items():
        print(f"  {name:10s} {common.format_seconds(seconds):>7s}")
    print(f"checkpoints and metrics: {args.out}/<stage>/ (model.pt, meta.json, metrics.jsonl)")
