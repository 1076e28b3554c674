"""pytest setup shared by the test files.

Without a GPU the Triton kernels run through the Triton interpreter, which must be switched on
before anything imports triton; with CUDA they run natively. Also puts the repo root on sys.path
so `import kernels` (and the stage modules) work from tests/.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


# -----------------------------------------------------------------------------
# Running a stage as a user would, killing it, and comparing two runs (tests of resume and bad input)

import json  # noqa: E402
import runpy  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: a second thread only adds overhead


@pytest.fixture
def stage_here(monkeypatch, capsys):
    """run(argv, env={}) runs a stage script in this process (runpy: no new interpreter to start,
    which costs seconds) and returns a CompletedProcess with its exit status, stdout and stderr."""
    def run(argv, env=None):
        argv = list(map(str, argv))
        code, threads, handler = 0, torch.get_num_threads(), signal.getsignal(signal.SIGINT)
        with monkeypatch.context() as m:
            m.setattr(sys, "argv", argv)
            for k, v in (env or {}).items():
                m.setenv(k, str(v))
            torch.set_num_threads(1)
            try:
                runpy.run_path(os.path.join(ROOT, argv[0]), run_name="__main__")
            except SystemExit as e:
                code = e.code
            finally:
                torch.set_num_threads(threads)
                signal.signal(signal.SIGINT, handler)  # a stage's Ctrl-C handler must not outlive it
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(argv, code, out, err)
    return run


def fault(what, step):
    """The environment of a run that fails at the end of `step` as a crash (SIGKILL), a Ctrl-C (SIGINT)
    or a diverged loss (NaN) would: common's one test switch, RLHF_TEST_FAULT."""
    return {"RLHF_TEST_FAULT": f"{what}@step={step}"}


@pytest.fixture
def kill_resume(stage_here):
    """run(argv, kill_at) runs a stage in a new process that SIGKILLs itself at the end of step kill_at
    (the test switch in common.steps), checks it died so, then resumes it with --resume in this
    process. Returns (the killed run, the resumed run)."""
    def run(argv, kill_at):
        argv = list(map(str, argv))
        killed = subprocess.run([sys.executable, *argv], cwd=ROOT, env={**ENV, **fault("SIGKILL", kill_at)},
                                capture_output=True, text=True, timeout=300)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        resumed = stage_here(argv + ["--resume"])
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        return killed, resumed
    return run


def metrics_without_time(path):
    """The rows of a metrics.jsonl without their wall-clock times (time/elapsed_s, time/<phase>): what two
    runs of the same steps share."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


@pytest.fixture
def same_run():
    """check(a, b): two stage folders hold the same run: metrics.jsonl row for row (wall-clock time
    aside; every step exactly once), the same final metrics in meta.json and bit-identical weights."""
    def check(a, b, steps=None):
        a, b = Path(a), Path(b)
        rows_a, rows_b = metrics_without_time(a / "metrics.jsonl"), metrics_without_time(b / "metrics.jsonl")
        assert [r["step"] for r in rows_b] == [r["step"] for r in rows_a]
        if steps is not None:
            assert [r["step"] for r in rows_b] == list(steps)
        assert rows_b == rows_a
        meta_a, meta_b = (json.loads((d / "meta.json").read_text()) for d in (a, b))
        assert meta_b["final"] == meta_a["final"] and meta_b["step"] == meta_a["step"]
        if (a / "model.pt").exists():
            wa, wb = (torch.load(d / "model.pt", weights_only=True) for d in (a, b))
            assert wa.keys() == wb.keys()
            for k in wa:
                assert torch.equal(wa[k], wb[k]), k
    return check


def tiny_stage(tmp, stage="sft", **world_sizes):
    """What a stage's end-to-end test starts from: the tiny world's data in tmp/data (world.write_data
    with world_sizes), a 300-token BPE in tmp/tok and an untrained tiny GPT (torch seed 0) saved as the
    checkpoint tmp/<stage>. Returns (world, enc, gpt, meta), meta to save more checkpoints beside it."""
    from dataclasses import asdict

    import common
    from model import GPT, GPTConfig
    from tokenizer import save_tokenizer, train_bpe
    from world import write_data

    world = write_data(tmp / "data", **world_sizes)[0]
    enc = train_bpe((tmp / "data" / "pretrain.txt").read_text(), 300)
    save_tokenizer(enc, tmp / "tok")
    config = GPTConfig(block_size=64, vocab_size=320, n_layer=1, n_head=2, n_embd=32)
    meta = {"stage": stage, "config": asdict(config), "args": {}, "step": 0, "tokenizer": str(tmp / "tok"), "final": {}}
    torch.manual_seed(0)
    gpt = GPT(config)
    common.save_checkpoint(tmp / stage, gpt, meta)
    return world, enc, gpt, meta


@pytest.fixture(scope="session")
def chain(tmp_path_factory):
    """The tiny chain data -> tokenizer -> pretrain -> sft -> feedback at a few-second size, every
    stage run as a user would (its own process). Returns (folder, run) with run(script, *args)."""
    from tokenizer import save_tokenizer, train_bpe
    from world import write_data

    tmp = tmp_path_factory.mktemp("chain")
    data = tmp / "data"
    write_data(data, n_sft=120, n_prompts=60, n_eval=10, n_paragraphs=300)
    save_tokenizer(train_bpe((data / "pretrain.txt").read_text(), 300), tmp / "tok")

    def run(script, *args):
        r = subprocess.run([sys.executable, script, *map(str, args), "--device", "cpu"], cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{script}: {r.stderr[-2000:]}"
        return r

    run(*pretrain_args(tmp, "pretrain"))
    run("sft.py", "--init", tmp / "pretrain", "--data", data / "sft.jsonl", "--eval-data",
        data / "val_prompts.jsonl", "--out", tmp / "sft", "--steps", 3, "--batch-size", 8, "--eval-every", 3,
        "--eval-prompts", 4, "--max-new-tokens", 8)
    run("feedback.py", "--init", tmp / "sft", "--data", data / "prompts.jsonl", "--out", tmp / "feedback",
        "--num-prompts", 60, "--max-new-tokens", 8)
    return tmp, run


def pretrain_args(tmp, out, *extra):
    """The chain's pretraining: 4 steps, a checkpoint at step 2."""
    return ["pretrain.py", "--data", tmp / "data" / "pretrain.txt", "--tokenizer", tmp / "tok", "--out", tmp / out,
            "--steps", 4, "--n-layer", 1, "--n-head", 2, "--n-embd", 32, "--batch-size", 4, "--eval-every", 2,
            "--eval-batches", 1, "--device", "cpu", *extra]


@pytest.fixture(scope="session")
def chain_pretrain_args():
    return pretrain_args


# -----------------------------------------------------------------------------
# The course: `-k <exercise>` selects the tests that grade it (exercises.EXERCISES lists them)


@pytest.hookimpl(tryfirst=True)  # before pytest's own -k filter runs
def pytest_collection_modifyitems(config, items):
    from exercises import EXERCISES
    graded_by = {test: name for name, (_, tests) in EXERCISES.items() for test in tests}
    for item in items:
        name = graded_by.get(item.nodeid.split("[")[0])  # "tests/test_ppo.py::test_gae_..." (params dropped)
        if name:
            item.extra_keyword_matches.add(name)
