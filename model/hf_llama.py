"""A plain-residual dense model as transformers' `LlamaForCausalLM`: config and weights.

The architectures agree term by term: RMSNorm before attention and before the feed-forward
(weight, `norm_eps`), multi-head attention without biases scaled by head_dim^-0.5, SwiGLU
(`gate_up` holds gate then up), a final RMSNorm and an untied or tied head. One difference:
our RoPE rotates interleaved channel pairs (2i, 2i+1), Llama's rotates halves (i, i + D/2), with
the same frequency for pair i. Permuting each head's query and key rows (even channels first,
then odd) turns one into the other, as Meta→HF conversion does; scores q·k are unchanged because
queries and keys are permuted alike, and values are not rotated.
"""
from __future__ import annotations

import torch

from model.transformer import ffn_hidden_size


def refusal(cfg) -> str | None:
    """Why `cfg` (ModelConfig) has no LlamaForCausalLM form, or None."""
    streams = cfg.residual != "residual" and cfg.n_streams > 1
    parts = [p for p, on in ((f"model.residual={cfg.residual}", streams),
                             (f"model.attention={cfg.attention}", cfg.attention != "dense"),
                             (f"model.ffn={cfg.ffn}", cfg.ffn != "dense")) if on]
    return f"{', '.join(parts)} has no LlamaForCausalLM form" if parts else None


def interleaved_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a query/key projection [H·D, in], each head's channels reordered (0, 2, 4, ...,
    1, 3, 5, ...): pair (2i, 2i+1) rotated together becomes (i, i + D/2)."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def llama_state_dict(state: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """Our state dict → LlamaForCausalLM's (MTP weights, which Llama has no place for, dropped)."""
    d, h = cfg.d_model, ffn_hidden_size(cfg.d_model, cfg.ffn_hidden)
    out = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["head.weight"]
    for i in range(cfg.n_layers):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = state[src + "attn.qkv.weight"].split(d, dim=0)
        gate, up = state[src + "ffn.gate_up.weight"].split(h, dim=0)
        out |= {
            dst + "input_layernorm.weight": state[src + "attn_norm.weight"],
            dst + "self_attn.q_proj.weight": interleaved_to_halves(q, cfg.n_heads),
            dst + "self_attn.k_proj.weight": interleaved_to_halves(k, cfg.n_heads),
            dst + "self_attn.v_proj.weight": v,
            dst + "self_attn.o_proj.weight": state[src + "attn.out.weight"],
            dst + "post_attention_layernorm.weight": state[src + "ffn_norm.weight"],
            dst + "mlp.gate_proj.weight": gate,
            dst + "mlp.up_proj.weight": up,
            dst + "mlp.down_proj.weight": state[src + "ffn.down.weight"],
        }
    return {k: v.contiguous().clone() for k, v in out.items()}


def llama_config(cfg, vocab_size: int, eos_id: int, dtype: str) -> dict:
    """config.json of the LlamaForCausalLM with our weights (transformers ≥ 4.4x reads it)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": ffn_hidden_size(cfg.d_model, cfg.ffn_hidden),
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_heads,
        "head_dim": cfg.d_model // cfg.n_heads, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
        "bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": None,
        "dtype": dtype, "torch_dtype": dtype, "use_cache": True,
    }
