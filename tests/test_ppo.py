"""PPO: the math against plain references, the plumbing invariants other RLHF code trips on, a
learning check on a known rule, and short end-to-end runs (kernels torch vs triton, resume, bad input)."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import ppo  # noqa: E402
from conftest import metrics_without_time, tiny_stage  # noqa: E402
from model import GPT, GPTConfig, ScalarModel, left_pad  # noqa: E402
from sampling import response_logprobs  # noqa: E402

torch.set_num_threads(1)  # tiny models: one thread is fastest, and the CI machine may be shared
END, PAD, V = 62, 63, 64


def tiny_models(dropout=0.0, seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(block_size=32, vocab_size=V, n_layer=1, n_head=2, n_embd=32, dropout=dropout)
    policy = GPT(cfg)
    ref = GPT(cfg)
    ref.load_state_dict(policy.state_dict())
    value, rm = ScalarModel(cfg), ScalarModel(cfg)  # random heads and trunks: any numbers will do
    return policy, ref, value, rm


def make_args(*extra):
    return ppo.parser.parse_args(["--max-new-tokens", "6", "--minibatch-size", "4", "--ppo-epochs", "2", *extra])


def random_prompts(n, generator, lo=1, hi=7):
    lengths = torch.randint(lo, hi, (n,), generator=generator).tolist()
    return left_pad([torch.randint(0, 60, (k,), generator=generator).tolist() for k in lengths], PAD)


# -----------------------------------------------------------------------------
# The math against plain references


def test_gae_vectorised_equals_plain_loop_with_padding():
    g = torch.Generator().manual_seed(0)
    B, T, gamma, lam = 5, 7, 0.9, 0.8
    lengths = [7, 1, 4, 6, 3]
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)  # garbage on padding too: must be ignored
    adv, ret = ppo.compute_gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        r, v = rewards[b, :n].tolist(), values[b, :n].tolist()
        expected = [0.0] * n
        for t in range(n):  # the definition: A_t = sum_k (gamma lam)^k delta_{t+k}
            for k in range(t, n):
                next_v = v[k + 1] if k + 1 < n else 0.0
                expected[t] += (gamma * lam) ** (k - t) * (r[k] + gamma * next_v - v[k])
        assert adv[b, :n].tolist() == pytest.approx(expected, abs=1e-12)
        assert ret[b, :n].tolist() == pytest.approx([a + x for a, x in zip(expected, v)], abs=1e-12)
        assert adv[b, n:].abs().sum() == 0 and ret[b, n:].abs().sum() == 0


def test_whitening_and_means_ignore_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 5.0, -7.0, -50.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    real = [1.0, 2.0, 3.0, 4.0, 5.0]
    mean = sum(real) / 5
    var = sum((v - mean) ** 2 for v in real) / 4  # unbiased
    assert ppo.masked_mean(x, mask).item() == pytest.approx(mean)
    assert ppo.masked_var(x, mask).item() == pytest.approx(var)
    w = ppo.whiten(x, mask, eps=0.0)
    expected = [(v - mean) / math.sqrt(var) for v in real]
    assert w[mask.bool()].tolist() == pytest.approx(expected)
    assert w[~mask.bool()].abs().sum() == 0
    x2 = x.clone()
    x2[~mask.bool()] = 1e6  # other padding values: nothing changes
    assert torch.equal(ppo.whiten(x2, mask, eps=0.0), w)
    w = ppo.whiten(x, mask, shift_mean=False, eps=0.0)  # only rescaled
    assert w[mask.bool()].tolist() == pytest.approx([(v - mean) / math.sqrt(var) + mean for v in real])


def test_kl_estimators_by_hand():
    logp = torch.tensor([[math.log(0.5), math.log(0.1)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.3)]])
    k1 = ppo.kl_per_token(logp, ref, "k1")
    assert k1.tolist()[0] == pytest.approx([math.log(2), math.log(1 / 3)])
    k3 = ppo.kl_per_token(logp, ref, "k3")  # r = ref/pi: r - 1 - log r
    assert k3.tolist()[0] == pytest.approx([0.5 - 1 - math.log(0.5), 3 - 1 - math.log(3)])
    # full: softmax(logits / T) of three tokens, the exact sum p (log p - log q)
    logits, ref_logits, T = torch.tensor([[[1.0, 2.0, 0.5]]]), torch.tensor([[[0.0, 1.0, 3.0]]]), 2.0
    p = [math.exp(a / T) for a in [1.0, 2.0, 0.5]]
    q = [math.exp(a / T) for a in [0.0, 1.0, 3.0]]
    p, q = [a / sum(p) for a in p], [a / sum(q) for a in q]
    exact = sum(a * math.log(a / b) for a, b in zip(p, q))
    full = ppo.kl_per_token(None, None, "full", logits, ref_logits, T)
    assert full.item() == pytest.approx(exact, rel=1e-5)


def test_adaptive_kl_controller_formula():
    # KL above target: error clipped at +0.2; below: (5 / 6 - 1) = -1/6 unclipped
    assert ppo.adaptive_kl_coef(0.1, 9.0, 6.0, 64, 10000) == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))
    assert ppo.adaptive_kl_coef(0.1, 5.0, 6.0, 64, 10000) == pytest.approx(0.1 * (1 - (1 / 6) * 64 / 10000))
    assert ppo.adaptive_kl_coef(0.1, 0.0, 6.0, 100, 100) == pytest.approx(0.1 * 0.8)


def test_value_loss_by_hand():
    vpred = torch.tensor([[1.0, 0.0, 5.0]])
    values = torch.tensor([[0.5, 0.0, 9.0]])
    returns = torch.tensor([[2.0, 1.0, 7.0]])
    mask = torch.tensor([[1, 1, 0]])
    # token 0: clipped pred 0.7 -> max((1-2)^2, (0.7-2)^2) = 1.69 (clipped); token 1: 1.0 either way
    loss, clipfrac = ppo.value_loss(vpred, values, returns, mask, 0.2)
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0) / 2)
    assert clipfrac.item() == pytest.approx(0.5)


def test_rewards_carry_the_score_on_the_last_real_token_only():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    rewards = ppo.compute_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.5)
    assert rewards.flatten().tolist() == pytest.approx([-0.05, -0.1, -0.15 + 2.0, -0.2 - 1.0, 0.0, 0.0])


def test_truncate_at_end_keeps_the_end_token_and_pads_after():
    responses = torch.tensor([[5, END, 7, 8], [5, 6, 7, 8], [END, 1, 2, 3]])
    out, mask, ended = ppo.truncate_at_end(responses, END, PAD)
    assert out.tolist() == [[5, END, PAD, PAD], [5, 6, 7, 8], [END, PAD, PAD, PAD]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]


# -----------------------------------------------------------------------------
# Plumbing invariants of a real rollout


def test_ratio_is_exactly_one_on_the_first_minibatch_of_the_first_epoch():
    policy, ref, value, rm = tiny_models(dropout=0.1)  # dropout left on would break it
    for estimator in ("k1", "full"):
        args = make_args("--kl-estimator", estimator, "--temperature", "0.7")
        q, m = random_prompts(12, torch.Generator().manual_seed(1))
        batch = ppo.rollout(policy, ref, value, rm, q, m, args, 0.05, END, PAD, torch.Generator().manual_seed(2))
        opt = torch.optim.AdamW(list(policy.parameters()) + list(value.parameters()), lr=1e-2)
        stats = ppo.ppo_update(policy, value, opt, batch, args, torch.Generator().manual_seed(3))
        assert len(stats) == 2 * 3
        assert stats[0]["ppo/ratio_mean"] == 1.0
        assert stats[0]["ppo/approx_kl"] == 0.0 and stats[0]["ppo/clipfrac"] == 0.0
        assert stats[0]["value/clipfrac"] == 0.0  # the value model has not moved either
        assert any(s["ppo/ratio_mean"] != 1.0 for s in stats[1:])  # and then the policy did move


def test_score_logprobs_and_penalty_sit_on_the_real_tokens_whatever_the_padding():
    policy, ref, value, rm = tiny_models()
    ref.transformer.h[0].mlp.c_fc.weight.data.mul_(3)  # a reference that differs: KL != 0
    prompts = [[3, 4], [5, 6, 7, 8, 9], [10], [11, 12, 13]]
    responses = torch.tensor([[20, 21, END, PAD, PAD], [22, END, PAD, PAD, PAD],
                              [23, 24, 25, 26, END], [27, 28, 29, 30, 31]])  # the last never ends
    policy.generate = lambda *a, **k: responses.clone()  # a fixed "sample"
    T, penalty = 0.6, -3.0
    args = make_args("--temperature", str(T), "--missing-end-penalty", str(penalty))
    q, m = left_pad(prompts, PAD)
    batch = ppo.rollout(policy, ref, value, rm, q, m, args, 0.1, END, PAD)
    assert batch["ended"].tolist() == [True, True, True, False]
    assert batch["mask"].sum(1).tolist() == [3, 2, 5, 5]
    for b, (p, n) in enumerate(zip(prompts, [3, 2, 5, 5])):
        seq = torch.tensor([p + responses[b, :n].tolist()])  # alone, no padding anywhere
        expected = rm(seq, torch.ones_like(seq))[0, -1].item() if b < 3 else penalty
        assert batch["scores"][b].item() == pytest.approx(expected, abs=1e-5)
        # log-probs at the sampling temperature, in float64 by hand
        logits = policy(seq, torch.ones_like(seq))[0, len(p) - 1 : -1].double()
        ref_logits = ref(seq, torch.ones_like(seq))[0, len(p) - 1 : -1].double()
        targets = seq[0, len(p):]
        logp = torch.log_softmax(logits / T, -1).gather(1, targets[:, None])[:, 0]
        ref_logp = torch.log_softmax(ref_logits / T, -1).gather(1, targets[:, None])[:, 0]
        assert batch["logprobs"][b, :n].tolist() == pytest.approx(logp.tolist(), abs=1e-5)
        kl = (logp - ref_logp).tolist()
        expected_rewards = [-0.1 * k for k in kl]
        expected_rewards[-1] += expected
        assert batch["rewards"][b, :n].tolist() == pytest.approx(expected_rewards, abs=1e-5)
        assert batch["rewards"][b, n:].abs().sum() == 0 and batch["advantages"][b, n:].abs().sum() == 0


def test_rollout_advantages_are_the_advantage_estimate_of_its_rewards_whitened():
    """Not over the padding too: the advantages of the real tokens have mean 0 and variance 1, and are
    the GAE (by its definition, a float64 loop) of the rollout's own rewards and values, whitened."""
    policy, ref, value, rm = tiny_models()
    ref.transformer.h[0].mlp.c_fc.weight.data.mul_(3)  # a reference that differs: a KL reward on every token
    responses = torch.tensor([[20, 21, END, PAD, PAD, PAD], [22, END, PAD, PAD, PAD, PAD],
                              [23, 24, 25, 26, END, PAD], [27, 28, 29, 30, 31, 32], [33, END, PAD, PAD, PAD, PAD]])
    policy.generate = lambda *a, **k: responses.clone()  # a fixed "sample", a third of it padding
    gamma, lam = 0.9, 0.8
    args = make_args("--gamma", str(gamma), "--lam", str(lam))
    q, m = left_pad([[3, 4], [5, 6, 7, 8, 9], [10], [11, 12, 13], [14, 15]], PAD)
    batch = ppo.rollout(policy, ref, value, rm, q, m, args, 0.1, END, PAD)
    mask = batch["mask"].bool()
    assert mask.sum(1).tolist() == [3, 2, 5, 6, 2]
    adv = batch["advantages"].double()
    assert adv[~mask].abs().sum() == 0
    assert adv[mask].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert adv[mask].var().item() == pytest.approx(1.0, abs=1e-5)  # unbiased, over the 18 real tokens only
    gae = []
    for b, n in enumerate(mask.sum(1).tolist()):
        r, v = batch["rewards"][b, :n].double().tolist(), batch["values"][b, :n].double().tolist()
        for t in range(n):  # A_t = sum_k (gamma lam)^k delta_{t+k}, V = 0 after the last real token
            gae.append(sum((gamma * lam) ** (k - t) * (r[k] + gamma * (v[k + 1] if k + 1 < n else 0.0) - v[k])
                           for k in range(t, n)))
    gae = torch.tensor(gae, dtype=torch.float64)
    assert adv[mask].tolist() == pytest.approx(((gae - gae.mean()) / gae.std()).tolist(), abs=1e-5)


@pytest.mark.parametrize("ent_coef", [0.0, 0.1])
def test_an_entropy_bonus_raises_the_entropy(ent_coef):
    """With every advantage 0 the clipped surrogate gives no gradient at all: PPO updates with ent_coef
    > 0 must raise the policy's entropy on the rollout's tokens (a sign error lowers it), and with
    ent_coef = 0 leave the policy exactly as it was."""
    policy, ref, value, rm = tiny_models()
    policy.transformer.ln_f.weight.data.fill_(3.0)  # peaked (entropy well below log V): room to rise
    args = make_args("--ent-coef", str(ent_coef), "--ppo-epochs", "4", "--vf-coef", "0")
    q, m = random_prompts(8, torch.Generator().manual_seed(1))
    batch = ppo.rollout(policy, ref, value, rm, q, m, args, 0.0, END, PAD, torch.Generator().manual_seed(2))
    batch["advantages"].zero_()

    def entropy():
        with torch.no_grad():
            _, h, _ = response_logprobs(policy, batch["query_responses"], batch["attention_mask"],
                                        batch["context_length"], args.temperature)
        return ppo.masked_mean(h, batch["mask"]).item()

    before = entropy()
    opt = torch.optim.AdamW(list(policy.parameters()) + list(value.parameters()), lr=1e-2, weight_decay=0.0)
    ppo.ppo_update(policy, value, opt, batch, args, torch.Generator().manual_seed(3))
    if ent_coef > 0:
        assert entropy() > before + 0.05, (before, entropy())
    else:
        assert entropy() == before


def test_sampling_and_scoring_use_the_same_temperature():
    policy, ref, value, rm = tiny_models()
    policy.transformer.ln_f.weight.data.fill_(3.0)  # top token: p 0.11 at T = 1, 0.49 at T = 0.5
    T, N = 0.5, 3000
    args = make_args("--temperature", str(T), "--max-new-tokens", "1")
    q = torch.tensor([[7, 8, 9]] * N)
    batch = ppo.rollout(policy, ref, value, rm, q, torch.ones_like(q), args, 0.0, END, PAD,
                        torch.Generator().manual_seed(0))
    tokens, logprobs = batch["responses"][:, 0], batch["logprobs"][:, 0]
    logits = policy(q[:1], torch.ones_like(q[:1]))[0, -1].double()
    p_at_1 = torch.softmax(logits, -1)
    top = torch.bincount(tokens, minlength=V).argmax().item()
    freq = (tokens == top).double().mean().item()
    p_scored = logprobs[tokens == top][0].exp().item()  # what the rollout says the sampler's p was
    assert abs(freq - p_scored) < 0.03  # the sampled frequency is the scored probability ...
    assert abs(freq - p_at_1[top].item()) > 0.1  # ... and temperature 1 would be visibly wrong


# -----------------------------------------------------------------------------
# Learning: PPO must raise a simple known reward (and a sign error would lower it)


class CountRule:
    """A known reward instead of the reward model: the fraction of response tokens with id < 8."""

    def __init__(self, context_length, sign=1.0):
        self.P, self.sign = context_length, sign

    def score(self, idx, mask):
        r, m = idx[:, self.P:], mask[:, self.P:]
        return self.sign * ((r < 8) * m).sum(1).float() / m.sum(1)


def run_rule_ppo(sign, steps=20):
    policy, ref, value, _ = tiny_models()
    args = make_args("--max-new-tokens", "8", "--minibatch-size", "8", "--ppo-epochs", "4", "--lr", "3e-3",
                     "--missing-end-penalty", "none")
    opt = torch.optim.AdamW(list(policy.parameters()) + list(value.parameters()), lr=args.lr, eps=1e-5)
    g = torch.Generator().manual_seed(0)
    good = []
    for _ in range(steps):
        q, m = random_prompts(32, g, 2, 6)
        batch = ppo.rollout(policy, ref, value, CountRule(q.size(1), sign), q, m, args, 0.05, END, PAD, g)
        ppo.ppo_update(policy, value, opt, batch, args, g)
        good.append(batch["scores"].mean().item() * sign)
    return sum(good[:3]) / 3, sum(good[-3:]) / 3


class ZeroReward:
    """A reward model that scores every answer 0: only the KL leash is left to act."""

    def score(self, idx, mask):
        return torch.zeros(idx.size(0))


def next_token_kls(policy, ref, q, m):
    """Exact KL(pi || ref) and KL(ref || pi) of the first answer token's distribution, mean over prompts."""
    with torch.no_grad():
        logp = torch.log_softmax(policy(q, m)[:, -1].double(), -1)
        ref_logp = torch.log_softmax(ref(q, m)[:, -1].double(), -1)
    return ((logp.exp() * (logp - ref_logp)).sum(-1).mean().item(),
            (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean().item())


@pytest.mark.parametrize("estimator", ["k1", "k3", "full"])
def test_every_kl_estimator_pulls_the_policy_back_to_the_reference(estimator):
    """The reward fixed at 0, one-token answers, a policy started ~1 nat away from the reference,
    kl_coef 1, 40 steps of rollout + ppo_update as shipped: KL(pi || ref) must fall by more than half,
    and KL(ref || pi) with it. A KL whose gradient does not point to the reference cannot pass: with k3
    and full charged in the reward (before issue 15) this run took KL(pi || ref) from 0.96 to 0.82 and
    1.01, and k3 took KL(ref || pi) from 0.65 up to 1.56; k1 took both to 0.02. As loss terms, k3 and
    full end at 0.05 and 0.03."""
    policy, ref, value, _ = tiny_models()
    with torch.no_grad():  # a policy away from the reference: its output layer perturbed
        policy.lm_head.weight.add_(0.13 * torch.randn(policy.lm_head.weight.shape,
                                                      generator=torch.Generator().manual_seed(5)))
    args = make_args("--max-new-tokens", "1", "--minibatch-size", "8", "--ppo-epochs", "4", "--lr", "3e-3",
                     "--missing-end-penalty", "none", "--kl-estimator", estimator)
    opt = torch.optim.AdamW(list(policy.parameters()) + list(value.parameters()), lr=args.lr, eps=1e-5)
    q_eval, m_eval = random_prompts(64, torch.Generator().manual_seed(9), 2, 6)
    kl_before, reverse_before = next_token_kls(policy, ref, q_eval, m_eval)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        q, m = random_prompts(32, g, 2, 6)
        batch = ppo.rollout(policy, ref, value, ZeroReward(), q, m, args, 1.0, END, PAD, g)
        ppo.ppo_update(policy, value, opt, batch, args, g)
    kl_after, reverse_after = next_token_kls(policy, ref, q_eval, m_eval)
    assert kl_before > 0.8, kl_before  # the start really is away from the reference
    assert kl_after < 0.5 * kl_before and reverse_after < 0.5 * reverse_before, (kl_before, kl_after,
                                                                                 reverse_before, reverse_after)


def test_ppo_raises_a_known_rule_reward():
    start, end = run_rule_ppo(+1.0)
    assert start < 0.2 and end > start + 0.25, (start, end)  # ~1/8 of tokens at random, then well over
    start, end = run_rule_ppo(-1.0)  # the same run maximising the opposite: the fraction must fall
    assert end < start, (start, end)


# -----------------------------------------------------------------------------
# End to end: ppo.py as a user runs it, at a few-second size


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """A tiny world, tokenizer, "SFT" policy (random) and reward model (ScalarModel of it)."""
    d = tmp_path_factory.mktemp("ppo")
    _, _, gpt, meta = tiny_stage(d, "sft", seed=0, n_sft=10, n_prompts=32, n_eval=8, n_paragraphs=200)
    common.save_checkpoint(d / "reward", ScalarModel.from_gpt(gpt), {**meta, "stage": "reward"})
    return d


def run_ppo(d, out, *extra, env=None):
    cmd = [sys.executable, str(ROOT / "ppo.py"), "--init", str(d / "sft"), "--reward", str(d / "reward"),
           "--data", str(d / "data" / "prompts.jsonl"), "--eval-data", str(d / "data" / "val_prompts.jsonl"),
           "--out", str(out), "--batch-size", "4", "--minibatch-size", "2", "--max-new-tokens", "5",
           "--ppo-epochs", "2", "--eval-prompts", "4", "--eval-every", "2", "--sample-every", "2", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def straight(stages):
    """Four steps in one go, in plain PyTorch (--kernels torch) with the exact-KL estimator: (its stdout,
    the rows of its metrics.jsonl)."""
    result = run_ppo(stages, stages / "straight", "--steps", "4", "--kernels", "torch", "--kl-estimator", "full")
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, metrics_without_time(stages / "straight" / "metrics.jsonl")


def test_a_run_logs_the_sft_model_at_step_0_then_every_step_and_prints_what_it_logs(stages, straight):
    stdout, rows = straight
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]  # step 0: the SFT model's eval/* before any update
    assert rows[0]["eval/kl_to_sft"] == pytest.approx(0.0, abs=1e-4) and "objective/kl" not in rows[0]
    assert "eval/gold_reward" in rows[2] and "eval/proxy_score" in rows[2] and "objective/kl" in rows[1]
    # the line printed at each step shows the numbers metrics.jsonl holds
    printed = dict(re.findall(r"^step (\d+)/4 \| (.*)$", stdout, re.M))
    assert sorted(printed) == ["0", "1", "2", "3", "4"]
    for row in rows[1:]:
        for key in ("objective/score", "objective/kl", "ppo/clipfrac", "response/length"):
            assert f"{key} {row[key]:.4g} |" in printed[str(row["step"])], (row["step"], key)
    meta = json.loads((stages / "straight" / "meta.json").read_text())
    assert meta["stage"] == "ppo" and meta["step"] == 4
    assert meta["final"] == {k: v for k, v in rows[-1].items() if k not in ("step", "episodes", "eval/gold_per_prompt")}
    # each evaluation also logs every prompt's gold score (hacking.py's verdict pairs them across steps)
    assert len(rows[2]["eval/gold_per_prompt"]) == 4
    assert sum(rows[2]["eval/gold_per_prompt"]) / 4 == pytest.approx(rows[2]["eval/gold_reward"])


def test_kernels_torch_and_triton_log_the_same_metrics(stages, straight):
    pytest.importorskip("triton")
    result = run_ppo(stages, stages / "triton", "--steps", "2", "--kernels", "triton", "--kl-estimator", "full",
                     env={"TRITON_INTERPRET": "1"})  # the Triton kernels on the CPU, through the interpreter
    assert result.returncode == 0, result.stderr[-3000:]
    triton_rows = metrics_without_time(stages / "triton" / "metrics.jsonl")
    assert len(triton_rows) == 3  # steps 0, 1, 2
    for a, b in zip(straight[1][:3], triton_rows):
        assert a.keys() == b.keys()
        for k in a:
            # a clip fraction counts tokens: float noise may flip one of a minibatch's ~10 (0.025 on average)
            tol = 0.05 if k.endswith("clipfrac") else 1e-4
            assert a[k] == pytest.approx(b[k], rel=1e-3, abs=tol), k


def ppo_argv(d, out, *extra):
    return ["ppo.py", "--init", d / "sft", "--reward", d / "reward", "--data", d / "data" / "prompts.jsonl",
            "--eval-data", d / "data" / "val_prompts.jsonl", "--out", out, "--batch-size", 4, "--minibatch-size", 2,
            "--max-new-tokens", 5, "--ppo-epochs", 2, "--eval-prompts", 4, "--eval-every", 2, "--sample-every", 2,
            "--steps", 4, "--kernels", "torch", "--kl-estimator", "full", *extra]


def test_killed_between_checkpoints_resumes_exactly_where_it_stopped(stages, straight, kill_resume, same_run):
    # SIGKILL right after step 3 is logged; the last checkpoint was at step 2
    killed, resumed = kill_resume(ppo_argv(stages, stages / "resumed"), kill_at=3)
    assert "step 3/4" in killed.stdout and "step 4/4" not in killed.stdout
    assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout and "8 episodes done" in resumed.stdout
    same_run(stages / "straight", stages / "resumed", steps=range(0, 5))  # policy, metrics, final: identical
    value_a, value_b = (torch.load(stages / d / "resume.pt", weights_only=False)["value_model"]
                        for d in ("straight", "resumed"))
    assert all(torch.equal(value_a[k], value_b[k]) for k in value_a)  # and the value model too
    common.load_policy(stages / "resumed", "cpu", expect_stage="ppo")  # a GPT that the next stage can load


def test_adaptive_kl_state_survives_a_kill(stages, kill_resume, same_run, stage_here):
    """The adaptive controller's kl_coef lives in resume.pt: a resumed run continues its trajectory."""
    argv = lambda out: ppo_argv(stages, stages / out, "--adaptive-kl", "--target-kl", "0.01", "--kl-horizon", "10",
                                "--steps", 3, "--kl-estimator", "k1")  # noqa: E731
    assert stage_here(argv("adaptive")).returncode == 0
    kill_resume(argv("adaptive_resumed"), kill_at=2)  # right after the checkpoint of step 2
    same_run(stages / "adaptive", stages / "adaptive_resumed", steps=range(0, 4))
    coefs = [r["objective/kl_coef"] for r in common.read_metrics(stages / "adaptive" / "metrics.jsonl")[1:]]
    assert coefs[0] == 0.3 and coefs[2] != coefs[1] != coefs[0]  # it moved at every step


def test_a_reward_model_from_the_wrong_stage_stops_with_one_clear_line(stages):
    result = run_ppo(stages, stages / "bad", "--steps", "1", "--reward", str(stages / "sft"))
    assert result.returncode == 2
    assert "--reward" in result.stderr and "expected reward" in result.stderr
    assert not (stages / "bad" / "meta.json").exists()


def test_null_reward_scores_every_answer_zero_and_keeps_the_trunk(tmp_path, stage_here):
    """scripts/null_reward.py: the control whose reward ignores the answer. Its model must score 0 on any
    sequence (the source scores something else), keep every trunk weight, load as a reward model, and
    refuse to write into a folder that is not empty."""
    from dataclasses import asdict

    from model import GPTConfig, ScalarModel
    from tokenizer import save_tokenizer, train_bpe

    enc = train_bpe("The milt is red. The snaiz eats moss. " * 40, 270)
    save_tokenizer(enc, tmp_path / "tok")
    config = GPTConfig(block_size=16, vocab_size=enc.n_vocab, n_layer=1, n_head=2, n_embd=8)
    torch.manual_seed(0)
    source = ScalarModel(config)
    torch.nn.init.constant_(source.head.bias, 0.7)
    (tmp_path / "rm").mkdir()
    torch.save(source.state_dict(), tmp_path / "rm" / "model.pt")
    common.atomic_write_json(tmp_path / "rm" / "meta.json", {"stage": "reward", "config": asdict(config),
                                                              "tokenizer": str(tmp_path / "tok"), "final": {}})
    r = stage_here(["scripts/null_reward.py", tmp_path / "rm", tmp_path / "null"])
    assert r.returncode == 0, r.stderr
    null, _, meta = common.load_scalar_model(tmp_path / "null", "cpu")
    assert meta["stage"] == "reward" and meta["null_of"] == str(tmp_path / "rm")
    idx = torch.randint(0, enc.n_vocab, (5, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(idx)
    mask[:2, :4] = 0  # left padding
    with torch.no_grad():
        assert source.score(idx, mask).abs().min() > 0  # the source does score the answers
        assert torch.equal(null.score(idx, mask), torch.zeros(5))
    kept = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    assert all(torch.equal(v, null.state_dict()[k]) for k, v in kept.items())
    again = stage_here(["scripts/null_reward.py", tmp_path / "rm", tmp_path / "null"])
    assert again.returncode == 2 and "not empty" in again.stderr
