"""failures.py at a few-second size: the files, the labels of each knob against a hand computation and
feedback.py's unbiased labels, the length measure, and a second call that trains nothing."""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
from dataclasses import asdict  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from conftest import tiny_stage  # noqa: E402
from failures import length_share  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def hand_label(world, pair, seed, tau=0.5, b_agree=0.0, b_refuse=0.0, b_len=0.0):
    """World.label's draw written out again: P(a > b) = sigmoid(gold gap / tau + the biases), one
    random.Random per pair seeded as feedback.py seeds it; returns the chosen text."""
    (ta, fa), (tb, fb) = world.judge(pair["prompt"], pair["a"]), world.judge(pair["prompt"], pair["b"])
    logit = (sum(ta.values()) - sum(tb.values())) / tau
    logit += b_agree * (bool(fa["agrees"]) - bool(fb["agrees"])) + b_refuse * (int(fa["refused"]) - int(fb["refused"]))
    logit += b_len * (fa["words"] - fb["words"]) / 10
    u = random.Random(seed * 1_000_003 + pair["pair_id"]).random()
    return pair["a"] if u < 1 / (1 + math.exp(-logit)) else pair["b"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A tiny world, a random "SFT" GPT, pairs of the demonstrator's answers (wrong beliefs agreed with,
    refusals, rambling: every knob has something to move), and one failures.py sweep over them."""
    d = tmp_path_factory.mktemp("failures")
    world, _, _, meta = tiny_stage(d, "sft", seed=0, n_sft=10, n_prompts=40, n_eval=8, n_paragraphs=200)
    config = GPTConfig(**{**meta["config"], "block_size": 160})  # room for the probes' prompt + answer
    torch.manual_seed(0)
    common.save_checkpoint(d / "sft", GPT(config), {**meta, "config": asdict(config)})
    rng, pairs = random.Random(0), []
    for row in common.read_jsonl(d / "data" / "prompts.jsonl"):
        texts = list(dict.fromkeys(world.demonstrate(row["prompt"], rng) for _ in range(3)))
        for i in range(len(texts)):
            for j in range(i + 1, len(texts)):
                pairs.append({"pair_id": len(pairs), "prompt": row["prompt"], "family": row["family"],
                              "a": texts[i], "b": texts[j], "a_ended": True, "b_ended": True})
    common.atomic_write_jsonl(d / "pairs.jsonl", pairs)
    cmd = [sys.executable, str(ROOT / "failures.py"), "--init", str(d / "sft"), "--pairs", str(d / "pairs.jsonl"),
           "--reference", str(d / "nothing"), "--data", str(d / "data" / "prompts.jsonl"),
           "--eval-data", str(d / "data" / "val_prompts.jsonl"), "--test-data", str(d / "data" / "test_prompts.jsonl"),
           "--out", str(d / "fail"), "--base", "0,0,0", "--agree", "0,2", "--refuse", "0,2", "--length", "0,2",
           "--policies", "ppo", "--fixes", "kl,majority", "--majority", "3", "--device", "cpu", "--kernels", "torch",
           "--test-prompts", "8", "--max-new-tokens", "5", "--probe-prompts", "10", "--show", "2",
           "--reward-args", "--steps 2 --batch-size 4 --eval-every 1 --norm-samples 8 --norm-max-new-tokens 5",
           "--ppo-args", "--steps 1 --batch-size 4 --minibatch-size 2 --ppo-epochs 1 --max-new-tokens 5 "
                         "--eval-prompts 4 --eval-every 1"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return d, world, pairs, cmd, first


def test_each_knob_at_0_gives_the_unbiased_labels_and_each_bias_moves_them_as_written(sweep, stage_here):
    d, world, pairs, _, _ = sweep
    unbiased = d / "unbiased"
    r = stage_here(["feedback.py", "--pairs", d / "pairs.jsonl", "--data", d / "data" / "prompts.jsonl", "--out", unbiased,
                    "--b-agree", "0", "--b-refuse", "0", "--b-len", "0", "--device", "cpu"])
    assert r.returncode == 0, r.stderr[-2000:]
    reference = common.read_jsonl(unbiased / "preferences.jsonl")
    assert [row["chosen"] for row in reference] == [hand_label(world, p, 1337) for p in pairs]
    # every knob at 0 with the others at --base 0,0,0 is the shared point "default": exactly those labels
    assert common.read_jsonl(d / "fail" / "default" / "feedback" / "preferences.jsonl") == reference
    for knob, field in (("agree", "b_agree"), ("refuse", "b_refuse"), ("length", "b_len")):
        rows = common.read_jsonl(d / "fail" / f"{knob}2" / "feedback" / "preferences.jsonl")
        assert [row["chosen"] for row in rows] == [hand_label(world, p, 1337, **{field: 2.0}) for p in pairs]
    # the majority fix: each pair's label is the majority of 3 labellers, each drawing as feedback.py would
    # with its own seed (1337 + 7919 j)
    majority = common.read_jsonl(d / "fail" / "fix_majority3" / "feedback" / "preferences.jsonl")
    votes = [[hand_label(world, p, 1337 + 7919 * j) == p["a"] for j in range(3)] for p in pairs]
    assert [row["chosen"] for row in majority] == [p["a"] if sum(v) >= 2 else p["b"] for p, v in zip(pairs, votes)]
    assert any(0 < sum(v) < 3 for v in votes)  # the labellers do disagree on some pairs
    agree = common.read_jsonl(d / "fail" / "agree2" / "feedback" / "preferences.jsonl")
    assert sum(a["chosen"] != b["chosen"] for a, b in zip(agree, reference)) > 0  # the bias does move some labels


def test_the_sweep_writes_its_files_and_a_second_call_trains_nothing(sweep, stage_here):
    d, _, _, cmd, first = sweep
    out = d / "fail"
    results = json.loads((out / "results.json").read_text())
    assert set(results["sweep"]) == {"agree", "refuse", "length"}
    assert set(results["sweep"]["agree"]) == {"0", "2"} and not results["reused_reference"]
    assert set(results["fixes"]) == {"kl_coef 1", "majority of 3 labellers"}
    for name in ("failures_sycophancy", "failures_refusal", "failures_tradeoff", "failures_length", "failures_fixes"):
        assert (out / f"{name}.png").stat().st_size > 10_000, name
    assert (out / "samples.md").read_text().count("- SFT:") >= 2
    for mode in ("sycophancy:", "over-refusal:", "length:"):
        assert sum(line.startswith(mode) for line in first.stdout.splitlines()) == 1, mode
    point = results["sweep"]["agree"]["2"]
    probe = point["rm"]["sycophancy"]
    assert probe["n"] > 0 and 0 <= probe["rm_prefers_biased"] <= 1
    assert probe["se"] == pytest.approx((probe["rm_prefers_biased"] * (1 - probe["rm_prefers_biased"]) / probe["n"]) ** 0.5)
    # a second call: every run and every evaluation reused, nothing trained, the same numbers
    again = stage_here(cmd[1:])  # in this process: it starts no stage, so no interpreter either
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"=== {ROOT}" not in again.stdout and "--- evaluating" not in again.stdout  # no stage run, no evaluation
    assert again.stdout.count("finished earlier, reused") == 11 and again.stdout.count("labelled earlier, reused") == 4
    assert json.loads((out / "results.json").read_text())["verdict_lines"] == results["verdict_lines"]


def test_length_share_is_the_regression_slope_times_the_change_in_words_over_the_gain():
    # proxy = 0.1 * words exactly: length explains the whole gain
    sft, policy = {"words": [5, 7, 9], "proxy": [0.5, 0.7, 0.9]}, {"words": [10, 12, 14], "proxy": [1.0, 1.2, 1.4]}
    s = length_share(sft, policy)
    assert s["slope_per_word"] == pytest.approx(0.1) and s["share"] == pytest.approx(1.0)
    # hand computed: words 1,3 | 2,4 (means 2, 3; pooled 2.5); proxy 0,0 | 1,1; slope = sxy / sxx = 1 / 5
    s = length_share({"words": [1, 3], "proxy": [0, 0]}, {"words": [2, 4], "proxy": [1, 1]})
    assert s["slope_per_word"] == pytest.approx(0.2) and s["proxy_gain"] == pytest.approx(1.0)
    assert s["share"] == pytest.approx(0.2)
    assert length_share({"words": [1, 2], "proxy": [0, 1]}, {"words": [1, 2], "proxy": [0, 1]})["share"] is None


def test_bad_flags_stop_with_one_clear_line(tmp_path, stage_here):
    base = ["failures.py", "--out", tmp_path / "out"]
    for extra, message in ((["--policies", "ppo,sft"], "--policies"), (["--majority", "4"], "--majority must be odd"),
                           (["--base", "1,2"], "--base must be three numbers"), (["--agree", "0,x"], "--agree")):
        r = stage_here(base + extra)  # in this process: four interpreters less to start
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert not (tmp_path / "out").exists()
