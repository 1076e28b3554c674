"""Exercises: a copy of this repository with the core math cut out, graded by its own tests.

Each exercise is a marked region in a stage file, around the lines that are the idea:

    def compute_gae(rewards, values, mask, gamma=1.0, lam=0.95):
        ...docstring...
        # exercise gae: walk t backwards; delta_t = r_t + gamma V_{t+1} - V_t; A_t = delta_t + gamma lam A_{t+1}
        rewards, values = rewards * mask, values * mask
        ...
        # end exercise

`python exercises.py make course/` copies the repository to course/ with every region's lines
replaced by `raise NotImplementedError("exercise gae: <the hint>")` (the markers stay, so the place
to write is easy to find). The solutions are this repository. Each exercise is graded by the tests
EXERCISES lists for it; tests/conftest.py lets `-k` select them by the exercise's name:

    python exercises.py list                          # the exercises, where they are, their tests
    python exercises.py make course/                  # every exercise cut out
    python exercises.py make course/ --only gae,dpo_loss   # just these (the rest stay solved)
    cd course && python -m pytest tests -k gae        # grade one: fails until compute_gae is written

Regions are independent: each exercise's tests fail on its own stub (with its own message) and
use no other exercise's code, so they can be done in any order, except that the tests of every
stage run the model: do causal_attention first, or make the course --only the ones you want.
tests/test_exercises.py makes the course and checks exactly that.
"""

import argparse
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent

# name -> (what to write, the tests that grade it: tests/<file>::<test function>). In the order of the course.
EXERCISES = {
    "bpe_merge": ("one BPE merge: replace a pair of token ids by the new id, left to right (tokenizer._merge)",
                  ["tests/test_tokenizer.py::test_merge_replaces_the_pair_left_to_right",
                   "tests/test_tokenizer.py::test_learns_frequent_words"]),
    "causal_attention": ("causal self-attention with a KV cache (model.CausalSelfAttention.forward)",
                         ["tests/test_model.py::test_logits_match_reference_attention",
                          "tests/test_model.py::test_cached_generation_equals_uncached",
                          "tests/test_model.py::test_left_padding_changes_nothing"]),
    "sft_mask": ("the SFT inputs and targets, with the prompt and padding masked out (sft.collate)",
                 ["tests/test_sft.py::test_collate_targets_are_the_response_only",
                  "tests/test_sft.py::test_prompt_and_pad_positions_carry_no_loss_and_no_gradient"]),
    "bt_loss": ("the reward model's Bradley-Terry loss, hard and soft labels (reward.bt_loss)",
                      ["tests/test_reward.py::test_bt_loss_on_hand_computed_pairs",
                       "tests/test_reward.py::test_bt_loss_gradient_and_large_margins",
                       "tests/test_rlaif.py::test_soft_bradley_terry_loss_against_a_hand_computation"]),
    "kl_penalty": ("PPO's per-token reward: the KL penalty on every token, the score on the last (ppo.compute_rewards)",
                   ["tests/test_ppo.py::test_rewards_carry_the_score_on_the_last_real_token_only"]),
    "gae": ("generalised advantage estimation over right-padded responses (ppo.compute_gae)",
            ["tests/test_ppo.py::test_gae_vectorised_equals_plain_loop_with_padding"]),
    "ppo_clip": ("PPO's clipped surrogate: the ratio, both sides, the max (ppo.policy_loss)",
                 ["tests/test_kernels.py::test_plain_ppo_policy_loss_is_the_formula"]),
    "dpo_loss": ("the DPO loss and its implicit rewards (dpo.dpo_loss)",
                 ["tests/test_dpo.py::test_dpo_loss_matches_hand_computation"]),
    "grpo_advantage": ("GRPO's group-relative advantage, and Dr. GRPO's (grpo.group_advantages)",
                       ["tests/test_grpo.py::test_group_advantages_by_hand_including_a_group_of_equal_rewards"]),
    "ai_preference": ("the AI labeller's preference, both orders averaged (rlaif.choice_prob, rlaif.soft_label)",
                      ["tests/test_rlaif.py::test_the_ai_preference_by_hand"]),
}

START = re.compile(r"^(?P<indent>\s*)# exercise (?P<name>\w+): (?P<hint>.+)$")
END = re.compile(r"^\s*# end exercise\s*$")
SKIP = {".git", ".venv", ".ci-venv", "__pycache__", ".pytest_cache", "out", "data", "gpu_out", "wheels"}


def die(message):
    print(f"exercises.py: {message}", file=sys.stderr)
    sys.exit(2)


def regions(path):
    """[(name, hint, indent, first line, last line)] of the marked regions of a file (1-based line numbers
    of the two markers). A marker out of place is an error naming the file and line."""
    found, open_at = [], None
    for n, line in enumerate(path.read_text().splitlines(), 1):
        start, end = START.match(line), END.match(line)
        if start and open_at:
            die(f"{path}:{n}: a new exercise starts inside the one opened at line {open_at[3]}")
        if start:
            if start["name"] not in EXERCISES:
                die(f"{path}:{n}: exercise {start['name']!r} is not in exercises.EXERCISES")
            open_at = (start["name"], start["hint"].strip(), start["indent"], n)
        elif end:
            if not open_at:
                die(f"{path}:{n}: '# end exercise' without an exercise open")
            found.append((*open_at, n))
            open_at = None
    if open_at:
        die(f"{path}:{open_at[3]}: exercise {open_at[0]!r} never ends ('# end exercise')")
    return found


def all_regions(root=ROOT):
    """{path relative to root: its regions} for every top-level Python file that has one."""
    paths = sorted(p for p in root.glob("*.py") if p.name != "exercises.py")  # the stages are flat
    return {p.relative_to(root): found for p in paths if (found := regions(p))}


def stub(text, found, only):
    """The text with the lines of each region in `only` replaced by one raise, at the marker's indent."""
    lines = text.splitlines(keepends=True)
    for name, hint, indent, first, last in reversed(found):  # from the bottom: earlier line numbers stay valid
        if name in only:
            message = f"exercise {name}: {hint}"
            lines[first:last - 1] = [f"{indent}raise NotImplementedError({message!r})\n"]
    return "".join(lines)


def make(dest, only):
    dest = Path(dest).resolve()
    if dest.exists() and any(dest.iterdir()):
        die(f"{dest} exists and is not empty: choose a new folder")
    found = all_regions()
    missing = set(EXERCISES) - {name for regs in found.values() for name, *_ in regs}
    if missing:
        die(f"no region marked for {sorted(missing)} (the markers are '# exercise NAME: hint' ... '# end exercise')")

    def ignore(folder, names):  # what the copy leaves out: runs, environments, caches, and the course itself
        return [n for n in names if n in SKIP or n.startswith(".venv") or (Path(folder) / n).resolve() == dest]
    shutil.copytree(ROOT, dest, ignore=ignore, dirs_exist_ok=True)
    for rel, regs in found.items():
        (dest / rel).write_text(stub((ROOT / rel).read_text(), regs, only))
    print(f"made {dest}: {len(only)} exercise(s) cut out, {sum(len(r) for r in found.values())} region(s) in "
          f"{len(found)} file(s). Grade one with: cd {dest} && python -m pytest tests -k <exercise>")


def show():
    where = {}
    for rel, regs in all_regions().items():
        for name, _, _, first, _ in regs:
            where.setdefault(name, []).append(f"{rel}:{first}")
    for name, (what, tests) in EXERCISES.items():
        print(f"{name:16s} {what}\n{'':16s} in {', '.join(where.get(name, ['(no region marked)']))}; "
              f"{len(tests)} test(s): -k {name}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the exercises, where they are, how they are graded")
    p = sub.add_parser("make", help="write a copy of the repository with the exercises cut out")
    p.add_argument("dest", help="a new folder (e.g. course/)")
    p.add_argument("--only", default=",".join(EXERCISES), help="comma-separated exercise names (default: all)")
    args = parser.parse_args()
    if args.command == "list":
        show()
    else:
        only = [n for n in args.only.split(",") if n]
        if unknown := [n for n in only if n not in EXERCISES]:
            die(f"--only: unknown exercise(s) {unknown}; `python exercises.py list` shows them")
        make(args.dest, set(only))
