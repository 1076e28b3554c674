"""plot.py: one PNG per stage with the panels expected from what was logged, overlays with a legend,
the x-axis fallback, smoothing of per-step curves only, and bad input stopping with file:line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import plot  # noqa: E402


def write_run(folder, rows, stage=None):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if stage:
        (folder / "meta.json").write_text(json.dumps({"stage": stage, "step": len(rows)}))
    return folder


def pretrain_rows(n=20, every=5):
    rows = []
    for t in range(1, n + 1):
        r = {"step": t, "train/loss": 6.0 - 0.2 * t + 0.1 * (-1) ** t, "train/lr": 1e-3, "train/grad_norm": 1.0 + 0.01 * t,
             "tokens": 4096 * t, "time/elapsed_s": 0.5 * t}
        if t % every == 0:
            r.update({"val/loss": 6.1 - 0.2 * t, "eval/fact_accuracy": 0.04 * t})
        rows.append(r)
    return rows


def ppo_rows(n=12, kl=1.0):  # only some of PPO's metrics: the others' panels must be skipped
    rows = []
    for t in range(1, n + 1):
        r = {"step": t, "objective/score": 0.1 * t, "objective/kl": kl * t, "objective/entropy": 1.2,
             "ppo/clipfrac": 0.05, "episodes": 64 * t}
        if t % 4 == 0:
            r.update({"eval/gold_reward": 0.5 + 0.01 * t, "eval/gold_reward_se": 0.05})
        rows.append(r)
    return rows


def drawn(stage, runs, x="step"):
    """The metrics of each panel of the stage's figure, in order (what it shows, not how it labels it),
    checked against the figure itself: one axis per panel, one line per run and metric."""
    panels = [[metric for metric, _ in series] for _, _, series in plot.panels_for(stage, runs)]
    fig = plot.make_figure(stage, runs, x=x)
    assert len(fig.axes) == len(panels)
    for ax, metrics in zip(fig.axes, panels):
        lines = [line for line in ax.get_lines() if line.get_alpha() is None]  # not smoothing's faint raw curves
        assert len(lines) == sum(any(metric in row for row in run.rows) for run in runs for metric in metrics)
    return panels


def test_one_png_per_stage_with_the_expected_panels(tmp_path):
    out = tmp_path / "out"
    write_run(out / "pretrain", pretrain_rows(), stage="pretrain")
    write_run(out / "ppo_kl0.1", ppo_rows())  # no meta.json: the stage comes from the folder name
    write_run(out / "reward", [{"step": t, "reward/loss": 0.7 - 0.01 * t, "reward/accuracy": 0.6, "pairs": 32 * t,
                                **({"val/acc_label": 0.7, "reward/acc_gold": 0.8} if t % 5 == 0 else {})}
                               for t in range(1, 11)], stage="reward")
    (out / "tokenizer").mkdir()  # folders without metrics are not stages: ignored
    paths = plot.plot_runs([out], tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["ppo.png", "pretrain.png", "reward.png"]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, p
    assert sorted(f.name for f in (tmp_path / "plots").iterdir()) == ["ppo.png", "pretrain.png", "reward.png"]

    runs = plot.find_runs([out])
    by_stage = {r.stage: [r] for r in runs}
    assert drawn("pretrain", by_stage["pretrain"]) == [
        ["train/loss", "val/loss"], ["eval/fact_accuracy"], ["train/lr"], ["train/grad_norm"]]
    # Only the panels whose metrics were logged; the gold reward shows its ±1 s.e. band.
    assert drawn("ppo", by_stage["ppo"]) == [
        ["objective/score"], ["eval/gold_reward"], ["objective/kl"], ["objective/entropy"], ["ppo/clipfrac"]]
    fig = plot.make_figure("ppo", by_stage["ppo"])
    assert [len(ax.collections) for ax in fig.axes] == [0, 1, 0, 0, 0]  # the band: one filled area
    assert drawn("reward", by_stage["reward"], x="pairs") == [  # reward/label_acc_gold not logged
        ["reward/loss"], ["reward/accuracy", "val/acc_label", "reward/acc_gold"]]
    fig = plot.make_figure("reward", by_stage["reward"], x="pairs")
    assert list(fig.axes[0].get_lines()[0].get_xdata()) == [32 * t for t in range(1, 11)]  # x: the pairs seen


def test_train_and_val_share_a_panel_val_with_markers_and_unsmoothed(tmp_path):
    rows = pretrain_rows(n=20, every=5)
    run = plot.Run(write_run(tmp_path / "pretrain", rows), "pretrain", rows)
    smooth = 0.6
    ax = plot.make_figure("pretrain", [run], x="tokens", smooth=smooth).axes[0]
    raw, smoothed, val = ax.get_lines()  # faint raw train loss, its EMA, then val
    train = [r["train/loss"] for r in rows]
    assert list(raw.get_ydata()) == train and raw.get_alpha() < 0.5
    ref, avg = [], 0.0  # debiased EMA by hand
    for i, y in enumerate(train, 1):
        avg = smooth * avg + (1 - smooth) * y
        ref.append(avg / (1 - smooth**i))
    assert list(smoothed.get_ydata()) == pytest.approx(ref)
    assert list(smoothed.get_xdata()) == [4096 * t for t in range(1, 21)]
    assert smoothed.get_marker() in (None, "None", "")
    assert list(val.get_xdata()) == [4096 * t for t in (5, 10, 15, 20)]
    assert list(val.get_ydata()) == [6.1 - 0.2 * t for t in (5, 10, 15, 20)]  # periodic: never smoothed
    assert val.get_marker() == "o"
    assert len(ax.get_legend().get_texts()) == 2  # which line is train, which val


def test_overlay_of_two_runs_has_a_legend_with_both_names(tmp_path):
    a = write_run(tmp_path / "ppo_kl0.02", ppo_rows(kl=2.0), stage="ppo")
    b = write_run(tmp_path / "ppo_kl0.2", ppo_rows(kl=0.5), stage="ppo")
    paths = plot.plot_runs([a, b], tmp_path / "plots", x="samples")
    assert [p.name for p in paths] == ["ppo.png"]
    fig = plot.make_figure("ppo", plot.find_runs([a, b]), x="samples")
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["ppo_kl0.02", "ppo_kl0.2"]
    kl_ax = fig.axes[drawn("ppo", plot.find_runs([a, b])).index(["objective/kl"])]
    assert [list(line.get_ydata())[-1] for line in kl_ax.get_lines()] == [2.0 * 12, 0.5 * 12]
    assert list(kl_ax.get_lines()[0].get_xdata()) == [64 * t for t in range(1, 13)]  # PPO's samples: episodes
    assert kl_ax.get_lines()[0].get_color() != kl_ax.get_lines()[1].get_color()


def test_x_axis_falls_back_to_step_and_unknown_stages_get_a_panel_per_metric(tmp_path):
    with_tokens = write_run(tmp_path / "a" / "pretrain", pretrain_rows(), stage="pretrain")
    rows = [{k: v for k, v in r.items() if k != "tokens"} for r in pretrain_rows()]
    without = write_run(tmp_path / "b" / "pretrain", rows, stage="pretrain")
    runs = plot.find_runs([with_tokens, without])
    assert [r.name for r in runs] == ["a/pretrain", "b/pretrain"]  # same folder name: the parent tells them apart
    fig = plot.make_figure("pretrain", runs, x="tokens")
    for ax in fig.axes:  # every run of the figure on the step axis
        assert all(list(line.get_xdata())[:2] in ([1, 2], [5, 10]) for line in ax.get_lines())
    one = plot.make_figure("pretrain", runs[:1], x="tokens")
    assert list(one.axes[0].get_lines()[0].get_xdata()) == [4096 * t for t in range(1, 21)]

    odd = write_run(tmp_path / "mystage", [{"step": t, "foo/bar": t, "foo/baz": 2 * t, "samples": t} for t in (1, 2)],
                    stage="mystage")
    assert plot.plot_runs([odd], tmp_path / "plots")[0].name == "mystage.png"
    assert drawn("mystage", plot.find_runs([odd])) == [["foo/bar"], ["foo/baz"]]


def test_bad_input_dies_with_file_and_line(tmp_path):
    good = write_run(tmp_path / "sft", [{"step": 1, "train/loss": 2.0}, {"step": 2, "train/loss": 1.5}], stage="sft")
    bad = write_run(tmp_path / "dpo", [{"step": 1, "dpo/loss": 0.7}], stage="dpo")
    with open(bad / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "dpo/loss": 0.6\n{"step": 3}\n')
    with pytest.raises(common.BadInput) as e:
        plot.plot_runs([good, bad], tmp_path / "plots")
    assert e.value.message.startswith(f"{bad / 'metrics.jsonl'}:2: not valid JSON")
    no_step = write_run(tmp_path / "ppo", [{"step": 1}, {"objective/kl": 1.0}])
    with pytest.raises(common.BadInput, match=r"ppo/metrics.jsonl:2: missing a numeric 'step'"):
        plot.plot_runs([no_step], tmp_path / "plots")
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.BadInput, match="no metrics.jsonl"):
        plot.plot_runs([tmp_path / "empty"], tmp_path / "plots")

    # The command line: one line on stderr, exit status 2, and no PNG at all (not even for the good run).
    plots = tmp_path / "cli_plots"
    run = lambda *a: subprocess.run([sys.executable, "plot.py", *map(str, a), "--out", plots], cwd=ROOT,
                                    capture_output=True, text=True, timeout=120)
    r = run(good, bad)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {bad / 'metrics.jsonl'}:2: not valid JSON (Expecting ',' delimiter)"]
    r = run(good, tmp_path / "missing")
    assert r.returncode == 2 and r.stderr.strip() == f"error: {tmp_path / 'missing'}: no such folder"
    assert not plots.exists() or not list(plots.glob("*.png"))
