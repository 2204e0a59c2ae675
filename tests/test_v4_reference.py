"""V4 parts transformers has no counterpart for, against plain float64 references written from
the formulas (tests/reference/): the lightning indexer's KL training signal (with the whole CSA
layer it needs: query norm, overlapping compressors, per-layer RoPE with YaRN, index scaling),
the max-logit probe over window, entries and sink, and the MTP loss on the stream state."""
import pytest
import torch

from model import build_model
from tests.conftest import compose_config
from tests.reference import indexer_kl, mtp
from tests.test_v4 import D, H, attention


def reference_weights(attn) -> dict:
    c, ix = attn.compressor, attn.indexer
    return {"wq_a": attn.q_down.weight, "q_norm": attn.q_norm.weight, "wq_b": attn.q_up.weight,
            "wkv": attn.kv.weight, "kv_norm": attn.kv_norm.weight, "sink": attn.sink,
            "comp_wkv": c.proj.weight, "comp_wgate": c.gate.weight, "comp_ape": c.pos_bias, "comp_norm": c.norm.weight,
            "idx_wkv": ix.keys.proj.weight, "idx_wgate": ix.keys.gate.weight, "idx_ape": ix.keys.pos_bias,
            "idx_norm": ix.keys.norm.weight, "idx_wq_b": ix.q.weight, "idx_weights": ix.head_weights.weight}


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("ratio", [2, 3])
@pytest.mark.parametrize("index_dim", [4, 2], ids=["index4", "index2"])  # 2 < rope_dim: the index heads' RoPE is narrower
def test_indexer_kl_and_max_logits_match_the_reference(ratio, sparse, index_dim):
    # 6 index heads: an entry scores exactly 0 (every ReLU at 0) rarely enough that no top-k boundary ties
    attn = attention("csa", ratio=ratio, window=5, topk=2, sparse=sparse, index_heads=6, index_dim=index_dim).train()
    attn.track_max_logits = True
    attn.kl_weight = 0.5  # model.attn.indexer_kl_weight: it scales the loss
    with torch.no_grad():
        attn.sink[0] = 8.0  # head 0's largest logit is its sink: the probe must see it
    x = torch.randn(2, 17, D, dtype=torch.float64, generator=torch.Generator().manual_seed(ratio))
    attn(x)
    # AttentionConfig's V4 defaults at max_seq_len 64: base 160000, YaRN x16 over 64 / 16 tokens
    theta, yarn = 160000.0, {"factor": 16.0, "original_seq_len": 4, "beta_fast": 32.0, "beta_slow": 1.0}
    ref = indexer_kl.csa_layer(x.detach(), reference_weights(attn), heads=H, head_dim=8, rope_dim=4, window=5,
                               ratio=ratio, index_heads=6, index_dim=index_dim, topk=2 if sparse else None, eps=1e-6,
                               theta=theta, yarn=yarn)
    assert ref["kl"] > 1e-3 and ref["ties"] == 0
    if sparse:  # the top-k left some visible entries out
        assert any(len(a) < (t + 1) // ratio for a, t in zip(ref["allowed"], [*range(17)] * 2))
    # float64 throughout except our RoPE tables, float32 buffers: agreement to ~1e-8
    torch.testing.assert_close(attn.aux_loss, 0.5 * torch.tensor(ref["kl"], dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(attn.max_logits, ref["max_logits"], rtol=1e-6, atol=0)


def test_mtp_loss_matches_the_reference():
    cfg = compose_config(["model=v4_tiny", "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
                          "model.fused_hc=false"]).model
    torch.manual_seed(0)
    model = build_model(cfg, 64).double().train()
    with torch.no_grad():  # norms, gates and biases away from their constant initial values
        for p in model.mtp.parameters():
            if p.dim() < 2:
                p.add_(0.3 * torch.randn_like(p))
    # A young trunk's streams are nearly equal (1e-4 apart), which would hide an MTP that reduced
    # them first: make them differ, as they do after training.
    noise = torch.Generator().manual_seed(2)
    model.blocks[-1].register_forward_hook(
        lambda mod, args, out: out + 0.5 * torch.randn(out.shape, generator=noise, dtype=out.dtype))
    seen = {}
    model.reduce.register_forward_hook(lambda mod, args, out: seen.update(trunk=args[0]))
    tokens = torch.randint(0, 64, (1, 21), generator=torch.Generator().manual_seed(1))
    model(tokens[:, :-1], tokens[:, 1:])
    ours = model.loss_sums["mtp"]
    m = model.mtp
    weights = {"embed": model.embed.weight, "head": model.head.weight, "enorm": m.embed_norm.weight,
               "hnorm": m.hidden_norm.weight, "norm": m.norm.weight, "e_proj": m.e_proj.weight,
               "h_proj": m.h_proj.weight, "hc_fn": m.reduce.phi.weight, "hc_base": m.reduce.bias,
               "hc_scale": m.reduce.alpha}
    block = lambda s, ids: m.block(s, model.rope_cos, model.rope_sin, ids)  # noqa: E731
    with torch.no_grad():
        ref = mtp.mtp_loss(seen["trunk"][0].detach(), tokens[0], weights, block, eps=cfg.norm_eps,
                           hc_eps=getattr(m.reduce, "hc_eps", 0.0))
    assert ref > 1.0 and (seen["trunk"][..., 0, :] - seen["trunk"][..., 1, :]).abs().max() > 0.1  # streams differ
    assert abs(float(ours) - ref) < 1e-6 * ref  # ours is kept in float32 for the metrics
