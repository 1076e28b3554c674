"""The main job: every stage of RLHF in order on the built-in tiny world, then the evaluation.

    python pipeline.py                 # the whole thing on a laptop CPU (timings: docs/timings.md)
    python pipeline.py --quick         # every stage at a few-second size: checks the plumbing
    python pipeline.py --out runs/a    # a whole run somewhere else, to compare runs side by side
    python pipeline.py --from ppo      # re-run from one stage on, keeping the earlier ones
    python pipeline.py --from ppo --resume   # after a Ctrl-C or a crash: continue where it stopped
    python pipeline.py --no-rlaif      # without the RLAIF chain (AI labeller, AI labels, reward, PPO, DPO)
    python pipeline.py --lanes 1       # one stage at a time (default on a CPU: two side by side)

The RLAIF chain (after DPO) trains the AI labeller (rlaif.py) from the pretrained model, has it label
every 5th pair of the human chain's (the same SFT samples, no new sampling) against constitution.md,
one principle drawn per comparison, and trains reward_ai, ppo_rlaif and dpo_rlaif on its labels as
the human chain does (shorter: on this world its reward model is near chance, and validation
stops its PPO at 15 steps and its DPO at 25); the evaluation gets their rows. docs/rlaif.md gives its cost.

Each stage is its own script (read them in this order); this file only calls them, each in a fresh
process, exactly as you would by hand (on Linux the process is forked from this one, which has
already imported torch: start_stage). On a CPU it runs two stages at a time where neither needs the
other's output (after pretraining: the RLAIF chain and GRPO beside the human chain), each on half
the threads, their lines marked with their names; `--lanes 1` runs them one after another, as by hand
(another thread count: other, equally good, numbers). A stage re-run with --from or --only gets the
threads it had in the whole run, so it writes what the whole run would. A stage that fails stops the job.
"""

import json
import os
import runpy
import select
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import common

parser = common.ArgumentParser(description="Run every RLHF stage on the tiny world")
parser.add_argument("--out", default="out", help="folder for every stage's checkpoint and metrics")
parser.add_argument("--data", default=None, help="folder for the tiny world's data (default: data/, or <out>/data with --out)")
parser.add_argument("--quick", action="store_true", help="every stage at a few-second size")
parser.add_argument("--from", dest="start", default=None, help="first stage to run (earlier ones must exist)")
parser.add_argument("--only", default=None, help="comma-separated stages to run")
parser.add_argument("--resume", action="store_true", help="stages continue from their last checkpoint")
parser.add_argument("--device", default="auto")
parser.add_argument("--kernels", default="auto", choices=["auto", "triton", "torch"])
parser.add_argument("--seed", type=int, default=1337)
parser.add_argument("--no-rlaif", dest="rlaif", action="store_false", help="skip the RLAIF chain (rlaif.py's AI labeller)")
parser.add_argument("--constitution", default="constitution.md", help="the AI labeller's principles (RLAIF chain)")
parser.add_argument("--lanes", type=common.positive_int, default=None,
                    help="stages run side by side, each on its share of the threads (default: 2 on a CPU with 2 "
                         "threads or more, on Linux; 1: one after another, as by hand)")
parser.add_argument("--preset", default="cpu", choices=["cpu", "gpu"],
                    help="gpu: a GPT-2-small-size model (12 layers, 768 wide) on the tiny world, for one GPU")


def stages(out, data, rlaif=True, constitution="constitution.md"):
    """(name, script, arguments, takes the common flags, quick-size arguments, GPU-preset arguments)."""
    o, d = Path(out), Path(data)
    evals = ["--eval-data", d / "val_prompts.jsonl"]
    quick_reward = ["--steps", 5, "--batch-size", 8, "--eval-every", 5, "--norm-samples", 256]
    quick_ppo = ["--steps", 2, "--batch-size", 8, "--minibatch-size", 4, "--ppo-epochs", 1, "--max-new-tokens", 16,
                 "--eval-prompts", 16, "--eval-every", 2, "--sample-every", 2]
    quick_dpo = ["--steps", 5, "--batch-size", 8, "--eval-every", 5, "--eval-prompts", 8]
    chain = [  # RLAIF: the AI labeller, its labels of the human chain's pairs, and the same stages on them
        ("rlaif", "rlaif.py", ["--init", o / "pretrain", "--constitution", constitution, "--corpus", d / "pretrain.txt",
                               "--prompts", f"{d / 'prompts.jsonl'},{d / 'sft.jsonl'}", "--out", o / "rlaif_labeller"],
         True, ["--steps", 5, "--batch-size", 8, "--eval-every", 5, "--examples-per-contrast", 20], []),
        ("feedback_ai", "feedback.py", ["--labeler", "ai", "--pairs", o / "feedback" / "pairs.jsonl", "--pairs-every", 5,
                                        "--constitution", constitution, "--labeller-model", o / "rlaif_labeller",
                                        "--data", d / "prompts.jsonl", "--out", o / "feedback_ai"], True, ["--steps", 40], []),
        # shorter than the human chain's stages, on a fifth of the pairs (the chain's cost: docs/rlaif.md). PPO 15 steps
        # and DPO 25: on validation (600 prompts) gold -0.255 and -0.369 against -0.449 and -0.501 at 30 and 50 steps
        ("reward_ai", "reward.py", ["--init", o / "sft", "--data", o / "feedback_ai" / "preferences.jsonl", "--steps", 200,
                                    "--norm-data", d / "prompts.jsonl", "--out", o / "reward_ai"], True,
         quick_reward, ["--lr", 3e-5]),
        ("ppo_rlaif", "ppo.py", ["--init", o / "sft", "--reward", o / "reward_ai", "--data", d / "prompts.jsonl", *evals,
                                 "--steps", 15, "--eval-every", 5, "--sample-every", 5, "--out", o / "ppo_rlaif"], True,
         quick_ppo, ["--lr", 1e-5]),
        ("dpo_rlaif", "dpo.py", ["--init", o / "sft", "--data", o / "feedback_ai" / "preferences.jsonl", *evals,
                                 "--steps", 25, "--eval-every", 25, "--out", o / "dpo_rlaif"], True, quick_dpo, ["--lr", 1e-6]),
    ] if rlaif else []
    rlaif_models = [o / "ppo_rlaif", o / "dpo_rlaif"] if rlaif else []
    return [
        ("world", "world.py", ["--out", d], False,
         ["--n-sft", 400, "--n-prompts", 200, "--n-eval", 64, "--n-paragraphs", 1500], []),
        ("tokenizer", "tokenizer.py", ["--data", d / "pretrain.txt", "--out", o / "tokenizer"], False,
         ["--vocab-size", 512], []),
        ("pretrain", "pretrain.py", ["--data", d / "pretrain.txt", "--tokenizer", o / "tokenizer", "--out", o / "pretrain"], True,
         ["--steps", 30, "--n-layer", 2, "--n-embd", 64, "--batch-size", 8, "--eval-every", 15, "--warmup-steps", 5],
         ["--n-layer", 12, "--n-head", 12, "--n-embd", 768, "--batch-size", 64, "--steps", 1000, "--lr", 6e-4]),
        ("sft", "sft.py", ["--init", o / "pretrain", "--data", d / "sft.jsonl", *evals, "--out", o / "sft"], True,
         ["--steps", 5, "--batch-size", 8, "--eval-every", 5, "--eval-prompts", 16], ["--lr", 1e-4]),
        ("feedback", "feedback.py", ["--init", o / "sft", "--data", d / "prompts.jsonl", "--out", o / "feedback"], True,
         ["--num-prompts", 40], []),
        ("reward", "reward.py", ["--init", o / "sft", "--data", o / "feedback" / "preferences.jsonl",
                                 "--norm-data", d / "prompts.jsonl", "--out", o / "reward"], True,
         ["--steps", 5, "--batch-size", 8, "--eval-every", 5, "--norm-samples", 256], ["--lr", 3e-5]),
        ("ppo", "ppo.py", ["--init", o / "sft", "--reward", o / "reward", "--data", d / "prompts.jsonl", *evals,
                           "--out", o / "ppo"], True,
         ["--steps", 2, "--batch-size", 8, "--minibatch-size", 4, "--ppo-epochs", 1, "--max-new-tokens", 16,
          "--eval-prompts", 16, "--eval-every", 2, "--sample-every", 2], ["--lr", 1e-5]),
        ("grpo", "grpo.py", ["--init", o / "sft", "--data", d / "prompts.jsonl", *evals, "--out", o / "grpo"], True,
         ["--steps", 2, "--prompts-per-step", 4, "--group-size", 2, "--max-new-tokens", 16, "--eval-prompts", 8,
          "--eval-every", 2, "--sample-every", 2], []),
        ("dpo", "dpo.py", ["--init", o / "sft", "--data", o / "feedback" / "preferences.jsonl", *evals, "--out", o / "dpo"], True,
         ["--steps", 5, "--batch-size", 8, "--eval-every", 5, "--eval-prompts", 8], ["--lr", 1e-6]),
        *chain,
        ("evaluate", "evaluate.py", [o / "sft", o / "ppo", o / "dpo", o / "grpo", *rlaif_models, "--baseline", o / "sft",
                                     "--reward", o / "reward",
                                     "--data", d / "test_prompts.jsonl", "--out", o / "eval"], True,
         ["--n-prompts", 32, "--best-of", 4, "--max-new-tokens", 16], []),
        ("plot", "plot.py", [o, "--out", o / "plots"], False, [], []),
    ]


RESUMABLE = {"pretrain", "sft", "feedback", "reward", "ppo", "dpo", "grpo",  # the stages with --resume
             "rlaif", "feedback_ai", "reward_ai", "ppo_rlaif", "dpo_rlaif"}
KERNELS = {"ppo", "dpo", "grpo", "evaluate", "ppo_rlaif", "dpo_rlaif"}  # the stages with --kernels (where a kernel runs)


def stage_needs(plan):
    """{stage: the earlier stages whose output it reads}, read off the arguments: a stage needs another
    when one of its paths (or a comma-separated part of one) is that stage's --out folder, lies inside
    it, or holds it (plot reads the whole of out/)."""
    outs, needs = {}, {}
    for name, _, args, *_ in plan:
        paths = [Path(part) for i, a in enumerate(args) if isinstance(a, (str, Path)) and not str(a).startswith("--")
                 and (i == 0 or args[i - 1] != "--out") for part in str(a).split(",")]
        needs[name] = [other for other, out in outs.items()
                       if any(p == out or out in p.parents or p in out.parents for p in paths)]
        if "--out" in args:
            outs[name] = Path(args[args.index("--out") + 1])
    return needs


def side_by_side(needs):
    """The stages that could run beside another: neither needs the other, directly or through others."""
    before = {}
    for name, direct in needs.items():  # plan order: what a stage needs comes before it
        before[name] = set(direct).union(*(before[n] for n in direct))
    return {a for a in needs for b in needs if a != b and a not in before[b] and b not in before[a]}


def start_stage(cmd, threads=None, capture=False):
    """Start one stage's command line ([python, script, arguments...]) in a child forked from this
    process (Linux); return its pid and, with capture, the file its output (stdout and stderr) is read from.

    The child finds torch already imported, which saves the 1.4 s that `import torch` takes, about
    20 s a run. It forgets this repository's modules (common keeps per-process state, such as when
    the process started), runs the script as __main__ with its own argv, and exits as the script
    would on its own: an exception (SystemExit, a Ctrl-C, a crash) rises to the top of this file and
    ends the child there. threads: the stage's torch threads (RLHF_THREADS, read by common.setup_threads).

    The caller must not have run a parallel torch op (a matmul, say) before: GNU OpenMP's pool of threads
    does not survive a fork, and the child's first parallel op would wait for it forever (measured: it
    hangs). pipeline.py's own process runs none; from a notebook that has trained a model, run the
    stage's command in a new interpreter (subprocess.run) instead."""
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe() if capture else (None, None)
    pid = os.fork()
    if pid:
        if capture:
            os.close(write_end)
        return pid, read_end
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the parent ignores Ctrl-C; the stage must not
    if capture:
        os.close(read_end)
        os.dup2(write_end, 1)
        os.dup2(write_end, 2)
        os.close(write_end)
        sys.stdout.reconfigure(line_buffering=True)  # each line as it is printed, not in blocks
    if threads:
        os.environ.pop("OMP_NUM_THREADS", None)
        os.environ["RLHF_THREADS"] = str(threads)
    here = os.path.dirname(os.path.abspath(__file__))
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if name != "__main__" and file and os.path.dirname(os.path.abspath(file)) == here:
            del sys.modules[name]
    sys.argv = cmd[1:]
    runpy.run_path(cmd[1], run_name="__main__")
    sys.exit(0)


def run_stage(cmd):
    """Run one stage's command line and return its exit status: forked on Linux (start_stage); elsewhere
    a new interpreter: Windows has no fork, and on macOS a fork without exec can crash in the system's
    libraries (Python's multiprocessing avoids it there too)."""
    if sys.platform != "linux":
        return subprocess.run(cmd).returncode
    pid, _ = start_stage(cmd)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def run_side_by_side(jobs, lanes):
    """Run jobs [(name, cmd, needs, threads)] (plan order) on Linux, up to `lanes` at once: a stage starts when
    the stages it needs have ended, the first ready one in the plan's order first. Every line a stage
    prints is shown with its name in front. After a stage fails (or a Ctrl-C, which every running stage
    gets), no new one starts; the running ones end as they would. Returns {name: (exit status, wall s, CPU s)}."""
    ended, running, partial = {}, {}, {}  # running: pid -> (name, start time, output fd)
    waiting = list(jobs)

    def show(name, fd, chunk):
        """Print the whole lines a stage has written (and, once it has ended, the rest), its name in front."""
        pending = partial.pop(fd, b"") + chunk
        if chunk:
            pending, newline, partial[fd] = pending.rpartition(b"\n")
            if not newline:
                return
        elif not pending:
            return
        for line in pending.split(b"\n"):
            print(f"{name:>11} | {line.decode(errors='replace')}", flush=True)

    while waiting or running:
        stopping = any(code != 0 for code, *_ in ended.values())
        for job in list(waiting):
            name, cmd, needs, threads = job
            if stopping or len(running) == lanes:
                break
            if all(n in ended for n in needs):
                on = f" ({threads} thread{'s' * (threads != 1)})" if threads else ""  # None: a GPU run
                print(f"\n=== {name}{on}: {' '.join(shlex.quote(c) for c in cmd[1:])}", flush=True)
                pid, fd = start_stage(cmd, threads, capture=True)
                running[pid] = (name, time.time(), fd)
                waiting.remove(job)
        if not running:
            break
        ready, _, _ = select.select([fd for _, _, fd in running.values()], [], [])
        for pid, (name, started, fd) in list(running.items()):
            if fd not in ready:
                continue
            chunk = os.read(fd, 1 << 16)
            show(name, fd, chunk)
            if not chunk:  # the stage closed its output: it has ended
                os.close(fd)
                _, status, usage = os.wait4(pid, 0)
                del running[pid]
                code, seconds = os.waitstatus_to_exitcode(status), time.time() - started
                ended[name] = (code, seconds, usage.ru_utime + usage.ru_stime)
                print(f"=== {name}: {'done' if code == 0 else f'exit {code}'} in {common.format_seconds(seconds)}"
                      + (f"; waiting for {', '.join(n for n, _, _ in running.values())}" if running else ""), flush=True)
    return ended


def write_report(out, times, quick, cpu_times=None, wall=None):
    """out/report.md: the results table, the headline figures of each stage, the curves, the timings (wall
    time per stage, and its CPU time, which a shared machine's other jobs move less). wall: the whole
    run's time, less than the stages' sum when some ran side by side."""
    o = Path(out)
    lines = ["# RLHF on the tiny world: results", ""]
    if quick:
        lines += ["(a `--quick` run: every stage at a few-second size; the numbers mean nothing)", ""]
    results = o / "eval" / "results.md"
    if results.exists():
        lines += ["## Evaluation on the held-out prompts", "", results.read_text().strip(), ""]
    headline = [("pretrain", "eval/fact_accuracy", "facts right by greedy completion"),
                ("pretrain", "eval/sum_accuracy", "sums right by greedy completion (\"7 plus 8 is\")"),
                ("sft", "eval/gold_reward_pretrain", "gold reward of the pretrained model (chat template)"),
                ("sft", "eval/gold_reward", "gold reward of SFT samples"),
                ("sft", "eval/gold_reward_ideal", "gold reward of the ideal answers"),
                ("feedback", "feedback/agreement_gold", "labels that agree with the gold ranking"),
                ("reward", "val/acc_label", "reward model: held-out accuracy vs the labels"),
                ("reward", "reward/acc_gold", "reward model: held-out accuracy vs the gold ranking"),
                ("grpo", "eval/pass@1_arith", "GRPO: sums right on validation, one try at temperature 1"),
                ("rlaif_labeller", "val/accuracy", "AI labeller: held-out judging examples right"),
                ("feedback_ai", "feedback/agreement_gold", "AI labels that agree with the gold ranking"),
                ("reward_ai", "reward/acc_gold", "reward model on AI labels: held-out accuracy vs the gold ranking")]
    rows = []
    for stage, key, what in headline:
        meta = o / stage / "meta.json"
        if meta.exists():
            value = json.loads(meta.read_text()).get("final", {}).get(key)
            if isinstance(value, (int, float)):
                rows.append(f"| {stage} | `{key}` | {value:.3f} | {what} |")
    if rows:
        lines += ["## Stage by stage", "", "| stage | metric | value | meaning |", "|---|---|---|---|", *rows, ""]
    plots = sorted((o / "plots").glob("*.png"))
    if plots:
        lines += ["## Learning curves", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]
    cpu_times = cpu_times or {}
    cpu_total = common.format_seconds(sum(cpu_times.values())) if cpu_times else "—"
    lines += ["## Wall time per stage", "", "| stage | time | CPU time |", "|---|---|---|"]
    lines += [f"| {name} | {common.format_seconds(t)} | "
              f"{common.format_seconds(cpu_times[name]) if name in cpu_times else '—'} |" for name, t in times.items()]
    overlapped = wall is not None and wall < 0.95 * sum(times.values())
    total = wall if overlapped else sum(times.values())
    lines += [f"| **total** | **{common.format_seconds(total)}** | **{cpu_total}** |", ""]
    if overlapped:
        lines += [f"Some stages ran side by side (`--lanes`): their times add up to "
                  f"{common.format_seconds(sum(times.values()))}.", ""]
    common.atomic_write_text(o / "report.md", "\n".join(lines))
    return results.read_text() if results.exists() else ""


if __name__ == "__main__":
    args = parser.parse_args()
    data = args.data or ("data" if args.out == "out" else str(Path(args.out) / "data"))
    plan = stages(args.out, data, args.rlaif, args.constitution)
    names = [name for name, *_ in plan]
    if args.start and args.start not in names:
        common.die(f"--from {args.start}: no such stage (stages: {', '.join(names)})")
    only = args.only.split(",") if args.only else None
    for name in only or []:
        if name not in names:
            common.die(f"--only {name}: no such stage (stages: {', '.join(names)})")
    first = names.index(args.start) if args.start else 0

    # Threads: chosen once, here, for every stage (common.setup_threads): measured before the first stage,
    # the CPU time in use is other jobs', not the stages' own.
    on_cpu = args.device == "cpu" or (args.device == "auto" and torch.version.cuda is None and torch.version.hip is None)
    threads = None
    if args.device in ("auto", "cpu"):
        threads = common.setup_threads()
        if not os.environ.get("OMP_NUM_THREADS"):
            os.environ["RLHF_THREADS"] = str(threads)
    # Lanes: two stages side by side, each on half the threads. On this small model a stage on one thread
    # beside another takes only 1.6-1.8x its time on two threads alone (docs/profile.md), so the pair gets
    # through more work. Which stages share the cores is fixed by the plan, not by timing: the same
    # numbers every run, and for a stage re-run alone.
    lanes = args.lanes or (2 if sys.platform == "linux" and on_cpu and threads and threads >= 2 else 1)
    if lanes > 1 and sys.platform != "linux":
        common.die(f"--lanes {lanes}: stages side by side need Linux (they are forked); use --lanes 1")
    needs = stage_needs(plan)
    beside = side_by_side(needs) if lanes > 1 else set()
    # the stages of this run; those left out have run before: their outputs are there
    selected = [name for i, name in enumerate(names) if i >= first and (not only or name in only)]
    jobs = []
    for name, script, stage_args, common_flags, quick_args, gpu_args in plan:
        if name not in selected:
            continue
        if name == "evaluate":  # the GRPO and RLAIF rows when they run now or exist (a run of older stages has none)
            optional = [Path(args.out) / s for s in ("grpo", "ppo_rlaif", "dpo_rlaif")]
            stage_args = [a for a in stage_args if a not in optional or a.name in selected or (a / "model.pt").exists()]
        cmd = [sys.executable, script, *map(str, stage_args)]
        if common_flags:
            cmd += ["--seed", str(args.seed), "--device", args.device]
        if name in KERNELS:
            cmd += ["--kernels", args.kernels]
        if args.quick:
            cmd += list(map(str, quick_args))
        if args.preset == "gpu":
            cmd += list(map(str, gpu_args))
        if args.resume and name in RESUMABLE:
            cmd += ["--resume"]
        stage_threads = max(1, threads // lanes) if threads and name in beside else threads
        jobs.append((name, cmd, [n for n in needs[name] if n in selected], stage_threads))

    # A Ctrl-C reaches the stages too, which save a checkpoint and exit: wait for them, do not kill them.
    signal.signal(signal.SIGINT, lambda signum, frame: None)
    t_start = time.time()
    if lanes > 1:
        ended = run_side_by_side(jobs, lanes)
    else:
        ended = {}
        for name, cmd, _, _ in jobs:
            print(f"\n=== {name}: {' '.join(shlex.quote(c) for c in cmd[1:])}", flush=True)
            t0, cpu0 = time.time(), os.times()
            returncode = run_stage(cmd)
            cpu1 = os.times()
            ended[name] = (returncode, time.time() - t0,
                           (cpu1.children_user + cpu1.children_system) - (cpu0.children_user + cpu0.children_system))
            if returncode != 0:
                break
    signal.signal(signal.SIGINT, signal.default_int_handler)
    wall = time.time() - t_start
    times = {name: ended[name][1] for name, *_ in jobs if name in ended}  # in the plan's order
    cpu_times = {name: ended[name][2] for name in times}
    unfinished = [name for name, *_ in jobs if ended.get(name, (None,))[0] != 0]
    if unfinished:
        again = f"python pipeline.py --from {unfinished[0]}{' --quick' if args.quick else ''}"
        failed = [(name, code) for name, (code, _, _) in ended.items() if code not in (0, 130, -signal.SIGINT)]
        if failed:
            name, code = failed[0]
            print(f"\npipeline: stage '{name}' failed (exit {code}); fix it and continue with `{again}`", file=sys.stderr)
            sys.exit(code)
        interrupted = " and ".join(f"'{name}'" for name in unfinished if name in ended)  # the plan's order, not the ending's
        print(f"\npipeline: interrupted in stage {interrupted}; continue with `{again} --resume`", file=sys.stderr)
        sys.exit(130)

    table = write_report(args.out, times, args.quick, cpu_times, wall)
    print("\n" + table)
    print("=== done in " + common.format_seconds(wall)
          + f" (CPU time {common.format_seconds(sum(cpu_times.values()))})")
    for name, seconds in times.items():
        print(f"  {name:10s} {common.format_seconds(seconds):>7s}  (CPU {common.format_seconds(cpu_times[name])})")
    print(f"checkpoints and metrics: {args.out}/<stage>/ (model.pt, meta.json, metrics.jsonl)")
    print(f"plots: {args.out}/plots/*.png | results: {args.out}/eval/results.md | report: {args.out}/report.md")
