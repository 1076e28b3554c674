"""Pretraining: the fact-accuracy probe against hand-made completions, and a tiny run that must learn."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import pretrain  # noqa: E402
import world as W  # noqa: E402
from conftest import metrics_without_time  # noqa: E402
from tokenizer import train_bpe  # noqa: E402


class ScriptedModel:
    """Stands in for a GPT: 'generates' the given completions, one per probe, in order."""

    def __init__(self, enc, completions):
        self.enc, self.completions = enc, completions

    def eval(self):
        return self

    def generate(self, idx, attention_mask, max_new_tokens, **kw):
        rows = [self.enc.encode_ordinary(c)[:max_new_tokens] for c in self.completions]
        width = max(map(len, rows))
        return torch.tensor([r + [kw["pad_id"]] * (width - len(r)) for r in rows])


def test_completion_accuracy_counts_right_first_words():
    world = W.World(0)
    enc = train_bpe(world.corpus(__import__("random").Random(0), 200), 400)
    probes = world.fact_prompts()
    completions = []
    for i, (prompt, value) in enumerate(probes):
        attr = prompt.split("'s ")[1].split()[0]
        wrong = next(v for v in W.ATTRIBUTES[attr] if v != value)
        if i % 4 == 0:
            completions.append(f" {wrong}. The")  # wrong
        elif attr == "home":
            completions.append(f" the {value}.")  # homes come with "the"
        else:
            completions.append(f" {value}. It")
    expected = sum(i % 4 != 0 for i in range(len(probes))) / len(probes)
    assert pretrain.completion_accuracy(ScriptedModel(enc, completions), enc, probes, "cpu") == pytest.approx(expected)


def test_sum_probes_and_their_accuracy_by_hand():
    world = W.World(0)
    probes = world.sum_prompts()
    assert len(probes) == 81 and ("7 plus 8 is", "15") in probes and ("1 plus 1 is", "2") in probes
    enc = train_bpe(world.corpus(__import__("random").Random(0), 200), 400)
    # right for the first 60 sums, off by one for the rest; "15 plus" counts its first word only
    completions = [f" {v}. 3 plus" if i < 60 else f" {int(v) + 1}." for i, (_, v) in enumerate(probes)]
    assert pretrain.completion_accuracy(ScriptedModel(enc, completions), enc, probes, "cpu") == pytest.approx(60 / 81)


def test_tiny_pretraining_run_learns(tmp_path, stage_here):
    data, out = tmp_path / "data", tmp_path / "out"
    W.write_data(data, seed=0, n_sft=10, n_prompts=10, n_eval=10, n_paragraphs=800)
    run = lambda *a: stage_here(list(a))  # noqa: E731  (in this process: no interpreter to start)
    r = run("tokenizer.py", "--data", data / "pretrain.txt", "--vocab-size", 400, "--out", out / "tokenizer")
    assert r.returncode == 0, r.stderr
    r = run("pretrain.py", "--data", data / "pretrain.txt", "--tokenizer", out / "tokenizer", "--out", out / "pretrain",
            "--steps", 40, "--n-layer", 2, "--n-embd", 64, "--batch-size", 16, "--block-size", 64,
            "--eval-every", 20, "--warmup-steps", 5)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 41))
    assert all("tokens" in row for row in rows)
    first, last = rows[0]["train/loss"], sum(row["train/loss"] for row in rows[-5:]) / 5
    assert first > 5.5 and last < first - 2.0  # from ~ln(400) to well below: it learned the corpus
    meta = json.loads((out / "pretrain" / "meta.json").read_text())
    assert meta["stage"] == "pretrain" and meta["step"] == 40
    assert 0.0 <= meta["final"]["eval/fact_accuracy"] <= 1.0 and 0.0 <= meta["final"]["eval/sum_accuracy"] <= 1.0
    state = torch.load(out / "pretrain" / "model.pt", weights_only=True)
    assert "transformer.wte.weight" in state and "transformer.h.1.attn.c_attn.weight" in state


def test_missing_corpus_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "pretrain.py", "--data", str(tmp_path / "none.txt"), "--out", str(tmp_path / "o")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: --data")
    assert not (tmp_path / "o").exists()


def test_pretraining_killed_between_checkpoints_resumes_to_the_same_run(chain, chain_pretrain_args, kill_resume,
                                                                       same_run):
    tmp, _ = chain  # its pretrain folder is the uninterrupted run
    killed, resumed = kill_resume(chain_pretrain_args(tmp, "pretrain_killed"), kill_at=3)
    assert "step 3/4" in killed.stdout and "step 4/4" not in killed.stdout
    assert f"resumed from {tmp / 'pretrain_killed'} at step 2" in resumed.stdout
    same_run(tmp / "pretrain", tmp / "pretrain_killed", steps=range(1, 5))


def test_two_runs_with_the_same_seed_write_the_same_metrics(chain, chain_pretrain_args, stage_here, same_run):
    tmp, _ = chain
    r = stage_here(chain_pretrain_args(tmp, "pretrain_again"))  # in this process; the chain's ran in its own
    assert r.returncode == 0, r.stderr
    same_run(tmp / "pretrain", tmp / "pretrain_again", steps=range(1, 5))
    r = stage_here(chain_pretrain_args(tmp, "pretrain_seed2", "--seed", 2))  # the check can tell runs apart
    assert metrics_without_time(tmp / "pretrain_seed2" / "metrics.jsonl") != metrics_without_time(tmp / "pretrain" / "metrics.jsonl")
