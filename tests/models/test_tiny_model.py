"""The bundled tiny model: it loads from the package directory (transformers and ``load_policy``), its
character tokenizer covers the task and the prompts, its held-out accuracy is in the range RL needs,
and ``make_tiny_model`` rebuilds a loadable model end to end."""

from __future__ import annotations

import json
import os

import pytest

transformers = pytest.importorskip("transformers")
import torch  # noqa: E402

from mgrpo_fast.data.answers import extract_answer
from mgrpo_fast.data.arithmetic import bundled_problems, generate_problems
from mgrpo_fast.data.arithmetic_corrections import checked_solution
from mgrpo_fast.data.bundled import bundled_model_path
from mgrpo_fast.data.prompts import (
    DEFAULT_GUIDING_PHRASES,
    build_correction_prompt,
    build_prompt,
    build_prompt_ids,
)
from mgrpo_fast.models.policy import load_policy  # noqa: E402
from mgrpo_fast.rl.rollout.base import SamplingParams
from mgrpo_fast.rl.rollout.hf import HFGenerateBackend
from mgrpo_fast.tools import make_tiny_model, tiny_model_mixture  # noqa: E402

MAX_NEW_TOKENS = make_tiny_model.RECOMMENDED_MAX_NEW_TOKENS  # what task.json recommends


@pytest.fixture(scope="module")
def bundled():
    path = bundled_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return path, model, tokenizer


def test_files_and_sizes(bundled):
    path, model, tokenizer = bundled
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"):
        assert os.path.isfile(os.path.join(path, name)), name
    assert os.path.getsize(os.path.join(path, "model.safetensors")) <= 10 * 2**20
    assert model.config.max_position_embeddings >= 768
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not getattr(tokenizer, "chat_template", None)  # prompts use data.py's plain format
    with open(os.path.join(path, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == tokenizer.eos_token_id
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_tokenizer_round_trips_without_unknown_tokens(bundled):
    _, _, tokenizer = bundled
    problems = generate_problems(100, seed=0, levels=(1, 2, 3, 4, 5, 6))
    texts = [build_prompt(p, tokenizer) for p in problems] + [" " + p.solution for p in problems]
    texts += list(DEFAULT_GUIDING_PHRASES)
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids, text
        assert len(ids) == len(text)  # one token per character
        assert tokenizer.decode(ids) == text
    # the EOS is a special token: kept or skipped on decoding, never part of the text
    ids = tokenizer(" 2+3=5. \\boxed{5}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert tokenizer.decode(ids, skip_special_tokens=True) == " 2+3=5. \\boxed{5}"
    # a layer-2 prompt is the token-exact concatenation of its parts
    p = problems[0]
    cp = build_correction_prompt(p, " " + p.solution, DEFAULT_GUIDING_PHRASES[1], tokenizer)
    assert cp.prompt_ids == tokenizer(cp.text, add_special_tokens=False)["input_ids"]
    assert cp.prompt_ids[: cp.question_end] == build_prompt_ids(p, tokenizer)


@pytest.mark.parametrize("correction_format", ["sentence", "span", "plan", "worked"])
def test_correction_round_example_is_the_layer2_input_then_the_rederivation(bundled, correction_format):
    """A supervised correction round (``--correction-share``): its prompt part is token for token the
    layer-2 input the trainer builds, and only the re-derivation (then EOS) is the target."""
    _, _, tokenizer = bundled
    p = generate_problems(5, seed=1, levels=(2,))[0]
    first = " 1+1=3. \\boxed{3}"
    ids, n = tiny_model_mixture.encode_correction_example(
        p, first.lstrip(), DEFAULT_GUIDING_PHRASES[0], tokenizer, correction_format=correction_format
    )
    cp = build_correction_prompt(p, first, DEFAULT_GUIDING_PHRASES[0], tokenizer, instruction=None)
    assert (ids[:n], n) == (cp.prompt_ids, cp.num_prompt_tokens)
    assert ids[-1] == tokenizer.eos_token_id
    expected = p.solution if correction_format == "worked" else checked_solution(p, correction_format)
    assert tokenizer.decode(ids[n:-1]) == " " + expected


def test_supervised_mixture_follows_the_shares(bundled):
    """The bundled model's habits come from these shares: first answers without working
    (``--direct-share``), correction rounds that restate the first answer (``--restate-share``)."""
    _, _, tokenizer = bundled
    argv = ["--out", "unused", "--correction-share", "0.5", "--direct-share", "0.6", "--restate-share", "0.3"]
    args = make_tiny_model._parse_args(argv)
    problems = generate_problems(600, seed=3, levels=(1, 2, 3))
    kinds = {"direct": 0, "worked": 0, "restate": 0, "rederive": 0}
    for p, (ids, n) in zip(problems, tiny_model_mixture.encode_examples(problems, tokenizer, args)):
        prompt, target = tokenizer.decode(ids[:n]), tokenizer.decode(ids[n:-1])
        boxed_only = target == f" \\boxed{{{extract_answer(target)}}}"
        if any(phrase in prompt for phrase in DEFAULT_GUIDING_PHRASES):
            kinds["restate" if boxed_only else "rederive"] += 1
            first = prompt.split("Answer: ", 1)[1].split("\n\n", 1)[0]
            assert (target.strip() == f"\\boxed{{{extract_answer(first)}}}") == boxed_only
            assert boxed_only or target == " " + checked_solution(p, args.correction_format)
        else:
            kinds["direct" if boxed_only else "worked"] += 1
            assert target == (f" \\boxed{{{p.answer}}}" if boxed_only else " " + p.solution)
    rounds = kinds["restate"] + kinds["rederive"]
    assert abs(rounds / len(problems) - 0.5) < 0.08, kinds
    assert abs(kinds["direct"] / (len(problems) - rounds) - 0.6) < 0.1, kinds
    assert abs(kinds["restate"] / rounds - 0.3) < 0.1, kinds


def test_restating_can_depend_on_the_first_answer(bundled):
    """``--restate-share-after-direct``: after a first answer without working the correction round
    restates with that share, after a worked one with ``--restate-share``."""
    _, _, tokenizer = bundled
    argv = ["--out", "unused", "--correction-share", "1", "--restate-share", "0.8"]
    args = make_tiny_model._parse_args([*argv, "--restate-share-after-direct", "0.2"])
    problems = generate_problems(600, seed=4, levels=(1, 2, 3))
    restated = {True: [], False: []}  # first answer without working -> restated or not, per round
    for ids, n in tiny_model_mixture.encode_examples(problems, tokenizer, args):
        prompt, target = tokenizer.decode(ids[:n]), tokenizer.decode(ids[n:-1])
        first = prompt.split("Answer: ", 1)[1].split("\n\n", 1)[0]
        restated[first == f"\\boxed{{{extract_answer(first)}}}"].append(target.count("=") == 0)
    assert abs(sum(restated[True]) / len(restated[True]) - 0.2) < 0.08, restated
    assert abs(sum(restated[False]) / len(restated[False]) - 0.8) < 0.08, restated
    with pytest.raises(SystemExit):
        make_tiny_model._parse_args([*argv, "--restate-share-after-direct", "-0.1"])


def _spec(path):
    with open(os.path.join(path, "task.json")) as f:
        return json.load(f)


def test_held_out_greedy_accuracy_in_range(bundled):
    """On the held-out problems the trainer evaluates it on (task.json), Acc@t1 leaves room both ways."""
    path, model, tokenizer = bundled
    spec = _spec(path)
    test = bundled_problems(
        "test", 200, seed=0, levels=spec["levels"], max_number=spec["max_number"], max_value=spec["max_value"]
    )
    from mgrpo_fast.data.train_data import load_eval_problems

    assert [p.question for p in load_eval_problems([], 200)] == [p.question for p in test]
    acc = make_tiny_model.evaluate_accuracy(
        model, tokenizer, test, max_new_tokens=spec["max_new_tokens"], instruction=spec["instruction"]
    )
    assert 0.10 <= acc <= 0.70, acc  # measured 0.185: most greedy answers skip the working


def test_load_policy_matches_transformers(bundled):
    path, model, tokenizer = bundled
    policy = load_policy(path, dtype="float32", device="cpu")
    assert policy.config._attn_implementation == "mgrpo_packed"
    spec = _spec(path)
    problems = bundled_problems("test", 6, seed=1, levels=(1, 2), max_number=spec["max_number"])
    prompts = [build_prompt_ids(p, tokenizer, instruction=spec["instruction"]) for p in problems]
    params = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS, batch_size=6)
    a = HFGenerateBackend(policy, tokenizer).generate(prompts, num_samples=1, params=params, seed=0)
    b = HFGenerateBackend(model, tokenizer).generate(prompts, num_samples=1, params=params, seed=0)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert all(c.finish_reason == "eos" for c in a)  # it learned to stop
    assert all("\\boxed{" in c.text for c in a)


def test_make_tiny_model_end_to_end(tmp_path, capsys):
    out = tmp_path / "tiny"
    argv = ["--out", str(out), "--steps", "3", "--batch-size", "4", "--warmup", "1", "--eval-n", "4"]
    argv += ["--hidden-size", "32", "--intermediate-size", "64", "--layers", "1", "--heads", "2"]
    argv += ["--max-new-tokens", "8", "--threads", "1", "--log-every", "1"]
    stats = make_tiny_model.main(argv)
    printed = capsys.readouterr().out
    assert "step 3/3" in printed and "held-out Acc@t1 on 4 test problems" in printed
    assert 0.0 <= stats["greedy"]["acc"] <= 1.0 and stats["bytes"] > 0
    model = load_policy(out, dtype="float32", device="cpu")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert model.config.hidden_size == 32 and model.config.max_position_embeddings >= 768
    ids = build_prompt_ids(generate_problems(1, seed=0)[0], tokenizer)
    params = SamplingParams(temperature=1.0, max_new_tokens=5)
    (c,) = HFGenerateBackend(model, tokenizer).generate([ids], num_samples=1, params=params, seed=0)
    assert 1 <= len(c.token_ids) <= 5
    assert "--steps 3" in (out / "README.md").read_text()
    assert json.loads((out / "task.json").read_text())["levels"] == [1, 2, 3]


def test_make_tiny_model_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        make_tiny_model.main(["--out", str(tmp_path), "--hidden-size", "30", "--heads", "4"])
    with pytest.raises(SystemExit):
        make_tiny_model.main(["--out", str(tmp_path), "--max-positions", "512"])
    with pytest.raises(SystemExit):
        make_tiny_model.main(["--out", str(tmp_path), "--direct-share", "1.5"])
