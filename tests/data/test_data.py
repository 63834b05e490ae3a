"""Data: JSONL/Parquet loaders, bad-file errors with file and line, and the prompts of both layers."""

from __future__ import annotations

import json
import random
import sys

import pytest
from conftest import CHATML, byte_tokenizer

from mgrpo_fast.data.problems import DataError, Problem, iter_problems, load_problems
from mgrpo_fast.data.prompts import (
    DEFAULT_GUIDING_PHRASES,
    DEFAULT_INSTRUCTION,
    build_correction_prompt,
    build_messages,
    build_prompt,
    build_prompt_ids,
    choose_guiding_phrase,
    has_chat_template,
)

GSM8K_ROWS = [
    {"question": "Janet has 3 eggs and buys 2. How many?", "answer": "3 + 2 = 5\n#### 5"},
    {"question": "A shop sells 1,000 pens twice.", "answer": "1000 * 2 = 2000\n#### 2,000"},
    {"question": "Owes money?", "answer": "She is short.\n#### -7"},
]
MATH_ROWS = [
    {"problem": "Simplify $\\frac{2}{4}$.", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "level": "Level 1"},
    {
        "problem": "Find x.",
        "solution": "So $x = \\boxed{\\sqrt{\\frac{3}{4}}}$.",
        "unique_id": "test/algebra/1.json",
    },
    {"problem": "Compute.", "solution": "Long... \\boxed{7}", "answer": "7"},
]


def write_jsonl(path, rows, *, blank_after: int | None = None) -> str:
    lines = [json.dumps(r) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def test_gsm8k_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "gsm.jsonl", GSM8K_ROWS)
    probs = load_problems(path)
    assert [p.answer for p in probs] == ["5", "2000", "-7"]
    p = probs[0]
    assert p == Problem(
        id="gsm-1",
        question=GSM8K_ROWS[0]["question"],
        answer="5",
        solution=GSM8K_ROWS[0]["answer"],
        meta={"data_file": path, "data_line": 1, "data_format": "gsm8k"},
    )


def test_math_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "math.jsonl", MATH_ROWS)
    probs = load_problems(path)
    assert [p.answer for p in probs] == ["\\frac{1}{2}", "\\sqrt{\\frac{3}{4}}", "7"]
    assert probs[0].meta == {"level": "Level 1", "data_file": path, "data_line": 1, "data_format": "math"}
    assert probs[1].id == "test/algebra/1.json" and "unique_id" not in probs[1].meta
    assert probs[2].solution == "Long... \\boxed{7}"


def test_custom_fields_forced_format_and_bare_answers(tmp_path):
    rows = [
        {"prompt": "What is 6*7?", "target": 42, "key": "a"},
        {"prompt": "Half of 1?", "target": "0.5", "key": "b"},
    ]
    path = write_jsonl(tmp_path / "custom.jsonl", rows)
    probs = load_problems(
        path, format="gsm8k", question_field="prompt", answer_field="target", id_field="key"
    )
    assert [(p.id, p.question, p.answer, p.solution) for p in probs] == [
        ("a", "What is 6*7?", "42", None),
        ("b", "Half of 1?", "0.5", None),
    ]
    # auto-detection uses the overridden names too
    assert len(load_problems(path, question_field="prompt", answer_field="target")) == 2
    # GSM8K-style rows with a final answer and a separate solution field
    rows = [{"question": "Q?", "answer": "12", "steps": "6 * 2 = 12", "source": "olympiads"}]
    probs = load_problems(write_jsonl(tmp_path / "sol.jsonl", rows), solution_field="steps")
    assert (probs[0].answer, probs[0].solution) == ("12", "6 * 2 = 12")
    assert probs[0].meta["source"] == "olympiads" and "steps" not in probs[0].meta


def test_dedupe_shuffle_limit_and_many_files(tmp_path):
    rows = [{"question": f"Q{i % 5}  ?", "answer": f"#### {i}"} for i in range(10)]
    a = write_jsonl(tmp_path / "a.jsonl", rows)
    b = write_jsonl(tmp_path / "b.jsonl", MATH_ROWS)
    assert len(load_problems([a, b])) == 13
    deduped = load_problems(a, dedupe=True)
    assert [p.answer for p in deduped] == ["0", "1", "2", "3", "4"]  # first occurrence kept
    assert [p.answer for p in load_problems(a, limit=3)] == ["0", "1", "2"]
    s1 = load_problems([a, b], shuffle_seed=7)
    s2 = load_problems([a, b], shuffle_seed=7)
    s3 = load_problems([a, b], shuffle_seed=8)
    assert [p.id for p in s1] == [p.id for p in s2] != [p.id for p in s3]
    assert sorted(p.id for p in s1) == sorted(p.id for p in load_problems([a, b]))
    assert [p.id for p in load_problems([a, b], shuffle_seed=7, limit=4)] == [p.id for p in s1[:4]]
    with pytest.raises(ValueError, match="limit must be"):
        load_problems(a, limit=-1)
    assert next(iter_problems(b)).answer == "\\frac{1}{2}"


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    gsm, math_ = tmp_path / "gsm.parquet", tmp_path / "math.parquet"
    pq.write_table(pa.Table.from_pylist(GSM8K_ROWS), gsm)
    pq.write_table(pa.Table.from_pylist(MATH_ROWS), math_)
    assert [p.answer for p in load_problems(gsm)] == ["5", "2000", "-7"]
    probs = load_problems(math_)
    assert [p.answer for p in probs] == ["\\frac{1}{2}", "\\sqrt{\\frac{3}{4}}", "7"]
    assert probs[0].meta["data_line"] == 1 and probs[0].id == "math-1"
    # bad rows name the 1-based row
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(GSM8K_ROWS[:1] + [{"question": "Q", "answer": "no number"}]), bad)
    with pytest.raises(DataError, match=r"bad\.parquet: row 2: no final answer in field 'answer'"):
        load_problems(bad)
    binary = tmp_path / "binary.parquet"
    pq.write_table(pa.table({"question": [b"ok", b"bad \xff"], "answer": ["#### 1", "#### 2"]}), binary)
    with pytest.raises(
        DataError, match=r"row 2: field 'question' is not valid UTF-8: byte 0xff at byte offset 4"
    ):
        load_problems(binary)
    empty = tmp_path / "empty.parquet"
    pq.write_table(
        pa.table({"question": pa.array([], pa.string()), "answer": pa.array([], pa.string())}), empty
    )
    with pytest.raises(DataError, match=r"empty\.parquet: file is empty"):
        load_problems(empty)
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match=r"corrupt\.parquet: not a readable Parquet file"):
        load_problems(corrupt)


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "x.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"needs pyarrow.*mgrpo-fast\[dev\]"):
        load_problems(path)


# --------------------------------------------------------------------------------------------
# Bad files: each error names the file and the 1-based line
# --------------------------------------------------------------------------------------------
def _bad(tmp_path, name: str, content: bytes | str) -> str:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def _row(q="Q?", a="#### 1") -> str:
    return json.dumps({"question": q, "answer": a})


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty.jsonl: file is empty"),
        (b"\n  \n\n", "empty.jsonl: file is empty"),
    ],
)
def test_empty_file(tmp_path, content, message):
    with pytest.raises(DataError, match=message):
        load_problems(_bad(tmp_path, "empty.jsonl", content))


def test_non_utf8_reports_line_and_byte_offset(tmp_path):
    line1 = (_row() + "\n").encode()
    line3 = b'{"question": "caf\xe9?", "answer": "#### 1"}\n'
    path = _bad(tmp_path, "latin1.jsonl", line1 + b"\n" + line3)
    col = line3.index(b"\xe9")
    offset = len(line1) + 1 + col
    with pytest.raises(DataError) as err:
        load_problems(path)
    assert str(err.value) == (
        f"{path}:3: not valid UTF-8: byte 0xe9 at byte offset {offset} of the file "
        f"(byte {col + 1} of the line); re-encode the file as UTF-8"
    )
    assert err.value.path == path and err.value.line == 3


def test_utf8_bom_is_accepted(tmp_path):
    path = _bad(tmp_path, "bom.jsonl", b"\xef\xbb\xbf" + (_row("Caf\u00e9?") + "\n").encode())
    assert load_problems(path)[0].question == "Caf\u00e9?"


@pytest.mark.parametrize(
    "lines, message",
    [
        ([_row(), '{"question": "Q", "answer": '], r":2: invalid JSON: Expecting value \(column 28\)"),
        ([_row(), "", "[1, 2]"], r":3: expected a JSON object per line, got list"),
        ([_row(), _row(), json.dumps({"question": "Q"})], r":3: missing field 'answer' \(gsm8k-style row"),
        ([_row(), "", "", json.dumps({"answer": "#### 1"})], r":4: missing field 'question'"),
        ([_row(), _row(q="   ")], r":2: field 'question' is empty"),
        (
            [_row(), json.dumps({"question": ["Q"], "answer": "#### 1"})],
            r":2: field 'question' must be a string",
        ),
        ([_row(), _row(a="She has some left.")], r":2: no final answer in field 'answer'.*She has some left"),
        ([_row(), _row(a="#### ")], r":2: no final answer in field 'answer'"),
        ([json.dumps({"text": "hi"})], r":1: cannot detect the format from the fields \['text'\]"),
        (
            [
                json.dumps({"problem": "P", "solution": "\\boxed{1}"}),
                json.dumps({"problem": "P", "solution": "x"}),
            ],
            r":2: no final answer: field 'solution' has no complete \\boxed\{\.\.\.\}",
        ),
        (
            [json.dumps({"problem": "P", "solution": "so \\boxed{12"})],
            r":1: no final answer: field 'solution' has no complete",
        ),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, lines, message):
    path = _bad(tmp_path, "bad.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl" + message):
        load_problems(path)


def test_bad_paths_and_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl: data file not found"):
        load_problems(tmp_path / "nope.jsonl")
    other = _bad(tmp_path, "data.csv", "question,answer\n")
    with pytest.raises(DataError, match=r"data\.csv: unknown file type"):
        load_problems(other)
    with pytest.raises(DataError, match=r"data\.csv:1: invalid JSON"):
        load_problems(other, file_type="jsonl")
    ok = _bad(tmp_path, "ok.jsonl", _row() + "\n")
    with pytest.raises(ValueError, match="format must be"):
        load_problems(ok, format="aime")
    with pytest.raises(DataError, match=r":1: missing id field 'uid'"):
        load_problems(ok, id_field="uid")


def test_read_options_are_the_keywords_of_iter_problems(tmp_path):
    path = write_jsonl(tmp_path / "renamed.jsonl", [{"prompt": "1 + 1?", "target": "#### 2"}])
    options = dict(format="gsm8k", question_field="prompt", answer_field="target")
    assert load_problems(path, **options) == list(iter_problems(path, **options))
    # a misspelt read option fails up front, naming the function, even with no files to read
    for paths in ([], path):
        with pytest.raises(TypeError, match=r"load_problems\(\): .*keyword argument 'question_feild'"):
            load_problems(paths, question_feild="prompt")


# --------------------------------------------------------------------------------------------
# Prompts: a tiny byte-level tokenizer built here, with and without a chat template
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_tok():
    return byte_tokenizer(CHATML)


@pytest.fixture(scope="module")
def plain_tok():
    return byte_tokenizer(None)


PROBLEM = Problem(id="p1", question="What is 2+3?", answer="5")
USER = "What is 2+3?\n\n" + DEFAULT_INSTRUCTION
CHAT_PROMPT = f"<|im_start|>user\n{USER}<|im_end|>\n<|im_start|>assistant\n"
PLAIN_PROMPT = f"Question: What is 2+3?\n\n{DEFAULT_INSTRUCTION}\n\nAnswer:"


def test_build_prompt_chat_and_plain(chat_tok, plain_tok):
    assert has_chat_template(chat_tok) and not has_chat_template(plain_tok)
    assert build_messages(PROBLEM, system_prompt="Be brief.") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": USER},
    ]
    assert build_prompt(PROBLEM, chat_tok) == CHAT_PROMPT
    assert build_prompt(PROBLEM, chat_tok, system_prompt="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n" + CHAT_PROMPT
    )
    assert build_prompt("What is 2+3?", chat_tok, instruction=None) == (
        "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    )
    # no chat template (or template="plain"): the documented plain format
    assert build_prompt(PROBLEM, plain_tok) == PLAIN_PROMPT
    assert build_prompt(PROBLEM, chat_tok, template="plain") == PLAIN_PROMPT
    assert build_prompt(PROBLEM, None, template="plain", system_prompt="S", instruction="") == (
        "S\n\nQuestion: What is 2+3?\n\nAnswer:"
    )
    with pytest.raises(ValueError, match="template must be"):
        build_prompt(PROBLEM, chat_tok, template="jinja")


def test_build_prompt_ids(chat_tok, plain_tok):
    ids = build_prompt_ids(PROBLEM, chat_tok)
    assert chat_tok.decode(ids) == CHAT_PROMPT
    assert ids[0] == chat_tok.convert_tokens_to_ids("<|im_start|>")
    assert ids == chat_tok.apply_chat_template(
        build_messages(PROBLEM), add_generation_prompt=True, return_dict=False
    )
    plain_ids = build_prompt_ids(PROBLEM, plain_tok)
    assert plain_tok.decode(plain_ids) == PLAIN_PROMPT


def test_correction_prompt_chat(chat_tok):
    first = "2+3 is \\boxed{5}."
    c = build_correction_prompt(PROBLEM, first + "<|im_end|>", DEFAULT_GUIDING_PHRASES[0], chat_tok)
    assert c.text == CHAT_PROMPT + first + "\n\nWait, let me double-check that."
    assert c.phrase == "Wait, let me double-check that."
    # the same as leaving o_i + phrase open as the final assistant turn
    msgs = build_messages(PROBLEM) + [{"role": "assistant", "content": first + "\n\n" + c.phrase}]
    assert c.text == chat_tok.apply_chat_template(msgs, tokenize=False, continue_final_message=True)
    # token boundaries: prompt | o_i | separator + phrase; the continuation starts after the phrase
    assert chat_tok.decode(c.prompt_ids) == c.text
    assert c.prompt_ids[: c.question_end] == build_prompt_ids(PROBLEM, chat_tok)
    assert chat_tok.decode(c.prompt_ids[c.question_end : c.answer_end]) == first
    assert chat_tok.decode(c.prompt_ids[c.answer_end :]) == "\n\n" + c.phrase
    assert c.num_prompt_tokens == len(c.prompt_ids)
    assert c.loss_mask(3) == [0] * len(c.prompt_ids) + [1, 1, 1]


def test_correction_prompt_as_the_next_user_turn(chat_tok, plain_tok):
    first = "2+3 is \\boxed{5}."
    sampled = chat_tok(first, add_special_tokens=False)["input_ids"] + [chat_tok.eos_token_id]
    phrase = DEFAULT_GUIDING_PHRASES[1]
    c = build_correction_prompt(
        PROBLEM, None, phrase, chat_tok, first_answer_ids=sampled, guiding_turn="user"
    )
    # o_i is the assistant's finished turn, the phrase the user's next one, then a new assistant turn
    turns = [{"role": "assistant", "content": first}, {"role": "user", "content": phrase}]
    msgs = build_messages(PROBLEM) + turns
    assert c.text == chat_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    tail = f"{first}<|im_end|>\n<|im_start|>user\n{phrase}<|im_end|>\n<|im_start|>assistant\n"
    assert c.text.endswith(tail)
    assert chat_tok.decode(c.prompt_ids) == c.text
    # token-exact o_i (its sampled ids, EOS dropped)
    assert c.prompt_ids[: c.answer_end] == build_prompt_ids(PROBLEM, chat_tok) + sampled[:-1]
    assert c.prompt_ids[c.answer_end] == chat_tok.eos_token_id  # the turn's end, from the template
    # without a chat template the phrase continues the answer, as in "assistant" mode
    plain = build_correction_prompt(PROBLEM, first, phrase, plain_tok, guiding_turn="user")
    assert plain.text == build_correction_prompt(PROBLEM, first, phrase, plain_tok).text
    with pytest.raises(ValueError, match="guiding_turn"):
        build_correction_prompt(PROBLEM, first, phrase, chat_tok, guiding_turn="system")


def test_correction_prompt_uses_sampled_ids(chat_tok):
    sampled = chat_tok("It is \\boxed{5}.", add_special_tokens=False)["input_ids"] + [chat_tok.eos_token_id]
    c = build_correction_prompt(PROBLEM, None, "Hmm.", chat_tok, first_answer_ids=sampled)
    assert c.prompt_ids[c.question_end : c.answer_end] == sampled[:-1]  # EOS dropped, ids kept as sampled
    assert c.text == CHAT_PROMPT + "It is \\boxed{5}.\n\nHmm."
    with pytest.raises(ValueError, match="first_answer"):
        build_correction_prompt(PROBLEM, None, "Hmm.", chat_tok)


def test_correction_prompt_plain(plain_tok):
    c = build_correction_prompt(PROBLEM, " 5  \n", "Wait.", plain_tok, separator="\n")
    assert c.text == PLAIN_PROMPT + " 5\nWait."
    assert plain_tok.decode(c.prompt_ids) == c.text
    assert c.prompt_ids[: c.question_end] == build_prompt_ids(PROBLEM, plain_tok)


def test_guiding_phrase_choice_is_seeded(chat_tok):
    assert len(DEFAULT_GUIDING_PHRASES) == 5
    assert (
        DEFAULT_GUIDING_PHRASES[1]
        == "Where might I have gone wrong this time? Let me double-check carefully."
    )

    def draw(seed: int) -> list[str]:
        rng = random.Random(seed)
        return [build_correction_prompt(PROBLEM, "5", None, chat_tok, rng=rng).phrase for _ in range(8)]

    assert draw(3) == draw(3)
    expected_rng = random.Random(3)
    assert draw(3) == [DEFAULT_GUIDING_PHRASES[expected_rng.randrange(5)] for _ in range(8)]
    assert set(draw(3) + draw(4) + draw(5)) <= set(DEFAULT_GUIDING_PHRASES)
    custom = build_correction_prompt(PROBLEM, "5", None, chat_tok, rng=random.Random(0), phrases=["Check."])
    assert custom.text.endswith("5\n\nCheck.")
    assert choose_guiding_phrase(random.Random(1), ["a", "b"]) == ["a", "b"][random.Random(1).randrange(2)]
    with pytest.raises(ValueError, match="guiding_phrase or an rng"):
        build_correction_prompt(PROBLEM, "5", None, chat_tok)
    with pytest.raises(ValueError, match="list is empty"):
        choose_guiding_phrase(random.Random(0), [])
