"""Our V4 model in DeepSeek-V4's released format, which transformers' `DeepseekV4ForCausalLM` loads.

API (the export command, `python -m train.export --format hf`, is built on it):

- `hf_config(model) -> dict`: the `config.json` contents `DeepseekV4Config` accepts;
- `hf_state_dict(model) -> dict[str, Tensor]`: the weights under DeepSeek's checkpoint names
  (`embed.weight`, `layers.N.attn.wq_a.weight`, `layers.N.ffn.experts.E.w1.weight`, `hc_head_fn`,
  ...; transformers renames them on load), our MTP block under `mtp.0.*` (names as in DeepSeek's
  and torchtitan's checkpoints: `enorm`, `hnorm`, `e_proj`, `h_proj`, `norm`, `hc_head_*` and the
  block's own), which transformers' loader ignores;
- `save_hf_v4(model, cfg, out_dir, dtype=torch.float32) -> Path`: writes `config.json` and
  `model.safetensors` into out_dir (created if needed) and returns it. `cfg` is the run's Config
  or its ModelConfig; it must be the one `model` was built from.

`model` is a `model.transformer.Transformer` (unwrapped, its full parameters on this process).
Exportable: `model.attention=v4`, `model.ffn=moe` with `n_shared=1`, `model.residual=mhc` with
`n_streams > 1`, `model.attn.index_dim >= rope_dim`, `model.norm_eps` equal to the
hyper-connections' normalisation eps (1e-6); anything else is refused with a one-line reason.

What the export carries over as the model behaves now: CSA's top-k is `csa_topk` once the
indexers are sparse; during the indexer's dense warm-up it is every entry of `max_seq_len`, so the
exported model attends densely as ours does. Token ids have no special meaning here (byte-level
or the run's own tokenizer): `bos_token_id`, `eos_token_id` and `pad_token_id` are null, so
`generate` stops only at `max_new_tokens`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from model.attention import V4Attention, rope_base
from model.block import Block
from model.mhc import HyperConnection, StreamReduce
from model.moe import MoE

LAYER_TYPES = {"window": "sliding_attention", "csa": "compressed_sparse_attention", "hca": "heavily_compressed_attention"}


class NotExportable(ValueError):
    """The model has a part DeepSeek-V4's format cannot express."""


def _check(model) -> None:
    cfg = model.cfg
    problems = []
    if cfg.attention != "v4":
        problems.append(f"model.attention={cfg.attention!r} (needs v4)")
    if cfg.ffn != "moe":
        problems.append(f"model.ffn={cfg.ffn!r} (needs moe: every V4 layer is a MoE)")
    elif cfg.moe.n_shared != 1:
        problems.append(f"model.moe.n_shared={cfg.moe.n_shared} (needs 1: V4 has one shared expert)")
    if model.n_streams == 1 or cfg.residual != "mhc":
        problems.append(f"model.residual={cfg.residual!r} with {model.n_streams} stream(s) (needs mhc, n_streams > 1)")
    if cfg.attention == "v4" and not cfg.attn.q_head_norm:
        problems.append("model.attn.q_head_norm=false (V4 RMS-normalises every query head)")
    if cfg.attention == "v4" and cfg.attn.rope_dim == 0:
        problems.append("model.attn.rope_dim=0 (V4 rotates part of every head)")
    if cfg.attention == "v4" and cfg.attn.index_dim < cfg.attn.rope_dim:
        problems.append(f"model.attn.index_dim={cfg.attn.index_dim} < rope_dim={cfg.attn.rope_dim} "
                        "(V4 rotates rope_dim channels of the index heads)")
    hc_eps = {m.eps for m in model.modules() if isinstance(m, (HyperConnection, StreamReduce))}
    if hc_eps and hc_eps != {cfg.norm_eps}:
        problems.append(f"model.norm_eps={cfg.norm_eps} differs from the hyper-connections' {sorted(hc_eps)} "
                        "(V4 uses one rms_norm_eps for both)")
    if problems:
        raise NotExportable("cannot export to DeepSeek-V4's format: " + "; ".join(problems))


def hf_config(model) -> dict:
    """config.json for `DeepseekV4Config` (see the module docstring)."""
    _check(model)
    cfg, a, e = model.cfg, model.cfg.attn, model.cfg.moe
    indexers = model.indexers()
    sparse = all(m.sparse for m in indexers)
    theta, yarn = rope_base("csa", a, cfg.rope_theta, cfg.max_seq_len)
    partial = a.rope_dim / a.head_dim
    compress = {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": partial}
    if yarn is not None:  # V4 applies no YaRN attention scaling: attention_factor 1
        compress.update(rope_type="yarn", factor=yarn["factor"], original_max_position_embeddings=yarn["original_seq_len"],
                        beta_fast=yarn["beta_fast"], beta_slow=yarn["beta_slow"], attention_factor=1.0)
    return {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "vocab_size": model.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": 1,
        "head_dim": a.head_dim,
        "q_lora_rank": a.q_lora,
        "partial_rotary_factor": partial,
        "layer_types": [LAYER_TYPES[k] for k in model.kinds],
        "compress_rates": {LAYER_TYPES["csa"]: a.csa_ratio, LAYER_TYPES["hca"]: a.hca_ratio},
        "sliding_window": a.window,
        "o_groups": a.out_groups,
        "o_lora_rank": a.out_lora,
        "index_n_heads": a.index_heads,
        "index_head_dim": a.index_dim,
        "index_topk": a.csa_topk if sparse else max(a.csa_topk, cfg.max_seq_len // a.csa_ratio),
        "rope_theta": cfg.rope_theta,
        "compress_rope_theta": theta,
        "rope_parameters": {"main": {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": partial},
                            "compress": compress},
        "max_position_embeddings": cfg.max_seq_len,
        "hc_mult": model.n_streams,
        "hc_sinkhorn_iters": cfg.sinkhorn_iters,
        "hc_eps": _hc_eps(model),
        "rms_norm_eps": cfg.norm_eps,
        "moe_intermediate_size": e.expert_hidden,
        "n_routed_experts": e.n_experts,
        "num_experts_per_tok": e.top_k,
        "n_shared_experts": 1,
        "mlp_layer_types": ["hash_moe" if b.ffn.hashed else "moe" for b in model.blocks],
        "scoring_func": "sqrtsoftplus",
        "norm_topk_prob": True,
        "routed_scaling_factor": e.route_scale,
        "swiglu_limit": e.clamp,
        "num_nextn_predict_layers": 1 if model.mtp is not None else 0,
        "tie_word_embeddings": False,  # tied weights are written twice
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "hidden_act": "silu",
        "initializer_range": cfg.init_std,
    }


def _hc_eps(model) -> float:
    # Sinkhorn's denominators and the floor under pre (model/mhc.py); 1e-6 where the module has no attribute
    return next((float(m.hc_eps) for m in model.modules() if hasattr(m, "hc_eps")), 1e-6)


def _hc(prefix: str, hc: HyperConnection) -> dict[str, torch.Tensor]:
    # φ's rows are (pre, post, comb) and the biases follow V4's comb layout (model/mhc.py)
    return {f"{prefix}_fn": hc.phi.weight, f"{prefix}_scale": hc.alpha,
            f"{prefix}_base": torch.cat((hc.b_pre, hc.b_post, hc.b_res.flatten()))}


def _reduce(prefix: str, reduce: StreamReduce) -> dict[str, torch.Tensor]:
    return {f"{prefix}hc_head_fn": reduce.phi.weight, f"{prefix}hc_head_base": reduce.bias,
            f"{prefix}hc_head_scale": reduce.alpha}


def _compressor(prefix: str, comp) -> dict[str, torch.Tensor]:
    # pos_bias is [ratio, width] as V4's `ape` (overlap: [previous block's half | own block's half])
    return {f"{prefix}wkv.weight": comp.proj.weight, f"{prefix}wgate.weight": comp.gate.weight,
            f"{prefix}ape": comp.pos_bias, f"{prefix}norm.weight": comp.norm.weight}


def _attention(prefix: str, attn: V4Attention) -> dict[str, torch.Tensor]:
    out = {f"{prefix}wq_a.weight": attn.q_down.weight, f"{prefix}q_norm.weight": attn.q_norm.weight,
           f"{prefix}wq_b.weight": attn.q_up.weight, f"{prefix}wkv.weight": attn.kv.weight,
           f"{prefix}kv_norm.weight": attn.kv_norm.weight, f"{prefix}attn_sink": attn.sink,
           f"{prefix}wo_a.weight": attn.out_down.flatten(0, 1),  # [groups·rank, heads·head_dim / groups]
           f"{prefix}wo_b.weight": attn.out.weight}
    if attn.compressor is not None:
        out |= _compressor(f"{prefix}compressor.", attn.compressor)
    if attn.indexer is not None:
        ix = attn.indexer
        out |= {f"{prefix}indexer.wq_b.weight": ix.q.weight, f"{prefix}indexer.weights_proj.weight": ix.head_weights.weight}
        out |= _compressor(f"{prefix}indexer.compressor.", ix.keys)
    return out


def _moe(prefix: str, moe: MoE) -> dict[str, torch.Tensor]:
    h = moe.gate_up.size(1) // 2
    out = {f"{prefix}gate.weight": moe.router}
    out[f"{prefix}gate.tid2eid" if moe.hashed else f"{prefix}gate.bias"] = moe.hash_table if moe.hashed else moe.bias
    for i in range(moe.n_experts):  # gate_up rows: [gate (w1) | up (w3)]
        out |= {f"{prefix}experts.{i}.w1.weight": moe.gate_up[i, :h], f"{prefix}experts.{i}.w3.weight": moe.gate_up[i, h:],
                f"{prefix}experts.{i}.w2.weight": moe.down[i]}
    hs = moe.shared.gate_up.weight.size(0) // 2
    return out | {f"{prefix}shared_experts.w1.weight": moe.shared.gate_up.weight[:hs],
                  f"{prefix}shared_experts.w3.weight": moe.shared.gate_up.weight[hs:],
                  f"{prefix}shared_experts.w2.weight": moe.shared.down.weight}


def _block(prefix: str, block: Block) -> dict[str, torch.Tensor]:
    return (_hc(f"{prefix}hc_attn", block.attn_hc) | _hc(f"{prefix}hc_ffn", block.ffn_hc)
            | {f"{prefix}attn_norm.weight": block.attn_norm.weight, f"{prefix}ffn_norm.weight": block.ffn_norm.weight}
            | _attention(f"{prefix}attn.", block.attn) | _moe(f"{prefix}ffn.", block.ffn))


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """DeepSeek-V4 checkpoint names → tensors (detached copies, the model's dtypes)."""
    _check(model)
    out = {"embed.weight": model.embed.weight, "head.weight": model.head.weight, "norm.weight": model.norm.weight}
    out |= _reduce("", model.reduce)
    for i, block in enumerate(model.blocks):
        out |= _block(f"layers.{i}.", block)
    if model.mtp is not None:
        m = model.mtp
        out |= {"mtp.0.enorm.weight": m.embed_norm.weight, "mtp.0.hnorm.weight": m.hidden_norm.weight,
                "mtp.0.e_proj.weight": m.e_proj.weight, "mtp.0.h_proj.weight": m.h_proj.weight,
                "mtp.0.norm.weight": m.norm.weight}
        out |= _reduce("mtp.0.", m.reduce) | _block("mtp.0.", m.block)
    return {k: v.detach().clone() for k, v in out.items()}  # no shared storage (safetensors refuses it)


def save_hf_v4(model, cfg, out_dir, dtype: torch.dtype = torch.float32) -> Path:
    """config.json + model.safetensors in out_dir (see the module docstring); floating tensors in
    `dtype`, the hash routing table as int64. Returns out_dir."""
    from safetensors.torch import save_file

    model_cfg = getattr(cfg, "model", cfg)
    if model_cfg != model.cfg:
        raise ValueError("save_hf_v4: cfg is not the config the model was built from")
    config = hf_config(model) | {"dtype": str(dtype).removeprefix("torch.")}
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in hf_state_dict(model).items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    return out
