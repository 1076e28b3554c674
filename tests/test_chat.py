"""chat.py on tiny checkpoints made here: the interactive loop, --prompt, --compare with gold and proxy
scores, and the reward model's right-padded batch scoring each answer as it would alone."""

import random
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import chat  # noqa: E402
import common  # noqa: E402
from model import GPT, GPTConfig, ScalarModel  # noqa: E402
from tokenizer import decode_response, encode_prompt, encode_response, save_tokenizer, special_id, train_bpe  # noqa: E402
from world import World  # noqa: E402

MAX_NEW = 8


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A tokenizer, two tiny GPTs (stages sft and ppo), a reward model, and a world.json for the gold judge."""
    root = tmp_path_factory.mktemp("chat")
    world = World(0)
    enc = train_bpe(world.corpus(random.Random(0), 60), 300)
    save_tokenizer(enc, root / "tokenizer")
    config = GPTConfig(block_size=48, vocab_size=enc.n_vocab, n_layer=1, n_head=2, n_embd=32)
    for seed, stage in ((0, "sft"), (1, "ppo")):
        torch.manual_seed(seed)
        meta = {"stage": stage, "config": asdict(config), "step": 3, "tokenizer": str(root / "tokenizer")}
        common.save_checkpoint(root / stage, GPT(config), meta)
    torch.manual_seed(2)
    rm = ScalarModel(config)
    torch.nn.init.normal_(rm.head.bias, std=1.0)  # non-zero everywhere, so a wrong read position shows
    common.save_checkpoint(root / "reward", rm, {"stage": "reward", "config": asdict(config), "step": 3,
                                                 "tokenizer": str(root / "tokenizer")})
    common.atomic_write_json(root / "data" / "world.json", world.to_json())
    return root


def run_chat(*args, stdin=None):
    r = subprocess.run([sys.executable, "chat.py", *map(str, args)], cwd=ROOT, input=stdin, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def greedy_reference(stage_dir, prompt):
    """The greedy answer computed here by hand: chat template, argmax token by token, cut at <|end|>."""
    model, enc, _ = common.load_policy(stage_dir, "cpu")
    model.eval()
    ids, end = encode_prompt(enc, prompt), special_id(enc, "<|end|>")
    out = []
    with torch.no_grad():
        for _ in range(MAX_NEW):
            nxt = model(torch.tensor([ids + out]))[0, -1].argmax().item()
            out.append(nxt)
            if nxt == end:
                break
    return decode_response(enc, out).strip()


def test_interactive_loop_answers_each_prompt_until_quit(ckpts):
    out = run_chat("--ckpt", ckpts / "sft", "--temperature", 0, "--max-new-tokens", MAX_NEW,
                   stdin="Hello!\nWhat is 2 plus 3?\n/quit\nnever answered\n")
    assert out.count("you> ") == 3  # two prompts, then /quit
    assert "you> Hello!\n" in out and "you> What is 2 plus 3?\n" in out
    assert out.count("assistant> ") == 2
    assert "never answered" not in out
    answers = [line.split("assistant> ", 1)[1] for line in out.splitlines() if "assistant> " in line]
    assert answers[0].split("  [no <|end|>")[0] == greedy_reference(ckpts / "sft", "Hello!")
    assert "single-turn" in out


def test_prompt_mode_gives_one_greedy_answer(ckpts):
    out = run_chat("--ckpt", ckpts / "ppo", "--prompt", "What colour is the milt?", "--temperature", 0,
                   "--max-new-tokens", MAX_NEW)
    lines = [line for line in out.splitlines() if line.startswith("assistant> ")]
    assert len(lines) == 1 and "you> " not in out
    assert lines[0][len("assistant> "):].split("  [no <|end|>")[0] == greedy_reference(ckpts / "ppo", "What colour is the milt?")


def test_compare_prints_each_model_with_gold_and_proxy_scores(ckpts):
    prompt = "Hello!"
    out = run_chat("--compare", ckpts / "sft", ckpts / "ppo", "--prompt", prompt, "--temperature", 0,
                   "--max-new-tokens", MAX_NEW, "--data", ckpts / "data", "--reward", ckpts / "reward")
    world = World(0)
    rm, enc, _ = common.load_scalar_model(ckpts / "reward", "cpu")
    for name in ("sft", "ppo"):
        header = re.search(rf"^--- {name} +\[{name}\]  gold ([+-]\d+\.\d\d) \| proxy ([+-]\d+\.\d\d)$", out, re.M)
        assert header, out
        text = greedy_reference(ckpts / name, prompt)
        assert float(header.group(1)) == pytest.approx(world.gold_score(prompt, text), abs=0.006)
        ids = torch.tensor([encode_prompt(enc, prompt) + encode_response(enc, text)])
        with torch.no_grad():
            alone = rm(ids, torch.ones_like(ids))[0, -1].item()  # value at the last token, no padding at all
        answer = out[header.end():].split("\n")[1]
        unfinished = "[no <|end|>" in answer  # as PPO scores it: the missing-end penalty, -1
        assert float(header.group(2)) == pytest.approx(-1.0 if unfinished else alone, abs=0.006)
    assert out.count("assistant> ") == 2
    # Interactive compare, ended by end of input (Ctrl-D); without a world or a reward model the scores
    # are skipped with a note, not an error.
    out = run_chat("--compare", ckpts / "sft", ckpts / "ppo", "--max-new-tokens", MAX_NEW,
                   "--data", ckpts / "nowhere", "--reward", ckpts / "nowhere", stdin="Hi\n")
    assert out.count("you> ") == 2 and out.count("assistant> ") == 2
    assert "gold scores skipped" in out and "proxy scores skipped" in out
    assert re.findall(r"^--- (\w+) +\[\w+\]$", out, re.M) == ["sft", "ppo"]  # headers without scores


def test_proxy_scores_right_padded_batch_equals_each_alone(ckpts):
    rm, enc, _ = common.load_scalar_model(ckpts / "reward", "cpu")
    rm.eval()
    prompt, texts = "Hello!", ["Hi.", "Hello there, how can I help you?", "", "x" * 200]
    got = chat.proxy_scores(rm, enc, prompt, texts, "cpu")
    assert got[3] is None  # longer than the reward model's context
    for text, score in zip(texts[:3], got):
        ids = torch.tensor([encode_prompt(enc, prompt) + encode_response(enc, text)])
        with torch.no_grad():
            ref = rm(ids, torch.ones_like(ids))[0, -1].item()
        assert score == pytest.approx(ref, abs=1e-5)
    # as PPO scores them: an answer that never ended gets the missing-end penalty, or ('none') is read without <|end|>
    assert chat.proxy_scores(rm, enc, prompt, texts[:2], "cpu", ended=[True, False])[1] == -1.0
    unfinished = chat.proxy_scores(rm, enc, prompt, texts[:2], "cpu", ended=[True, False], missing_end_penalty=None)
    ids = torch.tensor([encode_prompt(enc, prompt) + encode_response(enc, texts[1], end=False)])
    with torch.no_grad():
        assert unfinished[1] == pytest.approx(rm(ids, torch.ones_like(ids))[0, -1].item(), abs=1e-5)
