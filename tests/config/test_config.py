"""Config: the documented defaults, YAML + CLI precedence, errors naming the field path (and file:line or the
override), the GRPO/MGRPO equal-budget rule, round-trip and the atomic save of the resolved config."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from mgrpo_fast.config.fields import ConfigError, field_doc, setting
from mgrpo_fast.config.loading import MOVED_KEYS, load_config, parse_cli
from mgrpo_fast.config.run import TrainConfig, equal_budget_group_size
from mgrpo_fast.config.sections import Layer1Config, Layer2Config, LossConfig, parse_selection
from mgrpo_fast.ops.options import LossOptions

NO_GROUP = "a group of one has zero advantage: its reward is its own mean, so it never trains"

REPO = Path(__file__).resolve().parents[2]
PAPER_PHRASES = (
    "Wait, let me double-check that.",
    "Where might I have gone wrong this time? Let me double-check carefully.",
    "Wait a minute, let me make sure I didn't make a mistake.",
    "Hmm, let me think if there's another way to approach this problem.",
    "But wait, let me make sure I didn't miss anything in the original problem.",
)


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    return str(info.value)


# --------------------------------------------------------------------------------------------
# Defaults and documentation
# --------------------------------------------------------------------------------------------
def test_defaults_match_design():
    raw = TrainConfig()
    assert raw.algo == "mgrpo" and raw.layer1.group_size == "auto" and raw.layer2.enabled == "auto"
    cfg = load_config(None, [])
    assert cfg == raw.resolved()
    assert cfg.layer1.group_size == 8 and cfg.layer2.group_size == 4
    assert cfg.layer2.enabled is True and cfg.layer2.selection == "all"
    assert cfg.layer2.shaping_alpha == 0.0 and cfg.layer2.loss_weight == 1.0
    assert cfg.layer2.guiding_phrases == PAPER_PHRASES
    loss = cfg.loss
    assert (loss.loss_type, loss.beta, loss.kl_estimator) == ("dapo", 0.0, "k3")
    assert loss.drop_zero_variance_groups is True and loss.mu == 1 and loss.advantage_scale == "group"
    assert loss.options() == LossOptions()  # the loss section reuses LossOptions' defaults
    assert cfg.parallel.engine == "auto" and cfg.parallel.zero_stage == 2
    assert cfg.layer2.max_new_tokens == cfg.rollout.max_new_tokens
    assert cfg.rollout.seed == cfg.data.shuffle_seed == cfg.seed == 0
    assert cfg.checkpoint.dir == os.path.join(cfg.logging.run_dir, "checkpoints")


def sections(cls=TrainConfig):
    yield cls
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory if callable(f.default_factory) else None):
            yield from sections(f.default_factory)


@pytest.mark.parametrize("cls", list(sections()), ids=lambda c: c.__name__)
def test_every_field_is_documented_and_sections_are_frozen_kw_only(cls):
    assert cls.__doc__ and cls.__doc__.strip()
    for f in dataclasses.fields(cls):
        doc = field_doc(f)
        assert doc and "\n" not in doc, f"{cls.__name__}.{f.name} has no one-line doc= in its setting(...)"
        assert f.kw_only
    with pytest.raises(TypeError):
        cls(0)  # keyword-only
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(cls(), dataclasses.fields(cls)[0].name, None)


def test_a_field_cannot_be_declared_without_its_doc():
    with pytest.raises(TypeError, match="doc"):
        setting(1)
    with pytest.raises(TypeError, match="doc must be a non-empty string"):
        setting(1, doc="  ")
    with pytest.raises(TypeError, match="unknown bound"):
        setting(1, doc="x", gte=0)
    assert field_doc(dataclasses.fields(Layer2Config)[1]).startswith("G2: continuations")


# --------------------------------------------------------------------------------------------
# YAML + overrides
# --------------------------------------------------------------------------------------------
def test_yaml_then_overrides_precedence(tmp_path):
    path = write(
        tmp_path, "seed: 3\noptim:\n  lr: 1e-5\ntrain:\n  total_steps: 7\nlayer2:\n  group_size: 2\n"
    )
    cfg = load_config(path, ["--optim.lr=3e-4", "--layer2.group_size", "6", "--optim.lr", "2e-4"])
    assert cfg.seed == 3 and cfg.train.total_steps == 7  # file over defaults
    assert cfg.optim.lr == 2e-4 and cfg.layer2.group_size == 6  # overrides over file, last wins
    assert cfg.optim.warmup_steps == 0 and cfg.layer1.group_size == 8  # untouched defaults
    assert load_config(path, ["optim.lr=5e-5"]).optim.lr == 5e-5  # parse_cli's normalized form


def test_override_values_are_yaml():
    cfg = load_config(None, [
        '--layer2.guiding_phrases=["a", "b: c"]', "--loss.delta=null", "--loss.delta=2",
        "--rollout.stop=</s>", "--data.system_prompt=Be: brief", "--model.path=123",
        "--train.total_steps=1e3", "--model.dtype=bf16", "--layer2={group_size: 3, selection: 'sample: 2'}",
        "--reward.functions={'my_mod:fn': 0.5}", "--resume",
    ])  # fmt: skip
    assert cfg.layer2.guiding_phrases == ("a", "b: c") and cfg.loss.delta == 2.0
    assert cfg.rollout.stop == ("</s>",) and cfg.data.system_prompt == "Be: brief"
    assert cfg.model.path == "123" and cfg.train.total_steps == 1000 and cfg.model.dtype == "bfloat16"
    assert cfg.layer2.group_size == 3 and cfg.layer2.selection == "sample:2" and cfg.layer2.selection_k == 2
    assert cfg.layer2.shaping_alpha == 0.0  # a section mapping merges, it does not reset the section
    assert cfg.reward.functions == {"my_mod:fn": 0.5}  # a mapping value replaces
    assert cfg.reward.scorer_fns() == [("my_mod:fn", 0.5)]
    assert cfg.checkpoint.resume is True
    assert load_config(None, ["--loss.delta", "null"]).loss.delta is None
    assert load_config(None, ["--layer1.group_size=null", "--algo=grpo"]).layer1.group_size == 40


def test_parse_cli():
    argv = ["-c", "x.yaml", "--a.b", "1", "--c.d=2", "--resume", "--e-f.g", "-3", "--config=y.yaml"]
    assert parse_cli(argv) == ("y.yaml", ["a.b=1", "c.d=2", "checkpoint.resume=true", "e_f.g=-3"])
    assert parse_cli([]) == (None, [])
    assert "unexpected argument 'oops'" in error_of(parse_cli, ["oops"])


def test_help_lists_every_key_with_type_default_allowed_values_and_doc(capsys):
    with pytest.raises(SystemExit) as info:
        parse_cli(["--model.path=x", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:")
    assert "  optim.lr: float = 1.0e-06  [> 0]\n      AdamW peak learning rate.\n" in out
    assert "  parallel.zero_stage: int = 2  [2, 3]\n" in out
    assert "  layer1.group_size: int | 'auto' | null = auto  [>= 2]\n" in out
    assert "  train.packing_balance: str = attention  [attention, tokens]\n" in out
    for cls in sections():
        for f in dataclasses.fields(cls):
            key = f.name if cls is TrainConfig else f"{cls._section}.{f.name}"
            if not dataclasses.is_dataclass(f.default_factory if callable(f.default_factory) else None):
                assert f"\n  {key}: " in out, key
            assert field_doc(f).split()[0] in out


def test_example_configs_load_at_equal_budget():
    mgrpo = load_config(REPO / "configs" / "mgrpo_default.yaml")
    grpo = load_config(REPO / "configs" / "grpo_default.yaml")
    assert (mgrpo.algo, grpo.algo) == ("mgrpo", "grpo")
    assert mgrpo.layer1.group_size == 8 and grpo.layer1.group_size == 40
    assert load_config(REPO / "configs" / "mgrpo_default.yaml", ["--algo=grpo"]).layer1.group_size == 40
    assert mgrpo.layer2.guiding_phrases == PAPER_PHRASES


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, message",
    [
        ("layer2.group_size=0", f"layer2.group_size: expected an integer >= 2 ({NO_GROUP}), got 0"),
        ("layer2.group_size=four", "layer2.group_size: expected an integer, got 'four'"),
        ("layer1.group_size=0", f"layer1.group_size: expected an integer >= 2 ({NO_GROUP}), got 0"),
        ("layer1.group_size=many", "layer1.group_size: expected an integer or 'auto' or null, got 'many'"),
        ("layer2.selection=sample:0", "layer2.selection: expected 'all', 'wrong_only' or 'sample:k'"),
        ("layer2.selection=some", "layer2.selection: expected 'all', 'wrong_only' or 'sample:k'"),
        ("layer2.selection=sample:9", "layer2.selection: sample:9 selects more than the 8 layer-1"),
        ("layer2.guiding_phrases=[]", "layer2.guiding_phrases: expected a non-empty list"),
        ("layer2.guiding_phrases=['a', ' ']", "layer2.guiding_phrases[1]: expected a non-empty phrase"),
        ("layer2.guiding_phrases=[1]", "layer2.guiding_phrases[0]: expected a string, got 1"),
        ("layer2.shaping_alpha=-1", "layer2.shaping_alpha: expected a number >= 0, got -1.0"),
        ("layer2.loss_weight=true", "layer2.loss_weight: expected a number, got True"),
        ("layer2.enabled=false", "layer2.enabled: False contradicts algo: mgrpo"),
        ("loss.loss_type=ppo", "loss.loss_type: expected one of"),
        ("loss.epsilon_low=-0.5", "loss.epsilon_low: expected a number >= 0, got -0.5"),
        ("loss.delta=nan", "loss.delta: expected a number, got 'nan'"),
        ("loss.sapo_temperature_neg=0", "loss.sapo_temperature_neg: expected a number > 0, got 0.0"),
        ("loss.kl_estimator=k4", "loss.kl_estimator: expected one of"),
        ("loss.advantage_scale=std", "loss.advantage_scale: expected one of 'group', 'batch', 'none'"),
        ("loss.mu=0", "loss.mu: expected an integer >= 1, got 0"),
        ("loss.impl=cuda", "loss.impl: expected one of 'auto', 'torch', 'triton'"),
        ("optim.lr=0", "optim.lr: expected a number > 0, got 0.0"),
        ("optim.lr=fast", "optim.lr: expected a number, got 'fast'"),
        ("optim.betas=[0.9, 1.0]", "optim.betas: expected a number >= 0 and < 1, got (0.9, 1.0)"),
        ("optim.betas=[0.9]", "optim.betas: expected a list of 2 numbers, got [0.9]"),
        ("train.total_steps=2.5", "train.total_steps: expected an integer, got 2.5"),
        ("train.packing_balance=flops", "train.packing_balance: expected one of 'attention', 'tokens'"),
        ("train.max_tokens_per_microbatch=0", "train.max_tokens_per_microbatch: expected an integer >= 1"),
        ("optim.warmup_steps=-1", "optim.warmup_steps: expected an integer >= 0, got -1"),
        ("optim.min_lr_ratio=2", "optim.min_lr_ratio: expected a number >= 0 and <= 1, got 2.0"),
        ("optim.schedule=step", "optim.schedule: expected one of 'cosine', 'linear', 'constant'"),
        ("rollout.top_p=0", "rollout.top_p: expected a number > 0 and <= 1, got 0.0"),
        ("rollout.temperature=0", "rollout.temperature: expected a number > 0, got 0.0"),
        ("rollout.backend=sglang", "rollout.backend: expected one of 'auto', 'vllm', 'hf', 'hf_generate'"),
        ("rollout.is_correction=ppo", "rollout.is_correction: expected one of 'none', 'tis', got 'ppo'"),
        ("rollout.vllm_kv_cache_gib=0.5", "rollout.vllm_kv_cache_gib: expected an integer, got 0.5"),
        ("model.dtype=int8", "model.dtype: expected one of auto, float32, bfloat16, float16, got 'int8'"),
        ("model.gradient_checkpointing=maybe", "model.gradient_checkpointing: expected a boolean"),
        ("data.format=csv", "data.format: expected one of 'auto', 'gsm8k', 'math', 'prompt_answer', got"),
        ("data.limit=-1", "data.limit: expected an integer >= 0, got -1"),
        ("reward.functions={'nocolon': 1}", "reward.functions.nocolon: expected 'module:function'"),
        ("reward.timeout_s=0", "reward.timeout_s: expected a number > 0, got 0.0"),
        ("reward.num_workers=-1", "reward.num_workers: expected an integer >= 0, got -1"),
        ("checkpoint.keep_last=0", "checkpoint.keep_last: expected an integer >= 1, got 0"),
        ("checkpoint.resume=''", "checkpoint.resume: expected true, false or a checkpoint path"),
        ("logging.run_dir=runs/{foo}", "logging.run_dir: expected a non-empty path whose only"),
        ("parallel.engine=ddp", "parallel.engine: expected one of 'auto', 'fsdp2', 'deepspeed', got 'ddp'"),
        ("parallel.zero_stage=1", "parallel.zero_stage: expected one of 2, 3, got 1"),
        ("algo=ppo", "algo: expected one of 'mgrpo', 'grpo', got 'ppo'"),
        ("seed=-1", "seed: expected an integer >= 0, got -1"),
        ("layer2=3", "layer2: expected a mapping (section layer2), got 3"),
        ("seed.x=1", "seed: not a section, cannot set seed.x"),
    ],
)
def test_bad_values_name_the_field_path(override, message):
    text = error_of(load_config, None, [override])
    assert text.startswith(f"command line --{override}: "), text
    assert message in text, text


def test_direct_construction_validates():
    expected = f"layer2.group_size: expected an integer >= 2 ({NO_GROUP}), got 0"
    assert error_of(Layer2Config, group_size=0) == expected
    text = error_of(TrainConfig, layer2={"group_size": "4"})
    assert text == "layer2.group_size: expected an integer, got '4'"
    assert error_of(TrainConfig, algo="grpo", layer2=Layer2Config(enabled=True)).startswith("layer2.enabled:")
    assert Layer1Config(group_size=None).group_size == "auto"
    assert isinstance(LossConfig(epsilon_high=1).epsilon_high, float)  # ints are accepted for floats
    assert error_of(LossConfig, delta=float("inf")) == "loss.delta: expected a finite number, got inf"


def test_unknown_keys_list_the_valid_keys(tmp_path):
    text = error_of(load_config, write(tmp_path, "optim:\n  lr: 1e-5\nlayer2:\n  grup_size: 3\n"), [])
    path = tmp_path / "c.yaml"
    assert text.startswith(f"{path}:4: layer2.grup_size: unknown key (did you mean 'group_size'?)")
    assert "valid keys of layer2: enabled, group_size, selection, guiding_phrases" in text
    text = error_of(load_config, None, ["--modle.path=x"])
    assert text.startswith("command line --modle.path=x: modle: unknown key (did you mean 'model'?)")
    assert "valid keys: algo, seed, model, data, rollout, layer1, layer2, reward, loss, train, optim" in text
    text = error_of(load_config, None, ["--layer2.foo.bar=1"])
    assert "layer2.foo: unknown key; valid keys of layer2:" in text


def test_file_errors_give_file_and_line(tmp_path):
    path = write(tmp_path, "algo: mgrpo\noptim:\n  lr: [1, 2\nlayer2: x\n")
    assert error_of(load_config, path, []).startswith(f"{path}:4:7: invalid YAML: ")
    path = write(tmp_path, "algo: mgrpo\nlayer2:\n  selection: all\n  group_size: 0\n")
    expected = f"{path}:4: layer2.group_size: expected an integer >= 2 ({NO_GROUP}), got 0"
    assert error_of(load_config, path, []) == expected
    path = write(tmp_path, "optim:\n  betas: [0.9, 2]\n")
    text = error_of(load_config, path, [])
    assert text.startswith(f"{path}:2: optim.betas: expected a number >= 0 and < 1")
    assert "expected a mapping of sections" in error_of(load_config, write(tmp_path, "- 1\n- 2\n"), [])
    assert load_config(write(tmp_path, "# only a comment\n"), []) == load_config(None, [])
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "missing.yaml", [])
    (tmp_path / "bin.yaml").write_bytes(b"algo: \xff\n")
    assert "not UTF-8" in error_of(load_config, tmp_path / "bin.yaml", [])


# --------------------------------------------------------------------------------------------
# Keys that moved from optim to train
# --------------------------------------------------------------------------------------------
OLD_OPTIM_KEYS = {
    "total_steps": 7,
    "questions_per_step": 3,
    "max_tokens_per_microbatch": 99,
    "packing_balance": "tokens",
    "max_nonfinite_updates": 5,
}


def test_the_moved_keys_are_the_train_section():
    moved_to_train = {f"optim.{k}": f"train.{k}" for k in OLD_OPTIM_KEYS}
    assert MOVED_KEYS == {**moved_to_train, "data.eval_limit": "eval.num_problems"}
    train = {f.name for f in dataclasses.fields(TrainConfig().train)}
    optim = {f.name for f in dataclasses.fields(TrainConfig().optim)}
    assert train == set(OLD_OPTIM_KEYS) and not train & optim
    assert optim == {
        "lr",
        "betas",
        "eps",
        "weight_decay",
        "warmup_steps",
        "schedule",
        "min_lr_ratio",
        "grad_clip",
    }


def test_old_optim_keys_in_a_file_still_work_with_a_one_line_warning(tmp_path, caplog):
    body = "".join(f"  {k}: {v}\n" for k, v in OLD_OPTIM_KEYS.items())
    path = write(tmp_path, f"optim:\n  lr: 1e-5\n{body}")
    with caplog.at_level("WARNING", logger="mgrpo_fast.config.loading"):
        cfg = load_config(path, [])
    assert {k: getattr(cfg.train, k) for k in OLD_OPTIM_KEYS} == OLD_OPTIM_KEYS and cfg.optim.lr == 1e-5
    assert cfg == load_config(write(tmp_path, f"optim:\n  lr: 1e-5\ntrain:\n{body}", "new.yaml"), [])
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == len(OLD_OPTIM_KEYS) and all("\n" not in m for m in messages)
    assert messages[0] == (
        f"{path}:3: optim.total_steps has moved to train.total_steps; please use that (the old key still "
        "works for now)"
    )
    # errors in a moved key still point at its line in the file
    text = error_of(load_config, write(tmp_path, "optim:\n  lr: 1e-5\n  total_steps: 2.5\n", "bad.yaml"), [])
    assert text == f"{tmp_path / 'bad.yaml'}:3: train.total_steps: expected an integer, got 2.5"


def test_old_optim_overrides_still_work_with_a_warning(caplog):
    with caplog.at_level("WARNING", logger="mgrpo_fast.config.loading"):
        cfg = load_config(
            None, ["--optim.total_steps=4", "--optim={questions_per_step: 2}", "--train.total_steps=5"]
        )
        old_last = load_config(None, ["--train.total_steps=5", "--optim.total_steps", "4"])
    assert (cfg.train.total_steps, cfg.train.questions_per_step, old_last.train.total_steps) == (5, 2, 4)
    assert "command line: optim.questions_per_step has moved to train.questions_per_step" in caplog.text
    text = error_of(load_config, None, ["--optim.total_steps=0"])
    assert text == "command line --optim.total_steps=0: train.total_steps: expected an integer >= 1, got 0"


def test_old_and_new_key_in_one_file_is_an_error(tmp_path):
    path = write(tmp_path, "train:\n  total_steps: 3\noptim:\n  total_steps: 4\n")
    text = error_of(load_config, path, [])
    assert (
        text == f"{path}:4: optim.total_steps and train.total_steps are both set; keep only train.total_steps"
    )


def test_python_construction_with_an_old_key_names_the_new_key():
    text = error_of(TrainConfig.from_dict, {"optim": {"total_steps": 3}})
    assert text == "optim.total_steps: this key has moved to train.total_steps; set train.total_steps instead"


def test_the_resolved_config_is_written_with_the_new_keys(tmp_path):
    cfg = load_config(None, ["--optim.total_steps=9", f"--logging.run_dir={tmp_path / 'run'}"])
    written = (Path(cfg.save_resolved())).read_text()
    assert "\ntrain:\n  total_steps: 9\n" in written and "total_steps" not in written.split("\noptim:\n")[1]


# --------------------------------------------------------------------------------------------
# Equal rollout budget
# --------------------------------------------------------------------------------------------
def test_equal_budget_rule():
    assert equal_budget_group_size(8, 4) == 40  # G1 (1 + G2)
    assert equal_budget_group_size(8, 4, "wrong_only") == 40  # charged at its upper bound |S| = G1
    assert equal_budget_group_size(8, 4, "sample:2") == 16  # G1 + k G2
    assert equal_budget_group_size(8, 4, "sample:20") == 40  # k capped at G1
    assert equal_budget_group_size(8, 4, "all", 512, 256) == 24  # T2 = T1 / 2: half-length continuations
    assert equal_budget_group_size(3, 2, "all", 100, 150) == 3 + 9  # ceil(3 * 2 * 1.5) = 9
    assert "g2: expected an integer >= 1, got 0" in error_of(equal_budget_group_size, 8, 0)
    assert parse_selection("sample: 3") == ("sample", 3) and parse_selection("all") == ("all", None)


@pytest.mark.parametrize("selection, t1, t2", [("all", 512, None), ("sample:3", 300, 200), ("all", 7, 11)])
def test_grpo_gets_mgrpo_rollout_budget(selection, t1, t2):
    overrides = [
        f"--layer2.selection={selection}",
        f"--rollout.max_new_tokens={t1}",
        f"--layer2.max_new_tokens={'null' if t2 is None else t2}",
        "--layer1.mgrpo_group_size=6",
        "--layer2.group_size=3",
    ]
    mgrpo, grpo = load_config(None, overrides), load_config(None, overrides + ["--algo=grpo"])
    g1, g2, t2 = mgrpo.layer1.group_size, mgrpo.layer2.group_size, mgrpo.layer2.max_new_tokens
    k = mgrpo.layer2.selection_k
    selected = g1 if k is None else min(k, g1)
    mgrpo_tokens = g1 * t1 + selected * g2 * t2  # per question, at the max_new_tokens caps
    assert mgrpo_tokens <= grpo.layer1.group_size * t1 < mgrpo_tokens + t1
    assert grpo.layer2.enabled is False and mgrpo.layer2.enabled is True
    assert grpo.train.questions_per_step == mgrpo.train.questions_per_step
    explicit = load_config(None, overrides + ["--algo=grpo", "--layer1.group_size=5"])
    assert explicit.layer1.group_size == 5  # an explicit group size is used as given


# --------------------------------------------------------------------------------------------
# Resolved config: round-trip and atomic save
# --------------------------------------------------------------------------------------------
def test_resolved_is_idempotent_and_fills_placeholders():
    overrides = ["--algo=grpo", "--seed=4", "--logging.run_dir=runs/{algo}-s{seed}", "--model.path=m"]
    cfg = load_config(None, overrides)
    assert cfg.logging.run_dir == "runs/grpo-s4"
    assert cfg.checkpoint.dir == os.path.join("runs/grpo-s4", "checkpoints")
    assert cfg.model.ref_path == cfg.model.tokenizer_path == "m" and cfg.rollout.seed == 4
    assert cfg.resolved() == cfg


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["--algo=grpo"],
        [
            "--layer2.separator=\n---\n",
            "--data.system_prompt=1e3",
            "--rollout.stop=['yes', 'null', '#x', 'é']",
            "--optim.lr=3.5e-7",
            "--loss.delta=3",
            "--checkpoint.resume=runs/x/step_2",
            "--data.train_files=a.jsonl",
            "--reward.functions={'a.b:c': -0.25, 'f.py:g': 1e-3}",
            "--layer2.guiding_phrases=['Hmm: \"ok\"', ' x ']",
        ],
    ],
)
def test_round_trip(tmp_path, overrides):
    cfg = load_config(None, overrides)
    path = cfg.save_resolved(tmp_path / "run")
    assert path == os.path.join(tmp_path / "run", "config.yaml")
    assert load_config(path, []) == cfg
    assert load_config(path, [], resolve=False) == cfg
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    if len(overrides) > 1:  # strings YAML would read as numbers, booleans or null stay strings
        assert cfg.data.system_prompt == "1e3" and cfg.rollout.stop == ("yes", "null", "#x", "é")
        assert cfg.layer2.separator == "\n---\n" and cfg.layer2.guiding_phrases == ('Hmm: "ok"', " x ")


def test_save_is_atomic(tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg = load_config(None, [f"--logging.run_dir={run}"])
    assert cfg.save_resolved() == str(run / "config.yaml")
    assert sorted(os.listdir(run)) == ["config.yaml"]  # no temp file left behind
    before = (run / "config.yaml").read_text()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        load_config(None, [f"--logging.run_dir={run}", "--seed=9"]).save_resolved()
    assert sorted(os.listdir(run)) == ["config.yaml"] and (run / "config.yaml").read_text() == before


def test_rollout_backend_old_name_and_auto():
    import importlib.util

    from mgrpo_fast.config.loading import load_config

    assert load_config(None, ["--rollout.backend=hf_generate"]).rollout.backend == "hf"
    auto = load_config(None, []).resolved().rollout.backend
    assert auto == ("vllm" if importlib.util.find_spec("vllm") else "hf")
