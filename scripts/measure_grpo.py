"""What the verifier says of several models: pass@1 and pass@G per verifiable family, on one split.

GRPO can only sharpen what a model already samples, so this is the table that says what RL with a
verifier had to work with (SFT's pass@G) and what it got (the policies' pass@1). G answers per
prompt at temperature 1, each scored by grpo.verify (the truth from the world's data, never a reward
model); pass@1 is the mean over all answers, with its standard error over prompts; pass@G the share
of prompts with at least one right answer among their G.

    python scripts/measure_grpo.py out/sft out/ppo out/grpo                      # test split
    python scripts/measure_grpo.py out/sft --data data/val_prompts.jsonl --group-size 16
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
from grpo import pass_at, verified_groups  # noqa: E402
from world import load_world  # noqa: E402

parser = common.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("models", nargs="+", help="checkpoint folders (sft, ppo, grpo, ...)")
parser.add_argument("--data", default="data/test_prompts.jsonl", help="prompts, with world.json beside them")
parser.add_argument("--families", default="arith,list", help="verifiable families to measure")
parser.add_argument("--group-size", type=common.positive_int, default=8, help="answers per prompt (G)")
parser.add_argument("--max-new-tokens", type=common.positive_int, default=48)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

common.setup_threads()
world = load_world(Path(args.data).parent)
if world is None:
    common.die(f"--data {args.data}: no world.json beside it; the verifier reads the truth from the tiny world")
rows = common.read_jsonl(args.data, required=("prompt",), flag="--data")
families = args.families.split(",")
print(f"{args.data}: G = {args.group_size} answers per prompt, temperature 1, {args.max_new_tokens} new tokens")
print(f"{'model':24s}" + "".join(f" {f + ' pass@1':>20s} {'pass@' + str(args.group_size):>8s}" for f in families))
for folder in args.models:
    model, enc, _ = common.load_policy(folder, "cpu", flag=folder)
    line = f"{folder:24s}"
    for family in families:
        prompts = [r["prompt"] for r in rows if (world.prompt_info(r["prompt"]) or {}).get("family") == family]
        if not prompts:
            line += f" {'(no prompts)':>20s} {'':>8s}"
            continue
        _, _, right = verified_groups(model, enc, world, prompts, args.group_size, "cpu", args.max_new_tokens, 1.0,
                                      torch.Generator().manual_seed(args.seed))
        p1, pg = pass_at(right, args.group_size)
        se = right.view(-1, args.group_size).mean(dim=1).std().item() / len(prompts) ** 0.5
        line += f" {f'{100 * p1:.1f} ± {100 * se:.1f} % (n {len(prompts)})':>20s} {100 * pg:7.0f}%"
    print(line)
