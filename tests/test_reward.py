"""Reward model: the Bradley-Terry loss by hand, the score read at the last real token through the
batching code, both preference layouts and their error lines, a learning check, normalisation,
resume, and the tiny chain pretrain -> sft -> feedback -> reward."""

import json
import math
import random
import runpy
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
from model import GPT, GPTConfig, ScalarModel  # noqa: E402
from reward import bt_loss, collate, epoch_batches, load_preferences, score_pairs  # noqa: E402

# -----------------------------------------------------------------------------
# The loss


def test_bt_loss_on_hand_computed_pairs():
    r_chosen, r_rejected = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 2.0])
    # -log sigmoid(m) = log(1 + e^-m) for margins m = 1, -1, 0
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1)) + math.log(2)) / 3
    assert bt_loss(r_chosen, r_rejected).item() == pytest.approx(expected, rel=1e-6)
    assert bt_loss(torch.tensor([1.0]), torch.tensor([0.0])).item() == pytest.approx(0.31326169, rel=1e-6)


def test_bt_loss_gradient_and_large_margins():
    r_chosen = torch.tensor([0.3, -2.0], requires_grad=True)
    r_rejected = torch.tensor([0.0, 1.0], requires_grad=True)
    bt_loss(r_chosen, r_rejected).backward()
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # d/dr_chosen of mean(-log sigmoid(m)) = -(1 - sigmoid(m)) / B, and the opposite for r_rejected
    assert r_chosen.grad.tolist() == pytest.approx([-(1 - sig(0.3)) / 2, -(1 - sig(-3.0)) / 2], rel=1e-5)
    assert r_rejected.grad.tolist() == pytest.approx([(1 - sig(0.3)) / 2, (1 - sig(-3.0)) / 2], rel=1e-5)
    # logsigmoid: no overflow to inf or nan where a naive log(sigmoid(m)) would give log(0)
    assert bt_loss(torch.tensor([-1000.0]), torch.tensor([0.0])).item() == pytest.approx(1000.0)
    assert bt_loss(torch.tensor([1000.0]), torch.tensor([0.0])).item() == 0.0


# -----------------------------------------------------------------------------
# The score is read at the last real token, whatever the padding


def test_score_pairs_reads_the_last_real_token_whatever_the_padding():
    torch.manual_seed(0)
    model = ScalarModel(GPTConfig(block_size=32, vocab_size=20, n_layer=2, n_head=2, n_embd=16)).eval()
    torch.nn.init.normal_(model.head.bias)  # a non-zero bias, like a normalised reward model
    pairs = [{"prompt": [1, 5, 6, 2], "chosen": [7, 3], "rejected": [3]},  # (tokenize_pairs' layout)
             {"prompt": [1, 9, 2], "chosen": [4, 4, 4, 4, 4, 4, 4, 3], "rejected": [3]},
             {"prompt": [1], "chosen": [2, 3], "rejected": [8, 8, 8, 8, 8, 8, 8, 2, 11, 12, 13, 14, 3]}]

    def alone(seq):  # reference: the sequence by itself, no padding, value at its last position
        with torch.no_grad():
            h = model.transformer.hidden_states(torch.tensor([seq]))  # (1, T, C)
            return model.head(h)[0, -1, 0].item()

    with torch.no_grad():
        for pad_id in (0, 19):  # whatever the pad token is
            r_chosen, r_rejected = score_pairs(model, pairs, pad_id, "cpu")
            assert r_chosen.tolist() == pytest.approx([alone(p["prompt"] + p["chosen"]) for p in pairs], abs=1e-5)
            assert r_rejected.tolist() == pytest.approx([alone(p["prompt"] + p["rejected"]) for p in pairs], abs=1e-5)
        # and the neighbours in the batch (so the amount of padding) change nothing
        one_c, one_r = score_pairs(model, pairs[:1], 0, "cpu")
        assert one_c.item() == pytest.approx(r_chosen[0].item(), abs=1e-5)
        assert one_r.item() == pytest.approx(r_rejected[0].item(), abs=1e-5)
    idx, mask = collate([[4, 5, 6], [7]], pad_id=0)
    assert idx.tolist() == [[4, 5, 6], [7, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_epoch_batches_use_each_pair_once_with_less_padding_and_depend_only_on_the_seed():
    rng = random.Random(0)
    lengths = [rng.randint(5, 70) for _ in range(1000)]
    batches = epoch_batches(lengths, 32, seed=3)
    flat = [i for b in batches for i in b]
    # chunks of 8 batches (256): three full chunks and one of 232 -> 7 full batches, 8 left out
    assert len(batches) == 31 and all(len(b) == 32 for b in batches) and len(set(flat)) == len(flat) == 992
    padding = lambda bs: sum(32 * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in bs)  # noqa: E731
    shuffled = list(range(1000))
    rng.shuffle(shuffled)
    random_batches = [shuffled[k : k + 32] for k in range(0, 992, 32)]
    assert padding(batches) < 0.5 * padding(random_batches)
    maxima = [max(lengths[i] for i in b) for b in batches]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)  # batch order stays random
    assert epoch_batches(lengths, 32, seed=3) == batches and epoch_batches(lengths, 32, seed=4) != batches


# -----------------------------------------------------------------------------
# Preference files: TRL and Anthropic HH layouts, and their error lines


def write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_load_preferences_reads_trl_and_hh_layouts(tmp_path):
    path = write(tmp_path / "p.jsonl", [
        {"prompt": "Hi!", "chosen": "Hello!", "rejected": "Ugh.", "gold_chosen": 1.0},
        "",
        {"chosen": "\n\nHuman: What is 2 plus 2?\n\nAssistant: 4.",
         "rejected": "\n\nHuman: What is 2 plus 2?\n\nAssistant: 5, obviously."},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Help me rob a bank.\n\nAssistant: Sorry, no.",
         "rejected": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Help me rob a bank.\n\nAssistant: Sure: first..."},
    ])
    rows = load_preferences(path)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [
        ("Hi!", "Hello!", "Ugh."),
        ("What is 2 plus 2?", "4.", "5, obviously."),
        ("Hi\n\nAssistant: Hello.\n\nHuman: Help me rob a bank.", "Sorry, no.", "Sure: first..."),
    ]
    assert rows[0]["gold_chosen"] == 1.0  # other fields are kept


def test_an_answer_that_never_ended_is_encoded_without_the_end_token():
    """feedback.py's chosen_ended / rejected_ended: the reward model and DPO train on what the policy
    wrote, so an answer cut at --max-new-tokens gets no <|end|> it never sampled; rows without the
    flags (TRL, HH) end as before."""
    from reward import tokenize_pairs
    from tokenizer import encode_prompt, encode_response, special_id, train_bpe

    enc = train_bpe("The feelt eats berries. Happy to help! " * 50, 280)
    end = special_id(enc, "<|end|>")
    rows = [{"prompt": "Hi!", "chosen": "Happy to help!", "rejected": "The feelt eats", "chosen_ended": True,
             "rejected_ended": False},
            {"prompt": "Hi!", "chosen": "The feelt eats", "rejected": "Happy to help!"}]
    a, b = tokenize_pairs(enc, rows, block_size=64)
    assert a["chosen"] == encode_response(enc, "Happy to help!") and a["chosen"][-1] == end
    assert a["rejected"] == encode_response(enc, "The feelt eats", end=False) and end not in a["rejected"]
    assert b["chosen"][-1] == end and b["rejected"][-1] == end
    assert a["prompt"] == encode_prompt(enc, "Hi!")


@pytest.mark.parametrize("bad_line, expected", [
    ('{"prompt": "Hi!", "chosen": "Hello!"}', "missing field 'rejected'"),
    ('{"chosen": "\\n\\nHuman: Hi\\n\\nAssistant: Hello!"}', "missing field 'rejected'"),
    ('{"prompt": "Hi!", "chosen": "Hello!", "rejected": ["Ugh."]}', "'rejected' must be a string"),
    ('{"prompt": "Hi!", "chosen": "Hello!", "rejected": "Ugh."', "not valid JSON"),
    ('{"chosen": "Hello!", "rejected": "\\n\\nHuman: Hi\\n\\nAssistant: Ugh."}', "'chosen' has no"),
    ('{"chosen": "\\n\\nHuman: Hi\\n\\nAssistant: Hello!", "rejected": "\\n\\nHuman: Yo\\n\\nAssistant: Ugh."}',
     "do not share"),
    ('{"prompt": "Hi!", "chosen": "Hello!", "rejected": "Ugh.", "rejected_ended": "no"}',
     "'rejected_ended' must be true or false"),
])
def test_load_preferences_errors_name_file_and_line(tmp_path, bad_line, expected):
    path = write(tmp_path / "bad.jsonl", [{"prompt": "Hi!", "chosen": "Hello!", "rejected": "Ugh."}, bad_line])
    with pytest.raises(common.BadInput) as e:
        load_preferences(path)
    assert e.value.code == 2
    assert e.value.message.startswith(f"{path}:2:") and expected in e.value.message


def test_reward_py_stops_on_bad_data_before_loading_anything(tmp_path, monkeypatch, capsys):
    path = write(tmp_path / "bad.jsonl", [{"prompt": "Hi!", "chosen": "Hello!", "rejected": "Ugh."}, "{oops"])
    monkeypatch.setattr(sys, "argv", ["reward.py", "--data", str(path), "--init", str(tmp_path / "none"),
                                      "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / "reward.py"), run_name="__main__")
    assert e.value.code == 2
    assert f"{path}:2: not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# The chain pretrain -> sft -> feedback -> reward at a few-second size


def run_here(monkeypatch, script, *args):
    """Run a stage in this process (runpy: no new interpreter to start)."""
    monkeypatch.setattr(sys, "argv", [script, *map(str, args), "--device", "cpu"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only adds overhead
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
        monkeypatch.undo()


def reward_args(tmp, out, *extra):
    return ["reward.py", "--init", tmp / "sft", "--data", tmp / "preferences_and_ideals.jsonl", "--out", tmp / out,
            "--steps", 5, "--batch-size", 8, "--eval-every", 2, "--val-fraction", 0.25, "--norm-samples", 2000,
            "--norm-data", tmp / "data" / "prompts.jsonl", "--missing-end-penalty", -0.3, *extra]


@pytest.fixture(scope="module")
def chain_preferences(chain):
    """The chain's feedback file plus, for each of its prompts, the ideal answer against one of its SFT
    samples. A 3-step SFT model's answers are garbage that the judge mostly scores alike, so without
    these the held-out pairs may all tie on gold and reward/acc_gold would have nothing to measure."""
    from world import load_world

    tmp, _ = chain
    world = load_world(tmp / "data")
    prefs = common.read_jsonl(tmp / "feedback" / "preferences.jsonl")
    sample = {}
    for r in prefs:
        sample.setdefault(r["prompt"], r["rejected"])
    ideals = [{"prompt": p, "chosen": world.ideal_response(p), "rejected": a, "gold_chosen": world.gold_score(
               p, world.ideal_response(p)), "gold_rejected": world.gold_score(p, a)} for p, a in sample.items()]
    assert all(r["gold_chosen"] != r["gold_rejected"] for r in ideals)
    common.atomic_write_jsonl(tmp / "preferences_and_ideals.jsonl", prefs + ideals)
    return tmp / "preferences_and_ideals.jsonl"


@pytest.fixture(scope="module")
def reward_run(chain, chain_preferences):
    """The chain's reward model, trained in its own process: tmp/reward."""
    tmp, run = chain
    run(*reward_args(tmp, "reward"))
    return tmp / "reward"


def test_chain_ends_with_a_normalised_reward_model(chain, reward_run):
    tmp, _ = chain
    for stage in ("pretrain", "sft", "feedback", "reward"):
        assert json.loads((tmp / stage / "meta.json").read_text())["stage"] == stage
    meta = json.loads((tmp / "reward" / "meta.json").read_text())
    rows = common.read_metrics(tmp / "reward" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[-1]["pairs"] == 40
    for key in ("reward/loss", "reward/accuracy", "reward/margin", "train/lr", "train/grad_norm"):
        assert key in rows[0]
    for key in ("val/loss", "val/acc_label", "reward/acc_gold", "reward/label_acc_gold", "reward/gold_corr"):
        assert key in rows[1] and key in meta["final"]
    assert 0 <= meta["final"]["reward/acc_gold"] <= 1
    # Normalised as lm-human-preferences: fresh SFT answers to train prompts, sampled here with another
    # seed and scored through the saved checkpoint as PPO scores them, have mean 0 +- 0.1 and std 1 +- 10 %.
    # (This 3-step SFT model ends only ~10 % of its answers: the penalty -0.3 keeps the normalisation of
    # the reward as PPO sees it possible, e / (1 - e) > p^2; gain_and_bias's own test covers the rest.)
    norm = meta["reward_norm"]
    assert norm["normalised"] == "the reward as PPO sees it" and norm["missing_end_penalty"] == -0.3
    assert norm["samples"] == 2000 and norm["max_new_tokens"] == 32 and norm["gain"] > 0
    assert norm["mean"] == pytest.approx(0, abs=1e-5) and norm["std"] == pytest.approx(1, abs=1e-3)
    # (not normalised by chance: the raw scores are outside the tolerances above)
    assert abs(norm["raw_mean"]) > 0.1 or abs(norm["raw_std"] - 1) > 0.1
    import evaluate
    from sampling import sample_responses
    model, enc, _ = common.load_scalar_model(tmp / "reward", "cpu")
    sft, _, _ = common.load_policy(tmp / "sft", "cpu")
    prompts = [r["prompt"] for r in common.read_jsonl(tmp / "data" / "prompts.jsonl")]  # the train prompts
    rng = random.Random(12345)
    picked = [rng.choice(prompts) for _ in range(2000)]
    answers = sample_responses(sft, enc, picked, "cpu", 32, generator=torch.Generator().manual_seed(12345))
    scores = evaluate.proxy_scores(model, enc, picked, answers, "cpu", missing_end_penalty=-0.3)
    assert abs(scores.mean().item()) < 0.1 and abs(scores.std().item() - 1) < 0.1, (scores.mean(), scores.std())


def test_acc_gold_by_family_counts_each_familys_pairs_whose_gold_differs(monkeypatch):
    import reward
    # (reward chosen, reward rejected, gold chosen, gold rejected, family); by hand: family a 1 right of 2
    # (its gold tie is left out), family b 2 of 3, all 3 of 5
    table = [(1, 0, 2, 1, "a"), (0, 1, 2, 1, "a"), (1, 0, 1, 1, "a"), (1, 0, 0, 1, "b"), (0, 1, 0, 1, "b"), (2, 0, 3, 0, "b")]
    pairs = [{"row": {"gold_chosen": gc, "gold_rejected": gr, "family": f}} for _, _, gc, gr, f in table]
    scores = iter([(torch.tensor([float(c)]), torch.tensor([float(r)])) for c, r, *_ in table])
    monkeypatch.setattr(reward, "score_pairs", lambda model, batch, pad_id, device: next(scores))
    out = reward.evaluate(torch.nn.Identity(), pairs, 1, 0, "cpu")
    assert out["reward/acc_gold"] == pytest.approx(3 / 5)
    assert out["reward/acc_gold_a"] == pytest.approx(1 / 2) and out["reward/acc_gold_b"] == pytest.approx(2 / 3)
    assert out["reward/label_acc_gold_a"] == 1 and out["reward/label_acc_gold_b"] == pytest.approx(1 / 3)  # gold says chosen
    scores = iter([(torch.tensor([float(c)]), torch.tensor([float(r)])) for c, r, *_ in table])
    one = reward.evaluate(torch.nn.Identity(), [{"row": {**p["row"], "family": "a"}} for p in pairs], 1, 0, "cpu")
    assert not any(k.startswith("reward/acc_gold_") for k in one)  # one family: the overall figure says it all


@pytest.mark.parametrize("share_ended, penalty, expected", [
    (0.8, -1.0, "the reward as PPO sees it"), (0.97, -2.0, "the reward as PPO sees it"),
    (0.3, -1.0, "all scores (too few answers ended for the reward as PPO sees it)"), (0.8, None, "all scores"),
    (1.0, -1.0, "all scores")])
def test_gain_and_bias_give_the_reward_as_ppo_sees_it_mean_0_and_std_1(share_ended, penalty, expected):
    from evaluate import penalise_unfinished
    from reward import gain_and_bias

    g = torch.Generator().manual_seed(0)
    scores = 3.0 + 2.0 * torch.randn(5000, generator=g, dtype=torch.float64)
    ended = torch.rand(5000, generator=g) < share_ended
    gain, bias, how = gain_and_bias(scores, ended, penalty)
    assert how == expected
    normalised = scores * gain + bias  # where the answer ended; else the penalty, as PPO scores it
    reward = penalise_unfinished(normalised, ended, penalty) if how == "the reward as PPO sees it" else normalised
    assert reward.mean().item() == pytest.approx(0, abs=1e-9)
    assert reward.var(unbiased=False).item() == pytest.approx(1, abs=1e-9)


def test_reward_run_killed_at_a_checkpoint_resumes_to_the_same_run(chain, reward_run, kill_resume, same_run):
    tmp, _ = chain
    # SIGKILL right after step 4's checkpoint (--eval-every 2): resumed from step 4, not from 2
    killed, resumed = kill_resume(reward_args(tmp, "r2") + ["--device", "cpu"], kill_at=4)
    assert "step 4/5" in killed.stdout and "step 5/5" not in killed.stdout
    assert f"resumed from {tmp / 'r2'} at step 4" in resumed.stdout
    same_run(reward_run, tmp / "r2", steps=range(1, 6))
    a, b = (json.loads((tmp / d / "meta.json").read_text()) for d in ("reward", "r2"))
    assert a["reward_norm"] == b["reward_norm"]


def test_reward_model_learns_a_preference_it_can_see(chain, tmp_path, monkeypatch):
    """Chosen = the ideal answer, rejected = the same with a rude opener: an easy rule, so held-out
    accuracy must reach ~1; a loss with chosen and rejected swapped would drive it to ~0."""
    tmp, run = chain
    from world import World
    world, rng = World(0), random.Random(1)
    rows = []
    for _ in range(120):
        p = world.sample_prompt(rng)["prompt"]
        ideal = world.ideal_response(p)
        rows.append({"prompt": p, "chosen": ideal, "rejected": "Ugh. " + ideal, "gold_chosen": 1.5, "gold_rejected": 0.5})
    common.atomic_write_jsonl(tmp_path / "easy.jsonl", rows)
    run_here(monkeypatch, "reward.py", "--init", tmp / "sft", "--data", tmp_path / "easy.jsonl", "--out", tmp_path / "rm",
        "--steps", 30, "--batch-size", 16, "--lr", 3e-3, "--warmup-steps", 3, "--eval-every", 30)
    final = json.loads((tmp_path / "rm" / "meta.json").read_text())["final"]
    assert final["val/acc_label"] >= 0.95 and final["reward/acc_gold"] >= 0.95
