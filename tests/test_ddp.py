"""DDP: every stage under torchrun with 2 processes on the CPU (gloo), against one process.

What must match, and how closely. `--batch-size B` is the global batch: rank r trains on the r-th
half of it. One process with `--grad-accum 2` sees the same two halves as two micro-batches, and
DDP's average of the two ranks' gradients, (g0 + g1) / 2, is bit for bit the one process's sum
g0 / 2 + g1 / 2 (halving is exact in floating point; the loss of each half is scaled by an exact
power of two or, for SFT, by its share of the tokens times the ranks). So against that run every
logged number must be EQUAL. Against the plain one-process run (one batch, today's default path)
the mean of two half-batch means differs from the one mean in the last bits (~1e-7) and Adam carries
it on: the training curves must agree to rel 1e-5, or abs 1e-6 for figures near 0 such as a margin
(measured: below 2e-6 relative, 2e-7 absolute, after 6 steps). Gradient accumulation under DDP (2 ranks
x 2 micro-batches against 1 process x 4) sums the same quarters in another order: close, not equal.
Numbers that sampling or a threshold decides (gold reward, accuracies) are left out of the close
comparisons: a last-bit difference may flip a sampled token.

Each torchrun launch costs ~10 s on a 2-core machine (three Python processes importing torch); the
one-process runs go in-process to save that.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import ppo  # noqa: E402
from model import left_pad  # noqa: E402
from sampling import encode_prompts  # noqa: E402
from conftest import fault, metrics_without_time as rows  # noqa: E402
from test_ppo import stages  # noqa: E402,F401  (fixture: a tiny SFT policy and reward model)
from test_reward import run_here  # noqa: E402  (the chain fixture: pretrain -> sft -> feedback, in conftest.py)
from tokenizer import special_id  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per process: two processes on two cores
# Not dpo/margin: a difference of log-probs near -80, whose float32 last bits (~1e-5) it keeps whole.
CURVES = ("train/loss", "train/grad_norm", "val/loss", "reward/loss", "reward/margin", "dpo/loss", "dpo/chosen_logp",
          "dpo/rejected_logp")


def start_torchrun(*args, env=None):
    """torchrun with 2 processes (gloo), in a process group of its own as a terminal's job."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *map(str, args)]
    return subprocess.Popen(cmd, cwd=ROOT, env={**ENV, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def wait_for(proc, timeout, what):
    """(stdout, stderr) of a torchrun job; past the timeout (a rank waiting for a collective) it fails, after
    killing torchrun and its workers (each in a session of its own: not in torchrun's process group)."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        workers = [int(p.name) for p in Path("/proc").glob("[0-9]*")
                   if (p / "stat").exists() and (p / "stat").read_text().rsplit(")", 1)[-1].split()[1] == str(proc.pid)]
        for pid in [proc.pid, *workers]:
            os.kill(pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"torchrun {what} still running after {timeout} s: a rank hung")


def torchrun(*args, timeout=180, env=None, check=True):
    """2 processes, gloo; the timeout turns a hang into a failure, with no process left behind."""
    proc = start_torchrun(*args, env=env)
    stdout, stderr = wait_for(proc, timeout, args[0])
    r = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def torchrun_ranks(tmp, script, *args):
    """torchrun through tests/ddp_ranks.py: returns (result, [what rank 0 did, what rank 1 did])."""
    r = torchrun("tests/ddp_ranks.py", tmp / "ranks", script, *args, "--device", "cpu")
    return r, [torch.load(tmp / "ranks" / f"rank{k}.pt", weights_only=False) for k in (0, 1)]


def assert_curves_close(a, b):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in CURVES:
            if k in ra:
                assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6), (ra["step"], k)


def assert_only_rank0_wrote(out, stdout, ranks=None, n_steps=None):
    assert stdout.count("saved ") == 1  # rank 1 prints nothing (its stdout goes to /dev/null)
    steps = [r["step"] for r in common.read_metrics(out / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and len(steps) == n_steps  # one logger: every step once
    if ranks is not None:
        assert ranks[1]["written"] == []
        assert str(out / "model.pt") in ranks[0]["written"] and str(out / "meta.json") in ranks[0]["written"]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # no half-written file left behind


def few_preferences(tmp, n=96):
    """The chain's first n preference pairs: the ~900 of the feedback file cost seconds per run."""
    path = tmp / f"preferences_{n}.jsonl"
    if not path.exists():
        common.atomic_write_jsonl(path, common.read_jsonl(tmp / "feedback" / "preferences.jsonl")[:n])
    return path


def same_weights(a, b, skip=()):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if k not in skip)


# -----------------------------------------------------------------------------
# The supervised stages: bit for bit as one process with --grad-accum 2, close to one batch


def test_pretrain_under_torchrun_matches_one_process(chain, tmp_path, monkeypatch):
    tmp, _ = chain
    args = ["--data", tmp / "data" / "pretrain.txt", "--tokenizer", tmp / "tok", "--steps", 6, "--n-layer", 1,
            "--n-head", 2, "--n-embd", 32, "--block-size", 64, "--batch-size", 8, "--eval-every", 3,
            "--eval-batches", 1, "--device", "cpu"]
    # The command of docs/ddp.md, as a user types it.
    r = torchrun("pretrain.py", *args, "--out", tmp_path / "ddp")
    run_here(monkeypatch, "pretrain.py", *args, "--out", tmp_path / "accum", "--grad-accum", 2)
    run_here(monkeypatch, "pretrain.py", *args, "--out", tmp_path / "one")
    assert "ddp: 2 processes (gloo)" in r.stdout
    assert_only_rank0_wrote(tmp_path / "ddp", r.stdout, n_steps=6)
    ddp = rows(tmp_path / "ddp" / "metrics.jsonl")
    assert ddp == rows(tmp_path / "accum" / "metrics.jsonl")
    assert (tmp_path / "ddp" / "model.pt").read_bytes() == (tmp_path / "accum" / "model.pt").read_bytes()
    assert_curves_close(ddp, rows(tmp_path / "one" / "metrics.jsonl"))
    assert ddp[-1]["tokens"] == 6 * 8 * 64  # the global batch's tokens


def pretrain_args(tmp, steps=6):
    return ["pretrain.py", "--data", tmp / "data" / "pretrain.txt", "--tokenizer", tmp / "tok", "--steps", steps,
            "--n-layer", 1, "--n-head", 2, "--n-embd", 32, "--block-size", 64, "--batch-size", 8, "--eval-every", 3,
            "--eval-batches", 1, "--device", "cpu"]


@pytest.fixture(scope="module")
def straight_under_torchrun(chain, tmp_path_factory):
    """Six pretraining steps under torchrun, uninterrupted: the folder."""
    tmp, _ = chain
    out = tmp_path_factory.mktemp("ddp") / "straight"
    torchrun(*pretrain_args(tmp), "--out", out)
    return out


def assert_resumes_to_the_uninterrupted_run(tmp, out, straight, at_step):
    resumed = torchrun(*pretrain_args(tmp), "--out", out, "--resume")
    assert "resumed from" in resumed.stdout and f"at step {at_step}" in resumed.stdout
    assert rows(out / "metrics.jsonl") == rows(straight / "metrics.jsonl")
    assert (out / "model.pt").read_bytes() == (straight / "model.pt").read_bytes()


def test_pretrain_under_torchrun_killed_and_resumed_is_the_uninterrupted_run(chain, tmp_path, straight_under_torchrun):
    """Both ranks die (SIGKILL, the test switch) at the end of step 4, one step after the checkpoint of
    step 3; `--resume` under torchrun continues from it to the same weights and metrics, bit for bit."""
    tmp, _ = chain
    killed = torchrun(*pretrain_args(tmp), "--out", tmp_path / "resumed", env=fault("SIGKILL", 4), check=False)
    assert killed.returncode != 0
    assert [r["step"] for r in common.read_metrics(tmp_path / "resumed" / "metrics.jsonl")] == [1, 2, 3, 4]
    assert_resumes_to_the_uninterrupted_run(tmp, tmp_path / "resumed", straight_under_torchrun, at_step=3)


def test_a_ctrl_c_seen_by_one_rank_stops_every_rank_at_the_same_step(chain, tmp_path, straight_under_torchrun):
    """Rank 1 alone gets the Ctrl-C, during step 2: both ranks stop at the end of step 2 (a rank that
    went on would wait for the other forever), after rank 0 saved step 2 (not a checkpoint step)."""
    tmp, _ = chain
    out = tmp_path / "ctrl_c"
    r = torchrun(*pretrain_args(tmp), "--out", out, env={"RLHF_TEST_FAULT": "SIGINT@step=2,rank=1"}, check=False)
    assert r.returncode != 0 and "exitcode  : 130" in r.stderr, r.stderr[-3000:]  # (torchrun's own status is 1)
    assert "interrupted: checkpoint of step 2 saved" in r.stdout and "with --resume" in r.stdout
    assert json.loads((out / "meta.json").read_text())["step"] == 2
    assert [r["step"] for r in common.read_metrics(out / "metrics.jsonl")] == [1, 2]
    assert_resumes_to_the_uninterrupted_run(tmp, out, straight_under_torchrun, at_step=2)


def test_ctrl_c_at_the_terminal_saves_and_stops_the_torchrun_job(chain, tmp_path):
    """A Ctrl-C at the terminal goes to torchrun, which passes it on to every rank: the job stops at the
    end of one step with that step saved (resuming from it: the test above)."""
    tmp, _ = chain
    out, steps = tmp_path / "terminal", 400
    proc = start_torchrun(*pretrain_args(tmp, steps), "--eval-every", steps, "--out", out)
    for _ in range(600):  # until the first step is logged
        if (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip():
            break
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGINT)  # what a terminal does: to torchrun (the workers have sessions of their own)
    stdout, stderr = wait_for(proc, 120, "after a Ctrl-C")
    saved = json.loads((out / "meta.json").read_text())["step"]
    assert 0 < saved < steps and f"interrupted: checkpoint of step {saved} saved" in stdout, stdout[-2000:] + stderr[-2000:]
    assert [r["step"] for r in common.read_metrics(out / "metrics.jsonl")] == list(range(1, saved + 1))


def test_bad_input_under_torchrun_is_one_line_from_rank_0_and_exit_status_2(chain, tmp_path):
    tmp, _ = chain
    for extra, line in ((["--batch-size", "-4"], "error: --batch-size must be a positive number, got -4"),
                        (["--batch-size", "7"], "error: --batch-size 7 must be a multiple of 2 (processes 2 x "
                                                "micro-batches 1)")):
        r = torchrun(*pretrain_args(tmp), "--out", tmp_path / "bad", *extra, check=False)
        assert r.returncode != 0 and "exitcode  : 2" in r.stderr, r.stderr[-3000:]  # torchrun's own status: 1
        assert [x for x in r.stderr.splitlines() if x.startswith("error: ")] == [line]
        assert not (tmp_path / "bad").exists()


def test_sft_under_torchrun_matches_one_process(chain, tmp_path, monkeypatch):
    tmp, _ = chain
    args = ["--init", tmp / "pretrain", "--data", tmp / "data" / "sft.jsonl", "--eval-data",
            tmp / "data" / "val_prompts.jsonl", "--steps", 4, "--batch-size", 8, "--eval-every", 2,
            "--eval-prompts", 4, "--max-new-tokens", 8]
    r, ranks = torchrun_ranks(tmp_path, "sft.py", *args, "--out", tmp_path / "ddp")
    run_here(monkeypatch, "sft.py", *args, "--out", tmp_path / "accum", "--grad-accum", 2)
    run_here(monkeypatch, "sft.py", *args, "--out", tmp_path / "one")
    assert_only_rank0_wrote(tmp_path / "ddp", r.stdout, ranks, n_steps=4)
    assert same_weights(ranks[0]["models"]["model"], ranks[1]["models"]["model"])
    ddp = rows(tmp_path / "ddp" / "metrics.jsonl")
    # Demonstrations differ in length: each half counts for its share of the batch's response tokens.
    assert ddp == rows(tmp_path / "accum" / "metrics.jsonl")
    assert_curves_close(ddp, rows(tmp_path / "one" / "metrics.jsonl"))
    assert "eval/gold_reward" in ddp[1]  # rank 0 evaluated


def test_reward_with_grad_accum_under_torchrun_matches_one_process(chain, tmp_path, monkeypatch):
    """2 ranks x 2 micro-batches: the first backward of each step skips its all-reduce (no_sync)."""
    tmp, _ = chain
    args = ["--init", tmp / "sft", "--data", few_preferences(tmp), "--steps", 5, "--batch-size", 8,
            "--eval-every", 2, "--val-fraction", 0.25]
    r, ranks = torchrun_ranks(tmp_path, "reward.py", *args, "--out", tmp_path / "ddp", "--grad-accum", 2)
    run_here(monkeypatch, "reward.py", *args, "--out", tmp_path / "accum", "--grad-accum", 4)
    run_here(monkeypatch, "reward.py", *args, "--out", tmp_path / "one")
    assert_only_rank0_wrote(tmp_path / "ddp", r.stdout, ranks, n_steps=5)
    ddp = rows(tmp_path / "ddp" / "metrics.jsonl")
    # The same four quarters of each batch, summed as (q0 + q1) + (q2 + q3) against ((q0 + q1) + q2) + q3.
    assert_curves_close(ddp, rows(tmp_path / "accum" / "metrics.jsonl"))
    assert_curves_close(ddp, rows(tmp_path / "one" / "metrics.jsonl"))
    # Same trained weights on both ranks; rank 0 alone then folded the normalising gain and bias into the head.
    w0, w1 = ranks[0]["models"]["model"], ranks[1]["models"]["model"]
    assert same_weights(w0, w1, skip=("head.weight", "head.bias"))
    norm = json.loads((tmp_path / "ddp" / "meta.json").read_text())["reward_norm"]
    torch.testing.assert_close(w0["head.weight"], w1["head.weight"] * norm["gain"])
    assert w0["head.bias"].item() == pytest.approx(w1["head.bias"].item() * norm["gain"] + norm["bias"], abs=1e-5)
    assert w0["head.bias"].equal(torch.load(tmp_path / "ddp" / "model.pt", weights_only=True)["head.bias"])


def test_dpo_under_torchrun_matches_one_process(chain, tmp_path, monkeypatch):
    tmp, _ = chain
    args = ["--init", tmp / "sft", "--data", few_preferences(tmp), "--steps", 4,
            "--batch-size", 8, "--eval-every", 2, "--eval-data", tmp / "data" / "val_prompts.jsonl",
            "--eval-prompts", 4, "--max-new-tokens", 6, "--lr", 1e-2]
    r, ranks = torchrun_ranks(tmp_path, "dpo.py", *args, "--out", tmp_path / "ddp")
    run_here(monkeypatch, "dpo.py", *args, "--out", tmp_path / "accum", "--grad-accum", 2)
    run_here(monkeypatch, "dpo.py", *args, "--out", tmp_path / "one")
    assert_only_rank0_wrote(tmp_path / "ddp", r.stdout, ranks, n_steps=5)  # steps 0 (the SFT model) to 4
    assert same_weights(ranks[0]["models"]["policy"], ranks[1]["models"]["policy"])
    ddp = rows(tmp_path / "ddp" / "metrics.jsonl")
    assert ddp == rows(tmp_path / "accum" / "metrics.jsonl")
    one = rows(tmp_path / "one" / "metrics.jsonl")
    assert ddp[0] == one[0]  # step 0 evaluates the same SFT model on rank 0: exactly as one process
    assert_curves_close(ddp, one)


def test_a_batch_that_does_not_split_stops_with_one_clear_line(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:  # checked before anything is read or written
        run_here(monkeypatch, "pretrain.py", "--out", tmp_path / "o", "--batch-size", 6, "--grad-accum", 4)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --batch-size 6 must be a multiple of 4 (processes 1 x micro-batches 4)"
    assert not (tmp_path / "o").exists()


# -----------------------------------------------------------------------------
# PPO: each rank samples its own episodes, so compare what can be compared


def test_ppo_under_torchrun_keeps_ranks_in_step_and_logs_global_means(stages, tmp_path):
    d = stages
    args = ["--init", d / "sft", "--reward", d / "reward", "--data", d / "data" / "prompts.jsonl",
            "--eval-data", d / "data" / "val_prompts.jsonl", "--batch-size", 4, "--minibatch-size", 2,
            "--max-new-tokens", 5, "--ppo-epochs", 2, "--eval-prompts", 4, "--eval-every", 2, "--sample-every", 2,
            "--steps", 3, "--kernels", "torch", "--adaptive-kl", "--whiten-rewards"]
    r, ranks = torchrun_ranks(tmp_path, "ppo.py", *args, "--out", tmp_path / "ddp")
    out = tmp_path / "ddp"
    assert_only_rank0_wrote(out, r.stdout, ranks, n_steps=4)  # steps 0 (the SFT model) to 3
    # Different episodes on each rank, yet the same policy and value model after every update: DDP
    # all-reduced both. (What rank 0 saved is what both hold.)
    for name in ("policy", "value_model"):
        assert same_weights(ranks[0]["models"][name], ranks[1]["models"][name]), name
    assert same_weights(ranks[0]["models"]["policy"], torch.load(out / "model.pt", weights_only=True))
    logged = rows(out / "metrics.jsonl")[1:]  # steps 1, 2, 3 (step 0 evaluates SFT, before any rollout)
    assert "eval/gold_reward" in logged[1]

    # Step 1 again, here, one rank at a time: rank r samples prompts 2r, 2r+1 of the shared shuffle
    # with its own seed (seed + 1 + 1000 r), from the same starting weights. The logged figures must
    # be the global means, computed as the script does (the mean of the ranks' means for per-episode
    # figures, all-reduced sums for per-token ones): equal, not just close.
    a = ppo.parser.parse_args(list(map(str, args)))
    policy, enc, _ = common.load_policy(d / "sft", "cpu")
    ref, _, _ = common.load_policy(d / "sft", "cpu")
    reward_model, _, _ = common.load_scalar_model(d / "reward", "cpu")
    value_model, _, _ = common.load_scalar_model(d / "reward", "cpu")
    prompts = encode_prompts(enc, [p["prompt"] for p in common.read_jsonl(a.data)], 64 - a.max_new_tokens)
    pick = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(a.seed))[: a.batch_size].tolist()
    batches = []
    for rank in (0, 1):
        queries, query_mask = left_pad([prompts[i] for i in pick[2 * rank : 2 * rank + 2]], enc.eot_token)
        batches.append(ppo.rollout(policy, ref, value_model, reward_model, queries, query_mask, a, a.kl_coef,
                                   special_id(enc, "<|end|>"), enc.eot_token,
                                   torch.Generator().manual_seed(a.seed + 1 + 1000 * rank)))
    assert not torch.equal(batches[0]["responses"], batches[1]["responses"])  # the ranks did sample differently
    mean_of_ranks = lambda f: (f(batches[0]) + f(batches[1])) / 2  # noqa: E731
    first = logged[0]
    assert first["objective/score"] == mean_of_ranks(lambda b: b["scores"].mean().item())
    assert first["objective/kl"] == mean_of_ranks(lambda b: b["kl"].sum(1).mean().item())
    assert first["response/length"] == mean_of_ranks(lambda b: b["mask"].sum(1).float().mean().item())
    tokens = sum((b["entropy"] * b["mask"]).sum() for b in batches) / sum(b["mask"].sum() for b in batches)
    assert first["objective/entropy"] == tokens.item()
    # The adaptive controller saw that global KL and the global batch (on every rank: they stayed in step).
    assert logged[1]["objective/kl_coef"] == ppo.adaptive_kl_coef(a.kl_coef, first["objective/kl"], a.target_kl,
                                                                   a.batch_size, a.kl_horizon)
