"""The data formats users have, one tiny fixture each (tests/data/fixtures/): GSM8K-style, MATH-style,
and prompt/answer rows in JSONL and in Parquet with a column mapping; loaded directly and through the
run's ``data`` config section, and scored by the verifier the trainer uses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mgrpo_fast.config.loading import load_config
from mgrpo_fast.data.problems import FORMATS, DataError, load_problems
from mgrpo_fast.data.train_data import load_eval_problems, load_train_problems
from mgrpo_fast.rl.rewards import correctness_reward

FIXTURES = Path(__file__).parent / "fixtures"


def test_gsm8k_fixture():
    problems = load_problems(FIXTURES / "gsm8k.jsonl")
    assert [p.answer for p in problems] == ["48", "6", "15000"]  # "#### 15,000": separators dropped
    assert all(p.meta["data_format"] == "gsm8k" for p in problems)
    assert problems[0].question.startswith("Lena picks 36") and "<<36/3=12>>" in problems[0].solution
    assert correctness_reward("So she picks \\boxed{48}.", problems[0].answer) == 1.0


def test_math_fixture():
    problems = load_problems(FIXTURES / "math.jsonl")
    assert [p.answer for p in problems] == ["15", "\\frac{5}{12}", "3, 4"]  # boxed, nested, given
    ids = [f"fixture/{t}.json" for t in ("prealgebra/1", "prealgebra/2", "algebra/3")]
    assert [p.id for p in problems] == ids
    assert problems[0].meta["level"] == "Level 1" and problems[0].meta["data_format"] == "math"
    assert correctness_reward("... = \\boxed{\\dfrac{5}{12}}", problems[1].answer) == 1.0


def test_prompt_answer_jsonl_fixture():
    problems = load_problems(FIXTURES / "prompt_answer.jsonl")
    assert [p.question[:8] for p in problems] == ["Mia has ", "What is ", "Tom had "]
    assert [p.answer for p in problems] == ["19", "\\frac{1}{6}", "18"]  # a number becomes its text
    assert [p.id for p in problems] == ["prompt_answer-1", "frac-1", "prompt_answer-3"]
    assert problems[2].meta["source"] == "hand-written" and problems[0].solution is None
    assert correctness_reward("7 + 12 = 19", problems[0].answer) == 1.0
    assert correctness_reward("7 + 12 = 20", problems[0].answer) == 0.0


def test_prompt_answer_parquet_with_a_column_mapping():
    path = FIXTURES / "prompt_answer_mapped.parquet"  # columns uid, input, target, difficulty
    with pytest.raises(DataError, match="cannot detect the format"):
        load_problems(path)
    problems = load_problems(
        path, format="prompt_answer", question_field="input", answer_field="target", id_field="uid"
    )
    assert [(p.id, p.answer) for p in problems] == [("a1", "9"), ("a2", "24"), ("a3", "25")]
    assert problems[0].question.startswith("Ben has 4 pens") and problems[2].meta["difficulty"] == 2
    assert problems[0].meta["data_line"] == 1 and problems[0].meta["data_format"] == "prompt_answer"


def test_the_data_section_maps_columns_for_training_and_evaluation():
    parquet = FIXTURES / "prompt_answer_mapped.parquet"
    cfg = load_config(
        None,
        [
            f"--data.train_files=['{parquet}']",
            f"--data.eval_files=['{FIXTURES / 'prompt_answer.jsonl'}']",
            "--data.format=prompt_answer",
            "--data.question_field=input",
            "--data.answer_field=target",
            "--data.id_field=uid",
        ],
    )
    assert [p.answer for p in load_train_problems(cfg.data)] == ["9", "24", "25"]
    with pytest.raises(DataError, match="missing field 'input'"):  # the mapping applies to eval files too
        load_eval_problems(cfg.data.eval_files, None, cfg.data)
    auto = load_config(None, [f"--data.eval_files=['{FIXTURES / 'prompt_answer.jsonl'}']"])
    evaluated = load_eval_problems(auto.data.eval_files, 2, auto.data)
    assert [p.answer for p in evaluated] == ["19", "\\frac{1}{6}"]


def test_every_format_is_detected_and_can_be_forced(tmp_path):
    fixtures = {"gsm8k": "gsm8k.jsonl", "math": "math.jsonl", "prompt_answer": "prompt_answer.jsonl"}
    assert set(fixtures) == set(FORMATS)
    for fmt, name in fixtures.items():
        assert load_problems(FIXTURES / name)[0].meta["data_format"] == fmt
        assert load_problems(FIXTURES / name, format=fmt)[0].meta["data_format"] == fmt


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "q?", "answer": ""}, "field 'answer' is empty"),
        ({"prompt": "q?", "answer": [1, 2]}, "field 'answer' must be a string, got list"),
        ({"prompt": [{"role": "user", "content": "q?"}], "answer": "1"}, "field 'prompt' must be a string"),
        ({"prompt": "q?"}, "missing field 'answer'"),
    ],
)
def test_bad_prompt_answer_rows_name_file_and_line(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "fine", "answer": 1}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=f"bad.jsonl:2: {message}"):
        load_problems(path, format="prompt_answer")
