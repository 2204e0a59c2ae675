"""Our V4 against an implementation no one here wrote: transformers' `DeepseekV4ForCausalLM`
(pinned in the test extras) loads what model/hf_v4.py exports and must compute the same logits
(dense and sparse CSA, the same top-k entries, float32 and float64, before and after training)
and, through its own KV cache, generate what our full-sequence argmax predicts."""
import os

import pytest
import torch

from model import build_model
from model.hf_v4 import NotExportable, hf_config, save_hf_v4
from tests.conftest import compose_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
VOCAB = 64

# v4_tiny as it is, and a second shape where every count differs: 3 streams, 7 Sinkhorn
# iterations, CSA m = 3, HCA m = 8, 2 hash layers, top-3 of 6 experts, its own RoPE bases and YaRN.
SHAPES = {
    "v4_tiny": ["model=v4_tiny"],
    "other": ["model=v4_tiny", "model.d_model=48", "model.n_layers=5", "model.n_heads=4", "model.n_streams=3",
              "model.sinkhorn_iters=7", "model.max_seq_len=96", "model.rope_theta=5000",
              "model.attn.layers=[window,csa,hca,csa,hca]", "model.attn.window=16", "model.attn.head_dim=16",
              "model.attn.rope_dim=8", "model.attn.q_lora=24", "model.attn.out_groups=2", "model.attn.out_lora=12",
              "model.attn.csa_ratio=3", "model.attn.csa_topk=5", "model.attn.hca_ratio=8", "model.attn.index_heads=3",
              "model.attn.index_dim=8", "model.attn.compress_rope_theta=50000", "model.attn.yarn_factor=4",
              "model.moe.n_experts=6", "model.moe.top_k=3", "model.moe.expert_hidden=24", "model.moe.hash_layers=2"],
}
# below the window, and above it at a length that is no multiple of any compression ratio
LENGTHS = {"v4_tiny": (37, 150), "other": (13, 61)}


def random_model(shape: str, sparse: bool, seed: int = 0):
    """Our model with every parameter and selection bias away from its initial value (sinks,
    position biases, gates and norms start at constants that would hide mistakes)."""
    cfg = compose_config(SHAPES[shape]).model
    torch.manual_seed(seed)
    model = build_model(cfg, VOCAB)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() < 2 or "pos_bias" in name or "b_res" in name:
                p.add_(0.3 * torch.randn_like(p))
        for m in model.modules():
            if m.__class__.__name__ == "MoE":
                m.bias.normal_(0, 0.05)
    model.on_step_start(10**6 if sparse else 0, lr_decaying=False)
    return model.eval()


def load_hf(model, path, dtype):
    save_hf_v4(model, model.cfg, path, dtype)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, experts_implementation="eager", output_loading_info=True)
    # every weight it has came from the file, and only the MTP block's were left out
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    return hf.eval()


def logits_of(model, hf, ids):
    with torch.no_grad():
        return model(ids), hf(ids).logits


def tie_decided(scores, visible, index, valid, picked) -> int:
    """Assert our picks (index, valid [B, T, k]) are transformers' (picked [B, T, k], -1 = none)
    except among entries tied at the k-th score, and count the queries where such a tie decided.
    At a tie (entries whose every index head is ReLU-zero score exactly 0) torch.topk, which
    transformers and DeepSeek's code call, has no defined order (its pick depends on the row's
    length); ours is the earliest entry (model/indexer.py select_topk), so that a decoding cache
    picks what the full sequence picks (tests/test_sample.py)."""
    masked = scores.masked_fill(~visible, float("-inf"))
    decided = 0
    for b in range(index.size(0)):
        for q in range(index.size(1)):
            mine = set(index[b, q][valid[b, q]].tolist())
            theirs = set(picked[b, q][picked[b, q] >= 0].tolist())
            assert len(mine) == len(theirs), f"query {q}: {len(mine)} picks, transformers {len(theirs)}"
            if mine != theirs:
                kth = masked[b, q, sorted(mine)].min()
                assert all(masked[b, q, i] == kth for i in mine ^ theirs), (
                    f"query {q}: picks {sorted(mine - theirs)} against transformers' {sorted(theirs - mine)}, "
                    f"not a tie at the k-th score {kth.item():.3g}")
                decided += 1
    return decided


def logits_with_their_picks(model, hf, ids, monkeypatch):
    """Logits of both, ours computed with the entries transformers selected in each CSA layer
    (after checking that ours are the same up to ties), so one tie decided differently does not
    change every later layer's input; the number of queries where a tie decided."""
    import model.attention as attention

    picks = []
    hooks = [m.register_forward_hook(lambda mod, args, out: picks.append(out))
             for m in hf.modules() if type(m).__name__ == "DeepseekV4Indexer"]
    with torch.no_grad():
        theirs = hf(ids).logits
    for h in hooks:
        h.remove()
    pending, decided, select = iter(picks), [], attention.select_topk

    def their_picks(index, n_visible, k):
        picked = next(pending)
        scores = index if isinstance(index, torch.Tensor) else index.scores()  # [B, T, N]
        visible = torch.arange(scores.size(-1)) < n_visible[:, None]  # [T, N]
        decided.append(tie_decided(scores, visible, *select(index, n_visible, k), picked))
        return picked.clamp(min=0), picked >= 0

    with monkeypatch.context() as m, torch.no_grad():
        m.setattr(attention, "select_topk", their_picks)
        ours = model(ids)
    assert len(decided) == model.kinds.count("csa")  # every CSA layer selected
    return ours, theirs, sum(decided)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-6)], ids=["fp32", "fp64"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_logits_equal_transformers(shape, sparse, dtype, tol, tmp_path, monkeypatch):
    """float64: transformers still normalises, rotates and mixes streams in float32, so 1e-6.
    Sparse: the same entries selected up to the order of tied index scores (see tie_decided);
    v4_tiny at T=150 has such ties, where the selections legitimately differ (max |Δlogit| 6e-2
    when each model keeps its own picks, 4e-7 with the same picks)."""
    model = random_model(shape, sparse).to(dtype)
    hf = load_hf(model, tmp_path, dtype)
    for t in LENGTHS[shape]:
        ids = torch.randint(0, VOCAB, (2, t), generator=torch.Generator().manual_seed(t))
        if sparse:
            ours, theirs, _ = logits_with_their_picks(model, hf, ids, monkeypatch)
        else:
            ours, theirs = logits_of(model, hf, ids)
        assert ours.dtype == theirs.dtype == dtype and ours.abs().max() > 0.3
        err = (ours - theirs).abs().max().item()
        assert err < tol, f"T={t}: max |Δlogit| = {err:.2e}"


@pytest.mark.parametrize("shape", list(SHAPES))
def test_sparse_attention_selects_the_same_entries(shape, tmp_path, monkeypatch):
    model = random_model(shape, sparse=True)
    hf = load_hf(model, tmp_path, torch.float32)
    t = LENGTHS[shape][1]
    fewer = []
    import model.attention as attention

    select = attention.select_topk
    monkeypatch.setattr(attention, "select_topk", lambda s, n, k: fewer.append((n > k).sum()) or select(s, n, k))
    logits_with_their_picks(model, hf, torch.randint(0, VOCAB, (2, t), generator=torch.Generator().manual_seed(1)),
                            monkeypatch)
    assert sum(fewer) > 0  # top-k left visible entries out: the selection mattered


def test_logits_equal_after_training_steps(tmp_path, monkeypatch):
    """Trained weights (every parameter moved, MoE biases updated by their balancing rule)."""
    model = random_model("v4_tiny", sparse=True).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        ids = torch.randint(0, VOCAB, (4, 65), generator=gen)
        model(ids[:, :-1], ids[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
        model.on_step_end()
    model.eval()
    hf = load_hf(model, tmp_path, torch.float32)
    ours, theirs, _ = logits_with_their_picks(model, hf, torch.randint(0, VOCAB, (2, 150), generator=gen), monkeypatch)
    assert (ours - theirs).abs().max().item() < 1e-5


def test_greedy_generation_through_its_cache_is_our_argmax(tmp_path):
    """32 tokens past a 40-token prompt cross the window (64) and many compression blocks; at each
    step transformers decodes from its cache (window, compressor buffers, overlap state)."""
    model = random_model("v4_tiny", sparse=True)
    hf = load_hf(model, tmp_path, torch.float32)
    prompt = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = hf.generate(prompt, max_new_tokens=32, do_sample=False)
        ours = model(out)
    assert out.shape == (1, 72)
    assert torch.equal(ours[0, 39:-1].argmax(-1), out[0, 40:])


@pytest.mark.parametrize("override,words", [
    ("model.residual=residual", "model.residual='residual'"), ("model.moe.n_shared=2", "n_shared=2"),
    # transformers' V4 always normalises query heads and rotates rope_dim channels: exported, these
    # computed other logits (q_head_norm=false: up to 0.31 off) or crashed in transformers (rope_dim=0)
    ("model.attn.q_head_norm=false", "q_head_norm=false"), ("model.attn.rope_dim=0", "rope_dim=0"),
    # transformers rotates rope_dim channels of every index head: narrower ones crash its forward
    ("model.attn.index_dim=8", "index_dim=8")])
def test_export_refuses_what_v4_cannot_express(override, words):
    cfg = compose_config(["model=v4_tiny", override]).model
    with pytest.raises(NotExportable, match=words):
        hf_config(build_model(cfg, VOCAB))


def test_save_refuses_a_config_the_model_was_not_built_from(tmp_path):
    """save_hf_v4 writes config.json from the model and its cfg: another cfg (a run's config.yaml
    edited since) is refused before anything is written."""
    model = build_model(compose_config(["model=v4_tiny"]).model, VOCAB)
    other = compose_config(["model=v4_tiny", "model.attn.csa_topk=2"])
    with pytest.raises(ValueError, match="not the config the model was built from"):
        save_hf_v4(model, other, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert save_hf_v4(model, compose_config(["model=v4_tiny"]), tmp_path / "out") == tmp_path / "out"


@pytest.mark.parametrize("original", [65536, 4096, 777])
def test_yarn_frequencies_equal_transformers(original):
    """V4's YaRN at its real values (rope_dim 64, θ 160000, factor 16, β 32/1, an original context of
    64K): the ramp starts past pair 0, where tests at small contexts (it clamps to 0 there) cannot
    tell floor from ceil. Against transformers' own YaRN frequencies, the ones the export configures."""
    from transformers import PretrainedConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from model.layers import yarn_inv_freq

    theta, dim = 160000.0, 64
    config = PretrainedConfig()
    config.hidden_size, config.num_attention_heads, config.head_dim, config.max_position_embeddings = 512, 1, 512, 1 << 20
    config.rope_parameters = {"rope_type": "yarn", "rope_theta": theta, "partial_rotary_factor": dim / 512,
                              "factor": 16.0, "original_max_position_embeddings": original,
                              "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": 1.0}
    theirs, scale = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    base = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    ours = yarn_inv_freq(base, dim, theta, 16.0, original, 32.0, 1.0)
    assert scale == 1.0
    torch.testing.assert_close(ours, theirs.double(), rtol=1e-6, atol=0)
    assert not torch.equal(ours, base / 16) and not torch.equal(ours, base)


def test_the_mtp_block_and_hash_table_are_exported_as_deepseek_names_them(tmp_path):
    """transformers' V4 reads no MTP weights, so its logits cannot check them: the exported mtp.0.*
    tensors, used as DeepSeek's MTP uses them (h_proj(hnorm(h)) + e_proj(enorm(emb))), give our
    MTP block's input; the config counts the block; the hash routing table stays int64 in a bf16
    export."""
    from safetensors.torch import load_file

    from model.hf_v4 import hf_state_dict

    model = random_model("v4_tiny", sparse=False)
    cfg = model.cfg
    assert hf_config(model)["num_nextn_predict_layers"] == 1
    assert hf_config(build_model(compose_config(["model=v4_tiny", "model.mtp_depth=0"]).model, VOCAB))[
        "num_nextn_predict_layers"] == 0
    sd = hf_state_dict(model)
    g = torch.Generator().manual_seed(5)
    hidden, emb = torch.randn(1, 5, cfg.n_streams, cfg.d_model, generator=g), torch.randn(1, 5, cfg.d_model, generator=g)
    seen = {}
    model.mtp.block.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    with torch.no_grad():
        model.mtp(hidden, emb, torch.zeros(1, 5, dtype=torch.long), model.rope_cos, model.rope_sin)

    def rms(v, w):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w
    expected = (rms(hidden, sd["mtp.0.hnorm.weight"]) @ sd["mtp.0.h_proj.weight"].T
                + (rms(emb, sd["mtp.0.enorm.weight"]) @ sd["mtp.0.e_proj.weight"].T).unsqueeze(-2))
    torch.testing.assert_close(seen["x"], expected, rtol=1e-5, atol=1e-6)
    save_hf_v4(model, compose_config(SHAPES["v4_tiny"]).model, tmp_path, torch.bfloat16)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    table = tensors["layers.0.ffn.gate.tid2eid"]
    assert table.dtype == torch.int64 and torch.equal(table, model.blocks[0].ffn.hash_table)
    assert tensors["layers.0.ffn.experts.0.w1.weight"].dtype == torch.bfloat16

