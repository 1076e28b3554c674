"""hacking.py: the over-optimisation verdict on hand-made curves, and the whole sweep at a few-second size."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
from hacking import overoptimisation  # noqa: E402
from test_ppo import stages  # noqa: E402,F401  (fixture: tiny world, tokenizer, random SFT policy and reward model)


def point(step, gold, proxy, se=0.05, kl=0.0):
    return {"step": step, "kl": kl, "gold": gold, "gold_se": se, "proxy": proxy}


def test_verdict_needs_a_gold_fall_beyond_noise_while_the_proxy_rises():
    rising = [point(0, 0.0, 0.0), point(10, 0.4, 0.5), point(20, 0.6, 1.0)]
    assert not overoptimisation(rising)["hacked"]  # the peak is the last point: nothing fell
    hacked = [point(0, 0.0, 0.0), point(10, 0.6, 0.5), point(20, 0.3, 1.5)]
    v = overoptimisation(hacked)
    assert v["hacked"] and v["peak"]["step"] == 10 and v["last"]["step"] == 20
    assert v["gold_drop"] == pytest.approx(0.3)
    assert v["gold_drop_se"] == pytest.approx(0.3 / (2 ** 0.5 * 0.05))
    within_noise = [point(0, 0.0, 0.0), point(10, 0.6, 0.5, se=0.2), point(20, 0.3, 1.5, se=0.2)]
    assert not overoptimisation(within_noise)["hacked"]  # 0.3 < 2 * sqrt(2) * 0.2
    proxy_fell_too = [point(0, 0.0, 0.0), point(10, 0.6, 0.5), point(20, 0.3, 0.4)]
    assert not overoptimisation(proxy_fell_too)["hacked"]  # both fell: a worse policy, not a fooled proxy


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
    assert results["best_of_n"][0]["kl"] == 0.0
    # the verdict is the one of the weakest leash's own curve, and the printed line says the same
    assert results["weakest_kl_coef"] == 0.0
    assert results["verdict"] == overoptimisation(results["ppo"]["kl_coef 0"])
    assert ("reward hacking: YES" in result.stdout) == results["verdict"]["hacked"]
    assert ("reward hacking: not shown" in result.stdout) == (not results["verdict"]["hacked"])
    assert (out / "hacking.png").stat().st_size > 10_000 and (out / "frontier.png").stat().st_size > 10_000
    assert (out / "samples.md").read_text().count("- SFT:") == 2
    assert "reward hacking:" in result.stdout
    # a second call reuses the finished runs instead of training them again
    again = subprocess.run(cmd + ["--best-of", "0"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert again.returncode == 0 and again.stdout.count("finished earlier, reused") == 3, again.stderr[-2000:]


def test_bad_flags_stop_with_one_clear_line(stages):
    cmd = [sys.executable, str(ROOT / "hacking.py"), "--init", str(stages / "sft"), "--reward", str(stages / "reward"),
           "--eval-data", str(stages / "data" / "val_prompts.jsonl"), "--out", str(stages / "bad")]
    for extra, message in ((["--kl-coefs", "0,abc"], "--kl-coefs"), (["--reward", str(stages / "sft")], "--reward")):
        result = subprocess.run(cmd + extra, capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert not (stages / "bad").exists()
