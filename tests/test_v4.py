"""V4's architecture: attention (window, CSA, HCA), compressor, indexer, MoE, MTP, and the
V4-tiny preset training end to end."""
from dataclasses import replace

import pytest
import torch

from model.attention import SoftmaxOverParts, V4Attention, layer_kinds, window_mask
import model.indexer as indexer_module
from model.compressor import Compressor, visible_entries
from model.indexer import kl_to_attention, select_topk
from model.layers import clamped_swiglu
from model.moe import MoE
from optim.params import classify_parameters
from tests.conftest import V4_RUN, compose_config, metrics_rows
from train.config import AttentionConfig, MoEConfig
from train.trainer import Trainer

D, H = 16, 2


def attention(kind, ratio=4, window=5, topk=3, sparse=False, index_heads=2, index_dim=4):
    cfg = AttentionConfig(window=window, head_dim=8, rope_dim=4, q_lora=8, out_groups=2, out_lora=4,
                          csa_ratio=ratio, csa_topk=topk, hca_ratio=ratio, index_heads=index_heads, index_dim=index_dim)
    torch.manual_seed(0)
    attn = V4Attention(D, H, cfg, kind, max_seq_len=64, eps=1e-6).double()
    for p in attn.parameters():  # away from the zero init of sinks and position biases
        torch.nn.init.normal_(p, std=0.3)
    attn.sparse = sparse
    return attn


CASES = [("window", 1, False)] + [(k, r, s) for r in (2, 3, 4) for k, s in (("csa", False), ("csa", True), ("hca", False))]


@pytest.mark.parametrize("kind,ratio,sparse", CASES, ids=[f"{k}-m{r}{'-sparse' if s else ''}" for k, r, s in CASES])
def test_no_position_sees_the_future(kind, ratio, sparse):
    """d out[t] / d x[s] is exactly zero for every s > t (chunk edges and partial blocks included)."""
    attn = attention(kind, ratio, sparse=sparse).eval()
    x = torch.randn(1, 23, D, dtype=torch.float64, requires_grad=True)
    out = attn(x)
    for t in range(23):
        (grad,) = torch.autograd.grad(out[0, t].sum(), x, retain_graph=True)
        assert torch.all(grad[0, t + 1:] == 0), f"position {t} depends on a later token"
        assert grad[0, t].abs().sum() > 0


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("ratio", [1, 2, 3, 4])
def test_entry_visibility_is_the_brute_force_rule(ratio, overlap):
    """An entry is visible to query t exactly when every token it pools (found by differentiating
    the compressor) is at or before t."""
    torch.manual_seed(0)
    comp = Compressor(D, 8, ratio, overlap, rope_dim=0, eps=1e-6).double()
    T = 13
    x = torch.randn(1, T, D, dtype=torch.float64, requires_grad=True)
    entries = comp(x, None, None)
    reads = []
    for i in range(entries.size(1)):
        (grad,) = torch.autograd.grad(entries[0, i].sum(), x, retain_graph=True)
        reads.append({p for p in range(T) if grad[0, p].abs().sum() > 0})
    assert reads == [{p for p in row.tolist() if p >= 0} for row in comp.pooled_positions(len(reads))]
    brute = torch.tensor([[max(r) <= t for r in reads] for t in range(T)]).reshape(T, len(reads))
    assert torch.equal(visible_entries(T, ratio), brute)


@pytest.mark.parametrize("t,w,chunk", [(10, 3, 3), (12, 4, 4), (5, 8, 8), (12, 4, 2), (13, 8, 4), (9, 6, 3)])
def test_window_mask_is_the_brute_force_window(t, w, chunk):
    mask = window_mask(t, w, chunk=chunk)
    assert mask.shape == (-(-t // chunk), chunk, w + chunk)
    for first in range(mask.size(0)):  # a query chunk's rows alone
        for count in range(1, mask.size(0) - first + 1):
            assert torch.equal(window_mask(t, w, first=first, count=count, chunk=chunk), mask[first:first + count])
    for c in range(mask.size(0)):
        for r in range(chunk):
            for j in range(w + chunk):
                q, k = c * chunk + r, c * chunk - w + j
                assert mask[c, r, j] == (0 <= k <= q < k + w)


def test_softmax_over_parts_is_one_masked_softmax_forward_and_backward():
    """The parted softmax (own backward) against autograd through the plain formulation: cat,
    mask, softmax, slice; fp64, every input's gradient, a part whose mask hides a whole row."""
    g = torch.Generator().manual_seed(0)
    b, n, h = 2, 5, 3
    win = torch.randn(b, n, h, 6, generator=g, dtype=torch.float64, requires_grad=True)
    comp = torch.randn(b, n, h, 4, generator=g, dtype=torch.float64, requires_grad=True)
    sink = torch.randn(1, 1, h, 1, generator=g, dtype=torch.float64, requires_grad=True)
    hide_win = torch.rand(n, 1, 6, generator=g) < 0.4
    hide_comp = torch.rand(b, n, 1, 4, generator=g) < 0.5
    hide_comp[0, 1] = True
    weights = [torch.randn(b, n, h, k, generator=g, dtype=torch.float64) for k in (6, 4)]

    def reference():
        logits = torch.cat((win.masked_fill(hide_win, float("-inf")), comp.masked_fill(hide_comp, float("-inf")),
                            sink.expand(b, n, h, 1)), -1)
        probs = torch.softmax(logits, -1)
        return [probs[..., :6], probs[..., 6:10]], logits.amax((0, 1, 3))

    for track in (True, False):
        *probs, max_logits = SoftmaxOverParts.apply(sink, track, win, comp, hide_win, hide_comp)
        expected, expected_max = reference()
        for got, want in zip(probs, expected):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
        assert torch.equal(max_logits, expected_max) if track else max_logits.numel() == 0
    for used in ([0, 1], [0], [1]):  # a part whose probabilities go unused gets its share too
        *probs, _ = SoftmaxOverParts.apply(sink, False, win, comp, hide_win, hide_comp)
        expected, _ = reference()
        grads = torch.autograd.grad(sum((probs[i] * weights[i]).sum() for i in used), (win, comp, sink))
        want = torch.autograd.grad(sum((expected[i] * weights[i]).sum() for i in used), (win, comp, sink))
        for a, e in zip(grads, want):
            torch.testing.assert_close(a, e, rtol=0, atol=1e-14)
    with pytest.raises(RuntimeError, match="no double backward"):  # rather than a silently partial one
        torch.autograd.grad(probs[0].square().sum(), win, create_graph=True)


@pytest.mark.parametrize("sorting", [False, True], ids=["cpu", "sorting"])
def test_indexer_topk_is_the_brute_force_ranking(sorting, monkeypatch):
    monkeypatch.setattr(indexer_module, "_sorts_every_row", lambda device: sorting)
    torch.manual_seed(0)
    scores = torch.randn(2, 12, 6)
    visible = visible_entries(12, 2)
    before = scores.clone()
    index, valid = select_topk(scores, visible.sum(-1), k=3)
    assert torch.equal(scores, before)  # the caller's scores are not masked in place
    for b in range(2):
        for t in range(12):
            ranked = sorted((i for i in range(6) if visible[t, i]), key=lambda i: -scores[b, t, i].item())[:3]
            assert sorted(index[b, t][valid[b, t]].tolist()) == sorted(ranked)


@pytest.mark.parametrize("mode", ["eager", "compiled", "sorting"])
def test_indexer_ties_go_to_the_earliest_entry_whatever_the_row_length(mode, monkeypatch):
    """Entries tied at the k-th score (ReLU-zero index heads: exactly 0) are picked earliest first,
    and rows with more not-yet-visible entries pick the same: a decoding cache, which holds only
    the entries made so far, then selects what the full sequence selects. torch.topk does not.
    Compiled (fullgraph: no graph break) and off the CPU (`sorting`), the selection sorts every
    row instead: the same picks."""
    compiled = mode == "compiled"
    if mode == "sorting":
        monkeypatch.setattr(indexer_module, "_sorts_every_row", lambda device: True)
    select = torch.compile(select_topk, fullgraph=True, dynamic=False) if compiled else select_topk
    scores = torch.tensor([[0.0, 0.5, 0.0, 0.0, 0.2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0] + [0.0] * 30])
    for n in (42,) if compiled else (12, 20, 42):  # compiled: one shape, one compilation
        index, valid = select(scores[None, :, :n], torch.tensor([12]), k=5)
        assert index[0, 0].tolist() == [1, 4, 0, 2, 3] and valid.all()
    early, valid = select(scores[None], torch.tensor([3]), k=5)  # 3 entries visible: 2 picks are not
    assert early[0, 0, :3].tolist() == [1, 0, 2] and valid[0, 0].tolist() == [True] * 3 + [False] * 2


def test_sparse_with_k_at_least_all_entries_equals_dense():
    x = torch.randn(2, 23, D, dtype=torch.float64)
    dense = attention("csa", ratio=2, topk=100, sparse=False).eval()(x)
    sparse = attention("csa", ratio=2, topk=100, sparse=True).eval()(x)
    torch.testing.assert_close(sparse, dense, rtol=0, atol=1e-12)
    fewer = attention("csa", ratio=2, topk=2, sparse=True).eval()(x)
    assert not torch.allclose(fewer, dense)  # so the comparison above can tell


def test_indexer_learns_from_its_kl_only_and_goes_sparse_after_warm_up():
    """The KL reaches the indexer's parameters and nothing else; the LM path never reaches them."""
    from model import build_model

    attn = attention("csa", ratio=2, sparse=False).train()
    out = attn(torch.randn(2, 16, D, dtype=torch.float64))
    kl = attn.aux_loss
    indexer = {id(p) for p in attn.indexer.parameters()}
    for p in attn.parameters():
        (g,) = torch.autograd.grad(kl, p, retain_graph=True, allow_unused=True)
        assert (g is not None and g.abs().sum() > 0) == (id(p) in indexer)
        (g,) = torch.autograd.grad(out.sum(), p, retain_graph=True, allow_unused=True)
        assert g is None or id(p) not in indexer  # sparse=False: the indexer selects nothing yet

    model = build_model(compose_config(["model=v4_tiny", "model.attn.indexer_warmup_steps=7"]).model, 256)
    csa = [m for m in model.modules() if isinstance(m, V4Attention) and m.kind == "csa"]
    model.on_step_start(6, lr_decaying=False)
    assert not any(m.sparse for m in csa) and model.mtp_weight == 0.3
    model.on_step_start(7, lr_decaying=True)
    assert all(m.sparse for m in csa) and model.mtp_weight == 0.1


def test_indexer_kl_target_and_direction():
    target = torch.tensor([[[0.5, 0.5, 0.0]]])
    allowed = torch.tensor([[[True, True, False]]])
    assert kl_to_attention(torch.tensor([[[0.0, 0.0, 9.0]]]), target, allowed) < 1e-6  # masked entry ignored
    assert kl_to_attention(torch.tensor([[[3.0, 0.0, 0.0]]]), target, allowed) > 0.5


def moe(**overrides):
    torch.manual_seed(0)
    m = MoE(D, replace(MoEConfig(n_experts=4, top_k=2, n_shared=1, expert_hidden=8, hash_layers=0), **overrides),
            layer=0, vocab_size=32)
    m.init_weights(0.5, 1.0)
    return m


def expert(m, e, x):
    return clamped_swiglu(*(x @ m.gate_up[e].t()).chunk(2, dim=-1), m.clamp) @ m.down[e].t()


def test_moe_output_is_the_explicit_sum_over_selected_experts():
    m = moe()
    m.bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))  # selection bias in play
    x, ids = torch.randn(3, 5, D), torch.randint(0, 32, (3, 5))
    out = m(x, ids)
    scores, chosen, weights = m.route(x.reshape(-1, D), ids.reshape(-1))
    for n, token in enumerate(x.reshape(-1, D)):
        assert set(chosen[n].tolist()) == set((scores[n] + m.bias).topk(2).indices.tolist())
        expected = m.shared(token) + sum(w * expert(m, int(e), token[None])[0] for e, w in zip(chosen[n], weights[n]))
        torch.testing.assert_close(out.reshape(-1, D)[n], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights.sum(-1), torch.full((15,), 1.5))  # normalised, times route_scale
    assert torch.equal(scores, torch.nn.functional.softplus(x.reshape(-1, D) @ m.router.t()).sqrt())


def test_bias_updates_move_a_skewed_load_toward_balance():
    m = moe(bias_gamma=0.01)
    with torch.no_grad():
        m.router[0] += 2.0 * m.router[1:].abs().mean()  # expert 0 attracts most tokens
        m.router[1] += 1.0 * m.router[1:].abs().mean()
    torch.manual_seed(1)
    x = torch.randn(4, 64, D) + 0.5
    ids = torch.zeros(4, 64, dtype=torch.long)
    imbalance = []
    for _ in range(150):
        m(x, ids)
        imbalance.append(float(m.update_bias()["load_max_over_mean"]))
    assert imbalance[0] > 1.5
    assert imbalance[-1] < 0.7 * imbalance[0]
    assert m.bias[0] < 0 < m.bias[2:].max()
    assert "bias" in m.state_dict() and not any(p is m.bias for p in m.parameters())


def test_balance_loss_is_deepseeks_sequence_wise_formula():
    """Σ_i f_i·P_i per sequence, f_i = E/(k·T)·(tokens whose selection holds i), P_i = the mean of
    i's affinity normalised over experts, averaged over sequences: against a loop over sequences,
    tokens and experts; 1 exactly for even routing and equal affinities; the layer's aux_loss is it
    times balance_weight."""
    m = moe(balance_weight=0.3)
    b, t, e, k = 3, 5, 4, 2
    scores, chosen = torch.rand(b, t, e) + 0.1, torch.rand(b, t, e).argsort(-1)[..., :k]
    expected = 0.0
    for s in range(b):
        for i in range(e):
            f = e / (k * t) * sum(i in chosen[s, n].tolist() for n in range(t))
            p = sum(scores[s, n, i] / scores[s, n].sum() for n in range(t)) / t
            expected += f * p / b
    torch.testing.assert_close(m.balance_loss(scores, chosen), torch.as_tensor(expected, dtype=torch.float32))
    even = torch.tensor([[0, 1], [2, 3]]).repeat(b, 2, 1)  # every expert twice in 4 tokens
    assert m.balance_loss(torch.ones(b, 4, e), even).item() == pytest.approx(1.0, abs=1e-6)
    x, ids = torch.randn(2, 6, D), torch.randint(0, 32, (2, 6))
    m(x, ids)
    scores, chosen, _ = m.route(x.reshape(-1, D), ids.reshape(-1))
    torch.testing.assert_close(m.aux_loss, 0.3 * m.balance_loss(scores.view(2, 6, -1), chosen.view(2, 6, -1)))


def test_a_hash_routed_layer_has_no_balance_loss_and_no_bias():
    """What a hash decides, neither the balance loss nor the bias can balance: no aux_loss, the bias
    stays 0; its loads are still counted and reset."""
    m = moe(hash_layers=1)
    assert m.hashed
    m(torch.randn(2, 6, D), torch.randint(0, 32, (2, 6)))
    assert m.aux_loss is None and m.load.sum() == 2 * 6 * 2
    m.update_bias()
    assert torch.equal(m.bias, torch.zeros(4)) and torch.equal(m.load, torch.zeros(4))


def test_bias_moves_by_gamma_against_the_sign_of_each_steps_load():
    """b_i -= γ·sign(load_i - mean load), from the tokens counted since the last update only (the
    loads are reset), and not at all for a skipped step; worked by hand."""
    m = moe(bias_gamma=0.01)
    for load, applied, bias in (([100, 10, 10, 10], True, [-0.01, 0.01, 0.01, 0.01]),
                                ([0, 60, 40, 30], True, [0.0, 0.0, 0.0, 0.02]),
                                ([90, 0, 0, 0], False, [0.0, 0.0, 0.0, 0.02]),
                                ([10, 10, 10, 10], True, [0.0, 0.0, 0.0, 0.02])):
        m.load.copy_(torch.tensor(load, dtype=torch.float32))
        stats = m.update_bias(applied)
        torch.testing.assert_close(m.bias, torch.tensor(bias))
        assert torch.equal(m.load, torch.zeros(4))
        assert stats["load_max_over_mean"].item() == pytest.approx(max(load) / (sum(load) / 4))


def test_hash_routing_is_a_fixed_function_of_token_and_layer():
    cfg = MoEConfig(n_experts=6, top_k=2, hash_layers=2)
    a, b, later = MoE(D, cfg, 1, 50), MoE(D, cfg, 1, 50), MoE(D, cfg, 0, 50)
    assert torch.equal(a.hash_table, b.hash_table) and not torch.equal(a.hash_table, later.hash_table)
    assert all(len(set(row.tolist())) == 2 for row in a.hash_table)
    ids = torch.randint(0, 50, (2, 7))
    a.init_weights(0.5, 1.0)
    _, chosen, _ = a.route(torch.randn(14, D), ids.reshape(-1))
    assert torch.equal(chosen, a.hash_table[ids.reshape(-1)])
    assert not MoE(D, cfg, 2, 50).hashed


def test_mtp_predicts_the_token_after_next():
    from model import build_model
    from model.mtp import mtp_loss

    targets = torch.randint(0, 10, (2, 6))
    # position t knows token t+2; the last position's is outside the window: whatever it says is no loss
    oracle = torch.nn.functional.one_hot(targets[:, 1:], 10).float() * 50
    oracle = torch.cat((oracle, 50 * torch.randn(2, 1, 10)), dim=1)
    assert mtp_loss(oracle, targets) < 1e-6
    assert mtp_loss(torch.roll(oracle, 1, dims=1), targets) > 10

    cfg = compose_config(["model=v4_tiny", "model.d_model=32", "model.n_layers=2", "model.n_heads=2"]).model
    model = build_model(cfg, 64).train()
    seen = {}
    model.mtp.register_forward_hook(lambda mod, args, out: seen.update(hidden=args[0], next_ids=args[2]))
    model.reduce.register_forward_hook(lambda mod, args, out: seen.update(trunk=args[0]))
    idx = torch.randint(0, 64, (2, 16))
    targets = torch.cat((idx[:, 1:], torch.randint(0, 64, (2, 1))), dim=1)
    model(idx, targets)
    assert seen["trunk"].dim() == 4  # the n-stream state, before the head reduction (V4) ...
    assert torch.equal(seen["hidden"], seen["trunk"])  # ... at t ...
    assert torch.equal(seen["next_ids"], targets)  # ... with token t+1 (= input t+1)


@pytest.mark.parametrize("training", [False, True])
def test_v4_tiny_outputs_ignore_later_tokens(training):
    """Changing tokens from position 20 on leaves every logit before 20 unchanged, through the
    indexer's selections, compressed entries, MoE routing and mHC (sparse CSA). Float64: MoE
    experts batch whichever tokens they get, so results differ in the last bits only."""
    from model import build_model

    cfg = compose_config(["model=v4_tiny", "model.attn.window=8", "model.attn.csa_topk=2"]).model
    model = build_model(cfg, 64).double().train(training)
    model.on_step_start(10_000, lr_decaying=False)
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 64, (2, 40), generator=gen)
    b = a.clone()
    # every token from 20 on changes (an unseeded fresh draw kept token 20 about 3 % of the time,
    # and that position's logits then rightly stayed equal)
    b[:, 20:] = (a[:, 20:] + torch.randint(1, 64, (2, 20), generator=gen)) % 64
    with torch.no_grad():
        la, lb = model(a), model(b)
    assert (la[:, :20] - lb[:, :20]).abs().max() < 1e-12
    assert (la[:, 20:] - lb[:, 20:]).abs().amax(-1).min() > 1e-3


@pytest.mark.parametrize("preset", [["experiment=v4"], ["model=v4_small", "optim=muon"]], ids=["v4", "v4_small"])
def test_v4_presets_choose_v4s_behaviour(preset):
    """Where issue #14 kept the old behaviour as an ablation option, the V4 presets use V4's."""
    cfg = compose_config(preset)
    a = cfg.model.attn
    assert a.q_head_norm and a.indexer_warmup == "indexer_only" and a.indexer_warmup_steps > 0
    assert (a.compress_rope_theta, a.yarn_factor, a.yarn_beta_fast, a.yarn_beta_slow) == (160000.0, 16.0, 32.0, 1.0)
    assert (cfg.model.residual, cfg.model.mtp_depth, cfg.model.attention) == ("mhc", 1, "v4")
    assert cfg.optim.name == "muon" and cfg.optim.eps == 1e-20 and cfg.optim.ns_restarts is None


def test_v4_parameters_are_routed_to_the_right_optimizer():
    from model import build_model

    model = build_model(compose_config(["model=v4_tiny"]).model, 256)
    roles = {name: role for role, items in classify_parameters(model).items() for name, _ in items}
    assert roles["blocks.1.ffn.gate_up"] == roles["blocks.1.ffn.down"] == "matrix"  # [E, out, in]: per expert
    assert roles["blocks.1.attn.out_down"] == "matrix"  # [groups, rank, in]: per group
    assert roles["blocks.1.attn.compressor.pos_bias"] == roles["blocks.1.attn.sink"] == "scalar"
    assert roles["blocks.1.attn.q_norm.weight"] == "norm"
    assert layer_kinds(4, []) == ["window", "csa", "hca", "csa"]
    assert model.num_active_params() < model.num_params()


def test_training_loss_is_next_token_plus_weighted_mtp_plus_auxiliaries():
    """What backward sees: lm + mtp_weight·mtp + indexer KL + MoE balance (each part as the step's
    metrics report it), at the MTP weight 0.3 and at 0.1 once the learning rate decays; during the
    indexer-only warm-up, the indexers' KL alone."""
    from model import build_model

    torch.manual_seed(0)
    model = build_model(compose_config(["model=v4_tiny", "model.moe.balance_weight=0.01"]).model, 256).train()
    idx = torch.randint(0, 256, (2, 33))
    for step, decaying, weight in ((10**6, False, 0.3), (10**6, True, 0.1), (0, False, None)):
        model.on_step_start(step, decaying)
        total = model(idx[:, :-1], idx[:, 1:])
        parts = {k: v.item() for k, v in model.loss_sums.items()}
        model.on_step_end()
        assert parts["moe_balance"] > 0 and parts["indexer_kl"] > 0 and parts["mtp"] > 0
        expected = (parts["lm"] + weight * parts["mtp"] + parts["indexer_kl"] + parts["moe_balance"]
                    if weight is not None else parts["indexer_kl"])
        assert total.item() == pytest.approx(expected, rel=1e-6)


def test_query_heads_are_separate_matrices_to_muon_with_per_head():
    """optim.per_head=true: each query head's rows of q_up (and of nothing V4 shares across heads) are
    their own matrix to Muon; without it, the whole projection is one."""
    from optim.muon import matrix_view

    attn = attention("csa")
    w = attn.q_up.weight
    assert matrix_view(w.shape, getattr(w, "row_blocks", 1), getattr(w, "head_blocks", 1), True) == (H, 8, 8)
    assert matrix_view(w.shape, getattr(w, "row_blocks", 1), getattr(w, "head_blocks", 1), False) == (1, H * 8, 8)


@pytest.mark.parametrize("kind", ["window", "csa", "hca"])
def test_scores_and_softmax_run_in_fp32_under_bf16_autocast(kind, monkeypatch):
    """bf16 logits would be rounded before the softmax, the sink with them: whatever autocast
    does to the projections, the attention itself receives float32 queries, keys and entries."""
    attn = attention(kind, ratio=2, sparse=kind == "csa").float().train()
    seen = []
    attend = attn._attend
    monkeypatch.setattr(attn, "_attend", lambda q, kv, entries, index, cos, sin: (
        seen.append((q.dtype, kv.dtype, None if entries is None else entries.dtype, torch.is_autocast_enabled("cpu"))),
        attend(q, kv, entries, index, cos, sin))[1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(torch.randn(2, 9, D))
    assert out.dtype == torch.bfloat16  # autocast is on: the projections ran in bf16
    q, kv, entries, autocast = seen[0]
    assert q == kv == torch.float32 and entries in (None, torch.float32) and not autocast


def test_attention_flops_are_the_written_convention():
    """4·H·hd per token for each key a query sees (the window, or T when shorter; CSA's top-k of T/m
    entries, HCA's T/m) plus the indexer's 2·index_heads·index_dim per scored entry."""
    for t in (3, 5, 40):
        assert attention("window").attention_flops(t) == 4 * H * 8 * min(5, t)
        assert attention("hca", ratio=4).attention_flops(t) == 4 * H * 8 * (min(5, t) + t // 4)
        assert attention("csa", ratio=4, topk=3, index_heads=2).attention_flops(t) == \
            4 * H * 8 * (min(5, t) + min(3, t // 4)) + 2 * 2 * 4 * (t // 4)


def test_v4_tiny_trains_with_muon(tiny_config):
    # 30 steps: 20 dense (the indexer warm-up), 10 sparse; the mean loss drops by ~1.6 (measured)
    cfg = tiny_config(*V4_RUN, "trainer.max_steps=30", "trainer.eval_every=15")
    summary = Trainer(cfg).fit()
    rows = metrics_rows(cfg.out_dir)
    losses = [r["loss"] for r in rows]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert {"loss/mtp", "loss/indexer_kl", "loss/moe_balance", "loss/total", "moe/load_max_over_mean",
            "moe/bias_min", "moe/bias_max", "mtp_weight"} <= rows[-1].keys()
    assert rows[-1]["loss/total"] > rows[-1]["loss"]  # the MTP and auxiliary terms are on top
    assert summary["n_active_params"] < summary["n_params"] and summary["flops_per_token"] > 0
    assert summary["final_val_loss"] < losses[0]


@pytest.mark.parametrize("schedule,weights", [("cosine", [0.3] * 5 + [0.1]), ("constant", [0.3] * 6)],
                         ids=["cosine", "constant"])
def test_the_mtp_weight_drops_once_the_learning_rate_decays(tiny_config, schedule, weights):
    """The MTP weight (0.3) drops to 0.1 only once the learning rate falls below its peak. The
    trunk's schedule starts after the indexer warm-up (frozen, steps 1-2): LR warm-up at 3-4, the
    peak at 5, decay (cosine) at 6; a constant schedule stays at the peak, and the weight at 0.3."""
    cfg = tiny_config(*V4_RUN, "model.attn.indexer_warmup_steps=2", "optim.warmup_steps=2", "trainer.max_steps=6",
                      "trainer.eval_every=0", "trainer.checkpoint_every=0", f"optim.schedule={schedule}")
    Trainer(cfg).fit()
    rows = metrics_rows(cfg.out_dir)
    peak = max(r["lr"] for r in rows)
    assert [r["lr"] / peak for r in rows][:5] == [0, 0, 0.5, 1, 1]
    assert [r["mtp_weight"] for r in rows] == weights


def test_v4_tiny_bf16_autocast_follows_fp32(tiny_config, tmp_path):
    """V4-tiny under bf16 autocast (dense warm-up, then sparse top-k, MoE, MTP) tracks fp32: its
    losses differ (autocast is on) and stay within 0.05 of fp32's at each of 6 steps."""
    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = tiny_config(*V4_RUN, "trainer.max_steps=6", "model.attn.indexer_warmup_steps=3",
                          f"trainer.precision={precision}")
        cfg.out_dir = str(tmp_path / precision)
        summary = Trainer(cfg).fit()
        assert summary["precision"] == precision and summary["status"] == "completed"
        losses[precision] = [r["loss"] for r in metrics_rows(cfg.out_dir)]
    gaps = [abs(a - b) for a, b in zip(losses["fp32"], losses["bf16"])]
    assert len(gaps) == 6 and min(gaps) > 0 and max(gaps) < 0.05, gaps


@pytest.mark.parametrize("mode,stage", [("indexer_only", 0), ("indexer_only", 2), ("all", 0)])
def test_indexer_warmup_trains_only_the_indexers(tiny_config, mode, stage):
    """indexer_only (V3.2/V4): through the warm-up every parameter and MoE bias outside the indexers
    stays bit-identical (AdamW's decay and Muon's included, at ZeRO-0 and ZeRO-2) and its momenta
    stay zero; the indexers learn; the trunk starts with the first sparse step. all: everything trains."""
    cfg = tiny_config(*V4_RUN, "model.attn.indexer_warmup_steps=3", f"model.attn.indexer_warmup={mode}",
                      f"deepspeed.zero_stage={stage}", "optim.adamw_weight_decay=0.1")
    trainer = Trainer(cfg)
    start = trainer.full_state_dict()
    for _ in range(3):
        trainer.train_step()
    warm = trainer.full_state_dict()
    moved = {k for k in start if not torch.equal(start[k], warm[k])}
    indexer = {k for k in start if ".indexer." in k}
    assert indexer <= moved
    if mode == "all":
        assert {"blocks.1.ffn.bias"} | {k for k in start if ".attn.q_up." in k} <= moved  # layer 0 routes by hash
        return
    assert moved == indexer
    if stage == 0:  # only the KL reached backward: the trunk's moments (DeepSpeed hands zero gradients) are zero
        inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        for name, p in trainer.engine.module.named_parameters():
            moments = [v for k, v in inner.state.get(p, {}).items() if k != "step"]
            assert (name in indexer) == any(v.abs().sum() > 0 for v in moments), name
    trainer.train_step()
    after = trainer.full_state_dict()
    assert all(not torch.equal(warm[k], after[k]) for k in start if k.endswith((".q_up.weight", ".router")))


@pytest.fixture
def cuda_autocast_rules(monkeypatch):
    """CPU autocast with CUDA's rule for rms_norm (CUDA's autocast runs it in float32 and returns
    float32; the CPU's has no rule for it), and the PyTorch paths that run on a GPU instead of the
    CPU kernels, so that CUDA's mixes of dtypes happen on this CPU."""
    from model import cpu_kernels, layers

    monkeypatch.setattr(cpu_kernels, "available", lambda source: False)
    monkeypatch.setattr(cpu_kernels, "extension", lambda source: None)

    def widened(norm):
        def call(x, *args, **kwargs):
            if not torch.is_autocast_enabled("cpu"):
                return norm(x, *args, **kwargs)
            with torch.autocast("cpu", enabled=False):
                return norm(x.float(), *(a.float() if torch.is_tensor(a) else a for a in args), **kwargs)
        return call

    monkeypatch.setattr(layers, "rms_norm", widened(layers.rms_norm))
    monkeypatch.setattr(torch.nn.functional, "rms_norm", widened(torch.nn.functional.rms_norm))


@pytest.mark.parametrize("overrides,step", [(["model=v4_tiny"], 0), (["model=v4_tiny"], 10_000),
                                            (["model.residual=mhc"], 0), (["model.residual=hc"], 0)],
                         ids=["v4-warm-up", "v4-sparse", "mhc", "hc"])
def test_models_train_and_sample_under_cudas_autocast_rules(overrides, step, cuda_autocast_rules):
    """Under CUDA's bf16 autocast the norms' outputs are float32 next to bf16 projections: V4's
    fp32 regions (attention, the indexer's scores and its KL, the decoding cache) and the
    hyper-connections' must take both."""
    from model import build_model
    from model.generate import Sampling, generate

    cfg = compose_config([*overrides, "model.attn.window=8", "model.attn.csa_topk=2"]).model
    model = build_model(cfg, 64).train()
    model.on_step_start(step, lr_decaying=False)
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, ids)
        loss.backward()
        model.eval()
        steps = list(generate(model, ids[:, :9], 4, Sampling(temperature=0), context=24,
                              use_cache=model.supports_cache))
    assert torch.isfinite(loss) and len(steps) == 4
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_activation_checkpointing_counts_each_tokens_routing_once():
    """The recompute in backward routed the tokens again and added them to the experts' loads a
    second time (trunk layers only: the MTP block is not checkpointed). Gradients and loads equal
    the run without checkpointing."""
    from model import build_model

    runs = []
    for ckpt in ("false", "true"):
        torch.manual_seed(0)
        model = build_model(compose_config(["model=v4_tiny", f"model.activation_checkpointing={ckpt}"]).model, 64)
        model.train()
        idx = torch.randint(0, 64, (2, 37), generator=torch.Generator().manual_seed(1))
        model(idx, idx).backward()
        runs.append(([m.load.clone() for m in model.modules() if isinstance(m, MoE)],
                     [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (loads, grads), (loads_ckpt, grads_ckpt) = runs
    assert all(torch.equal(a, b) for a, b in zip(loads, loads_ckpt)) and any(a.sum() > 0 for a in loads)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads, grads_ckpt))
