"""V4's parts without Python loops over experts or tokens, against the formulations they replace:
the grouped-matmul MoE against the per-expert loop, and sparse CSA over gathered top-k entries
against attention over all entries with a dense [T, T] window mask and a [T, N] top-k mask."""
import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import model.indexer as indexer_module
import model.moe as moe_module
from model.attention import V4Attention
from model.compressor import rope_last
from model.indexer import kl_to_attention
from model.layers import clamped_swiglu
from model.moe import MoE
from tests.test_v4 import D, attention
from train.config import AttentionConfig, MoEConfig


def loop_moe(m: MoE, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The reference: one matmul pair per expert over the tokens routed to it."""
    b, t, d = x.shape
    flat = x.reshape(-1, d)
    _, chosen, weights = m.route(flat, ids.reshape(-1))
    out = torch.zeros_like(flat)
    for e in range(m.n_experts):
        token, slot = (chosen == e).nonzero(as_tuple=True)
        hidden = clamped_swiglu(*(flat[token] @ m.gate_up[e].t()).chunk(2, dim=-1), m.clamp)
        out.index_add_(0, token, hidden @ m.down[e].t() * weights[token, slot, None])
    return (out + m.shared(flat)).view(b, t, d)


MOE_CASES = [(grouped_mm, hashed) for grouped_mm in (False, True) for hashed in (False, True)]


@pytest.mark.parametrize("grouped_mm,hashed", MOE_CASES,
                         ids=[f"{'grouped_mm' if g else 'padded_bmm'}-{'hash' if h else 'score'}" for g, h in MOE_CASES])
def test_grouped_moe_equals_the_per_expert_loop(grouped_mm, hashed, monkeypatch):
    """Outputs and every gradient to 1e-6 in fp32, through torch._grouped_mm and through the padded
    batched matmul (each forced), with an expert that gets no token."""
    monkeypatch.setattr(moe_module, "grouped_mm_supported", lambda x, w: grouped_mm)
    torch.manual_seed(0)
    cfg = MoEConfig(n_experts=5, top_k=2, n_shared=1, expert_hidden=8, hash_layers=1 if hashed else 0, clamp=1.5)
    m = MoE(D, cfg, layer=0, vocab_size=32)
    m.init_weights(0.5, 1.0)
    ids = torch.randint(0, 32, (3, 7))
    if hashed:
        m.hash_table[ids.flatten()] = m.hash_table[ids.flatten()] % 4  # expert 4 picked by no token
    else:
        m.bias[4] = -100.0  # expert 4 selected by no token
    x = torch.randn(3, 7, D, requires_grad=True)
    m.train()
    out = m(x, ids)
    load = m.load.clone()
    ref = loop_moe(m, x, ids)
    assert load[4] == 0 and load.sum() == 2 * 21
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    grad = torch.randn_like(out)
    params = [x, m.router, m.gate_up, m.down, *m.shared.parameters()]
    ours = torch.autograd.grad(out, params, grad, allow_unused=True)
    theirs = torch.autograd.grad(ref, params, grad, allow_unused=True)
    for name, a, b in zip(("x", "router", "gate_up", "down", "shared.gate_up", "shared.down"), ours, theirs):
        # 1e-6 of the gradient's scale: sums over an expert's rows in another order round differently
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6 * max(1.0, b.abs().max().item()),
                                   msg=lambda m: f"{name}: {m}")
    assert ours[2][4].abs().sum() == 0  # the idle expert gets no gradient


@pytest.mark.parametrize("choice,op", [("auto", "grouped_mm_linear"), ("padded", "padded_grouped_linear")])
def test_model_moe_grouped_matmul_picks_the_op(choice, op, monkeypatch):
    """model.moe.grouped_matmul: auto takes _grouped_mm where it can (fp32 on the CPU, 16-byte
    rows), padded the batched matmul over padded groups, for both projections."""
    calls = []
    for name in ("grouped_mm_linear", "padded_grouped_linear"):
        real = getattr(moe_module, name)
        monkeypatch.setattr(moe_module, name, lambda *a, name=name, real=real: calls.append(name) or real(*a))
    m = MoE(D, MoEConfig(n_experts=4, top_k=2, expert_hidden=8, grouped_matmul=choice), layer=1, vocab_size=32)
    m.init_weights(0.5, 1.0)
    m(torch.randn(2, 5, D), torch.randint(0, 32, (2, 5)))
    assert calls == [op, op]


@pytest.mark.parametrize("device,dtype,capability,rows,expected", [
    ("cpu", torch.float32, None, 8, True), ("cpu", torch.bfloat16, None, 8, True),
    ("cpu", torch.float64, None, 8, False), ("cpu", torch.float32, None, 6, False),  # 24-byte rows
    ("cuda", torch.bfloat16, (9, 0), 8, True), ("cuda", torch.bfloat16, (10, 0), 8, True),
    ("cuda", torch.bfloat16, (8, 0), 8, False), ("cuda", torch.bfloat16, (12, 0), 8, False),
    ("cuda", torch.float32, (9, 0), 8, False), ("cuda", torch.bfloat16, (9, 0), 12, False),
    ("mps", torch.float32, None, 8, False)])
def test_auto_takes_grouped_mm_only_where_it_is_one_kernel(device, dtype, capability, rows, expected, monkeypatch):
    """On CUDA, `_grouped_mm` outside bf16 on compute capability 9/10 copies the offsets to the host
    and loops over the groups: auto takes the padded batched matmul there. Stand-in operands (no GPU
    in the suite): only device, dtype and sizes are read."""
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d=None: SimpleNamespace(major=capability[0]))
    x = SimpleNamespace(device=torch.device(device), dtype=dtype, element_size=lambda: dtype.itemsize)
    weight = SimpleNamespace(size=lambda i: {1: rows, 2: 16}[i])
    assert moe_module.grouped_mm_supported(x, weight) is expected


def routed_rows(seed: int = 0, experts: int = 5, rows: int = 13, d_in: int = 6, d_out: int = 4):
    """Rows sorted by expert, with expert 3 idle: (x, weight, expert, counts)."""
    gen = torch.Generator().manual_seed(seed)
    expert = torch.tensor([0, 1, 2, 4])[torch.randint(0, 4, (rows,), generator=gen)].sort().values
    counts = torch.bincount(expert, minlength=experts)
    return (torch.randn(rows, d_in, generator=gen, requires_grad=True),
            torch.randn(experts, d_out, d_in, generator=gen, requires_grad=True), expert, counts)


@pytest.mark.parametrize("linear", [moe_module.grouped_mm_linear, moe_module.padded_grouped_linear],
                         ids=["grouped_mm", "padded_bmm"])
def test_grouped_ops_pass_opcheck(linear):
    """Both grouped matmuls are custom ops (so a compiled block keeps each as one node of a known
    shape); their fake kernels, autograd registrations and weight-gradient ops pass opcheck."""
    x, weight, expert, counts = routed_rows(d_in=8, d_out=4)  # 16-byte rows, as _grouped_mm needs
    torch.library.opcheck(linear, (x, weight, expert, counts))
    grad = torch.randn(x.size(0), weight.size(1))
    torch.library.opcheck(moe_module._PAIRS[linear], (grad, x.detach(), expert, counts))


def test_a_non_finite_row_stays_in_its_own_experts_weight_gradient():
    """The padding of expert groups repeats other experts' rows: an inf in one expert's input must
    still leave every other expert's weight gradient finite, the per-expert sum of gradᵀx (zero
    for the idle expert)."""
    x, weight, expert, counts = routed_rows()
    x = x.detach().clone()
    x[int((expert == 1).nonzero()[0]), 0] = float("inf")
    grad = torch.randn(x.size(0), weight.size(1))
    grad[expert == 1] = 0.0
    dw = moe_module.padded_grouped_weight_grad(grad, x, expert, counts)
    for e in (0, 2, 3, 4):
        rows = expert == e
        torch.testing.assert_close(dw[e], grad[rows].T @ x[rows], rtol=0, atol=1e-5)


def test_an_idle_expert_gets_no_weight_gradient_whatever_grouped_mm_leaves_in_its_group(monkeypatch):
    """PyTorch issue #172439: _grouped_mm on compute capability 10.x leaves garbage in empty groups.
    Stood in for here by a _grouped_mm that fills them with NaN: the idle expert's gradient is still
    zero, the others' the per-expert sums."""
    x, weight, expert, counts = routed_rows(d_in=8, d_out=4)
    real = torch._grouped_mm

    def garbage_in_empty_groups(a, b, offs):
        out = real(a, b, offs=offs)
        return torch.where((torch.diff(offs, prepend=offs.new_zeros(1)) == 0)[:, None, None], float("nan"), out)
    monkeypatch.setattr(torch, "_grouped_mm", garbage_in_empty_groups)
    grad = torch.randn(x.size(0), weight.size(1))
    dw = moe_module.grouped_mm_weight_grad(grad, x.detach(), expert, counts)
    assert counts[3] == 0 and torch.equal(dw[3], torch.zeros_like(dw[3]))
    for e in (0, 1, 2, 4):
        torch.testing.assert_close(dw[e], grad[expert == e].T @ x.detach()[expert == e], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grouped_mm", [True, False], ids=["grouped_mm", "padded_bmm"])
def test_compiled_moe_is_one_graph_with_the_eager_outputs(grouped_mm, monkeypatch):
    """torch.compile(fullgraph=True) raises at any graph break (the padded groups' size is read
    from the routing; _grouped_mm's own fake kernel refuses fp32). Output and gradients equal the
    eager module's, for two routings."""
    monkeypatch.setattr(moe_module, "grouped_mm_supported", lambda x, w: grouped_mm)
    torch.manual_seed(0)
    m = MoE(D, MoEConfig(n_experts=5, top_k=2, n_shared=1, expert_hidden=8, clamp=1.5), layer=0, vocab_size=32)
    m.init_weights(0.5, 1.0)
    m.train()
    compiled = torch.compile(m, fullgraph=True)
    for seed in (0, 1):
        gen = torch.Generator().manual_seed(seed)
        x, ids = torch.randn(3, 7, D, generator=gen, requires_grad=True), torch.randint(0, 32, (3, 7), generator=gen)
        outs = []
        for module in (m, compiled):
            out = module(x, ids)
            outs.append((out, *torch.autograd.grad(out.square().sum(), [x, m.gate_up, m.down, m.router])))
        for a, b in zip(*outs):  # Inductor fuses the elementwise parts: rounding-level differences
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def dense_mask_attention(attn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse CSA written over everything: [T, T] window scores under a band mask, [T, N] entry
    scores under the top-k mask (the k best visible entries by index score, ties to the earlier
    entry), one softmax with the sink; the indexer's KL over the same mask. → (output, KL)."""
    b, t, _ = x.shape
    cos, sin = attn.rope_cos[:t], attn.rope_sin[:t]
    q_latent, q, kv = attn.project(x, cos, sin)
    q = q.transpose(1, 2)  # [B, H, T, hd]
    entries = attn.compressor(x, cos, sin)
    scores = attn.indexer(x, q_latent, cos, sin).scores()  # [B, T, N]
    n = entries.size(1)
    pos = torch.arange(t)
    visible = torch.arange(n)[None, :] < ((pos + 1) // attn.ratio)[:, None]
    ranked = scores.masked_fill(~visible, float("-inf")).sort(dim=-1, descending=True, stable=True).indices
    picked = torch.zeros(b, t, n, dtype=torch.bool).scatter_(2, ranked[..., : attn.topk], True) & visible
    q = q * attn.head_dim ** -0.5
    band = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < attn.window)
    logits = torch.cat((torch.einsum("bhtd,bsd->bhts", q, kv).masked_fill(~band, float("-inf")),
                        torch.einsum("bhtd,bnd->bhtn", q, entries).masked_fill(~picked[:, None], float("-inf")),
                        attn.sink.view(1, -1, 1, 1).expand(b, -1, t, 1)), dim=-1)
    probs = torch.softmax(logits, dim=-1)
    out = probs[..., :t] @ kv[:, None] + probs[..., t:-1] @ entries[:, None]
    out = rope_last(out, cos, -sin, attn.rope_dim)
    kl = attn.kl_weight * kl_to_attention(scores, probs[..., t:-1].sum(1), picked)
    return attn.project_out(out.transpose(1, 2), x.dtype), kl


@pytest.mark.parametrize("chunk_elements", [0, 1 << 22, 8], ids=["fused", "one-chunk", "query-chunks"])
@pytest.mark.parametrize("ratio,topk", [(2, 3), (3, 2), (4, 5)])
def test_sparse_csa_over_gathered_topk_equals_the_dense_mask(ratio, topk, chunk_elements, monkeypatch):
    """Forward, the indexer's KL and the gradients of every parameter and of x agree in fp64 to
    1e-10, with ties in the index scores (one index head: every entry its ReLU zeroes scores
    exactly 0) and early queries that see fewer entries than k; the top-k selected by the fused
    CPU kernel, or by PyTorch one chunk of queries at a time or all at once."""
    if chunk_elements:
        monkeypatch.setattr(indexer_module, "_kernels", lambda: None)
        monkeypatch.setattr(indexer_module, "SELECT_CHUNK_ELEMENTS", chunk_elements)
    attn = attention("csa", ratio=ratio, window=4, topk=topk, sparse=True, index_heads=1).train()
    x = torch.randn(2, 29, D, dtype=torch.float64, requires_grad=True)
    out, ref = attn(x), dense_mask_attention(attn, x)
    torch.testing.assert_close(out, ref[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(attn.aux_loss, ref[1], rtol=0, atol=1e-10)
    scores = attn.indexer(x, attn.project(x, attn.rope_cos[:29], attn.rope_sin[:29])[0],
                          attn.rope_cos[:29], attn.rope_sin[:29]).scores()
    visible_scores = [scores[bb, t, : (t + 1) // ratio] for bb in range(2) for t in range(29)]
    assert any(((s == 0).sum() > 1) and (s > 0).sum() < topk <= s.numel() for s in visible_scores)  # ties at the cut
    assert any(0 < s.numel() < topk for s in visible_scores)  # fewer visible than k
    params = [x, *attn.parameters()]
    grad = torch.randn_like(out)
    for loss, reference in ((out, ref[0]), (attn.aux_loss, ref[1])):
        ours = torch.autograd.grad(loss, params, grad if loss is out else None, retain_graph=True, allow_unused=True)
        theirs = torch.autograd.grad(reference, params, grad if loss is out else None, retain_graph=True,
                                     allow_unused=True)
        for a, b in zip(ours, theirs):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.numel = max(self.numel, o.numel())
        return out


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "chunked"])
def test_sparse_csa_tensors_grow_linearly_in_t(fused, monkeypatch):
    """The largest tensor any op makes in a sparse CSA layer's forward + backward (training, KL
    included) grows 4x from T = 256 to 1024: no [T, T] or [T, N] score tensor."""
    monkeypatch.setattr(indexer_module, "SELECT_CHUNK_ELEMENTS", 4096)
    if not fused:
        monkeypatch.setattr(indexer_module, "_kernels", lambda: None)
    cfg = AttentionConfig(window=8, head_dim=8, rope_dim=4, q_lora=8, out_groups=2, out_lora=4,
                          csa_ratio=4, csa_topk=4, index_heads=2, index_dim=4)
    largest = {}
    for t in (256, 1024):
        attn = V4Attention(D, 2, cfg, "csa", max_seq_len=t, eps=1e-6).train()
        attn.sparse = True
        x = torch.randn(1, t, D, requires_grad=True)
        with LargestTensor() as mode:
            out = attn(x)
            (out.sum() + attn.aux_loss).backward()
        largest[t] = mode.numel
    assert largest[1024] <= 4 * largest[256], largest


CHUNK_CASES = [("window", False), ("csa", False), ("csa", True), ("hca", False)]


@pytest.mark.parametrize("ratio,chunk,window", [(3, 11, 5), (8, 5, 6)], ids=["m3-chunks10-w5", "m8-chunks3-w6"])
@pytest.mark.parametrize("kind,sparse", CHUNK_CASES, ids=[f"{k}{'-sparse' if s else ''}" for k, s in CHUNK_CASES])
def test_query_chunks_recomputed_in_backward_equal_one_pass(kind, sparse, ratio, chunk, window):
    """Attention a chunk of queries at a time (recomputed in backward) against all queries at once,
    in training: output, the indexer's KL, the max logits and every gradient agree in fp64 to
    1e-12, with a last chunk shorter than the others, chunk edges inside compressed blocks and
    (m = 8, chunks of 3) a first chunk that sees no entry. Window 5 runs in window chunks of 5
    queries, window 6 in chunks of 3 (model.attention.window_chunk)."""
    results = []
    for query_chunk in (0, chunk):  # rounded down to a multiple of the window chunk; 29 queries
        attn = attention(kind, ratio=ratio, window=window, topk=2, sparse=sparse).train()
        attn.query_chunk, attn.track_max_logits = query_chunk, True
        x = torch.randn(2, 29, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
        out = attn(x)
        loss = (out * torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(2))).sum()
        if attn.aux_loss is not None:
            loss = loss + 3 * attn.aux_loss
        grads = torch.autograd.grad(loss, [x, *attn.parameters()], allow_unused=True)
        results.append((out, attn.aux_loss, attn.max_logits, grads))
    (out, kl, top, grads), (out_c, kl_c, top_c, grads_c) = results
    assert (kl is None) == (kind != "csa")
    torch.testing.assert_close(out_c, out, rtol=0, atol=1e-12)
    if kl is not None:
        torch.testing.assert_close(kl_c, kl, rtol=0, atol=1e-12)
    torch.testing.assert_close(top_c, top, rtol=0, atol=1e-12)
    for a, b in zip(grads_c, grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def bytes_kept_for_backward(attn, t: int) -> int:
    """Bytes of the distinct storages a training forward of one layer keeps for its backward."""
    kept = {}

    def pack(tensor):
        kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    x = torch.randn(1, t, D, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        attn(x)
    return sum(kept.values())


@pytest.mark.parametrize("kind", ["hca", "csa"])
def test_dense_entry_attention_keeps_memory_linear_in_t_in_query_chunks(kind):
    """HCA and dense CSA score every query against all T/m entries. In query chunks (recomputed in
    backward), from T = 128 to 512 what a layer keeps for backward grows 4x, and so does the
    largest tensor it makes in forward + backward (no [T, T/m] scores, probabilities or mask, in
    the recomputation either); in one pass both grow faster."""
    cfg = AttentionConfig(window=8, head_dim=8, rope_dim=4, q_lora=8, out_groups=2, out_lora=4, csa_ratio=2,
                          hca_ratio=2, csa_topk=4, index_heads=2, index_dim=4)
    kept_growth, largest_growth = {}, {}
    for query_chunk in (0, 32):
        kept, largest = {}, {}
        for t in (128, 512):
            attn = V4Attention(D, 2, dataclasses.replace(cfg, query_chunk=query_chunk), kind, max_seq_len=t, eps=1e-6).train()
            kept[t] = bytes_kept_for_backward(attn, t)
            x = torch.randn(1, t, D, requires_grad=True)
            with LargestTensor() as mode:
                out = attn(x)
                (out.sum() + (attn.aux_loss if attn.aux_loss is not None else 0)).backward()
            largest[t] = mode.numel
        kept_growth[query_chunk], largest_growth[query_chunk] = kept[512] / kept[128], largest[512] / largest[128]
    assert kept_growth[32] <= 4.0 + 1e-9 and kept_growth[0] > 6, kept_growth
    assert largest_growth[32] <= 4.0 + 1e-9 and largest_growth[0] > 6, largest_growth
