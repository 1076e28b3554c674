"""pipeline.py: stages chained at the --quick size; a Ctrl-C in a stage stops the job with the resume command;
the resumed job runs to the end, training on the train files, evaluating on validation, the table on test."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import common  # noqa: E402


def run_pipeline(out, *extra, env=None):
    cmd = [sys.executable, str(ROOT / "pipeline.py"), "--quick", "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def interrupted_then_finished(tmp_path_factory):
    """A --quick run stopped by a Ctrl-C in pretraining, then resumed to the end (the plots aside), two stages
    side by side where they can be."""
    out = tmp_path_factory.mktemp("pipeline") / "run"
    # the stage's own Ctrl-C path (a test hook sends SIGINT at the end of step 12 of pretraining's 30)
    first = run_pipeline(out, "--only", "world,tokenizer,pretrain", env={"RLHF_TEST_FAULT": "SIGINT@step=12"})
    second = run_pipeline(out, "--from", "pretrain", "--resume", "--lanes", "2", "--only", "pretrain,sft,feedback,reward,"
                          "ppo,grpo,dpo,rlaif,feedback_ai,reward_ai,ppo_rlaif,dpo_rlaif,evaluate")
    return out, first, second


def test_ctrl_c_in_a_stage_stops_the_job_and_resume_finishes_it(interrupted_then_finished):
    out, first, second = interrupted_then_finished
    assert first.returncode == 130, first.stdout[-2000:] + first.stderr[-2000:]
    assert "interrupted in stage 'pretrain'" in first.stderr
    assert "python pipeline.py --from pretrain --quick --resume" in first.stderr
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "resumed from" in second.stdout
    steps = [r["step"] for r in common.read_metrics(out / "pretrain" / "metrics.jsonl")]
    assert 12 in steps and steps == sorted(set(steps)) and steps[-1] == 30  # every step once, to the end
    assert (out / "report.md").exists() and "pretrain" in (out / "report.md").read_text()


def test_training_reads_train_files_evaluates_on_validation_and_the_table_on_test(interrupted_then_finished):
    out, _, second = interrupted_then_finished
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    data = out / "data"
    args = {stage: json.loads((out / stage / "meta.json").read_text())["args"]
            for stage in ("sft", "feedback", "reward", "ppo", "grpo", "dpo")}
    assert args["sft"]["data"] == str(data / "sft.jsonl")
    assert args["feedback"]["data"] == args["ppo"]["data"] == args["grpo"]["data"] == str(data / "prompts.jsonl")
    assert args["grpo"]["eval_data"] == str(data / "val_prompts.jsonl")
    assert args["reward"]["data"] == args["dpo"]["data"] == str(out / "feedback" / "preferences.jsonl")
    for stage in ("sft", "ppo", "dpo"):  # periodic evaluations: the validation split
        assert args[stage]["eval_data"] == str(data / "val_prompts.jsonl"), stage
        logged = [r for r in common.read_metrics(out / stage / "metrics.jsonl") if "eval/gold_reward" in r]
        assert logged and all(any(k.startswith("eval/gold_held_out_") for k in r) for r in logged), stage
    assert not (data / "eval_prompts.jsonl").exists()
    md = (out / "eval" / "results.md").read_text()  # the final table: the test split, named in its header
    assert md.startswith(f"Evaluation on 32 prompts of {data / 'test_prompts.jsonl'} (split: test;")
    assert "| over-refuses look-alikes | sycophancy |" in md and "train-like: fresh (n = " in md
    results = json.loads((out / "eval" / "results.json").read_text())
    for key in ("name", "gold_reward", "gold_reward_se", "win_rate_vs_sft", "kl_to_sft", "proxy_score", "length",
                "sycophancy_rate", "over_refusal_rate_lookalike", "refusal_rate_unsafe", "gold_held_out_fresh_se"):
        assert all(key in r for r in results), key
    assert [r["name"] for r in results][:6] == ["sft", "ppo", "dpo", "grpo", "ppo_rlaif", "dpo_rlaif"]  # all exist
    ai = json.loads((out / "feedback_ai" / "meta.json").read_text())  # the RLAIF chain: AI labels of the same pairs
    assert ai["labeler"] == "ai" and ai["args"]["pairs"] == str(out / "feedback" / "pairs.jsonl")
    assert json.loads((out / "reward_ai" / "meta.json").read_text())["args"]["data"] == str(out / "feedback_ai" / "preferences.jsonl")


def test_stages_side_by_side_write_what_they_write_one_after_another(interrupted_then_finished, tmp_path):
    """The fixture ran its stages two at a time (one thread each): the same stages run again one after another,
    on one thread, write byte-identical models."""
    out, _, second = interrupted_then_finished
    assert second.returncode == 0 and "=== grpo (1 thread)" in second.stdout
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    again = run_pipeline(copy, "--only", "grpo,dpo_rlaif", "--lanes", "1", "--data", str(out / "data"))
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    for stage in ("grpo", "dpo_rlaif"):
        assert (copy / stage / "model.pt").read_bytes() == (out / stage / "model.pt").read_bytes(), stage


def test_a_ctrl_c_stops_both_stages_side_by_side_and_resume_finishes_them(interrupted_then_finished, tmp_path):
    out, _, _ = interrupted_then_finished
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    flags = ["--only", "sft,rlaif", "--lanes", "2", "--data", str(out / "data")]
    stopped = run_pipeline(copy, *flags, env={"RLHF_TEST_FAULT": "SIGINT@step=3"})  # each stage at its step 3
    assert stopped.returncode == 130, stopped.stdout[-2000:] + stopped.stderr[-2000:]
    assert "interrupted in stage 'sft' and 'rlaif'; continue with `python pipeline.py --from sft --quick --resume`" \
        in stopped.stderr
    finished = run_pipeline(copy, *flags, "--resume")
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-2000:]
    for stage in ("sft", "rlaif_labeller"):
        steps = [r["step"] for r in common.read_metrics(copy / stage / "metrics.jsonl")]
        assert 3 in steps and steps == sorted(set(steps)) and steps[-1] == 5, (stage, steps)  # every step once


def test_the_rlaif_chain_is_in_the_default_and_no_rlaif_skips_it():
    import pipeline

    chain = ["rlaif", "feedback_ai", "reward_ai", "ppo_rlaif", "dpo_rlaif"]
    names = [s[0] for s in pipeline.stages("o", "d")]
    assert names[names.index("dpo") + 1 : names.index("evaluate")] == chain
    evaluate = dict((s[0], s[2]) for s in pipeline.stages("o", "d"))["evaluate"]
    assert Path("o/ppo_rlaif") in evaluate and Path("o/dpo_rlaif") in evaluate
    assert not set(chain) & {s[0] for s in pipeline.stages("o", "d", rlaif=False)}
    assert pipeline.parser.parse_args([]).rlaif and not pipeline.parser.parse_args(["--no-rlaif"]).rlaif


def test_an_unknown_stage_is_one_clear_line(tmp_path):
    result = run_pipeline(tmp_path / "run", "--from", "nonsense")
    assert result.returncode == 2 and "--from nonsense: no such stage" in result.stderr
    assert not (tmp_path / "run").exists()


def test_report_keeps_each_stage_time_and_the_total(tmp_path):
    import pipeline

    pipeline.write_report(tmp_path, {"pretrain": 78.2, "sft": 33.0}, False, {"pretrain": 150.0, "sft": 60.0})
    text = (tmp_path / "report.md").read_text()
    assert "| pretrain | 1m18s | 2m30s |" in text and "| sft | 33s | 1m00s |" in text
    assert "| **total** | **1m51s** | **3m30s** |" in text
    pipeline.write_report(tmp_path, {"pretrain": 78.2, "sft": 33.0, "rlaif": 30.0}, False, None, wall=112.0)
    text = (tmp_path / "report.md").read_text()  # rlaif ran beside sft: the total is the run's, not the sum
    assert "| **total** | **1m52s** | **—** |" in text and "their times add up to 2m21s" in text


STAGE_ENDINGS = {  # a stage's last words, and the exit status a new interpreter gives them (the reference)
    "done": "import common; print('fresh common:', not hasattr(common, 'parent_was_here'))",
    "bad_input": "import common; common.die('bad.jsonl line 3: expected a prompt')",
    "exit_3": "import sys; sys.exit(3)",
    "crash": "raise ValueError('a bug')",
    "ctrl_c": "import os, signal; os.kill(os.getpid(), signal.SIGINT); import time; time.sleep(5)",
}


@pytest.mark.parametrize("ending", STAGE_ENDINGS)
def test_a_forked_stage_ends_as_it_would_on_its_own(tmp_path, ending):
    """run_stage forks on Linux: the stage must exit with the status a new interpreter gives it, print what it
    would, and find this repository's modules fresh (common is imported again, not the parent's)."""
    script = tmp_path / f"{ending}.py"
    script.write_text(STAGE_ENDINGS[ending] + "\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the script lies outside the repository: common on the path
    reference = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=60)
    driver = ("import sys, pipeline, common; common.parent_was_here = True; "
              f"code = pipeline.run_stage([sys.executable, {str(script)!r}]); print('parent got', code)")
    forked = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, env=env, timeout=60)
    assert forked.returncode == 0, forked.stderr
    assert forked.stdout.splitlines()[-1] == f"parent got {reference.returncode}"
    assert forked.stdout.count("parent got") == 1  # the child never comes back into the parent's code
    assert reference.stdout in forked.stdout and reference.stderr.splitlines()[-1:] == forked.stderr.splitlines()[-1:]
    if ending == "done":
        assert "fresh common: True" in forked.stdout


def test_each_stage_needs_the_stages_whose_output_its_arguments_name():
    import pipeline

    names = [s[0] for s in pipeline.stages("o", "d")]
    expected = {  # by hand, from what each script reads
        "world": set(), "tokenizer": {"world"}, "pretrain": {"world", "tokenizer"}, "sft": {"world", "pretrain"},
        "feedback": {"world", "sft"}, "reward": {"world", "sft", "feedback"}, "ppo": {"world", "sft", "reward"},
        "grpo": {"world", "sft"}, "dpo": {"world", "sft", "feedback"}, "rlaif": {"world", "pretrain"},
        "feedback_ai": {"world", "feedback", "rlaif"}, "reward_ai": {"world", "sft", "feedback_ai"},
        "ppo_rlaif": {"world", "sft", "reward_ai"}, "dpo_rlaif": {"world", "sft", "feedback_ai"},
        "evaluate": {"world", "sft", "reward", "ppo", "grpo", "dpo", "ppo_rlaif", "dpo_rlaif"},
        "plot": set(names) - {"plot"}}  # with --out runs/a the data lies in runs/a too
    needs = pipeline.stage_needs(pipeline.stages("runs/a", "runs/a/data"))
    assert list(needs) == names and {k: set(v) for k, v in needs.items()} == expected
    # what may share the cores: after pretraining, before the evaluation; sft only beside the AI labeller
    assert pipeline.side_by_side(needs) == set(names[3:-2])
    no_rlaif = pipeline.stage_needs(pipeline.stages("o", "d", rlaif=False))
    assert pipeline.side_by_side(no_rlaif) == {"feedback", "reward", "ppo", "grpo", "dpo"}


def test_stages_side_by_side_wait_for_what_they_need_and_stop_after_a_failure(tmp_path):
    """run_side_by_side with stand-in stages (a forked child takes about 0.4 s to exit): at most two at once,
    each after the stages it needs, its lines shown with its name, its threads set; after a failure no new
    stage starts, the running one ends."""
    def stage(name, seconds, code=0):
        script = tmp_path / f"{name}.py"
        script.write_text(f"import os, sys, time\n"
                          f"open({str(tmp_path / name)!r} + '.start', 'w').write(repr(time.time()))\n"
                          f"print('threads', os.environ.get('RLHF_THREADS'), 'omp', os.environ.get('OMP_NUM_THREADS'))\n"
                          f"time.sleep({seconds})\nprint('bye'); sys.stdout.flush()\n"
                          f"open({str(tmp_path / name)!r} + '.end', 'w').write(repr(time.time()))\nsys.exit({code})\n")
        return [sys.executable, str(script)]
    jobs = [("a", stage("a", 2.0), [], 1), ("b", stage("b", 0.1), ["a"], 1), ("c", stage("c", 0.2), [], 1),
            ("d", stage("d", 0.1, code=3), ["c"], 2), ("e", stage("e", 0.1), ["c"], 1)]
    driver = f"import json, sys, pipeline; print('ENDED', json.dumps(pipeline.run_side_by_side({jobs!r}, 2)))"
    result = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, cwd=ROOT, timeout=60,
                            env={**os.environ, "OMP_NUM_THREADS": "4"})
    assert result.returncode == 0, result.stderr
    ended = json.loads(result.stdout.split("ENDED ")[1])
    assert {name: code for name, (code, _, _) in ended.items()} == {"a": 0, "c": 0, "d": 3}  # b, e: never started
    times = {name: (float((tmp_path / f"{name}.start").read_text()), float((tmp_path / f"{name}.end").read_text()))
             for name in ("a", "c", "d")}
    assert times["c"][0] < times["a"][1] and times["d"][0] < times["a"][1]  # c, then d, beside a
    assert times["d"][0] >= times["c"][1]  # d after the stage it needs
    assert not (tmp_path / "b.start").exists()  # b was ready only after d had failed
    lines = result.stdout.splitlines()
    assert "          a | threads 1 omp None" in lines and "          d | threads 2 omp None" in lines
    assert lines.count("          a | bye") == 1
    assert any(line.startswith("=== d: exit 3 in ") and line.endswith("; waiting for a") for line in lines)
