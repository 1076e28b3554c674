"""docs/course.md: every lesson command names a script that exists and flags that script accepts.

The commands are every line of the page's ```bash blocks (scripts/run_course.py runs each lesson's
block); each script's `--help` is asked once, all in one process."""

import functools
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))
import run_course  # noqa: E402

OTHER_COMMANDS = {"mkdir", "grep"}  # the only non-Python commands a lesson may use


def bash_commands(text):
    """Every command line of every ```bash block."""
    return [line.strip() for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M)
            for line in block.splitlines() if line.strip()]


HELP_ALL = """
import contextlib, io, json, runpy, sys
out = {}
for script in sys.argv[1:]:
    sys.argv, buf = [script, "--help"], io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit:
            pass
    out[script] = buf.getvalue()
print(json.dumps(out))
"""


@functools.lru_cache(maxsize=None)
def helps(scripts):
    """{script: its --help text}: each script run as __main__ with --help, all in one process (one
    torch import instead of one per script)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", HELP_ALL, *scripts], cwd=ROOT, env=env, text=True,
                       capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def problems(text):
    """What is wrong with the page's commands: an unknown program, a missing script, an unknown flag."""
    bad, uses = [], []
    for command in bash_commands(text):
        words = shlex.split(command.split(">")[0])
        if words[0] != "python":
            if words[0] not in OTHER_COMMANDS:
                bad.append(f"not a python script nor one of {sorted(OTHER_COMMANDS)}: {command}")
            continue
        script = words[1]
        if not (ROOT / script).is_file():
            bad.append(f"no such script: {script}")
            continue
        uses += [(script, w.split("=")[0]) for w in words[2:] if w.startswith("--")]
    texts = helps(tuple(sorted({s for s, _ in uses})))
    for script, flag in uses:
        if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", texts[script]):
            bad.append(f"{script} has no {flag}")
    return bad


def test_every_lesson_command_runs_a_script_with_flags_it_has():
    text = run_course.COURSE.read_text()
    assert bash_commands(text), "no ```bash block in docs/course.md"
    assert problems(text) == []


def test_a_misspelt_flag_or_a_missing_script_is_caught():
    text = "```bash\npython ppo.py --init out/sft --kl-cof 0 --out out/course/x\npython nosuch.py --out x\n```\n"
    assert problems(text) == ["no such script: nosuch.py", "ppo.py has no --kl-cof"]
    assert problems("```bash\nrm -rf out\n```\n")[0].startswith("not a python script")


def test_every_lesson_has_commands_writing_to_its_own_folder_and_numbers_to_print():
    lessons = run_course.lessons()
    names = [name for name, _, _ in lessons]
    assert len(names) >= 8 and len(set(names)) == len(names)
    assert set(names) == set(run_course.REPORT)
    for name, _, commands in lessons:
        assert commands, f"lesson {name} has no ```bash block"
        for command in commands:
            outs = re.findall(r"--out (\S+)", command)
            assert all(o.startswith(f"out/course/{name}/") for o in outs), (name, command)
        for _, path, _ in run_course.REPORT[name]:
            assert path.startswith(f"course/{name}/"), (name, path)
    # every script a lesson runs is sized down by --quick (or needs no sizing)
    scripts = {shlex.split(c)[1] for _, _, cs in lessons for c in cs if c.startswith("python ")}
    assert scripts - set(run_course.QUICK) <= {"tokenizer.py", "plot.py"}


def test_paths_move_to_the_run_folder():
    c = "python rlaif.py --prompts data/prompts.jsonl,data/sft.jsonl --init out/pretrain --out out/course/x"
    assert run_course.relocate(c, "runs/a", "runs/a/data") == (
        "python rlaif.py --prompts runs/a/data/prompts.jsonl,runs/a/data/sft.jsonl --init runs/a/pretrain "
        "--out runs/a/course/x")


def test_every_exercise_a_lesson_names_exists_and_every_exercise_has_a_lesson():
    import exercises
    named = set()
    for line in re.findall(r"^\*\*Exercises?\*\*: (.+)$", run_course.COURSE.read_text(), re.M):
        named |= set(re.findall(r"`(\w+)`", line))
    assert named == set(exercises.EXERCISES)
