"""Writing a tiny GGUF checkpoint (llama.cpp's format) in the test, from a transformers Llama and its
byte-level BPE tokenizer, with the ``gguf`` package: metadata, tokenizer (tokens, types, merges, chat
template) and weights, F32 or block-quantized (Q8_0, Q4_0, ...). Nothing is downloaded."""

from __future__ import annotations

import json

import numpy as np

_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}  # fmt: skip
_PER_LAYER = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}  # fmt: skip


def _rotary_interleave(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp keeps each head's q/k rows as interleaved rotary pairs (transformers' GGUF loader
    undoes exactly this): rows ``[x0..x(d/2-1), y0..]`` of a head become ``[x0, y0, x1, y1, ...]``."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def write_llama_gguf(path, model, tokenizer, quant: str = "F32") -> str:
    """Write ``model`` (a ``LlamaForCausalLM``, untied) and ``tokenizer`` (byte-level BPE) to ``path``;
    2-D weights in ``quant`` (a ``gguf.GGMLQuantizationType`` name), norms in F32."""
    import gguf

    c = model.config
    qtype = getattr(gguf.GGMLQuantizationType, quant)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(float((getattr(c, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    special = set(tokenizer.all_special_ids)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
    w.add_token_types([3 if i in special else 1 for i in range(len(tokenizer))])  # 3 = control
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)
    for key, tensor in model.state_dict().items():
        value = tensor.detach().float().numpy()
        if key in _GLOBAL:
            name = _GLOBAL[key]
        else:  # model.layers.{i}.{module}.weight
            _, _, i, *rest = key.split(".")
            module = ".".join(rest[:-1])
            name = f"blk.{i}.{_PER_LAYER[module]}.weight"
            heads = {"self_attn.q_proj": c.num_attention_heads, "self_attn.k_proj": c.num_key_value_heads}
            if module in heads:
                value = _rotary_interleave(value, heads[module])
        if value.ndim == 2 and quant != "F32":
            w.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, np.ascontiguousarray(value))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)
