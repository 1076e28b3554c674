"""evaluate.py: win rate, best-of-n and sequence log-probs against hand computations, and the files it
writes (tiny models, a few prompts)."""

import itertools
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import evaluate  # noqa: E402
from model import GPT, GPTConfig, ScalarModel  # noqa: E402
from tokenizer import encode_prompt, save_tokenizer, train_bpe  # noqa: E402

torch.set_num_threads(1)


def test_win_rate_counts_ties_as_half():
    gold = [1.0, 0.0, 2.0, 0.5, 3.0]
    base = [0.0, 0.0, 3.0, 0.5, 1.0]  # win, tie, loss, tie, win
    assert evaluate.win_rate(gold, base) == pytest.approx((1 + 0.5 + 0 + 0.5 + 1) / 5)
    assert evaluate.win_rate(base, gold) == pytest.approx(1 - 0.6)
    with pytest.raises(ValueError):
        evaluate.win_rate([1.0], [1.0, 2.0])


def test_best_of_n_takes_the_highest_proxy_among_the_first_n():
    proxy = torch.tensor([[0.1, 0.5, 0.3, 9.0],
                          [2.0, 1.0, 3.0, 0.0],
                          [0.0, 0.0, 0.0, 0.0]])  # all tied: the first one
    assert evaluate.best_of_n(proxy, 1).tolist() == [0, 0, 0]
    assert evaluate.best_of_n(proxy, 2).tolist() == [1, 0, 0]
    assert evaluate.best_of_n(proxy, 4).tolist() == [3, 2, 0]
    assert evaluate.best_of_n_kl_bound(1) == 0.0
    assert evaluate.best_of_n_kl_bound(2) == pytest.approx(math.log(2) - 0.5)
    assert evaluate.best_of_n_kl_bound(16) == pytest.approx(math.log(16) - 15 / 16)


def exact_best_of_n_kl(probs, scores, n):
    """KL(best-of-n || base) of a categorical base with known probabilities, by enumerating all
    len(probs)^n draws: the best is the draw with the highest score, ties broken uniformly at random
    among the tied draws. Independent of evaluate's closed form."""
    bon = [0.0] * len(probs)
    for draw in itertools.product(range(len(probs)), repeat=n):
        weight = math.prod(probs[y] for y in draw)
        tied = [y for y in draw if scores[y] == max(scores[y] for y in draw)]
        for y in tied:
            bon[y] += weight / len(tied)
    return sum(b * math.log(b / p) for b, p in zip(bon, probs) if b > 0)


def test_best_of_n_kl_estimate_is_exact_on_the_empirical_distribution():
    """The closed form over a prompt's K samples equals enumeration over those K samples as a
    categorical (each 1/K), with tied scores and repeated answers; float noise on copies of one answer
    changes nothing when the texts are given."""
    scores = [0.5, -1.0, 0.5, 2.0, -1.0, 0.5, 1.0]  # two tie groups
    texts = ["a", "b", "c", "d", "e", "a", "f"]      # "a" twice (same score), "c" ties with it
    for n in (1, 2, 3, 4):
        expected = exact_best_of_n_kl([1 / 7] * 7, scores, n)
        assert evaluate.best_of_n_kl(torch.tensor([scores]), n, [texts]) == pytest.approx(expected, abs=1e-6)
        noisy = torch.tensor([[0.5, -1.0, 0.5, 2.0, -1.0, 0.5 + 1e-6, 1.0]])  # the second "a": a float off
        assert evaluate.best_of_n_kl(noisy, n, [texts]) == pytest.approx(expected, abs=1e-6)


def test_best_of_n_kl_estimate_against_the_exact_kl_of_a_known_categorical():
    """Samples of a 6-way categorical with tied scores: the estimate from 64 samples per prompt (averaged
    over 300 prompts) and from 4000 samples of one prompt is within 3 % of the exact KL, which is well
    below the bound log n - (n - 1)/n; on answers that never repeat nor tie it reaches the bound."""
    probs = [0.4, 0.25, 0.15, 0.1, 0.06, 0.04]
    scores = [0.3, -1.0, 1.2, 0.3, 2.0, -1.0]  # ties: answers 0 and 3, 1 and 5 (e.g. two unfinished ones)
    g = torch.Generator().manual_seed(0)
    for N, K in ((300, 64), (1, 4000)):
        draws = torch.multinomial(torch.tensor(probs), N * K, replacement=True, generator=g).view(N, K)
        texts = [[f"answer {y}" for y in row] for row in draws.tolist()]
        for n in (2, 3, 4):
            exact = exact_best_of_n_kl(probs, scores, n)
            estimate = evaluate.best_of_n_kl(torch.tensor(scores)[draws], n, texts)
            assert estimate == pytest.approx(exact, rel=0.03), (N, K, n)
            assert exact < 0.85 * evaluate.best_of_n_kl_bound(n)  # the bound would be 15-20 % too far right
    distinct = torch.randn(2, 4096, generator=g)
    for n in (4, 64):
        assert evaluate.best_of_n_kl(distinct, n) == pytest.approx(evaluate.best_of_n_kl_bound(n), rel=0.002)


def test_best_of_n_kl_estimate_never_exceeds_the_bound():
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        K = int(torch.randint(2, 65, (1,), generator=g))
        proxy = torch.randint(0, 5, (3, K), generator=g).float()  # many ties
        for n in (1, 2, 4, 16, 64):
            kl = evaluate.best_of_n_kl(proxy, n)
            assert -1e-12 <= kl <= evaluate.best_of_n_kl_bound(n) + 1e-12, (K, n, kl)


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """A tiny world and tokenizer, an "SFT" GPT, a different "PPO" GPT and a reward model."""
    import world

    d = tmp_path_factory.mktemp("eval")
    world.write_data(d / "data", seed=0, n_sft=10, n_prompts=10, n_eval=12, n_paragraphs=200)
    enc = train_bpe((d / "data" / "pretrain.txt").read_text(), 300)
    save_tokenizer(enc, d / "tok")
    cfg = GPTConfig(block_size=64, vocab_size=320, n_layer=1, n_head=2, n_embd=32)
    meta = {"config": asdict(cfg), "args": {}, "step": 0, "tokenizer": str(d / "tok"), "final": {}}
    torch.manual_seed(0)
    sft = GPT(cfg)
    common.save_checkpoint(d / "sft", sft, {**meta, "stage": "sft"})
    ppo = GPT(cfg)
    ppo.transformer.ln_f.weight.data.fill_(10.0)  # peaked: far from the near-uniform "SFT", KL clearly > 0
    common.save_checkpoint(d / "ppo", ppo, {**meta, "stage": "ppo"})
    common.save_checkpoint(d / "reward", ScalarModel.from_gpt(sft), {**meta, "stage": "reward"})
    return d, enc


def test_sequence_kl_sums_the_response_tokens_log_ratio_at_the_temperature(stages):
    d, enc = stages
    model, _, _ = common.load_policy(d / "ppo", "cpu")
    ref, _, _ = common.load_policy(d / "sft", "cpu")
    prompts = ["Hello!", "What is 3 plus 4?", "Where does the bob live?"]
    responses = [{"ids": [5, 6, 7]}, {"ids": [8]}, {"ids": [9, 10, 11, 12, 13]}]  # different lengths: padding
    T = 0.7
    got = evaluate.sequence_kl(model, ref, enc, prompts, responses, "cpu", temperature=T, batch_size=2)

    def logprob(m, ids, n):  # log pi(y | x) of the last n tokens, the sequence alone (no padding), float64
        logp = torch.log_softmax(m(torch.tensor([ids]))[0].double() / T, -1)
        return sum(logp[t - 1, ids[t]].item() for t in range(len(ids) - n, len(ids)))

    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids = encode_prompt(enc, p) + r["ids"]
        expected = logprob(model, ids, len(r["ids"])) - logprob(ref, ids, len(r["ids"]))
        assert abs(expected) > 0.1 and got[i].item() == pytest.approx(expected, abs=1e-4)
    # and the proxy score is the reward model read at the last token of prompt + response
    rm, _, _ = common.load_scalar_model(d / "reward", "cpu")
    scores = evaluate.proxy_scores(rm, enc, prompts, responses, "cpu", batch_size=2)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        seq = torch.tensor([encode_prompt(enc, p) + r["ids"]])
        assert scores[i].item() == pytest.approx(rm(seq, torch.ones_like(seq))[0, -1].item(), abs=1e-5)
    # as PPO scores it: an answer that never ended gets the missing-end penalty instead ('none': kept)
    unfinished = [{**r, "ended": i != 1} for i, r in enumerate(responses)]
    penalised = evaluate.proxy_scores(rm, enc, prompts, unfinished, "cpu", batch_size=2, missing_end_penalty=-1.5)
    assert penalised[1].item() == -1.5 and penalised[[0, 2]].tolist() == scores[[0, 2]].tolist()
    kept = evaluate.proxy_scores(rm, enc, prompts, unfinished, "cpu", batch_size=2, missing_end_penalty=None)
    assert kept.tolist() == scores.tolist()


def run_eval(d, *extra):
    cmd = [sys.executable, str(ROOT / "evaluate.py"), *extra, "--baseline", str(d / "sft"), "--reward",
           str(d / "reward"), "--data", str(d / "data" / "eval_prompts.jsonl"), "--out", str(d / "eval"),
           "--max-new-tokens", "6", "--kernels", "torch"]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_results_json_and_markdown_have_every_field(stages):
    d, _ = stages
    result = run_eval(d, str(d / "sft"), str(d / "ppo"), "--n-prompts", "8", "--best-of", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((d / "eval" / "results.json").read_text())
    assert [r["name"] for r in results] == ["sft", "ppo", "best-of-1", "best-of-2", "best-of-4"]
    fields = ["name", "gold_reward", "gold_reward_se", "win_rate_vs_sft", "kl_to_sft", "proxy_score", "length",
              "correct_fact", "refusal_rate_unsafe", "over_refusal_rate"]
    for r in results:
        for f in fields:
            assert f in r, (r["name"], f)
    sft, ppo = results[0], results[1]
    assert sft["win_rate_vs_sft"] == 0.5 and sft["kl_to_sft"] == 0.0
    assert ppo["kl_to_sft"] > 0  # another model's own samples are likelier under itself
    assert results[4]["kl_to_sft_bound"] == pytest.approx(math.log(4) - 3 / 4)
    assert 0 <= results[3]["kl_to_sft"] <= results[4]["kl_to_sft"] <= results[4]["kl_to_sft_bound"] + 1e-9
    assert results[2]["proxy_score"] <= results[3]["proxy_score"] <= results[4]["proxy_score"]
    md = (d / "eval" / "results.md").read_text()
    assert "| model | gold |" in md and "| best-of-4 |" in md and "| ppo |" in md
    assert "| model | gold |" in result.stdout


def test_bad_input_stops_with_one_clear_line(stages):
    d, _ = stages
    result = run_eval(d, str(d / "reward"), "--n-prompts", "2", "--best-of", "0")
    assert result.returncode == 2 and "a checkpoint of stage 'reward'" in result.stderr
    result = run_eval(d, str(d / "sft"), "--best-of", "3")
    assert result.returncode == 2 and "--best-of must be 0 or a power of 2" in result.stderr
