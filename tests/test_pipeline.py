"""pipeline.py: stages chained at the --quick size; a Ctrl-C in a stage stops the job with the resume command."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import common  # noqa: E402


def run_pipeline(out, *extra, env=None):
    cmd = [sys.executable, str(ROOT / "pipeline.py"), "--quick", "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def test_ctrl_c_in_a_stage_stops_the_job_and_resume_finishes_it(tmp_path):
    out = tmp_path / "run"
    # the stage's own Ctrl-C path (a test hook sends SIGINT at the end of step 12 of pretraining's 30)
    first = run_pipeline(out, "--only", "world,tokenizer,pretrain", env={"RLHF_TEST_FAULT": "SIGINT@step=12"})
    assert first.returncode == 130, first.stdout[-2000:] + first.stderr[-2000:]
    assert "interrupted in stage 'pretrain'" in first.stderr
    assert "python pipeline.py --from pretrain --quick --resume" in first.stderr
    assert [r["step"] for r in common.read_metrics(out / "pretrain" / "metrics.jsonl")][-1] == 12
    second = run_pipeline(out, "--from", "pretrain", "--only", "pretrain", "--resume")
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "resumed from" in second.stdout
    steps = [r["step"] for r in common.read_metrics(out / "pretrain" / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 30  # every step once, to the end
    assert (out / "report.md").exists() and "pretrain" in (out / "report.md").read_text()


def test_an_unknown_stage_is_one_clear_line(tmp_path):
    result = run_pipeline(tmp_path / "run", "--from", "nonsense")
    assert result.returncode == 2 and "--from nonsense: no such stage" in result.stderr
    assert not (tmp_path / "run").exists()
