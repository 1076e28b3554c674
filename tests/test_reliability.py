"""Runs that survive interruption and bad input: every bad input stops with one line, exit status 2
and no file touched; a NaN stops the run and keeps the last good checkpoint; Ctrl-C saves and says
how to resume. (Each stage's SIGKILL-and-resume test sits in that stage's test file.)"""

import json
import re
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
from conftest import fault  # noqa: E402
from model import GPT, GPTConfig, ScalarModel  # noqa: E402


def files(folder):
    """Every file under folder with its bytes: what "nothing created or changed" compares."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def bad(chain, tmp_path_factory):
    """The chain's checkpoints, plus a folder of broken inputs made from them."""
    tmp, _ = chain
    d = tmp_path_factory.mktemp("bad")
    gpt, enc, meta = common.load_policy(tmp / "sft", "cpu")
    common.save_checkpoint(d / "reward", ScalarModel.from_gpt(gpt), {**meta, "stage": "reward"})
    (d / "malformed.jsonl").write_text('{"prompt": "Hi!", "response": "Hello!"}\n{"prompt": "Hi!", "response"\n')
    (d / "missing.jsonl").write_text('{"prompt": "Hi!"}\n{"text": "Hi!"}\n')
    (d / "mistyped.jsonl").write_text('{"prompt": "Hi!", "chosen": 3, "rejected": "Ugh."}\n')
    (d / "empty.jsonl").write_text("\n")
    (d / "empty.txt").write_text("  \n")
    too_long = json.dumps({"prompt": "What colour is the milt? " * 40})
    (d / "long.jsonl").write_text('{"prompt": "Hi!"}\n\n' + too_long + "\n")  # on line 3
    small = GPTConfig(**{**meta["config"], "vocab_size": 100})  # fewer rows than the tokenizer has tokens
    common.save_checkpoint(d / "small_vocab", GPT(small), {**meta, "stage": "pretrain", "config": asdict(small)})
    common.save_checkpoint(d / "other_config", gpt, {**meta, "stage": "pretrain",
                                                     "config": {**meta["config"], "n_layer": 2}})
    shutil.copytree(tmp / "pretrain", d / "truncated")
    weights = (d / "truncated" / "model.pt").read_bytes()
    (d / "truncated" / "model.pt").write_bytes(weights[: len(weights) // 2])
    shutil.copytree(tmp / "pretrain", d / "pretrain_copy")  # resumed into below: must stay as it is
    shutil.copytree(tmp / "pretrain", d / "corrupt_resume")
    (d / "corrupt_resume" / "resume.pt").write_bytes(b"not a checkpoint" * 10)
    shutil.copytree(tmp / "tok", d / "bad_tok")
    (d / "bad_tok" / "tokenizer.json").write_text('{"name": "tiny", "special_tokens": ')
    return tmp, d


def argv(stage, tmp, d):
    """A few-step run of each stage on the chain: bad-input cases append flags that override these."""
    data = tmp / "data"
    common_flags = ["--out", d / "out", "--device", "cpu"]
    return {
        "pretrain": ["pretrain.py", "--data", data / "pretrain.txt", "--tokenizer", tmp / "tok", "--steps", 2,
                     "--n-layer", 1, "--n-head", 2, "--n-embd", 32, "--batch-size", 4, "--eval-batches", 1],
        "sft": ["sft.py", "--init", tmp / "pretrain", "--data", data / "sft.jsonl", "--eval-data",
                data / "val_prompts.jsonl", "--steps", 2, "--batch-size", 4, "--eval-prompts", 2, "--max-new-tokens", 4],
        "feedback": ["feedback.py", "--init", tmp / "sft", "--data", data / "prompts.jsonl", "--num-prompts", 4,
                     "--k", 2, "--max-new-tokens", 4],
        "reward": ["reward.py", "--init", tmp / "sft", "--data", tmp / "feedback" / "preferences.jsonl", "--steps", 2,
                   "--batch-size", 4],
        "ppo": ["ppo.py", "--init", tmp / "sft", "--reward", d / "reward", "--data", data / "prompts.jsonl",
                "--eval-data", data / "val_prompts.jsonl", "--steps", 1, "--batch-size", 4, "--minibatch-size", 2,
                "--max-new-tokens", 4, "--eval-prompts", 2],
        "dpo": ["dpo.py", "--init", tmp / "sft", "--data", tmp / "feedback" / "preferences.jsonl", "--steps", 1,
                "--batch-size", 4, "--eval-prompts", 2, "--max-new-tokens", 4],
    }[stage] + common_flags


# (stage, extra flags with {d} = the broken-inputs folder, the expected error line as a regex)
BAD_INPUTS = {
    "malformed-jsonl-line": ("sft", ["--data", "{d}/malformed.jsonl"], r"{d}/malformed.jsonl:2: not valid JSON"),
    "missing-field": ("ppo", ["--data", "{d}/missing.jsonl"], r"{d}/missing.jsonl:2: missing field 'prompt'"),
    "mistyped-field": ("reward", ["--data", "{d}/mistyped.jsonl"],
                       r"{d}/mistyped.jsonl:1: field 'chosen' must be a string, got int"),
    "empty-jsonl": ("dpo", ["--data", "{d}/empty.jsonl"], r"{d}/empty.jsonl: empty file"),
    "empty-text": ("pretrain", ["--data", "{d}/empty.txt"], r"--data {d}/empty.txt: empty file"),
    "prompt-longer-than-context": ("feedback", ["--data", "{d}/long.jsonl", "--labeler", "human"],
                                   r"{d}/long.jsonl:3: the prompt is \d+ tokens, longer than the \d+ the context "
                                   r"leaves for it"),
    "prompt-longer-than-context-ppo": ("ppo", ["--data", "{d}/long.jsonl"], r"{d}/long.jsonl:3: the prompt is \d+ "),
    "checkpoint-of-wrong-stage": ("sft", ["--init", "{d}/reward"],
                                  r"--init {d}/reward: a checkpoint of stage 'reward', expected pretrain"),
    "resume-into-wrong-stage": ("sft", ["--out", "{d}/pretrain_copy", "--resume"],
                                r"--out {d}/pretrain_copy: a checkpoint of stage 'pretrain', expected sft"),
    "vocabulary-mismatch": ("sft", ["--init", "{d}/small_vocab"], r"--init {d}/small_vocab: tokenizer .* has \d+ "
                                                                   r"tokens, the model only 100"),
    "architecture-mismatch-meta": ("sft", ["--init", "{d}/other_config"],
                                   r"--init {d}/other_config: weights do not match the config in meta.json"),
    "architecture-mismatch-flags": ("pretrain", ["--out", "{d}/pretrain_copy", "--resume", "--n-layer", "2"],
                                    r"--resume: --out {d}/pretrain_copy: the checkpoint's architecture differs from "
                                    r"the flags' \(n_layer 1 vs 2\)"),
    "missing-previous-stage": ("reward", ["--init", "{d}/nowhere"], r"--init {d}/nowhere: no checkpoint there"),
    "truncated-checkpoint": ("sft", ["--init", "{d}/truncated"], r"{d}/truncated/model.pt: cannot read the checkpoint"),
    "corrupted-resume-checkpoint": ("pretrain", ["--out", "{d}/corrupt_resume", "--resume"],
                                    r"{d}/corrupt_resume/resume.pt: cannot resume from it .*run again without --resume"),
    "tokenizer-does-not-parse": ("pretrain", ["--tokenizer", "{d}/bad_tok"],
                                 r"--tokenizer: cannot load the tokenizer {d}/bad_tok .*not valid JSON"),
    "negative-size": ("pretrain", ["--batch-size", "-4"], r"--batch-size must be a positive number, got -4"),
    "negative-steps": ("reward", ["--steps", "-1"], r"--steps must be a positive number, got -1"),
    "batch-smaller-than-minibatch": ("ppo", ["--batch-size", "2", "--minibatch-size", "4"],
                                     r"--batch-size 2 is smaller than --minibatch-size 4"),
    "sampling-temperature-0-feedback": ("feedback", ["--temperature", "0"], r"--temperature must be a positive number"),
    "sampling-temperature-0-sft": ("sft", ["--temperature", "0"], r"--temperature must be a positive number"),
    "sampling-temperature-0-ppo": ("ppo", ["--temperature", "0"], r"--temperature must be a positive number"),
    "learning-rate-nan": ("dpo", ["--lr", "nan"], r"--lr must be a positive number, got nan"),
    "missing-end-penalty-nan": ("ppo", ["--missing-end-penalty", "nan"],
                                r"--missing-end-penalty must be a finite number or none, got nan"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_stops_with_one_clear_line_and_touches_no_file(case, bad, stage_here):
    tmp, d = bad
    stage, extra, expected = BAD_INPUTS[case]
    before = files(d)
    r = stage_here(argv(stage, tmp, d) + [x.format(d=d) for x in extra])
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch("error: " + expected.format(d=re.escape(str(d))) + ".*", lines[0]), lines
    assert files(d) == before  # nothing created (no --out folder), nothing changed (a resumed --out included)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(bad, stage_here, monkeypatch):
    tmp, d = bad
    out = d / "nan"
    at_step_2 = {}
    save_checkpoint = common.save_checkpoint

    def spy(folder, model, meta, resume_state=None):  # what the folder held right after step 2's checkpoint
        save_checkpoint(folder, model, meta, resume_state)
        if meta["step"] == 2:
            at_step_2.update(files(folder))
    monkeypatch.setattr(common, "save_checkpoint", spy)
    r = stage_here(argv("sft", tmp, d) + ["--out", out, "--steps", 4, "--eval-every", 2],
                   env=fault("NaN", 3))  # the test switch in common.guard_finite: step 3's loss is NaN
    assert r.returncode == 3
    assert r.stderr.strip().splitlines() == [
        f"error: step 3: the loss is nan; stopped before updating the weights (last good checkpoint in {out}: step 2)"]
    assert "step 2/4" in r.stdout and "step 3/4" not in r.stdout
    assert files(out) == at_step_2  # model.pt, resume.pt, meta.json and the metrics of steps 1-2, unchanged
    assert json.loads((out / "meta.json").read_text())["step"] == 2


def test_a_real_divergence_is_caught_before_it_reaches_a_checkpoint(bad, stage_here):
    tmp, d = bad
    out = d / "diverged"
    r = stage_here(argv("pretrain", tmp, d) + ["--out", out, "--steps", 4, "--lr", 1e30, "--warmup-steps", 0])
    assert r.returncode == 3
    assert re.fullmatch(r"error: step \d: the (loss|grad_norm) is (nan|inf); stopped before updating the weights "
                        rf"\(last good checkpoint in {re.escape(str(out))}: none saved yet\)", r.stderr.strip()), r.stderr
    assert not (out / "model.pt").exists()


def test_guard_finite_checks_every_quantity(tmp_path):
    common.guard_finite(1, tmp_path, loss=torch.tensor(2.0), grad_norm=torch.tensor(0.5))  # finite: nothing happens
    with pytest.raises(common.BadInput, match=r"step 7: the grad_norm is inf") as e:
        common.guard_finite(7, tmp_path, loss=torch.tensor(2.0), grad_norm=torch.tensor(float("inf")))
    assert e.value.code == 3


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(bad, stage_here, same_run):
    tmp, d = bad
    run = lambda out, *extra, env=None: stage_here(  # noqa: E731
        argv("sft", tmp, d) + ["--out", d / out, "--steps", 5, "--eval-every", 2, *extra], env=env)
    assert run("ctrl_c_ref").returncode == 0
    r = run("ctrl_c", env=fault("SIGINT", 3))  # as if Ctrl-C were pressed during step 3
    assert r.returncode == 130
    last = r.stdout.strip().splitlines()[-1]
    assert re.fullmatch(rf"interrupted: checkpoint of step 3 saved in {re.escape(str(d / 'ctrl_c'))}; "
                        r"continue with: python \S*sft.py .* --out \S*ctrl_c .* --resume", last), last
    assert json.loads((d / "ctrl_c" / "meta.json").read_text())["step"] == 3  # not a periodic checkpoint step
    r = run("ctrl_c", "--resume")
    assert r.returncode == 0 and f"resumed from {d / 'ctrl_c'} at step 3" in r.stdout
    same_run(d / "ctrl_c_ref", d / "ctrl_c", steps=range(1, 6))


def test_resuming_a_finished_run_changes_nothing(bad, stage_here):
    tmp, d = bad
    before = files(d)
    r = stage_here(argv("pretrain", tmp, d) + ["--out", d / "pretrain_copy", "--resume", "--steps", 4])
    assert r.returncode == 0 and "already finished its 4 steps: nothing to resume" in r.stdout
    assert files(d) == before


def test_triton_kernels_on_the_cpu_without_the_interpreter_is_one_clear_line(bad, stage_here, monkeypatch):
    tmp, d = bad
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the tests set it to 1 on a machine without CUDA
    before = files(d)
    r = stage_here(argv("ppo", tmp, d) + ["--kernels", "triton", "--device", "cpu", "--out", d / "triton_cpu"])
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert r.stderr.startswith("error: --kernels triton on --device cpu: Triton kernels run on a CUDA device")
    assert files(d) == before
