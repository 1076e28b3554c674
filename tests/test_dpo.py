"""DPO: the loss on a hand-computed batch, response-only sequence log-probs against a float64 loop,
a learning check a sign-flipped loss fails, and a tiny end-to-end run (frozen reference, determinism)."""

import copy
import json
import math
import os
import random
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
from conftest import metrics_without_time  # noqa: E402
from dpo import dpo_loss, pair_accuracy, sequence_logprobs  # noqa: E402
from model import GPT, GPTConfig, left_pad  # noqa: E402


def tiny_gpt(vocab_size=16, block_size=16, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=1, n_head=2, n_embd=32))


# -----------------------------------------------------------------------------
# The loss


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_loss_matches_hand_computation(eps):
    pc, pr = [-3.0, -10.0, -5.5], [-4.0, -9.0, -5.5]
    rc, rr = [-3.5, -8.0, -6.0], [-3.0, -9.5, -4.0]
    beta = 0.5
    sig = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    for i in range(3):
        h = (pc[i] - rc[i]) - (pr[i] - rr[i])
        expected = -(1 - eps) * math.log(sig(beta * h)) - eps * math.log(sig(-beta * h))
        losses, cr, rj = dpo_loss(*(torch.tensor(x, dtype=torch.float64) for x in (pc, pr, rc, rr)), beta, eps)
        assert losses[i].item() == pytest.approx(expected, rel=1e-12)
        assert cr[i].item() == pytest.approx(beta * (pc[i] - rc[i]))
        assert rj[i].item() == pytest.approx(beta * (pr[i] - rr[i]))
    # pair 0: h = 0.5 - (-1.0) = 1.5 by hand: -log sigmoid(0.75) = log(1 + e^-0.75)
    if eps == 0.0:
        assert losses[0].item() == pytest.approx(math.log(1 + math.exp(-0.75)), rel=1e-12)
    # the rewards carry no gradient; the loss does, to the policy's log-probs only
    p = torch.tensor(pc, requires_grad=True)
    losses, cr, _ = dpo_loss(p, torch.tensor(pr), torch.tensor(rc), torch.tensor(rr), beta, eps)
    assert not cr.requires_grad and losses.requires_grad


def test_accuracy_counts_ties_half():
    assert pair_accuracy(torch.tensor([1.0, 0.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 1.0, -1.0])).item() == 0.5


# -----------------------------------------------------------------------------
# Sequence log-probs: response tokens only


def a_batch(vocab_size=16, seed=0):
    g = random.Random(seed)
    prompts = [[g.randrange(1, vocab_size) for _ in range(n)] for n in (3, 5, 2)]
    responses = [[g.randrange(1, vocab_size) for _ in range(n)] for n in (4, 1, 6)]
    idx, mask = left_pad([p + r for p, r in zip(prompts, responses)], pad_id=0)
    resp, _ = left_pad([[0] * len(p) + [1] * len(r) for p, r in zip(prompts, responses)], pad_id=0)
    return idx, mask, resp


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sequence_logprobs_equals_float64_loop_over_response_positions(temperature):
    model = tiny_gpt().eval()
    idx, mask, resp = a_batch()
    got = sequence_logprobs(model, idx, mask, resp, temperature)
    with torch.no_grad():
        logits = model(idx, mask).double()
    for b in range(idx.size(0)):
        expected = 0.0
        for t in range(1, idx.size(1)):
            if resp[b, t] == 1:  # token t is a response token, predicted at position t - 1
                expected += torch.log_softmax(logits[b, t - 1] / temperature, dim=-1)[idx[b, t]].item()
        assert got[b].item() == pytest.approx(expected, abs=1e-4)


def test_prompt_and_padding_predictions_do_not_count():
    model = tiny_gpt().eval()
    idx, mask, resp = a_batch()
    scored = torch.zeros_like(resp, dtype=torch.bool)
    scored[:, :-1] = resp[:, 1:].bool()  # the positions whose logits predict a response token

    class Scrambled(torch.nn.Module):  # the same model, with garbage where prompt/pad tokens are predicted
        def forward(self, idx, attention_mask):
            logits = model(idx, attention_mask)
            noise = 50 * torch.randn_like(logits)
            return torch.where(scored[..., None], logits, noise)

    with torch.no_grad():
        a = sequence_logprobs(model, idx, mask, resp)
        b = sequence_logprobs(Scrambled(), idx, mask, resp)
    torch.testing.assert_close(a, b)
    # and the response tokens do count: dropping one changes the sum
    resp2 = resp.clone()
    resp2[0, -1] = 0
    with torch.no_grad():
        assert sequence_logprobs(model, idx, mask, resp2)[0] != a[0]


# -----------------------------------------------------------------------------
# Learning: the policy learns to prefer the chosen answers; a sign-flipped loss would unlearn them


def synthetic_pairs(n=48, seed=0):
    """prompt [1, a]; chosen is 'a + 1' said 1-3 times then end (2); rejected is 'a + 5' likewise."""
    g = random.Random(seed)
    pairs = []
    for _ in range(n):
        a = g.randrange(3, 8)
        pairs.append(([1, a], [a + 1] * g.randint(1, 3) + [2], [a + 5] * g.randint(1, 3) + [2]))
    return pairs


def train_accuracy(flip, steps=15):
    pairs = synthetic_pairs()
    seqs = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]
    idx, mask = left_pad(seqs, 0)
    resp, _ = left_pad([[0] * len(p) + [1] * len(c) for p, c, _ in pairs]
                       + [[0] * len(p) + [1] * len(r) for p, _, r in pairs], 0)
    policy = tiny_gpt().eval()
    ref = copy.deepcopy(policy).requires_grad_(False)
    n = len(pairs)
    with torch.no_grad():
        ref_logps = sequence_logprobs(ref, idx, mask, resp)
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    accs = []
    for _ in range(steps):
        logps = sequence_logprobs(policy, idx, mask, resp)
        args = (logps[:n], logps[n:], ref_logps[:n], ref_logps[n:])
        if flip:  # a broken loss: rewards the rejected answer
            args = (args[1], args[0], args[3], args[2])
        losses, _, _ = dpo_loss(*args, beta=0.5)
        _, cr, rr = dpo_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], beta=0.5)
        accs.append(pair_accuracy(cr, rr).item())
        opt.zero_grad()
        losses.mean().backward()
        opt.step()
    with torch.no_grad():
        logps = sequence_logprobs(policy, idx, mask, resp)
        _, cr, rr = dpo_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], beta=0.5)
    return accs[0], pair_accuracy(cr, rr).item()


def test_dpo_learns_the_preferences_and_a_flipped_loss_does_not():
    start, end = train_accuracy(flip=False)
    assert start == 0.5  # pi = pi_ref: every pair ties
    assert end >= 0.9
    _, end_flipped = train_accuracy(flip=True)
    assert end_flipped <= 0.1


# -----------------------------------------------------------------------------
# End to end: dpo.py on a tiny checkpoint and a preference file made from the world


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from tokenizer import save_tokenizer, train_bpe
    from world import World

    tmp = tmp_path_factory.mktemp("dpo")
    world = World(0)
    rng = random.Random(0)
    text = world.corpus(rng, 300)
    enc = train_bpe(text, 300)
    save_tokenizer(enc, tmp / "tok")
    config = GPTConfig(block_size=64, vocab_size=320, n_layer=1, n_head=2, n_embd=32)
    torch.manual_seed(0)
    common.save_checkpoint(tmp / "sft", GPT(config), {"stage": "sft", "config": asdict(config),
                                                       "tokenizer": str(tmp / "tok"), "step": 0, "final": {}})
    rows = []
    from tokenizer import encode_prompt, encode_response
    fits = lambda p, r: len(encode_prompt(enc, p) + encode_response(enc, r)) <= config.block_size  # noqa: E731
    while len(rows) < 40:  # pairs that fit the context, so no response is cut
        p = world.sample_prompt(rng)["prompt"]
        a, b = world.demonstrate(p, rng), world.demonstrate(p, rng)
        if not (fits(p, a) and fits(p, b)):
            continue
        chosen, rejected = (a, b) if world.label(p, a, b, 0.5, rng) else (b, a)
        rows.append({"prompt": p, "chosen": chosen, "rejected": rejected})
    common.atomic_write_jsonl(tmp / "prefs.jsonl", rows)
    val = [world.sample_prompt(rng, split="val") for _ in range(6)]
    common.atomic_write_jsonl(tmp / "data" / "val_prompts.jsonl", val)
    common.atomic_write_json(tmp / "data" / "world.json", world.to_json())

    def argv(out, *extra):
        return ["dpo.py", "--init", tmp / "sft", "--data", tmp / "prefs.jsonl", "--out", tmp / out,
                "--steps", 4, "--batch-size", 8, "--eval-every", 2, "--eval-data", tmp / "data" / "val_prompts.jsonl",
                "--eval-prompts", 6, "--max-new-tokens", 6, "--lr", 1e-2, "--device", "cpu", *extra]

    def run(out, *extra):
        return subprocess.run([sys.executable, *map(str, argv(out, *extra))], cwd=ROOT, capture_output=True, text=True,
                              timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})

    run.argv = argv
    return tmp, run


@pytest.fixture(scope="module")
def straight(tiny_run):
    """The uninterrupted run, in its own process: tmp/a (and whether it left the SFT checkpoint as it was)."""
    tmp, run = tiny_run
    init_weights = (tmp / "sft" / "model.pt").read_bytes()
    r = run("a")
    assert r.returncode == 0, r.stderr
    return tmp / "a", (tmp / "sft" / "model.pt").read_bytes() == init_weights


def test_end_to_end_reference_frozen_and_deterministic(tiny_run, straight):
    tmp, run = tiny_run
    _, sft_untouched = straight
    r = run("b")
    assert r.returncode == 0, r.stderr
    assert sft_untouched  # the reference's checkpoint is untouched
    meta = json.loads((tmp / "a" / "meta.json").read_text())
    assert meta["stage"] == "dpo" and meta["step"] == 4
    rows = common.read_metrics(tmp / "a" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    for key in ("dpo/loss", "dpo/accuracy", "dpo/margin", "dpo/chosen_reward", "dpo/rejected_reward",
                "dpo/chosen_logp", "dpo/rejected_logp", "pairs"):
        assert key in rows[1]
    for key in ("val/loss", "val/accuracy", "eval/gold_reward", "eval/kl_to_sft"):
        assert key in rows[2] and key in rows[0]
    assert rows[1]["dpo/loss"] == pytest.approx(math.log(2), abs=1e-5)  # step 1: pi = pi_ref
    assert metrics_without_time(tmp / "a" / "metrics.jsonl") == metrics_without_time(tmp / "b" / "metrics.jsonl")

    # The stored reference log-probs are the SFT model's, recomputed here with a plain float64 loop,
    # and not the trained policy's.
    state = torch.load(tmp / "a" / "resume.pt", weights_only=False)
    sft, enc, _ = common.load_policy(tmp / "sft", "cpu")
    dpo_model, _, _ = common.load_policy(tmp / "a", "cpu")
    ref_chosen, ref_rejected = state["ref_logps"]["train"]
    assert len(ref_chosen) >= 30

    def loop_logp(model, prompt, response):
        from tokenizer import encode_prompt, encode_response
        p, r = encode_prompt(enc, prompt), encode_response(enc, response)
        with torch.no_grad():
            logits = model(torch.tensor([p + r])).double()[0]
        return sum(torch.log_softmax(logits[len(p) + i - 1], -1)[tok].item() for i, tok in enumerate(r))

    all_rows = common.read_jsonl(tmp / "prefs.jsonl")
    sft_values = torch.tensor([loop_logp(sft, r["prompt"], r["chosen"]) for r in all_rows])
    dpo_values = torch.tensor([loop_logp(dpo_model, r["prompt"], r["chosen"]) for r in all_rows])
    nearest = lambda x, values: (values - x).abs().min().item()  # noqa: E731
    assert max(nearest(x, sft_values) for x in ref_chosen.tolist()) < 1e-3
    assert max(nearest(x, dpo_values) for x in ref_chosen.tolist()) > 1e-2  # the policy moved, the reference did not


def test_killed_at_a_checkpoint_resumes_to_the_same_run(tiny_run, straight, kill_resume, same_run):
    tmp, run = tiny_run
    # SIGKILL right after step 2's checkpoint: the stored reference log-probs come back with it
    killed, resumed = kill_resume(run.argv("killed"), kill_at=2)
    assert "step 2/4" in killed.stdout and "reference log-probs" in killed.stdout
    assert "resumed from" in resumed.stdout and "reference log-probs" not in resumed.stdout
    same_run(straight[0], tmp / "killed", steps=range(0, 5))  # step 0 (the SFT model) logged once too


def test_bad_preference_file_stops_with_file_and_line(tiny_run):
    tmp, run = tiny_run
    bad = tmp / "bad.jsonl"
    bad.write_text('{"prompt": "Hi!", "chosen": "Hello!", "rejected": "Ugh."}\n{"prompt": "Hi!", "chosen": "Hello!"}\n')
    r = subprocess.run([sys.executable, "dpo.py", "--init", str(tmp / "sft"), "--data", str(bad), "--out",
                        str(tmp / "bad_out"), "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert f"{bad}:2" in r.stderr and "rejected" in r.stderr
    assert not (tmp / "bad_out" / "meta.json").exists()
