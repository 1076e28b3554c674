"""grpo.py: the group advantages and the loss aggregations against hand computations, the verifier on
hand cases, a learning check a broken GRPO cannot pass, and the script end to end (torch = Triton)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpo  # noqa: E402
from conftest import metrics_without_time, tiny_stage  # noqa: E402
from model import GPT, GPTConfig, left_pad  # noqa: E402
from ppo import truncate_at_end  # noqa: E402
from sampling import response_logprobs  # noqa: E402
from world import World  # noqa: E402

torch.set_num_threads(1)
END, PAD, V = 62, 63, 64


# -----------------------------------------------------------------------------
# The math against hand computations


def test_group_advantages_by_hand_including_a_group_of_equal_rewards():
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1, 0.5, 1, 0, 0.5, 0, 0, 0, 0])
    adv = grpo.group_advantages(rewards, 4)
    # group 1: mean 1/4, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    # group 3: mean 1/2, deviations (0, .5, -.5, 0), unbiased variance 0.5 / 3
    s3 = (0.5 / 3) ** 0.5
    eps = 1e-4
    expected = [0.75 / (0.5 + eps), -0.25 / (0.5 + eps), -0.25 / (0.5 + eps), -0.25 / (0.5 + eps),
                0, 0, 0, 0,  # all right: no signal, and no NaN
                0, 0.5 / (s3 + eps), -0.5 / (s3 + eps), 0,
                0, 0, 0, 0]  # all wrong: the same
    assert torch.isfinite(adv).all()
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)
    # Dr. GRPO: r - mean, no division
    dr = grpo.group_advantages(rewards, 4, scale_std=False)
    assert dr.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0, 0, 0.5, -0.5, 0, 0, 0, 0, 0])


@pytest.mark.parametrize("loss_agg", ["answer", "token", "constant"])
def test_loss_aggregations_value_and_gradient_against_a_float64_loop(loss_agg):
    """Three answers of 1, 3 and 5 tokens (R = 5, max_new_tokens 6), the policy moved away from the one
    that sampled them (ratios != 1, some clipped), kl_coef 0.1: grpo_loss and its gradient against
    the formula written as a loop over answers and tokens in float64."""
    g = torch.Generator().manual_seed(0)
    B, R, max_new = 3, 5, 6
    logits = torch.randn(B, R, V, generator=g, dtype=torch.float64)
    actions = torch.randint(0, V, (B, R), generator=g)
    lengths = [1, 3, 5]
    mask = torch.tensor([[1 if t < n else 0 for t in range(R)] for n in lengths])
    logp_all = torch.log_softmax(logits, -1)
    cur = logp_all.gather(-1, actions[..., None]).squeeze(-1)
    old = cur + 0.3 * torch.randn(B, R, generator=g, dtype=torch.float64)
    ref = cur + 0.5 * torch.randn(B, R, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.5, -0.5, -1.0], dtype=torch.float64)
    kl_coef, clip = 0.1, 0.2

    x = logits.float().clone().requires_grad_(True)
    loss, _ = grpo.grpo_loss(x, actions, old.float(), ref.float(), adv.float(), mask, loss_agg, max_new,
                             clip_coef=clip, kl_coef=kl_coef)
    loss.backward()

    y = logits.clone().requires_grad_(True)
    lp = torch.log_softmax(y, -1)
    total = torch.zeros((), dtype=torch.float64)
    for i, n in enumerate(lengths):
        answer = torch.zeros((), dtype=torch.float64)
        for t in range(n):
            logp = lp[i, t, actions[i, t]]
            ratio = torch.exp(logp - old[i, t])
            pg = torch.max(-adv[i] * ratio, -adv[i] * torch.clamp(ratio, 1 - clip, 1 + clip))
            r = torch.exp(ref[i, t] - logp)
            answer = answer + pg + kl_coef * (r - 1 - torch.log(r))
        total = total + (answer / n if loss_agg == "answer" else answer)
    n_tokens = sum(lengths)
    expected = total / {"answer": B, "token": n_tokens, "constant": B * max_new}[loss_agg]
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(x.grad.double(), y.grad, atol=1e-6)


def test_pass_at_one_and_at_g():
    assert grpo.pass_at([1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 1], 4) == pytest.approx((4 / 12, 2 / 3))


# -----------------------------------------------------------------------------
# The verifier on hand cases


@pytest.fixture(scope="module")
def world():
    return World(seed=0)


def test_the_verifier_on_sums(world):
    q = "What is 4 plus 5?"
    assert world.prompt_info(q)["answer"] == "9"
    right = ["4 plus 5 is 9.", "5 plus 4 is 9. Happy to help!", "The answer is 9.", "9.", "It equals 9.",
             "4 plus 5 is 9, not 8."]
    wrong = ["4 plus 5 is 8.", "4 plus 5 is 9 or 10.", "4 plus 8 is 9.",  # another sum restated
             "4 plus 5", "9 plus!", "It is not 9.", "I have 9 apples and 2 pears, 11 fruits is my guess.",
             "Sorry, I can't help with that.", ""]
    for text in right:
        assert grpo.verify(world, q, text, ended=True) == 1.0, text
        assert grpo.verify(world, q, text, ended=False) == 0.0, text  # the right number but no end: 0
    for text in wrong:
        assert grpo.verify(world, q, text, ended=True) == 0.0, text


def test_the_verifier_on_lists_and_facts(world):
    q = "What is the last word in this list: door, snow, moon?"
    assert grpo.verify(world, q, "The last word is moon.", True) == 1.0
    assert grpo.verify(world, q, "The last word is moon. Happy to help!", True) == 1.0
    assert grpo.verify(world, q, "moon", True) == 1.0
    assert grpo.verify(world, q, "The last word is moon.", False) == 0.0  # no end
    assert grpo.verify(world, q, "The last word is snow.", True) == 0.0
    assert grpo.verify(world, q, "The last word is star.", True) == 0.0  # a list word not in the list
    assert grpo.verify(world, q, "The last word is moon or door.", True) == 0.0
    assert grpo.verify(world, q, "The last word is not moon.", True) == 0.0
    e = world.entities[0]
    truth = world.facts[e]["colour"]
    other = next(c for c in ["red", "blue"] if c != truth)
    q = f"What colour is the {e}?"
    assert grpo.verify(world, q, f"The {e} is {truth}.", True) == 1.0
    assert grpo.verify(world, q, f"The {e} is {other}.", True) == 0.0
    assert grpo.verify(world, q, f"The {e} is {truth} or {other}.", True) == 0.0
    assert grpo.verify(world, "Hello!", "Hello, how can I help you today?", True) == 0.0  # not verifiable


# -----------------------------------------------------------------------------
# Learning: a rule reward a broken GRPO cannot raise


def rule_reward(responses, mask):
    """1 for an answer whose first token is 5, else 0 (a random policy: ~1/64 of answers)."""
    return (responses[:, 0] == 5).float()


def run_rule_grpo(sign, loss_agg="answer", steps=30):
    """GRPO's step as grpo.py takes it (sample G answers per prompt, verify, group advantages,
    grpo_loss), with the advantages multiplied by sign: -1 is GRPO with its sign flipped."""
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=32, vocab_size=V, n_layer=1, n_head=2, n_embd=32)
    policy, ref = GPT(cfg), GPT(cfg)
    ref.load_state_dict(policy.state_dict())
    ref.requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2, eps=1e-5, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    G, n_prompts, R = 16, 8, 4
    share = []
    for _ in range(steps):
        prompts = [torch.randint(0, 60, (int(k),), generator=g).tolist()
                   for k in torch.randint(2, 6, (n_prompts,), generator=g)]
        q, m = left_pad([p for p in prompts for _ in range(G)], PAD)
        P = q.size(1)
        policy.eval()
        with torch.no_grad():
            resp, mask, _ = truncate_at_end(policy.generate(q, m, R, eos_id=END, pad_id=PAD, generator=g), END, PAD)
            qr, am = torch.cat([q, resp], 1), torch.cat([m, mask], 1)
            logprobs = response_logprobs(policy, qr, am, P)[0]
            ref_logprobs = response_logprobs(ref, qr, am, P)[0]
        rewards = rule_reward(resp, mask)
        adv = sign * grpo.group_advantages(rewards, G)
        logits = policy(qr, am)[:, P - 1 : -1]
        loss, _ = grpo.grpo_loss(logits, resp, logprobs, ref_logprobs, adv, mask, loss_agg, R, kl_coef=0.01)
        opt.zero_grad()
        loss.backward()
        opt.step()
        share.append(rewards.mean().item())
    return sum(share[:3]) / 3, sum(share[-3:]) / 3


@pytest.mark.parametrize("loss_agg", ["answer", "constant"])
def test_grpo_learns_a_rule_reward_and_fails_with_the_sign_flipped(loss_agg):
    start, end = run_rule_grpo(+1.0, loss_agg)
    assert start < 0.1 and end > 0.5, (start, end)  # ~1/64 at random, then most answers
    start, end = run_rule_grpo(-1.0, loss_agg)
    assert end < 0.05, (start, end)  # the flipped sign pushes token 5 away: never learned


# -----------------------------------------------------------------------------
# End to end: grpo.py as a user runs it, at a few-second size


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """A tiny world, tokenizer and a random "SFT" policy."""
    d = tmp_path_factory.mktemp("grpo")
    tiny_stage(d, "sft", seed=0, n_sft=10, n_prompts=64, n_eval=32, n_paragraphs=200)
    return d


def grpo_argv(d, out, *extra):
    return ["grpo.py", "--init", str(d / "sft"), "--data", str(d / "data" / "prompts.jsonl"),
            "--eval-data", str(d / "data" / "val_prompts.jsonl"), "--out", str(out), "--prompts-per-step", "2",
            "--group-size", "3", "--max-new-tokens", "5", "--eval-prompts", "3", "--eval-group-size", "2",
            "--eval-every", "2", "--sample-every", "2", "--epochs", "2", "--minibatch-size", "3", "--kl-coef", "0.5",
            "--device", "cpu", *map(str, extra)]


def run_grpo(d, out, *extra, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "grpo.py"), *grpo_argv(d, out, *extra)[1:]],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_a_run_logs_every_step_and_torch_and_triton_kernels_log_the_same(stages):
    default = run_grpo(stages, stages / "default", "--steps", "2")
    assert default.returncode == 0, default.stderr[-3000:]
    rows = metrics_without_time(stages / "default" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[0]["eval/kl_to_sft"] == pytest.approx(0.0, abs=1e-4)
    for key in ("grpo/reward", "grpo/zero_signal_groups", "objective/kl", "ppo/kl", "response/length"):
        assert key in rows[1], key
    assert "eval/pass@1" in rows[2] and "eval/pass@G" in rows[2]
    meta = json.loads((stages / "default" / "meta.json").read_text())
    assert meta["stage"] == "grpo" and meta["step"] == 2
    runs = {"default": rows}
    for backend, env in (("torch", {}), ("triton", {"TRITON_INTERPRET": "1"})):
        if backend == "triton":
            pytest.importorskip("triton")
        r = run_grpo(stages, stages / backend, "--steps", "2", "--kernels", backend, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[backend] = metrics_without_time(stages / backend / "metrics.jsonl")
    assert runs["torch"] == runs["default"]  # on the CPU the default is the plain PyTorch
    for a, b in zip(runs["torch"], runs["triton"]):
        assert a.keys() == b.keys()
        for k in a:
            tol = 0.1 if k.endswith("clipfrac") else 1e-4  # a clip fraction counts a few tokens
            assert a[k] == pytest.approx(b[k], rel=1e-3, abs=tol), k


def test_bad_input_stops_with_one_clear_line(stages, tmp_path, stage_here):
    # in this process (three interpreters less to start)
    r = stage_here(grpo_argv(stages, tmp_path / "a", "--families", "arith,greet"))
    assert r.returncode == 2 and "--families" in r.stderr and not (tmp_path / "a").exists()
    r = stage_here(grpo_argv(stages, tmp_path / "b", "--group-size", "1"))
    assert r.returncode == 2 and "--group-size must be at least 2" in r.stderr
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "p.jsonl").write_text('{"prompt": "What is 2 plus 3?"}\n')
    r = stage_here(grpo_argv(stages, tmp_path / "c", "--data", tmp_path / "elsewhere" / "p.jsonl"))
    assert r.returncode == 2 and "world.json" in r.stderr and not (tmp_path / "c").exists()


def test_killed_between_checkpoints_resumes_exactly_where_it_stopped(stages, kill_resume, same_run):
    """Killed (SIGKILL) at step 3, after the checkpoint of step 2: --resume redoes step 3 and logs the
    same rows, final metrics and weights as a run never interrupted."""
    def argv(out):
        return ["grpo.py", "--init", stages / "sft", "--data", stages / "data" / "prompts.jsonl", "--eval-data",
                stages / "data" / "val_prompts.jsonl", "--out", out, "--prompts-per-step", 2, "--group-size", 3,
                "--max-new-tokens", 5, "--eval-prompts", 3, "--eval-group-size", 2, "--eval-every", 2, "--steps", 4,
                "--epochs", 2, "--minibatch-size", 3, "--device", "cpu"]
    straight = subprocess.run([sys.executable, *map(str, argv(stages / "straight"))], cwd=ROOT, capture_output=True,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    kill_resume(argv(stages / "killed"), kill_at=3)
    same_run(stages / "straight", stages / "killed", steps=range(0, 5))
