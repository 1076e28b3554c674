"""A reward model that ignores the answer: the control that says what PPO gains without a judge.

PPO's reward has three parts: the reward model's score of an answer that ended, the fixed penalty
for one that ran out of tokens (ppo.py --missing-end-penalty, -1), and the KL leash to SFT. This
writes a copy of a reward model whose head gives every answer 0, so PPO on it learns from the
penalty and the leash alone: ending its answers, and nothing about which answer is better. A
policy trained on real labels should beat this one, not only SFT. The trunk is kept, so PPO's value
model (which starts from the reward model) starts from the same weights as in the real run.

    python scripts/null_reward.py out/reward out/reward_null
    python ppo.py --reward out/reward_null --eval-data data/val_prompts.jsonl --out out/ppo_null
    python evaluate.py out/sft out/ppo out/ppo_null --best-of 0 --out out/eval_null
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402

parser = common.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("reward", help="a reward model folder (reward.py's --out)")
parser.add_argument("out", help="the folder to write the null reward model to (new or empty)")

if __name__ == "__main__":
    args = parser.parse_args()
    meta = common.load_meta(args.reward, ("reward",), flag="reward")
    state = common.load_state_dict(args.reward)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        common.die(f"{out}: not empty; give a new folder")
    out.mkdir(parents=True, exist_ok=True)
    state["head.weight"].zero_()  # the score no longer depends on the answer's hidden state
    state["head.bias"].zero_()  # ... and is 0: the mean of the normalised reward on SFT answers
    common.atomic_torch_save(state, out / "model.pt")
    meta = {**meta, "null_of": str(args.reward), "final": {}, "reward_norm": None}
    common.atomic_write_json(out / "meta.json", meta)
    print(f"wrote {out}: {args.reward}'s trunk, a head that scores every answer 0 (the missing-end penalty "
          f"and the KL are all PPO will see)")
