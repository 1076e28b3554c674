"""Run every lesson of docs/course.md against a finished pipeline run, and print the numbers it quotes.

The commands are read from docs/course.md itself (each lesson's ```bash block), so the page and
what runs cannot drift apart. Their paths start with out/ and data/: they are moved to the run
folder given and to its data folder. Each lesson writes only to <run>/course/<lesson>/.

    python scripts/run_course.py                      # the default run: out/ and data/
    python scripts/run_course.py runs/a               # a run of pipeline.py --out runs/a (data: runs/a/data)
    python scripts/run_course.py --only kl_leash,grpo # some lessons
    python scripts/run_course.py /tmp/q --quick       # every command at a few-second size (a plumbing check)

At the end it prints one line per lesson with the figures its "What you will see" quotes, and
writes them to <run>/course/numbers.json.
"""

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COURSE = ROOT / "docs" / "course.md"

# --quick: appended to each script's command (argparse keeps the last value of a repeated flag);
# the sizes of pipeline.py --quick
QUICK = {
    "pretrain.py": "--steps 5 --eval-every 5 --n-layer 2 --n-embd 64 --batch-size 8 --warmup-steps 2",
    "sft.py": "--steps 5 --batch-size 8 --eval-every 5 --eval-prompts 16",
    "feedback.py": "--steps 40",
    "reward.py": "--steps 5 --batch-size 8 --eval-every 5 --norm-samples 256",
    "ppo.py": "--steps 2 --batch-size 8 --minibatch-size 4 --ppo-epochs 1 --max-new-tokens 16 --eval-prompts 16 "
              "--eval-every 2 --sample-every 2",
    "dpo.py": "--steps 5 --batch-size 8 --eval-every 5 --eval-prompts 8",
    "grpo.py": "--steps 2 --prompts-per-step 4 --group-size 2 --max-new-tokens 16 --eval-prompts 8 --eval-every 2 "
               "--sample-every 2",
    "rlaif.py": "--steps 5 --batch-size 8 --eval-every 5 --examples-per-contrast 20",
    "evaluate.py": "--n-prompts 32 --max-new-tokens 16",
    "chat.py": "--max-new-tokens 8",
}

# What each lesson quotes: (label, file under the run folder, key). A meta.json key is read from
# "final"; a results.json key is "model:field"; a metrics.jsonl key is every logged value of it.
REPORT = {
    "pretrain": [("bpe300 fact_accuracy", "course/pretrain/bpe300/meta.json", "eval/fact_accuracy"),
                 ("bpe1024 fact_accuracy", "course/pretrain/bpe1024/meta.json", "eval/fact_accuracy"),
                 ("bpe300 sum_accuracy", "course/pretrain/bpe300/meta.json", "eval/sum_accuracy"),
                 ("bpe1024 sum_accuracy", "course/pretrain/bpe1024/meta.json", "eval/sum_accuracy"),
                 ("bpe300 val/loss", "course/pretrain/bpe300/meta.json", "val/loss"),
                 ("bpe1024 val/loss", "course/pretrain/bpe1024/meta.json", "val/loss")],
    "sft": [("pretrained gold", "course/sft/steps50/meta.json", "eval/gold_reward_pretrain"),
            ("sft 50 steps gold", "course/sft/steps50/meta.json", "eval/gold_reward"),
            ("ideal gold", "course/sft/steps50/meta.json", "eval/gold_reward_ideal")],
    "labeller": [("tau2 agreement_gold", "course/labeller/tau2/meta.json", "feedback/agreement_gold"),
                 ("tau2 acc_gold", "course/labeller/reward_tau2/meta.json", "reward/acc_gold"),
                 ("tenth agreement_gold", "course/labeller/tenth/meta.json", "feedback/agreement_gold"),
                 ("tenth acc_gold", "course/labeller/reward_tenth/meta.json", "reward/acc_gold")],
    "kl_leash": [("kl0 gold", "course/kl_leash/kl0/metrics.jsonl", "eval/gold_reward"),
                 ("kl0 proxy", "course/kl_leash/kl0/metrics.jsonl", "eval/proxy_score"),
                 ("kl0 kl", "course/kl_leash/kl0/metrics.jsonl", "eval/kl_to_sft")],
    "sycophancy": [("sft sycophancy", "course/sycophancy/eval/results.json", "sft:sycophancy_rate"),
                   ("ppo sycophancy", "course/sycophancy/eval/results.json", "ppo:sycophancy_rate"),
                   ("ppo_agree5 sycophancy", "course/sycophancy/eval/results.json", "ppo_agree5:sycophancy_rate"),
                   ("ppo gold", "course/sycophancy/eval/results.json", "ppo:gold_reward"),
                   ("ppo_agree5 gold", "course/sycophancy/eval/results.json", "ppo_agree5:gold_reward")],
    "dpo_beta": [("beta0.05 gold", "course/dpo_beta/beta0.05/meta.json", "eval/gold_reward"),
                 ("beta0.05 kl", "course/dpo_beta/beta0.05/meta.json", "eval/kl_to_sft"),
                 ("beta2 gold", "course/dpo_beta/beta2/meta.json", "eval/gold_reward"),
                 ("beta2 kl", "course/dpo_beta/beta2/meta.json", "eval/kl_to_sft")],
    "constitution": [("ppo_rlaif look-alikes refused", "course/constitution/eval/results.json",
                      "ppo_rlaif:over_refusal_rate_lookalike"),
                     ("ppo_no_harmless look-alikes refused", "course/constitution/eval/results.json",
                      "ppo_no_harmless:over_refusal_rate_lookalike"),
                     ("ppo_rlaif unsafe refused", "course/constitution/eval/results.json",
                      "ppo_rlaif:refusal_rate_unsafe"),
                     ("ppo_no_harmless unsafe refused", "course/constitution/eval/results.json",
                      "ppo_no_harmless:refusal_rate_unsafe"),
                     ("AI labels agreement_gold", "course/constitution/feedback_ai/meta.json",
                      "feedback/agreement_gold")],
    "grpo": [(f"{m} {f}", "course/grpo/eval/results.json", f"{m}:{f}")
             for m in ("ppo", "grpo", "kl0.05")
             for f in ("correct_arith", "refusal_rate_unsafe", "gold_reward", "kl_to_sft")],
}


def lessons(text=None):
    """[(name, title, [command, ...])] from docs/course.md: a '## N. Title (`name`)' heading, then the
    first ```bash block under it; one command per line."""
    text = COURSE.read_text() if text is None else text
    out = []
    for m in re.finditer(r"^## \d+\. (.+?) \(`(\w+)`\)\n(.*?)(?=^## |\Z)", text, re.S | re.M):
        title, name, body = m.groups()
        block = re.search(r"^```bash\n(.*?)^```", body, re.S | re.M)
        commands = [c.strip() for c in block.group(1).splitlines() if c.strip()] if block else []
        out.append((name, title, commands))
    return out


def relocate(command, run, data):
    """out/... -> <run>/..., data/... -> <data>/... wherever a path starts (also after a comma)."""
    command = re.sub(r"(?<![\w/.-])out/", f"{run}/", command)
    return re.sub(r"(?<![\w/.-])data/", f"{data}/", command)


def value(run, path, key):
    p = (ROOT / run) / path
    if not p.exists():
        return "missing"
    if p.name == "metrics.jsonl":
        xs = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        return " ".join(f"{r['step']}:{r[key]:.3f}" for r in xs if r.get(key) is not None)
    if p.name == "results.json":
        model, field = key.split(":")
        rows = {r["name"]: r for r in json.loads(p.read_text())}
        v = rows.get(model, {}).get(field)
    else:
        v = json.loads(p.read_text()).get("final", {}).get(key)
    return "missing" if v is None else f"{v:.3f}"


def main():
    parser = argparse.ArgumentParser(description="run every lesson of docs/course.md and print its numbers")
    parser.add_argument("run", nargs="?", default="out", help="a finished pipeline.py run (default: out)")
    parser.add_argument("--data", default=None, help="its data folder (default: <run>/data if it exists, else data)")
    parser.add_argument("--only", default=None, help="comma-separated lessons")
    parser.add_argument("--quick", action="store_true", help="every command at a few-second size (numbers mean nothing)")
    args = parser.parse_args()
    here = lambda p: str(Path(p).resolve()) if Path(p).resolve() != (ROOT / p).resolve() else p.rstrip("/")  # noqa: E731
    run = here(args.run)  # the commands run in the repository; paths given from elsewhere are made absolute
    data = here(args.data or (f"{args.run}/data" if (Path(args.run) / "data").is_dir() else "data"))
    chosen = args.only.split(",") if args.only else None
    todo = [lesson for lesson in lessons() if chosen is None or lesson[0] in chosen]
    if chosen and len(todo) != len(chosen):
        sys.exit(f"--only: unknown lesson among {args.only} (the lessons: {', '.join(n for n, _, _ in lessons())})")
    times = {}
    for name, title, commands in todo:
        print(f"=== lesson {name}: {title}", flush=True)
        start = time.time()
        for command in commands:
            command = relocate(command, run, data)
            words = shlex.split(command)
            if words[0] == "python":
                if args.quick and words[1] in QUICK:
                    command += " " + QUICK[words[1]]
                command = shlex.quote(sys.executable) + command[len("python"):]
            print(f"$ {command}", flush=True)
            if subprocess.run(command, shell=True, cwd=ROOT, executable="/bin/bash").returncode != 0:
                sys.exit(f"lesson {name}: the command failed: {command}")
        times[name] = time.time() - start
    numbers = {}
    print("\n=== numbers (paste into docs/course.md)" + (" -- a --quick run: they mean nothing" if args.quick else ""))
    for name, title, _ in todo:
        numbers[name] = {label: value(run, path, key) for label, path, key in REPORT.get(name, [])}
        print(f"{name} ({times[name]:.0f}s): " + "; ".join(f"{k} {v}" for k, v in numbers[name].items()))
    out = ROOT / run / "course" / "numbers.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"quick": args.quick, "seconds": times, "numbers": numbers}, indent=1) + "\n")


if __name__ == "__main__":
    main()
