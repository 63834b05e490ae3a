"""BPE-safe completions: with a byte-level BPE tokenizer (real merges, trained in ``conftest``) the HF
rollout decodes every completion whole before the answer is extracted, so numbers, ``\\boxed{}`` and
multi-byte characters that span several tokens come out right; completions end at any of the model's
stop tokens (here the chat template's ``<|eot|>``, which is not the tokenizer's EOS).

The model is a tiny Llama whose forward is scripted: at generation step ``t`` it puts all its mass on
``script[t]``, so the test knows the exact token ids a real BPE model would emit."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from conftest import bpe_tokenizer  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from mgrpo_fast.data.answers import extract_answer  # noqa: E402
from mgrpo_fast.data.problems import Problem  # noqa: E402
from mgrpo_fast.rl.layers import rollout_layer1, score_layer1  # noqa: E402
from mgrpo_fast.rl.rollout.base import SamplingParams  # noqa: E402
from mgrpo_fast.rl.rollout.hf import HFGenerateBackend  # noqa: E402
from mgrpo_fast.rl.scorer import RewardScorer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

LLAMA3_LIKE = (  # the template closes a turn with <|eot|> (id 3); the tokenizer's EOS is <|im_end|> (2)
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|eot|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ScriptedLlama(LlamaForCausalLM):
    """Emits ``self.script`` token by token, whatever the prompt (greedy decoding picks the argmax)."""

    script: list[int] = []
    prompt_width: int = 0

    def forward(self, *args, attention_mask=None, **kwargs):
        out = super().forward(*args, attention_mask=attention_mask, **kwargs)
        step = attention_mask.shape[1] - self.prompt_width  # tokens generated so far
        forced = torch.full_like(out.logits[:, -1], -1e4)
        forced[:, self.script[min(step, len(self.script) - 1)]] = 1e4
        out.logits[:, -1] = forced
        return out


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer(LLAMA3_LIKE)


def scripted_backend(tokenizer, text: str, *, end: list[int], prompt: list[int]):
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
    )  # fmt: skip
    model = ScriptedLlama(config).eval()
    model.script = tokenizer(text, add_special_tokens=False)["input_ids"] + end
    model.prompt_width = len(prompt)
    return HFGenerateBackend(model, tokenizer), model.script


def test_answers_spanning_tokens_are_extracted_from_the_whole_decoding(tokenizer):
    problem = Problem(id="0", question="Mia has 7 apples and buys 12. How many?", answer="19")
    prompt = rollout_layer1([problem], tokenizer, _NoBackend(), SamplingParams(), 1, 0).prompt_ids[0]
    text = "Natürlich 😀: 7 + 12 = 19, so \\boxed{19}"
    backend, script = scripted_backend(tokenizer, text, end=[3, 5, 6], prompt=prompt)
    pieces = [tokenizer.decode([t]) for t in script[:-3]]
    assert "".join(pieces) != text and any("\ufffd" in p for p in pieces)  # per-token decoding breaks it
    assert any(len(p.strip()) > 1 and p.strip().isdigit() for p in pieces)  # "19" is one merged token
    assert 3 in backend.eos_token_ids and 2 in backend.eos_token_ids  # <|eot|> from the chat template

    r1 = rollout_layer1([problem], tokenizer, backend, SamplingParams(temperature=0, max_new_tokens=40), 1, 0)
    (c,) = r1.completions
    assert c.finish_reason == "eos" and c.token_ids == script[:-2]  # stopped at <|eot|>, kept
    assert c.text == text and extract_answer(c.text) == "19"
    scores = score_layer1(r1, RewardScorer([("mgrpo_fast.rl.rewards:correctness_reward", 1.0)], None, 0))
    assert bool(scores.correct[0, 0]) and float(scores.rewards[0, 0]) == 1.0


def test_stop_string_inside_a_merged_token_keeps_the_text_whole(tokenizer):
    prompt = tokenizer("Q: 30 - 12?", add_special_tokens=False)["input_ids"]
    text = "30 - 12 = 18 😀 The answer is 18. So 7 + 12 = 19 apples."
    backend, _ = scripted_backend(tokenizer, text, end=[5], prompt=prompt)
    params = SamplingParams(temperature=0, max_new_tokens=60, stop=("answer is 1",))
    (c,) = backend.generate([prompt], num_samples=1, params=params, seed=0)
    # the token that completes the stop string also carries the "8": kept, so ids and text agree
    assert c.finish_reason == "stop" and c.text == "30 - 12 = 18 😀 The answer is 18"
    assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
    assert extract_answer(c.text) == "18"


class _NoBackend:
    """Only the prompt ids of ``rollout_layer1`` are wanted: one empty completion per sample."""

    def generate(self, prompts, *, num_samples, params, seed):
        from mgrpo_fast.rl.rollout.base import Completion

        return [Completion(p, s, [], "", "length") for p in range(len(prompts)) for s in range(num_samples)]
