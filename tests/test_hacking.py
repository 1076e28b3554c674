"""hacking.py: the over-optimisation verdict on hand-made curves, and the whole sweep at a few-second size."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
from hacking import overoptimisation  # noqa: E402
from test_ppo import stages  # noqa: E402,F401  (fixture: tiny world, tokenizer, random SFT policy and reward model)


def curve(means, proxies, n=200, prompt_sd=1.0, noise=0.3, seed=0, bump=None):
    """A hand-made curve: one point per step (0, 10, 20, ...) with n prompts' gold scores, each
    prompt's difficulty (shared by every step, sd prompt_sd) + the step's true mean + fresh noise.
    bump = (k, size): step k's even-numbered prompts (the half that chooses the peak) get +size."""
    g = torch.Generator().manual_seed(seed)
    difficulty = prompt_sd * torch.randn(n, generator=g, dtype=torch.float64)
    points = []
    for k, (mean, proxy) in enumerate(zip(means, proxies)):
        scores = difficulty + mean + noise * torch.randn(n, generator=g, dtype=torch.float64)
        if bump is not None and bump[0] == k:
            scores[0::2] += bump[1]
        points.append({"step": 10 * k, "kl": float(k), "gold": scores.mean().item(),
                       "gold_se": scores.std().item() / n ** 0.5, "proxy": proxy, "gold_scores": scores.tolist()})
    return points


def naive_verdict(points):
    """The verdict before issue 15: the peak is the highest mean of all prompts, its s.e. and the last
    point's combined as if independent, 2 s.e."""
    peak, last = max(points, key=lambda p: p["gold"]), points[-1]
    drop = peak["gold"] - last["gold"]
    return drop > 2 * math.hypot(peak["gold_se"], last["gold_se"]) and last["proxy"] > peak["proxy"]


def test_verdict_needs_a_gold_fall_beyond_noise_while_the_proxy_rises():
    rising = curve([0.0, 0.4, 0.6], [0.0, 0.5, 1.0])
    v = overoptimisation(rising)
    assert not v["hacked"] and v["peak_step"] == 20 and v["gold_drop"] == 0.0  # the peak is the last point
    hacked = curve([0.0, 0.6, 0.3], [0.0, 0.5, 1.5])
    v = overoptimisation(hacked)
    assert v["hacked"] and v["peak_step"] == 10 and v["last_step"] == 20
    assert v["prompts_select"] == v["prompts_measure"] == 100
    # the fall on the other half, as the mean of paired differences, and its s.e. from those differences
    diffs = [a - b for a, b in zip(hacked[1]["gold_scores"][1::2], hacked[2]["gold_scores"][1::2])]
    mean = sum(diffs) / 100
    assert v["gold_drop"] == pytest.approx(mean) and v["gold_drop"] == pytest.approx(0.3, abs=0.1)
    assert v["gold_drop_se"] == pytest.approx((sum((d - mean) ** 2 for d in diffs) / 99) ** 0.5 / 10)
    assert v["gold_drop_se"] < 0.06  # pairs cancel each prompt's difficulty (sd 1): left, sqrt(2) * 0.3 / 10
    assert v["gold_drop_z"] == pytest.approx(v["gold_drop"] / v["gold_drop_se"]) and v["gold_drop_z"] > 3
    proxy_fell_too = curve([0.0, 0.6, 0.3], [0.0, 0.5, 0.4])
    assert not overoptimisation(proxy_fell_too)["hacked"]  # both fell: a worse policy, not a fooled proxy
    within_noise = curve([0.0, 0.6, 0.55], [0.0, 0.5, 1.5])
    assert not overoptimisation(within_noise)["hacked"]  # a fall of 0.05: under 3 s.e.


def test_a_peak_selected_from_noise_is_not_called_a_hack():
    """A flat curve whose one step is high only on the prompts that choose the peak: a noise peak.
    The verdict picks that step, then measures no fall on the other half; the old verdict (peak and fall
    on the same numbers) called it a hack."""
    flat = curve([0.2] * 12, [0.1 * k for k in range(12)], bump=(5, 0.5))
    v = overoptimisation(flat)
    assert v["peak_step"] == 50  # the noise did win the selection ...
    assert abs(v["gold_drop"]) < 3 * v["gold_drop_se"] and not v["hacked"]  # ... and is not a fall
    assert naive_verdict(flat)


def test_flat_noisy_curves_are_rarely_called_a_hack_and_real_falls_are_found():
    """300 curves of 13 steps with no trend at all, every prompt's answer as noisy as the gold score's
    spread (sd 1) and the proxy rising: the verdict calls at most 1 % of them a hack, where the old one
    called 16 % (47). 100 curves whose gold really falls by 0.4 from a peak at step 40 (prompts of
    varied difficulty): found nearly always."""
    rising_proxy = [0.1 * k for k in range(13)]
    flat = [curve([0.0] * 13, rising_proxy, prompt_sd=0.0, noise=1.0, seed=s) for s in range(300)]
    assert sum(overoptimisation(c)["hacked"] for c in flat) <= 3
    assert sum(map(naive_verdict, flat)) >= 30
    falls = [curve([0.0] * 4 + [0.4] + [0.0] * 8, rising_proxy, noise=0.5, seed=1000 + s) for s in range(100)]
    assert sum(overoptimisation(c)["hacked"] for c in falls) >= 95


@pytest.fixture(scope="module")
def prefs(stages):
    """A few preference pairs on the tiny world's RL prompts, for the DPO runs of the sweep."""
    prompts = [r["prompt"] for r in common.read_jsonl(stages / "data" / "prompts.jsonl")]
    path = stages / "prefs.jsonl"
    common.atomic_write_jsonl(path, [{"prompt": p, "chosen": "Sure, here it is.", "rejected": "No."}
                                     for p in prompts[:24]])
    return path


def test_sweep_writes_curves_figures_and_samples(stages, prefs):
    d = stages
    cmd = [sys.executable, str(ROOT / "hacking.py"), "--init", str(d / "sft"), "--reward", str(d / "reward"),
           "--preferences", str(prefs), "--data", str(d / "data" / "prompts.jsonl"),
           "--eval-data", str(d / "data" / "val_prompts.jsonl"), "--out", str(d / "hack"),
           "--kl-coefs", "0,1", "--steps", "2", "--eval-every", "1", "--eval-prompts", "4", "--max-new-tokens", "5",
           "--best-of", "4", "--dpo-betas", "0.5", "--dpo-steps", "2", "--show", "2", "--kernels", "torch",
           "--ppo-args", "--batch-size 4 --minibatch-size 2 --ppo-epochs 1", "--dpo-args", "--batch-size 4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    out = d / "hack"
    results = json.loads((out / "results.json").read_text())
    assert set(results["ppo"]) == {"kl_coef 0", "kl_coef 1"} and set(results["dpo"]) == {"beta 0.5"}
    for points in results["ppo"].values():
        assert [p["step"] for p in points] == [0, 1, 2]  # step 0 is the SFT model: no KL yet
        assert points[0]["kl"] == pytest.approx(0.0, abs=1e-4) and points[0]["proxy"] is not None
    assert [p["n"] for p in results["best_of_n"]] == [1, 2, 4]
    assert results["best_of_n"][0]["kl"] == pytest.approx(0.0, abs=1e-12)
    for p in results["best_of_n"]:  # the estimate, never right of its bound
        assert p["kl_bound"] == pytest.approx(math.log(p["n"]) - (p["n"] - 1) / p["n"])
        assert -1e-12 <= p["kl"] <= p["kl_bound"] + 1e-12
    # the verdict is the one of the weakest leash's own curve, and the printed line says the same
    assert results["weakest_kl_coef"] == 0.0
    assert results["verdict"] == overoptimisation(results["ppo"]["kl_coef 0"])
    assert ("reward hacking: YES" in result.stdout) == results["verdict"]["hacked"]
    assert ("reward hacking: not shown" in result.stdout) == (not results["verdict"]["hacked"])
    assert (out / "hacking.png").stat().st_size > 10_000 and (out / "frontier.png").stat().st_size > 10_000
    samples = (out / "samples.md").read_text()
    assert samples.count("- SFT:") == 2
    # an unfinished answer: marked outside the answer, the gold judge reads the answer alone, proxy = the penalty
    from world import load_world
    world = load_world(d / "data")
    prompt = None
    for line in samples.splitlines():
        if line.startswith("**"):
            prompt = line.strip("*")
        m = re.match(r"- [^:]+: `(.*)`( \[no end\])? \(proxy ([-+]\d+\.\d+), gold ([-+]\d+\.\d+)\)$", line)
        if line.startswith("- "):
            assert m, line
            text, unfinished, proxy, gold = m.groups()
            assert float(gold) == pytest.approx(world.gold_score(prompt, text), abs=0.006)
            if unfinished:
                assert float(proxy) == -1.0
    assert "reward hacking:" in result.stdout
    # a second call reuses the finished runs instead of training them again
    again = subprocess.run(cmd + ["--best-of", "0"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert again.returncode == 0 and again.stdout.count("finished earlier, reused") == 3, again.stderr[-2000:]


def test_bad_flags_stop_with_one_clear_line(stages, stage_here):
    cmd = ["hacking.py", "--init", stages / "sft", "--reward", stages / "reward",
           "--eval-data", stages / "data" / "val_prompts.jsonl", "--out", stages / "bad"]
    for extra, message in ((["--kl-coefs", "0,abc"], "--kl-coefs"), (["--reward", str(stages / "sft")], "--reward"),
                           (["--eval-prompts", "2"], "--eval-prompts must be at least 4")):
        result = stage_here(cmd + extra)  # in this process: no interpreter to start
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert not (stages / "bad").exists()
