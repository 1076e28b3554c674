"""SFT: the loss counts response tokens only (against a float64 loop), both data layouts and their
error lines, and a tiny run of sft.py that, killed and resumed, ends as an uninterrupted one."""

import json
import math
import os
import random
import runpy
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: a second thread only adds overhead
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from sft import collate, load_sft, sft_loss  # noqa: E402

PAD = 0


def examples():
    # (prompt ids, response ids): different lengths, so rows get padded differently
    return [([1, 5, 6, 2], [7, 8, 3]), ([1, 9, 2], [4, 4, 5, 6, 3]), ([1, 5, 5, 5, 5, 2], [3])]


def run_here(monkeypatch, args):
    """Run a stage in this process (runpy: no new interpreter to start)."""
    monkeypatch.setattr(sys, "argv", list(map(str, args)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runpy.run_path(str(ROOT / args[0]), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
        monkeypatch.undo()


# -----------------------------------------------------------------------------
# The loss mask


def test_collate_targets_are_the_response_only():
    x, y = collate(examples(), PAD)
    assert x.shape == y.shape == (3, 7)  # longest: 3 + 5 tokens, minus the last
    assert x[0].tolist() == [1, 5, 6, 2, 7, 8, PAD]
    assert y[0].tolist() == [-100, -100, -100, 7, 8, 3, -100]  # <|assistant|> predicts the first response token
    assert x[1].tolist() == [1, 9, 2, 4, 4, 5, 6]
    assert y[1].tolist() == [-100, -100, 4, 4, 5, 6, 3]
    assert y[2].tolist() == [-100] * 5 + [3, -100]


def loop_loss(logits, exs):
    """float64 reference from the raw (prompt, response) lists: -log p of each response token, averaged."""
    total, n = 0.0, 0
    for b, (p, r) in enumerate(exs):
        for i, tok in enumerate(r):
            row = logits[b, len(p) - 1 + i].double()  # the position that predicts response token i
            total -= (row - torch.logsumexp(row, 0))[tok].item()
            n += 1
    return total / n


def test_loss_equals_a_loop_over_response_tokens():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11) * 3
    x, y = collate(examples(), PAD)
    assert sft_loss(logits, y).item() == pytest.approx(loop_loss(logits, examples()), rel=1e-5)


def test_prompt_and_pad_positions_carry_no_loss_and_no_gradient():
    torch.manual_seed(1)
    logits = (torch.randn(3, 7, 11) * 3).requires_grad_()
    _, y = collate(examples(), PAD)
    loss = sft_loss(logits, y)
    loss.backward()
    masked = y == -100
    assert logits.grad[masked].abs().max() == 0  # no gradient reaches a prompt or pad position
    assert logits.grad[~masked].abs().sum(-1).min() > 0  # every response position gets one
    # Changing everything the model predicts at prompt/pad positions leaves the loss as it was...
    changed = logits.detach().clone()
    changed[masked] = torch.randn(int(masked.sum()), 11) * 10
    assert sft_loss(changed, y).item() == pytest.approx(loss.item(), rel=1e-6)
    # ...and so does changing the prompt tokens the targets would have held (the prompt is given, not learned)
    other = [([1, 2, 3, 2], r) if len(p) == 4 else (p, r) for p, r in examples()]
    assert torch.equal(collate(other, PAD)[1], y)


def test_batched_loss_through_a_model_equals_one_unpadded_example_at_a_time():
    torch.manual_seed(2)
    model = GPT(GPTConfig(block_size=16, vocab_size=11, n_layer=1, n_head=2, n_embd=16))
    x, y = collate(examples(), PAD)
    batched = sft_loss(model(x), y).item()  # right padding: real positions never attend to a pad
    total, n = 0.0, 0
    for p, r in examples():
        logits = model(torch.tensor([p + r[:-1]]))[0].double()  # this example alone, no padding at all
        for i, tok in enumerate(r):
            total -= torch.log_softmax(logits[len(p) - 1 + i], 0)[tok].item()
            n += 1
    assert batched == pytest.approx(total / n, rel=1e-5)


# -----------------------------------------------------------------------------
# The loader: both layouts, and file:line errors


def write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_load_sft_reads_both_layouts(tmp_path):
    path = write(tmp_path / "d.jsonl", [
        {"prompt": "Hi!", "response": "Hello!", "family": "greet"},
        "",
        {"messages": [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "What is 2 plus 2?"},
                      {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3 plus 3?"},
                      {"role": "assistant", "content": "6."}]},
        {"messages": [{"role": "user", "content": "Hey"}, {"role": "assistant", "content": "Hello."},
                      {"role": "user", "content": "unanswered"}]},
    ])
    rows = load_sft(path)
    assert [(r["prompt"], r["response"]) for r in rows] == [("Hi!", "Hello!"), ("And 3 plus 3?", "6."), ("Hey", "Hello.")]
    assert rows[0]["family"] == "greet"


@pytest.mark.parametrize("bad_line, expected", [
    ('{"prompt": "Hi!"}', "missing field 'response'"),
    ('{"prompt": "Hi!", "response": 3}', "'response' must be a string"),
    ('{"prompt": "Hi!", "response": "x"', "not valid JSON"),
    ('{"messages": [{"role": "user", "content": "Hi"}]}', "no assistant turn"),
    ('{"messages": [{"role": "assistant", "content": "Hi"}]}', "must follow a user turn"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}', "'role' and 'content'"),
])
def test_load_sft_errors_name_file_and_line(tmp_path, bad_line, expected):
    path = write(tmp_path / "bad.jsonl", [{"prompt": "Hi!", "response": "Hello!"}, "", bad_line])
    with pytest.raises(common.BadInput) as e:
        load_sft(path)
    assert e.value.code == 2
    assert e.value.message.startswith(f"{path}:3:") and expected in e.value.message


def test_bad_data_stops_sft_py_with_exit_2_and_nothing_written(tmp_path, monkeypatch, capsys):
    path = write(tmp_path / "bad.jsonl", [{"prompt": "Hi!", "response": "Hello!"}, {"response": "x"}])
    with pytest.raises(SystemExit) as e:
        run_here(monkeypatch, ["sft.py", "--data", path, "--init", tmp_path / "none", "--out", tmp_path / "out"])
    assert e.value.code == 2
    assert f"{path}:2: missing field 'prompt'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# A tiny sft.py run: it learns, it evaluates, and an interrupted run resumes to the same metrics


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tokenizer import save_tokenizer, train_bpe
    from world import World

    tmp = tmp_path_factory.mktemp("sft")
    world, rng = World(0), random.Random(0)
    enc = train_bpe(world.corpus(rng, 300), 300)
    save_tokenizer(enc, tmp / "tok")
    config = GPTConfig(block_size=96, vocab_size=320, n_layer=1, n_head=2, n_embd=32)
    torch.manual_seed(0)
    common.save_checkpoint(tmp / "pre", GPT(config), {"stage": "pretrain", "config": asdict(config),
                                                       "tokenizer": str(tmp / "tok"), "step": 0, "final": {}})
    demos = []
    for _ in range(200):
        p = world.sample_prompt(rng)
        demos.append({**p, "response": world.demonstrate(p["prompt"], rng)})
    common.atomic_write_jsonl(tmp / "data" / "sft.jsonl", demos)
    val = [world.sample_prompt(rng, split="val") for _ in range(12)]
    common.atomic_write_jsonl(tmp / "data" / "val_prompts.jsonl", val)
    common.atomic_write_json(tmp / "data" / "world.json", world.to_json())

    def args(out, *extra):
        return ["sft.py", "--init", tmp / "pre", "--data", tmp / "data" / "sft.jsonl", "--eval-data",
                tmp / "data" / "val_prompts.jsonl", "--out", tmp / out, "--steps", 6, "--batch-size", 16, "--lr",
                1e-2, "--warmup-steps", 2, "--eval-every", 2, "--eval-prompts", 4, "--max-new-tokens", 8, "--device", "cpu",
                *extra]

    def run(out, *extra):
        return subprocess.run([sys.executable, *map(str, args(out, *extra))], cwd=ROOT, env=ENV, capture_output=True,
                              text=True, timeout=180)

    return tmp, args, run


@pytest.fixture(scope="module")
def straight(tiny):
    """The uninterrupted run, in its own process: tmp/a."""
    tmp, _, run = tiny
    r = run("a")
    assert r.returncode == 0, r.stderr
    return tmp / "a"


def test_tiny_run_learns_and_reports_the_headroom(tiny, straight):
    tmp, _, _ = tiny
    rows = common.read_metrics(tmp / "a" / "metrics.jsonl")
    assert [row["step"] for row in rows] == list(range(1, 7))
    assert rows[-1]["train/loss"] < 0.8 * rows[0]["train/loss"]  # learning, from an untrained model
    assert rows[-1]["val/loss"] < rows[1]["val/loss"]
    for key in ("samples", "train/lr", "train/grad_norm", "val/loss", "eval/gold_reward", "eval/gold_reward_se"):
        assert key in rows[1]
    meta = json.loads((tmp / "a" / "meta.json").read_text())
    assert meta["stage"] == "sft" and meta["step"] == 6 and meta["tokenizer"] == str(tmp / "tok")
    final = meta["final"]
    for key in ("eval/gold_reward", "eval/gold_reward_pretrain", "eval/gold_reward_ideal", "eval/gold_reward_se",
                "eval/gold_reward_pretrain_se", "eval/gold_reward_ideal_se", "val/loss"):
        assert math.isfinite(final[key])
    assert final["eval/gold_reward_ideal"] == pytest.approx(1.5) and final["eval/gold_reward_ideal_se"] == 0
    assert final["eval/gold_reward"] == rows[-1]["eval/gold_reward"]  # the last row judged every eval prompt
    common.load_policy(tmp / "a", "cpu", expect_stage="sft")  # loadable as the next stage's --init


def test_run_killed_between_checkpoints_resumes_to_the_same_run(tiny, straight, kill_resume, same_run):
    tmp, args, _ = tiny
    # SIGKILL right after step 3 is logged; the last checkpoint was at step 2 (--eval-every 2)
    killed, resumed = kill_resume(args("b"), kill_at=3)
    assert "step 3/6" in killed.stdout and "step 4/6" not in killed.stdout
    assert f"resumed from {tmp / 'b'} at step 2" in resumed.stdout
    same_run(straight, tmp / "b", steps=range(1, 7))  # step 3 done again, not twice
