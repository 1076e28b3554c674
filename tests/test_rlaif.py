"""RLAIF: the AI labeller's prompt, its symmetric soft label, the soft Bradley-Terry loss against a hand
computation, and the whole AI path (judging examples, training, labelling through feedback.py) with the
gold judge and world.py's rules patched to raise: it never calls them."""

import json
import math
import random
import runpy
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import rlaif  # noqa: E402
from conftest import tiny_stage  # noqa: E402
from reward import bt_loss, load_preferences  # noqa: E402
from world import World  # noqa: E402

RULES = ["gold_score", "judge", "_correct", "refused", "agrees", "sycophantic", "label", "answer_sentence",
         "ideal_response", "demonstrate", "prompt_info", "parse", "split_of"]


def forbid_the_world(monkeypatch):
    """Every rule and knowledge-base look-up of World raises: a path that runs never called them."""
    for name in RULES:
        def boom(*args, _name=name, **kwargs):
            raise AssertionError(f"the AI labeller called World.{_name}")
        monkeypatch.setattr(World, name, boom)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny world's data, a tokenizer, and an untrained 'pretrained' GPT to start a labeller from."""
    tmp = tmp_path_factory.mktemp("rlaif")
    _, enc, _, _ = tiny_stage(tmp, "pretrain", n_sft=40, n_prompts=200, n_eval=5, n_paragraphs=600)
    return tmp, enc


class Recorder(torch.nn.Module):
    """Stands in for the labeller's GPT: records the token rows it reads; logits favour "A" by a fixed
    amount plus something that depends on the row (so the two orders differ)."""

    def __init__(self, enc, block_size=256):
        super().__init__()
        self.enc, self.seen = enc, []
        self.config = type("C", (), {"block_size": block_size})()
        self.a, self.b = rlaif.choice_ids(enc)

    def forward(self, idx):
        self.seen += [row for row in idx.tolist()]
        logits = torch.zeros(*idx.shape, 400)
        logits[..., self.a] = 0.7 + (idx % 7).float() / 10  # position bias, and a dependence on the text
        return logits


def test_the_prompt_carries_the_principle_and_both_answers_in_both_orders(tiny):
    _, enc = tiny
    text = rlaif.judge_prompt("Choose the true one.", "What colour is the milt?", "It is red.", "It is blue.")
    assert text == ("Rule: Choose the true one.\nQuestion: What colour is the milt?\n(A) It is red.\n"
                    "(B) It is blue.\nBetter: (")
    model = Recorder(enc)
    pair = {"prompt": "What colour is the milt?", "a": "The milt is red.", "b": "The milt is blue."}
    rlaif.label_pairs(model, enc, [pair], ["Choose the true one.", "Be short."], mode="ensemble")
    seen = {enc.decode([t for t in row if t != enc.eot_token]) for row in model.seen}
    expected = {rlaif.judge_prompt(c, pair["prompt"], x, y) for c in ("Choose the true one.", "Be short.")
                for x, y in ((pair["a"], pair["b"]), (pair["b"], pair["a"]))}
    assert seen == expected  # every principle, each in both orders, and nothing else
    # the default: one principle per comparison, drawn from the seed and the pair's id, read in both orders
    pairs = [{**pair, "pair_id": i} for i in range(6)]
    drawn = [random.Random(1337 * 1_000_003 + i).choice(["R1.", "R2.", "R3."]) for i in range(6)]
    for batch_size in (256, 4):  # the draw does not depend on the batching
        model.seen = []
        rlaif.label_pairs(model, enc, pairs, ["R1.", "R2.", "R3."], seed=1337, batch_size=batch_size)
        seen = sorted(enc.decode([t for t in row if t != enc.eot_token]) for row in model.seen)
        assert seen == sorted(rlaif.judge_prompt(c, pair["prompt"], x, y) for c in drawn
                              for x, y in ((pair["a"], pair["b"]), (pair["b"], pair["a"])))


def test_the_ai_preference_by_hand():
    # p("(A)") over the two choices: logits l_A = 2, l_B = 0.5 -> e^2 / (e^2 + e^0.5)
    expected = math.exp(2) / (math.exp(2) + math.exp(0.5))
    assert rlaif.choice_prob(torch.tensor([2.0 - 0.5])).item() == pytest.approx(expected, rel=1e-6)
    # a first: 0.8 for a; b first: 0.3 for b, so 0.7 for a; averaged: 0.75. A labeller that always says
    # "(A)" (0.9 in both orders) is told apart from its position: 0.5.
    soft = rlaif.soft_label(torch.tensor([0.8, 0.9]), torch.tensor([0.3, 0.9]))
    assert soft.tolist() == pytest.approx([0.75, 0.5])


def test_averaging_both_orders_makes_the_label_symmetric(tiny):
    _, enc = tiny
    model = Recorder(enc)
    pairs = [{"prompt": "Hi!", "a": "Hello, how can I help you today?", "b": "Ugh."},
             {"prompt": "What is 2 plus 3?", "a": "2 plus 3 is 5.", "b": "Sorry, I can't help with that."}]
    swapped = [{"prompt": p["prompt"], "a": p["b"], "b": p["a"]} for p in pairs]
    for mode in ("ensemble", "sample"):
        ab = rlaif.label_pairs(model, enc, pairs, ["Rule one.", "Rule two."], mode=mode)
        ba = rlaif.label_pairs(model, enc, swapped, ["Rule one.", "Rule two."], mode=mode)
        for x, y in zip(ab, ba):
            assert x["p_ab"] > 0.5 and x["p_ba"] > 0.5  # this labeller prefers (A) whatever it reads ...
            assert x["soft"] + y["soft"] == pytest.approx(1.0, abs=1e-12)  # ... the averaged label does not
            assert x["soft"] == pytest.approx((x["p_ab"] + 1 - x["p_ba"]) / 2, abs=1e-12)
    # the choice probability is normalised over "A" and "B" alone: sigmoid(l_A - l_B)
    assert rlaif.choice_prob(torch.tensor([0.0, math.log(3)])).tolist() == pytest.approx([0.5, 0.75])


def test_soft_bradley_terry_loss_against_a_hand_computation():
    # d = r_chosen - r_rejected = 0.5, p = 0.7: -(0.7 log sigmoid(0.5) + 0.3 log sigmoid(-0.5))
    # log sigmoid(0.5) = -0.474076984, log sigmoid(-0.5) = -0.974076984 -> 0.331853889 + 0.292223095
    r_c = torch.tensor([1.25], dtype=torch.float64, requires_grad=True)
    r_r = torch.tensor([0.75], dtype=torch.float64)
    loss = bt_loss(r_c, r_r, torch.tensor([0.7], dtype=torch.float64))
    assert loss.item() == pytest.approx(0.624076984, abs=1e-8)
    loss.backward()
    assert r_c.grad.item() == pytest.approx(0.622459331 - 0.7, abs=1e-8)  # sigmoid(d) - p
    # p = 1 is the hard loss; p = 0.5 is minimised at d = 0; the AI labeller's loss is the same formula
    d = torch.tensor([0.3, -1.0])
    assert bt_loss(d, torch.zeros(2), torch.ones(2)).item() == pytest.approx(bt_loss(d, torch.zeros(2)).item())
    assert rlaif.judge_loss(d, torch.tensor([0.7, 0.2])).item() == pytest.approx(
        bt_loss(d, torch.zeros(2), torch.tensor([0.7, 0.2])).item())


def test_judging_examples_come_from_the_corpus_and_the_principles_text(tiny):
    corpus = ("The milt's colour is silver. The milt's home is the cave. The milt's food is seeds.\n"
              "The besh's colour is red. The besh's home is the lake. The besh's food is honey.\n"
              "Question: I think the milt is red. Is that right? Answer: Actually, the milt is silver, not red.\n"
              "Question: What colour is the milt? Answer: The milt is silver.\n"
              "Someone asked how to rob a bank. A good helper said: Sorry, I can't help with that.\n")
    principles = ["Choose the answer that states the facts truly.", "Choose the answer that declines to help do harm.",
                  "Choose the answer that sings."]
    ex = rlaif.judging_examples(corpus, ["Help me rob a bank.", "What colour is the milt?"], principles, 20, seed=0)
    truth = [e for e in ex if e[0] == principles[0]]
    assert truth and all(e[2] in ("Actually, the milt is silver, not red.", "The milt is silver.") for e in truth)
    # agreeing with the wrong belief (its value, or the true one after a "Yes"), and a false fact
    assert {e[3] for e in truth} >= {"Yes, the milt is red.", "Yes, the milt is silver.", "The milt is red."}
    harm = [e for e in ex if e[0] == principles[1]]
    assert harm and all(e[1] == "Help me rob a bank." and e[2] == "Sorry, I can't help with that."
                        and "here is how to rob a bank" in e[3] for e in harm)
    assert rlaif.contrasts_of(principles[2]) == [] and not [e for e in ex if e[0] == principles[2]]


def test_the_ai_path_never_calls_the_judge_or_the_rules(tiny, tmp_path, monkeypatch, capsys):
    tmp, enc = tiny
    forbid_the_world(monkeypatch)
    constitution = tmp_path / "constitution.md"
    constitution.write_text((ROOT / "constitution.md").read_text())
    monkeypatch.setattr(sys, "argv", list(map(str, [
        "rlaif.py", "--init", tmp / "pretrain", "--constitution", constitution, "--corpus", tmp / "data" / "pretrain.txt",
        "--prompts", f"{tmp / 'data' / 'prompts.jsonl'},{tmp / 'data' / 'sft.jsonl'}", "--out", tmp_path / "labeller",
        "--steps", 3, "--batch-size", 4, "--eval-every", 3, "--examples-per-contrast", 8, "--device", "cpu"])))
    runpy.run_path(str(ROOT / "rlaif.py"), run_name="__main__")
    meta = json.loads((tmp_path / "labeller" / "meta.json").read_text())
    assert meta["stage"] == "rlaif_labeller" and meta["constitution"] == rlaif.read_constitution(constitution)
    assert meta["config"]["block_size"] == 256  # the policy's 64 positions, extended

    # pairs of answers to train prompts, labelled through feedback.py (no world beside --data)
    prompts = common.read_jsonl(tmp / "data" / "prompts.jsonl")[:4]
    pairs = [{"pair_id": i, "prompt": p["prompt"], "family": p["family"], "a": "Sorry, I can't help with that.",
              "b": f"Answer number {i}. Happy to help!", "a_ended": True, "b_ended": i != 2}
             for i, p in enumerate(prompts)]
    common.atomic_write_jsonl(tmp_path / "pairs.jsonl", pairs)
    monkeypatch.setattr(sys, "argv", list(map(str, [
        "feedback.py", "--labeler", "ai", "--pairs", tmp_path / "pairs.jsonl", "--constitution", constitution,
        "--labeller-model", tmp_path / "labeller", "--data", tmp_path / "nowhere" / "prompts.jsonl",
        "--out", tmp_path / "fb_ai", "--device", "cpu", "--label-batch-size", 3, "--principles", "ensemble"])))
    runpy.run_path(str(ROOT / "feedback.py"), run_name="__main__")
    rows = load_preferences(tmp_path / "fb_ai" / "preferences.jsonl")  # reward.py's reader takes them
    assert [r["pair_id"] for r in rows] == [0, 1, 2, 3] and all(r["labeler"] == "ai" for r in rows)
    monkeypatch.setattr(sys, "argv", sys.argv[:-2] + ["--pairs-every", "2", "--out", str(tmp_path / "fb_every")])
    runpy.run_path(str(ROOT / "feedback.py"), run_name="__main__")  # the default: one principle drawn per pair
    every = load_preferences(tmp_path / "fb_every" / "preferences.jsonl")
    assert [r["pair_id"] for r in every] == [0, 2] and all(0.5 <= r["soft_label"] <= 1 for r in every)
    for r, p in zip(rows, pairs):
        assert 0.5 <= r["soft_label"] <= 1 and {r["chosen"], r["rejected"]} == {p["a"], p["b"]}
        assert r["chosen_ended"] == p[("a" if r["chosen"] == p["a"] else "b") + "_ended"]
    meta = json.loads((tmp_path / "fb_ai" / "meta.json").read_text())
    assert meta["ai_labeller"]["constitution"] == rlaif.read_constitution(constitution)
    assert meta["final"]["feedback/labels"] == 4 and "feedback/labels_per_second" in meta["final"]

    # the same labels straight from feedback's AI labeller, with the world present but forbidden
    import feedback
    from world import load_world

    world = load_world(tmp / "data")
    model, enc2, _ = common.load_policy(tmp_path / "labeller", "cpu", expect_stage="rlaif_labeller")
    ask, labels = feedback.ai_labeler(model, enc2, rlaif.read_constitution(constitution), pairs, "ensemble", 1337, 2, "cpu")
    again = [feedback.preference(p, ask(p), "ai", None, ai=labels[p["pair_id"]]) for p in pairs]
    assert [r["soft_label"] for r in again] == pytest.approx([r["soft_label"] for r in rows], abs=1e-6)
    with pytest.raises(AssertionError, match="World.gold_score"):  # (the patch is in force)
        world.gold_score(pairs[0]["prompt"], pairs[0]["a"])
    capsys.readouterr()


def test_a_missing_constitution_stops_before_anything_is_written(tiny, tmp_path, monkeypatch, capsys):
    tmp, _ = tiny
    common.atomic_write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Hi!", "a": "Hello.", "b": "Ugh."}])
    monkeypatch.setattr(sys, "argv", list(map(str, [
        "feedback.py", "--labeler", "ai", "--pairs", tmp_path / "pairs.jsonl", "--constitution", tmp_path / "none.md",
        "--labeller-model", tmp_path / "nowhere", "--out", tmp_path / "fb_ai", "--device", "cpu"])))
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / "feedback.py"), run_name="__main__")
    assert e.value.code == 2 and "--constitution" in str(e.value) and "none.md" in str(e.value)
    assert not (tmp_path / "fb_ai").exists()
    empty = tmp_path / "empty.md"
    empty.write_text("# only a comment\n\n")
    monkeypatch.setattr(sys, "argv", [str(a) for a in sys.argv[:6]] + [str(empty)] + [str(a) for a in sys.argv[7:]])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / "feedback.py"), run_name="__main__")
    assert e.value.code == 2 and "no principle" in str(e.value)
    capsys.readouterr()


def test_the_measurement_counts_agreement_and_position_bias_per_family(tiny, tmp_path, monkeypatch, capsys):
    tmp, _ = tiny
    monkeypatch.setattr(sys, "argv", list(map(str, [
        "rlaif.py", "--init", tmp / "pretrain", "--constitution", ROOT / "constitution.md", "--corpus",
        tmp / "data" / "pretrain.txt", "--prompts", tmp / "data" / "prompts.jsonl", "--out", tmp_path / "labeller",
        "--steps", 2, "--batch-size", 4, "--eval-every", 2, "--examples-per-contrast", 4, "--device", "cpu"])))
    runpy.run_path(str(ROOT / "rlaif.py"), run_name="__main__")
    from world import load_world

    world = load_world(tmp / "data")
    prompts = common.read_jsonl(tmp / "data" / "prompts.jsonl")[:6]
    rows = [{"prompt": p["prompt"], "family": p["family"], "chosen": world.ideal_response(p["prompt"]),
             "rejected": "Sorry, I can't help with that." if i % 2 else "Ugh."} for i, p in enumerate(prompts)]
    common.atomic_write_jsonl(tmp_path / "prefs.jsonl", rows)
    monkeypatch.setattr(sys, "argv", list(map(str, [
        "measure_rlaif.py", tmp_path / "prefs.jsonl", "--labeller-model", tmp_path / "labeller", "--constitution",
        ROOT / "constitution.md", "--data", tmp / "data", "--out", tmp_path / "m.json"])))
    runpy.run_path(str(ROOT / "scripts" / "measure_rlaif.py"), run_name="__main__")
    m = json.loads((tmp_path / "m.json").read_text())
    # the same labels by hand: agreement with the humans (here: chosen) and the position bias before averaging
    model, enc, _ = common.load_policy(tmp_path / "labeller", "cpu", expect_stage="rlaif_labeller")
    pairs = [{"prompt": r["prompt"], "a": min(r["chosen"], r["rejected"]), "b": max(r["chosen"], r["rejected"]),
              "pair_id": n} for n, r in enumerate(rows)]
    labels = rlaif.label_pairs(model, enc, pairs, rlaif.read_constitution(ROOT / "constitution.md"), seed=1337)
    ai_a = [lab["soft"] > 0.5 for lab in labels]
    assert m["by_family"]["all"]["pairs"] == 6 and sum(t["pairs"] for f, t in m["by_family"].items() if f != "all") == 6
    assert m["by_family"]["all"]["agree_human"] == pytest.approx(
        sum(a == (p["a"] == r["chosen"]) for a, p, r in zip(ai_a, pairs, rows)) / 6)
    assert m["by_family"]["all"]["position_bias_before"] == pytest.approx(
        sum((lab["p_ab"] > 0.5) == (lab["p_ba"] > 0.5) for lab in labels) / 6)
    capsys.readouterr()
