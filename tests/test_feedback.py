"""Feedback: pairs from K samples, the simulated labeller's bookkeeping, the interactive labeller
driven with scripted stdin (1 / 2 / s / q / EOF, resuming without asking again), and a tiny
sampling run of feedback.py."""

import io
import json
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
from conftest import metrics_without_time, tiny_stage  # noqa: E402
from feedback import agreement_with_gold, make_pairs, preference, simulated_labeler  # noqa: E402
from feedback import parser as feedback_parser  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from world import World, write_data  # noqa: E402


def sample(text, ended=True):
    return {"ids": [], "text": text, "ended": ended}


def test_make_pairs_forms_every_pair_and_drops_identical_texts():
    prompts = [{"prompt": "p0", "family": "greet"}, {"prompt": "p1"}]
    responses = [sample("a"), sample("b"), sample("a"),  # p0: (a,b) (a,a)-dropped (b,a)
                 sample("x"), sample("y"), sample("z", ended=False)]  # p1: (x,y) (x,z) (y,z)
    pairs, identical = make_pairs(prompts, responses, k=3)
    assert identical == 1
    assert [(p["prompt"], p["a"], p["b"]) for p in pairs] == [
        ("p0", "a", "b"), ("p0", "b", "a"), ("p1", "x", "y"), ("p1", "x", "z"), ("p1", "y", "z")]
    assert [p["pair_id"] for p in pairs] == [0, 1, 2, 3, 4]
    assert pairs[0]["family"] == "greet" and pairs[2]["family"] is None
    assert pairs[3]["b_ended"] is False and pairs[3]["a_ended"] is True


def test_preference_rows_and_agreement_with_gold():
    world = World(0)
    good, bad = "Hello! How can I help you today?", "Ugh. Whatever"
    pair = {"pair_id": 7, "prompt": "Hi!", "family": "greet", "a": bad, "b": good, "a_ended": False, "b_ended": True}
    row = preference(pair, 2, "human", world)
    assert (row["chosen"], row["rejected"], row["labeler"], row["pair_id"]) == (good, bad, "human", 7)
    assert (row["chosen_ended"], row["rejected_ended"]) == (True, False)  # the flags follow their answers
    assert row["gold_chosen"] == world.gold_score("Hi!", good) > row["gold_rejected"] == world.gold_score("Hi!", bad)
    flipped = preference(pair, 1, "human", world)
    assert flipped["chosen"] == bad and (flipped["chosen_ended"], flipped["rejected_ended"]) == (False, True)
    tie = {"gold_chosen": 0.5, "gold_rejected": 0.5}
    agreement, contradictions, decided = agreement_with_gold([row, row, flipped, tie])
    assert (agreement, contradictions, decided) == (pytest.approx(2 / 3), 1, 3)


def test_simulated_labels_are_fixed_per_pair_and_as_noisy_as_bradley_terry():
    world = World(0)
    ask = simulated_labeler(world, tau=0.5, seed=3)
    good, worse = "Hello! How can I help you today?", "Hello! How can I help you today"  # gold gap 0.5
    pairs = [{"pair_id": i, "prompt": "Hi!", "a": good, "b": worse} for i in range(4000)]
    labels = [ask(p) for p in pairs]
    assert labels == [ask(p) for p in reversed(pairs)][::-1]  # the order of asking changes nothing
    right = sum(label == 1 for label in labels) / len(labels)
    assert right == pytest.approx(1 / (1 + 2.718281828 ** -1.0), abs=0.03)  # sigmoid(0.5 / 0.5) = 0.731


# -----------------------------------------------------------------------------
# The interactive labeller, through feedback.py with scripted stdin


@pytest.fixture
def pairs_dir(tmp_path):
    """An out/feedback folder whose pairs were sampled already (so no model is needed to label)."""
    write_data(tmp_path / "data", n_sft=5, n_prompts=5, n_eval=5, n_paragraphs=5)
    world = World(0)
    rng = random.Random(0)
    pairs = []
    for i in range(5):
        p = world.sample_prompt(rng)
        pairs.append({"pair_id": i, "prompt": p["prompt"], "family": p["family"], "a": f"answer A{i}.",
                      "b": world.ideal_response(p["prompt"]), "a_ended": True, "b_ended": i != 3})
    common.atomic_write_jsonl(tmp_path / "fb" / "pairs.jsonl", pairs)
    return tmp_path, pairs


def run_here(monkeypatch, capsys, argv, stdin=""):
    """Runs feedback.py in this process (runpy: no new interpreter to start) with scripted stdin."""
    argv = list(map(str, argv))
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))  # input() reads it; its end is EOF
    threads, code = torch.get_num_threads(), 0
    torch.set_num_threads(1)
    try:
        runpy.run_path(str(ROOT / "feedback.py"), run_name="__main__")
    except SystemExit as e:
        code = e.code
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


def label(tmp_path, stdin, *extra, monkeypatch=None, capsys=None):
    return run_here(monkeypatch, capsys, ["feedback.py", "--labeler", "human", "--out", tmp_path / "fb", "--data",
                                          tmp_path / "data" / "prompts.jsonl", "--init", tmp_path / "none", *extra],
                    stdin)


def test_human_session_labels_skips_quits_and_resumes_without_asking_again(pairs_dir, monkeypatch, capsys):
    tmp_path, pairs = pairs_dir
    # Session 1: "1" for pair 0, a typo then "2" for pair 1, "s" skips pair 2, "q" quits at pair 3.
    run = lambda stdin, *extra: label(tmp_path, stdin, *extra, monkeypatch=monkeypatch, capsys=capsys)  # noqa: E731
    r = run("1\nx\n2\ns\nq\n", "--resume")
    assert r.returncode == 0, r.stderr
    for p in pairs[:4]:
        assert p["prompt"] in r.stdout and p["a"] in r.stdout
    assert pairs[4]["prompt"] not in r.stdout  # never shown: the labeller quit before
    assert "please type 1, 2, s or q" in r.stdout
    assert "[ran out of tokens before <|end|>]" in r.stdout  # pair 3's second response did not end
    prefs = common.read_jsonl(tmp_path / "fb" / "preferences.jsonl")
    assert [(p["pair_id"], p["chosen"], p["labeler"]) for p in prefs] == [
        (0, pairs[0]["a"], "human"), (1, pairs[1]["b"], "human")]
    assert "gold_chosen" in prefs[0] and prefs[0]["family"] == pairs[0]["family"]
    assert [s["pair_id"] for s in common.read_jsonl(tmp_path / "fb" / "skipped.jsonl")] == [2]
    meta = json.loads((tmp_path / "fb" / "meta.json").read_text())
    assert meta["stage"] == "feedback" and meta["counts"] == {"pairs": 5, "labels": 2, "skipped": 1, "identical": 0}

    # Starting over by mistake is refused: the human labels are kept.
    r = run("1\n")
    assert r.returncode == 2 and "--resume" in r.stderr
    assert len(common.read_jsonl(tmp_path / "fb" / "preferences.jsonl")) == 2

    # Session 2 (resumed): only pairs 3 and 4 are asked; end of input (EOF) after one answer = quit.
    r = run("2\n", "--resume")
    assert r.returncode == 0, r.stderr
    assert pairs[3]["prompt"] in r.stdout and pairs[4]["prompt"] in r.stdout
    for p in pairs[:3]:
        assert p["a"] not in r.stdout
    prefs = common.read_jsonl(tmp_path / "fb" / "preferences.jsonl")
    assert [(p["pair_id"], p["chosen"]) for p in prefs] == [(0, pairs[0]["a"]), (1, pairs[1]["b"]), (3, pairs[3]["b"])]
    assert json.loads((tmp_path / "fb" / "meta.json").read_text())["final"]["feedback/remaining"] == 1


# -----------------------------------------------------------------------------
# Sampling with a (tiny, untrained) model, and the simulated labeller end to end


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("feedback")
    world, _, _, meta = tiny_stage(tmp, "sft", n_sft=5, n_prompts=40, n_eval=5, n_paragraphs=300)
    # room for 48-token answers: an untrained model's short answers are all equally bad by gold, and the
    # labels are checked against gold on the pairs whose scores differ (the longer ones differ in length)
    config = GPTConfig(**{**meta["config"], "block_size": 128})
    torch.manual_seed(0)
    common.save_checkpoint(tmp / "sft", GPT(config), {**meta, "config": asdict(config)})
    return tmp, world


def sample_args(tmp, out):
    return ["feedback.py", "--init", tmp / "sft", "--data", tmp / "data" / "prompts.jsonl", "--out", tmp / out,
            "--num-prompts", 30, "--k", 3, "--max-new-tokens", 48, "--sample-batch-size", 32, "--device", "cpu"]


def test_simulated_run_samples_pairs_and_labels_them_deterministically(tiny_sft, monkeypatch, capsys):
    tmp, world = tiny_sft
    r = subprocess.run(list(map(str, [sys.executable, *sample_args(tmp, "a")])), cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert run_here(monkeypatch, capsys, sample_args(tmp, "b")).returncode == 0  # the same again, in this process
    pairs = common.read_jsonl(tmp / "a" / "pairs.jsonl")
    meta = json.loads((tmp / "a" / "meta.json").read_text())
    assert len(pairs) + meta["counts"]["identical"] == 30 * 3  # K = 3: three pairs per prompt
    first30 = [p["prompt"] for p in common.read_jsonl(tmp / "data" / "prompts.jsonl")[:30]]
    assert all([q["prompt"] for q in pairs].count(p) <= 3 * first30.count(p) for p in set(first30))
    assert {q["prompt"] for q in pairs} <= set(first30)
    prefs = common.read_jsonl(tmp / "a" / "preferences.jsonl")
    assert len(prefs) == len(pairs) and meta["final"]["feedback/labels"] == len(pairs)
    for row, pair in zip(prefs, pairs):
        assert {row["chosen"], row["rejected"]} == {pair["a"], pair["b"]} and row["labeler"] == "simulated"
        assert row["gold_chosen"] == world.gold_score(row["prompt"], row["chosen"])
    decided = [r for r in prefs if r["gold_chosen"] != r["gold_rejected"]]
    assert decided, "no pair whose gold scores differ: nothing to measure the labels against"
    contradictions = sum(r["gold_chosen"] < r["gold_rejected"] for r in decided)
    assert meta["final"]["feedback/contradictions"] == contradictions
    assert meta["final"]["feedback/agreement_gold"] == pytest.approx(1 - contradictions / len(decided))
    assert (tmp / "a" / "preferences.jsonl").read_text() == (tmp / "b" / "preferences.jsonl").read_text()
    rows = common.read_metrics(tmp / "a" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["samples"] == 90  # 90 samples, 32 per step


def test_missing_prompt_field_is_a_file_line_error(tiny_sft, monkeypatch, capsys):
    tmp, _ = tiny_sft
    bad = tmp / "data" / "bad.jsonl"
    bad.write_text('{"prompt": "Hi!"}\n{"text": "Hi!"}\n')
    r = run_here(monkeypatch, capsys, ["feedback.py", "--init", tmp / "sft", "--data", bad, "--out", tmp / "bad"])
    assert r.returncode == 2 and f"{bad}:2: missing field 'prompt'" in r.stderr
    assert not (tmp / "bad" / "pairs.jsonl").exists()


def test_killed_while_sampling_and_while_labelling_resumes_to_the_same_labels(tiny_sft, stage_here):
    tmp, _ = tiny_sft
    if not (tmp / "a" / "preferences.jsonl").exists():
        r = subprocess.run(list(map(str, [sys.executable, *sample_args(tmp, "a")])), cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    argv = list(map(str, sample_args(tmp, "k") + ["--save-every", 20]))
    # 1. SIGKILL after sampling batch 2 of 3 (RLHF_TEST_FAULT, the test switch in common.steps)
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, env={**ENV, "RLHF_TEST_FAULT": "SIGKILL@step=2"}, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == -9 and "step 2/3" in r.stdout and not (tmp / "k" / "pairs.jsonl").exists(), r.stderr
    # 2. resumed: batch 3 is sampled with the generator where it was; SIGKILL after 50 labels (saved every 20)
    r = subprocess.run([sys.executable, *argv, "--resume"], cwd=ROOT, env={**ENV, "RLHF_TEST_FAULT": "SIGKILL@label=50"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == -9 and "resumed sampling" in r.stdout and "at step 2 of 3" in r.stdout, r.stderr
    assert len(common.read_jsonl(tmp / "k" / "preferences.jsonl")) == 40
    # 3. resumed: the 40 saved labels are kept, the pairs not sampled again
    r = stage_here(argv + ["--resume"])
    assert r.returncode == 0 and "40 labelled" in r.stdout, r.stderr
    for name in ("pairs.jsonl", "preferences.jsonl", "skipped.jsonl"):
        assert (tmp / "k" / name).read_text() == (tmp / "a" / name).read_text(), name
    meta_a, meta_k = (json.loads((tmp / d / "meta.json").read_text()) for d in ("a", "k"))
    assert meta_k["final"] == meta_a["final"] and meta_k["counts"] == meta_a["counts"]
    rows = metrics_without_time(tmp / "k" / "metrics.jsonl")
    assert rows == metrics_without_time(tmp / "a" / "metrics.jsonl") and [r["step"] for r in rows] == [1, 2, 3]
    assert not (tmp / "k" / "samples.pt").exists()


def test_labeller_biases_are_flags_kept_in_meta_and_zero_is_the_unbiased_labeller(tiny_sft, monkeypatch, capsys):
    """--b-agree/--b-refuse/--b-len reach World.label; with all three 0 every label is the plain
    Bradley-Terry draw sigmoid((gold(a) - gold(b)) / tau), computed here by hand for each pair."""
    import math

    from world import LABELLER_BIASES

    tmp, world = tiny_sft
    zeros = ["--b-agree", 0, "--b-refuse", 0, "--b-len", 0]
    assert run_here(monkeypatch, capsys, sample_args(tmp, "zero") + zeros).returncode == 0
    assert run_here(monkeypatch, capsys, sample_args(tmp, "long") + ["--b-len", 3]).returncode == 0
    pairs = common.read_jsonl(tmp / "zero" / "pairs.jsonl")
    assert common.read_jsonl(tmp / "long" / "pairs.jsonl") == pairs  # the same samples: only the labels differ

    def chosen(out):
        return {r["pair_id"]: r["chosen"] for r in common.read_jsonl(tmp / out / "preferences.jsonl")}

    unbiased, long = {}, {}
    for p in pairs:
        gap = world.gold_score(p["prompt"], p["a"]) - world.gold_score(p["prompt"], p["b"])
        rng = random.Random(1337 * 1_000_003 + p["pair_id"])  # feedback.py's generator of this pair (--seed 1337)
        unbiased[p["pair_id"]] = p["a"] if rng.random() < 1 / (1 + math.exp(-gap / 0.5)) else p["b"]
        rng = random.Random(1337 * 1_000_003 + p["pair_id"])
        a_wins = world.label(p["prompt"], p["a"], p["b"], 0.5, rng, **{**LABELLER_BIASES, "b_len": 3.0})
        long[p["pair_id"]] = p["a"] if a_wins else p["b"]
    assert chosen("zero") == unbiased
    assert chosen("long") == long and long != unbiased  # the flags reach the labeller
    metas = {out: json.loads((tmp / out / "meta.json").read_text()) for out in ("zero", "long")}
    assert metas["zero"]["simulated_labeller"] == {"tau": 0.5, "b_agree": 0.0, "b_refuse": 0.0, "b_len": 0.0}
    assert metas["long"]["simulated_labeller"] == {"tau": 0.5, **LABELLER_BIASES, "b_len": 3.0}
    assert {k: feedback_parser.get_default(k) for k in LABELLER_BIASES} == LABELLER_BIASES  # default: mild biases
    # Resuming a labelled folder with another labeller would mix two labellers in one file: refused.
    r = run_here(monkeypatch, capsys, sample_args(tmp, "zero") + ["--b-len", 1, "--resume"])
    assert r.returncode == 2 and "--b-agree 0, --b-refuse 0, --b-len 0" in r.stderr
    r = run_here(monkeypatch, capsys, sample_args(tmp, "bad") + ["--b-agree", "nan"])
    assert r.returncode == 2 and "--b-agree must be a finite number, got nan" in r.stderr
