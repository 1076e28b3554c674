"""Plumbing: clear errors, atomic files, the metrics logger, the schedule, checkpoint loading checks."""

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def test_die_exits_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        common.die("data.jsonl:3: missing field 'prompt'")
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: data.jsonl:3: missing field 'prompt'\n"


def test_read_jsonl_errors_name_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"\n')
    with pytest.raises(common.BadInput, match=r"d.jsonl:2: not valid JSON"):
        common.read_jsonl(p, required=("prompt", "response"))
    p.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "a"}\n')
    with pytest.raises(common.BadInput, match=r"d.jsonl:3: missing field 'response'"):
        common.read_jsonl(p, required=("prompt", "response"))
    p.write_text('{"prompt": 3, "response": "b"}\n')
    with pytest.raises(common.BadInput, match=r"d.jsonl:1: field 'prompt' must be a string"):
        common.read_jsonl(p, required=("prompt", "response"))
    p.write_text("\n")
    with pytest.raises(common.BadInput, match="empty file"):
        common.read_jsonl(p)
    with pytest.raises(common.BadInput, match="file not found"):
        common.read_jsonl(tmp_path / "nope.jsonl")
    p.write_text('{"prompt": "a", "response": "b"}\n[1, 2]\n')
    with pytest.raises(common.BadInput, match=r"d.jsonl:2: expected a JSON object"):
        common.read_jsonl(p)


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    p = tmp_path / "x.json"
    common.atomic_write_json(p, {"a": 1})

    def broken(f):
        f.write(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        common._atomic(p, broken)
    assert json.loads(p.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["x.json"]  # no temporary file left behind


def test_metrics_logger_appends_and_truncates_on_resume(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    log = common.MetricsLogger(path, total_steps=5)
    for step in range(1, 5):
        log.log(step, {"train/loss": 1.0 / step, "tokens": step * 10})
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("step 4/5 | train/loss 0.25 | tokens 40 | eta ")
    log2 = common.MetricsLogger(path, total_steps=5, resume=True)
    log2.truncate_after(2)  # the checkpoint was at step 2: steps 3 and 4 will be logged again
    log2.log(3, {"train/loss": 0.3})
    assert [r["step"] for r in common.read_metrics(path)] == [1, 2, 3]
    fresh = common.MetricsLogger(path, total_steps=5)  # a fresh (not resumed) run starts a new file...
    assert len(common.read_metrics(path)) == 3  # ...at its first row: bad input found before it changes nothing
    fresh.log(1, {"train/loss": 2.0})
    assert common.read_metrics(path)[0]["train/loss"] == 2.0 and len(common.read_metrics(path)) == 1


def test_lr_schedule_warmup_then_cosine():
    assert common.lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert common.lr_at(9, 100, 1.0, 10) == pytest.approx(1.0)
    mid = 10 + 45  # halfway through the decay: min + (1 - min) / 2
    assert common.lr_at(mid, 100, 1.0, 10) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert common.lr_at(100, 100, 1.0, 10) == pytest.approx(0.1)


def test_load_meta_checks_stage_and_presence(tmp_path):
    with pytest.raises(common.BadInput, match="no checkpoint there"):
        common.load_meta(tmp_path / "sft", "sft")
    common.atomic_write_json(tmp_path / "meta.json", {"stage": "pretrain"})
    with pytest.raises(common.BadInput, match="a checkpoint of stage 'pretrain', expected sft"):
        common.load_meta(tmp_path, "sft")
    assert common.load_meta(tmp_path, ("sft", "pretrain"))["stage"] == "pretrain"


def test_corrupted_checkpoint_is_a_clear_error(tmp_path):
    common.atomic_torch_save({"w": torch.ones(1000)}, tmp_path / "model.pt")
    data = (tmp_path / "model.pt").read_bytes()
    (tmp_path / "model.pt").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(common.BadInput, match="cannot read the checkpoint"):
        common.load_state_dict(tmp_path)


def test_phase_times_accumulate_and_an_inner_phase_pauses_the_outer(monkeypatch, tmp_path):
    clock = [100.0]  # a fake clock: the seconds are exact
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(common, "_phase_seconds", {})
    monkeypatch.setattr(common, "_phase_stack", [])
    with common.phase("train"):
        clock[0] += 2
        with common.phase("eval"):  # 3 s of eval, not of train
            clock[0] += 3
        clock[0] += 1
        assert common.phase_times() == {"time/train": 3.0, "time/eval": 3.0}  # an open phase counts up to now
    with common.phase("eval"):
        clock[0] += 0.5
    assert common.phase_times() == {"time/train": 3.0, "time/eval": 3.5}
    # the running totals go into every metrics row, and into the final meta.json (beside "final")
    row = common.MetricsLogger(tmp_path / "metrics.jsonl", 10).log(1, {"train/loss": 1.0})
    assert row["time/train"] == 3.0 and row["time/eval"] == 3.5
    common.save_checkpoint(tmp_path, torch.nn.Linear(1, 1), {"stage": "x", "final": {"loss": 1.0}})
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["final"] == {"loss": 1.0} and meta["time"] == {"time/train": 3.0, "time/eval": 3.5, "time/io": 0.0}


def test_threads_one_when_other_jobs_are_busy(monkeypatch, capsys):
    assert common.choose_threads(2, 0.2)[0] == 2  # idle
    assert common.choose_threads(2, 1.0)[0] == 1  # another job on one core
    assert common.choose_threads(2, 6.0)[0] == 1  # never fewer than 1
    assert common.choose_threads(16, 3.2)[0] == 13
    assert common.choose_threads(2, None)[0] == 2  # no load average (Windows)
    assert common.choose_threads(2, 6.0, requested="2") == (2, "OMP_NUM_THREADS")  # the user's choice wins
    # setup_threads with a faked load: one thread, said in one line
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("RLHF_THREADS", raising=False)
    monkeypatch.setattr(common, "busy_cores", lambda: 1.5)
    monkeypatch.setattr(common.torch, "get_num_threads", lambda: 2)
    chosen = []
    monkeypatch.setattr(common.torch, "set_num_threads", chosen.append)
    assert common.setup_threads() == 1 and chosen == [1]
    assert capsys.readouterr().out == "threads: 1 (2 cores, busy: other jobs use 1.5 of them)\n"
    monkeypatch.setenv("RLHF_THREADS", "2")  # pipeline.py's choice, made before its first stage
    assert common.setup_threads() == 2 and chosen == [1, 2]
    assert capsys.readouterr().out == "threads: 2 (chosen by pipeline.py)\n"



def test_busy_cores_is_the_non_idle_share_of_proc_stat(monkeypatch):
    stats = iter(["cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 ...", "cpu  200 0 200 900 0 0 0 0 0 0\ncpu0 ..."])

    class FakePath:
        def __init__(self, path):
            assert path == "/proc/stat"

        def read_text(self):
            return next(stats)
    monkeypatch.setattr(common, "Path", FakePath)
    monkeypatch.setattr(common.os, "cpu_count", lambda: 2)
    # 300 ticks passed, 100 of them idle: two thirds of 2 cores busy
    assert common.busy_cores(seconds=0) == pytest.approx(2 * (1 - 100 / 300))
