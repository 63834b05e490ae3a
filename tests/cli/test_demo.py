"""`make demo` and `make compare` on the embedded default, reduced to a few steps."""

from __future__ import annotations

import json

import pytest

from mgrpo_fast.cli.compare import table
from mgrpo_fast.cli.demo import DEFAULT_CONFIG, main

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = [
    "--train.total_steps=2",
    "--train.questions_per_step=4",
    "--eval.num_problems=16",
    "--eval.every=0",
    "--rollout.max_new_tokens=48",
    "--layer2.max_new_tokens=48",
    "--reward.num_workers=0",
    "--logging.progress=false",
    "--checkpoint.every=0",
]


def test_demo_config_is_the_embedded_default():
    from mgrpo_fast.config.loading import load_config

    cfg = load_config(DEFAULT_CONFIG)
    assert cfg.algo == "mgrpo" and cfg.model.path is None and cfg.data.train_files == ()
    assert cfg.eval.at_start and cfg.eval.at_end


def test_two_step_demo_writes_the_summary(tmp_path, capsys):
    run = tmp_path / "demo"
    assert main([*SMALL, f"--logging.run_dir={run}"]) == 0
    out = capsys.readouterr().out
    assert "Acc@t1" in out and "start (step 0)" in out and "after MGRPO (step 2)" in out
    for name in ("summary.png", "summary.json", "metrics.jsonl", "config.yaml"):
        assert (run / name).is_file(), name
    assert (run / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["before"]["num_problems"] == 16
    assert [e["step"] for e in summary["evals"]] == [0, 2]


def test_compare_table_means_and_stds():
    rows = {
        "start": [dict(acc_t1=0.5, acc_t2=0.25, delta=-0.25, delta_i_to_c=0.0, delta_c_to_i=0.25)],
        "MGRPO": [
            dict(acc_t1=0.5, acc_t2=0.5, delta=0.0, delta_i_to_c=0.1, delta_c_to_i=0.1),
            dict(acc_t1=0.7, acc_t2=0.7, delta=0.0, delta_i_to_c=0.1, delta_c_to_i=0.1),
        ],
    }
    text = table(rows)
    assert "| start | 1 | 50.0 | 25.0 | -25.0 | 0.0 | 25.0 |" in text
    assert "| MGRPO | 2 | 60.0 ± 14.1 | 60.0 ± 14.1 | 0.0 ± 0.0 | 10.0 ± 0.0 | 10.0 ± 0.0 |" in text


def test_compare_plot_bands_over_seeds(tmp_path):
    """The compare plot's band: the steps every seed evaluated at, and the mean, min and max there."""
    from mgrpo_fast.cli.plots import plot_compare, seed_band

    def run(*accs):
        keys = ("eval/acc_t1", "eval/acc_t2", "eval/delta_i_to_c", "eval/delta_c_to_i")
        return [{"step": 10 * k, **dict(zip(keys, (a, a / 2, a / 10, a / 5)))} for k, a in enumerate(accs)]

    seeds = [run(0.4, 0.5, 0.6), run(0.4, 0.3)]  # the second seed stopped at step 10
    steps, mean, lo, hi = seed_band(seeds, "eval/acc_t1")
    assert steps == [0, 10]
    assert mean == pytest.approx([40.0, 40.0]) and lo == pytest.approx([40.0, 30.0])
    assert hi == pytest.approx([40.0, 50.0])
    png = plot_compare({"GRPO": seeds, "MGRPO": [run(0.4, 0.45)]}, tmp_path / "compare.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
