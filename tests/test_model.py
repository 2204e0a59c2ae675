"""The plain transformer: shapes, causality, initialisation, FLOP accounting, and the dense
sublayers' fast forms against plain formulations."""
import pytest
import torch

from model import build_model
from model.layers import RMSNorm, SwiGLU, apply_rope, clamped_swiglu, rms_norm, rope_tables, rotary_qkv
from model.layers import swiglu as swiglu_fn
from tests.conftest import compose_config


def tiny_model(*overrides):
    cfg = compose_config(["model=tiny", *overrides])
    torch.manual_seed(0)
    return build_model(cfg.model, vocab_size=256)


def test_logits_shape_and_loss_at_init_is_near_uniform():
    model = tiny_model()
    idx = torch.randint(0, 256, (3, 17))
    assert model(idx).shape == (3, 17, 256)
    loss = model(idx, torch.randint(0, 256, (3, 17)))
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.1


def test_causal_no_gradient_from_future_tokens():
    model = tiny_model().double()
    x = model.embed(torch.randint(0, 256, (1, 12))).detach().requires_grad_(True)
    h = x
    for block in model.blocks:
        h = block(h, model.rope_cos.double(), model.rope_sin.double())
    t = 5
    h[0, t].sum().backward()
    assert torch.all(x.grad[0, t + 1:] == 0)
    assert torch.all(x.grad[0, : t + 1].abs().sum(-1) > 0)


def test_rope_preserves_norm_and_relative_positions():
    cos, sin = rope_tables(16, 8, 10000.0)
    q, k = torch.randn(1, 1, 16, 8), torch.randn(1, 1, 16, 8)
    rq = apply_rope(q, cos, sin)
    assert torch.allclose(rq.norm(dim=-1), q.norm(dim=-1), atol=1e-5)
    # The score of (q at i, k at j) depends on i - j only: shifting both leaves it unchanged.
    same_q, same_k = q[:, :, :1].expand(1, 1, 16, 8), k[:, :, :1].expand(1, 1, 16, 8)
    s = (apply_rope(same_q, cos, sin)[0, 0, 3:] * apply_rope(same_k, cos, sin)[0, 0, :-3]).sum(-1)
    assert torch.allclose(s, s[0].expand_as(s), atol=1e-5)


WRITERS = ("attn.out.weight", "ffn.down.weight", "ffn.down", "ffn.shared.down.weight")


@pytest.mark.parametrize("preset", ["tiny", "v4_tiny"])
def test_projections_into_the_residual_stream_start_at_init_std_over_root_2l(preset):
    """GPT-2's depth scaling for every matrix that writes into the residual stream (attention's
    output, the dense and the shared expert's down projections, the routed experts' stacked ones,
    the MTP block's too): std init_std/√(2L); every other matrix init_std (sample stds, within 10 %)."""
    import math

    from optim.params import classify_parameters

    cfg = compose_config([f"model={preset}", "model.n_layers=8", "model.init_std=0.05"]).model
    torch.manual_seed(0)
    model = build_model(cfg, 256)
    scalars = {name for name, _ in classify_parameters(model)["scalar"]}
    writers = 0
    for name, p in model.named_parameters():
        if p.dim() < 2 or name in scalars:
            continue
        writes = name.endswith(WRITERS)
        writers += writes
        expected = 0.05 / math.sqrt(2 * 8) if writes else 0.05
        assert p.std().item() == pytest.approx(expected, rel=0.1), name
    assert writers == (16 if preset == "tiny" else 3 * 9)  # v4: three in each of 8 blocks and the MTP block


def test_swiglu_width_is_eight_thirds_rounded_up_to_32():
    from model.transformer import ffn_hidden_size

    for d in (32, 96, 128, 200, 512):
        expected = next(w for w in range(32, 4 * d, 32) if w >= 8 * d / 3)
        assert ffn_hidden_size(d, 0) == expected
    assert ffn_hidden_size(128, 100) == 100


@pytest.mark.parametrize("preset", [["model=tiny"], ["model=tiny", "model.residual=mhc"], ["model=v4_tiny"]],
                         ids=["residual", "mhc", "v4"])
def test_load_for_loads_every_kernel_the_model_uses(preset, monkeypatch):
    """The trainer builds the model's CPU kernels before step 1 (cpu_kernels.load_for): a training
    step afterwards asks for none that load_for did not load."""
    from model import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "known", {})
    cfg = compose_config(preset).model
    cpu_kernels.load_for(cfg)
    loaded = set(cpu_kernels.known)
    torch.manual_seed(0)
    model = build_model(cfg, 256).train()
    model.on_step_start(10**6, False)  # V4: sparse CSA, past the indexer's warm-up
    idx = torch.randint(0, 256, (2, 65))
    model(idx[:, :-1], idx[:, 1:]).backward()
    assert set(cpu_kernels.known) == loaded


def test_flops_per_token_counts_six_n_plus_attention():
    model = tiny_model()
    n = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("embed"))
    assert model.flops_per_token(64) == 6 * n + 12 * 2 * 32 * 64


def test_flops_per_token_counts_every_matmul_that_runs():
    """A tied head is one parameter but still a matmul (its FLOPs were dropped: with a BPE
    vocabulary, half the model's); MTP's h_proj runs once per stream of the hyper-connections."""
    untied, tied = (build_model(compose_config(["model=tiny", f"model.tie_embeddings={t}"]).model, 256)
                    for t in ("false", "true"))
    assert tied.flops_per_token(64) == untied.flops_per_token(64)
    v4 = compose_config(["model=v4_tiny"]).model
    with_mtp, without = build_model(v4, 256), build_model(compose_config(["model=v4_tiny", "model.mtp_depth=0"]).model, 256)
    d, n = v4.d_model, v4.n_streams
    mtp_params = with_mtp.num_active_params() - without.num_active_params()
    mtp_attention = with_mtp.mtp.block.attn.attention_flops(64)
    assert with_mtp.flops_per_token(64) - without.flops_per_token(64) == \
        6 * (mtp_params + with_mtp.head.weight.numel() + (n - 1) * d * d) + 3 * mtp_attention


# -- the dense sublayers' fast forms against their plain PyTorch formulations --------------------

def rope_reference(x, cos, sin):
    """Rotation of channel pairs (2i, 2i+1), written out in real arithmetic."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[: x.shape[-2]].to(x.dtype), sin[: x.shape[-2]].to(x.dtype)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_rope_equals_the_real_rotation_forward_and_backward(dtype, tol):
    cos, sin = rope_tables(16, 8, 10000.0)
    qkv = torch.randn(2, 16, 3 * 2 * 8, dtype=dtype, requires_grad=True)
    q, k, _ = qkv.view(2, 16, 3, 2, 8).permute(2, 0, 3, 1, 4)  # strided views, as in Attention
    odd = torch.randn(2, 2, 16, 11, dtype=dtype, requires_grad=True)  # a slice at an odd offset
    for x, leaf in ((q, qkv), (k, qkv), (odd[..., 3:], odd)):
        g = torch.randn(x.shape, dtype=dtype)
        ours, ref = apply_rope(x, cos, sin), rope_reference(x, cos, sin)
        torch.testing.assert_close(ours, ref, rtol=0, atol=tol)
        grad_ours, = torch.autograd.grad(ours, leaf, g)
        grad_ref, = torch.autograd.grad(ref, leaf, g)
        torch.testing.assert_close(grad_ours, grad_ref, rtol=0, atol=tol)


@pytest.mark.parametrize("width", [12, 13, 8], ids=["even-rest", "odd-rest", "all-rotated"])
def test_rope_on_the_last_channels_leaves_the_others_exactly(width):
    """V4's partial RoPE: the last rope_dim channels rotated as pairs from their own start, the
    others (finite) passed through bit for bit, forward and backward (query-major tables too)."""
    from model.compressor import rope_last

    cos, sin = rope_tables(16, 8, 10000.0)
    for x, c, s in ((torch.randn(2, 16, width), cos, sin),
                    (torch.randn(2, 16, 3, width), cos[:, None], sin[:, None])):
        x.requires_grad_()
        g = torch.randn(x.shape)
        ours = rope_last(x, c, s, 8)
        x1, x2 = x[..., -8:].unflatten(-1, (-1, 2)).unbind(-1)
        ref = torch.cat((x[..., :-8], torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), -1).flatten(-2)), -1)
        assert torch.equal(ours[..., :-8], x[..., :-8])
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
        grad_ours, = torch.autograd.grad(ours, x, g)
        grad_ref, = torch.autograd.grad(ref, x, g)
        assert torch.equal(grad_ours[..., :-8], g[..., :-8])
        torch.testing.assert_close(grad_ours, grad_ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_weightless_rms_norm_equals_torch_forward_and_backward(dtype, tol):
    """V4's per-head query norm: no weight."""
    x = (3 * torch.randn(5, 7, 3, 24, dtype=dtype)).requires_grad_()
    g = torch.randn(x.shape, dtype=dtype)
    y_ours, y_ref = rms_norm(x, None, 1e-6), torch.nn.functional.rms_norm(x, (24,), None, 1e-6)
    torch.testing.assert_close(y_ours, y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(torch.autograd.grad(y_ours, x, g)[0], torch.autograd.grad(y_ref, x, g)[0],
                               rtol=tol, atol=tol)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda t: rms_norm(t, None, 1e-6), (x[:2, :2].detach().requires_grad_(),))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_rmsnorm_equals_torch_forward_and_backward(dtype, tol):
    ref = torch.nn.RMSNorm(24, eps=1e-6).to(dtype)
    ours = RMSNorm(24, eps=1e-6).to(dtype)
    with torch.no_grad():
        ref.weight.normal_()
        ours.weight.copy_(ref.weight)
    x = (3 * torch.randn(5, 7, 24, dtype=dtype)).requires_grad_()
    g = torch.randn(5, 7, 24, dtype=dtype)
    y_ref, y_ours = ref(x), ours(x)
    torch.testing.assert_close(y_ours, y_ref, rtol=tol, atol=tol)
    for a, b in zip(torch.autograd.grad(y_ours, (x, ours.weight), g), torch.autograd.grad(y_ref, (x, ref.weight), g)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # the reference, F.rms_norm
def test_rmsnorm_gradcheck_and_bf16_activations():
    norm = RMSNorm(6, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.normal_()
    assert torch.autograd.gradcheck(norm, (torch.randn(3, 6, dtype=torch.float64, requires_grad=True),))
    # bf16 activations with fp32 weights (autocast): bf16 out, gradients in each input's dtype
    norm = RMSNorm(16).float()
    x = torch.randn(4, 16).bfloat16().requires_grad_()
    y = norm(x)
    y.float().sum().backward()
    assert y.dtype == x.grad.dtype == torch.bfloat16 and norm.weight.grad.dtype == torch.float32
    torch.testing.assert_close(y, torch.nn.functional.rms_norm(x, (16,), norm.weight, norm.eps))


@pytest.mark.parametrize("clamp", [None, 0.7])
def test_swiglu_equals_the_chunked_form(clamp):
    swiglu = SwiGLU(8, 10, clamp).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 5, 8, dtype=torch.float64)

    def chunked(x):
        return swiglu.down(clamped_swiglu(*swiglu.gate_up(x).chunk(2, dim=-1), clamp))

    ours, ref = swiglu(x), chunked(x)
    params = (x, swiglu.gate_up.weight, swiglu.down.weight)
    grads_ours, grads_ref = torch.autograd.grad(ours, params, g), torch.autograd.grad(ref, params, g)
    # on the CPU the fused kernel (model/csrc/swiglu.cpp) forms the sigmoid its own way
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    for a, b in zip(grads_ours, grads_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(swiglu, (x,))


def kernels_on(monkeypatch, on: bool):
    import model.layers as layers

    monkeypatch.setattr(layers.cpu_kernels, "available", lambda source: on)


@pytest.mark.parametrize("clamp", [None, 7.0])
def test_fused_swiglu_follows_pytorch_in_float32(clamp, monkeypatch):
    """The CPU kernel against PyTorch's path (silu, clamps and masks as autograd derives them): a
    row width that is no multiple of the kernel's 8 or 16 lanes, inputs far out on both sides (its exp
    is clamped where e^x would leave the normal floats), NaN where PyTorch has NaN, masked
    gradients exactly where PyTorch masks them."""
    gen = torch.Generator().manual_seed(0)
    gate_up = 6 * torch.randn(37, 2 * 21, generator=gen)
    gate_up[0, 0] = gate_up[1, 21] = float("nan")
    gate_up[2, :4] = torch.tensor([-200.0, 200.0, -90.0, 88.5])
    gate_up[3, 21:25] = torch.tensor([-200.0, 200.0, -7.0, 7.0])
    grad = torch.randn(37, 21, generator=gen)
    results = []
    for fused in (True, False):
        kernels_on(monkeypatch, fused)
        x = gate_up.clone().requires_grad_()
        out = swiglu_fn(x, clamp)
        results.append((out, *torch.autograd.grad(out, x, grad)))
    (out, d), (ref, d_ref) = results
    for a, b in ((out, ref), (d, d_ref)):
        assert torch.equal(a.isnan(), b.isnan())
        # a few float32 ulps; absolutely near silu's and its slope's zeros, where rounding cancels
        torch.testing.assert_close(a, b, rtol=3e-7, atol=3e-7, equal_nan=True)
    if clamp is not None:
        gate, up = gate_up.chunk(2, dim=-1)
        masked = torch.cat((~(gate <= clamp), ~((up >= -clamp) & (up <= clamp))), dim=-1)
        assert masked.sum() > 10 and (d[masked] == 0).all() and (d_ref[masked] == 0).all()
    linspace = torch.linspace(-30, 30, 20001).view(1, -1)
    grid = torch.cat((linspace, torch.ones_like(linspace)), dim=1)
    kernels_on(monkeypatch, True)
    torch.testing.assert_close(swiglu_fn(grid, None), clamped_swiglu(linspace, 1.0, None), rtol=3e-7, atol=0)


def test_fused_swiglu_refuses_double_backward():
    x = torch.randn(4, 6, requires_grad=True)
    (d,) = torch.autograd.grad(swiglu_fn(x, None).sum(), x, create_graph=False)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(swiglu_fn(x, None).sum(), x, create_graph=True)


@pytest.mark.parametrize("weighted", [True, False])
def test_fused_rms_norm_follows_the_eager_path(weighted, monkeypatch):
    """model/csrc/rms_norm.cpp against the eager closed form (float32: a few ulps), over more rows
    than one chunk of the weight's gradient sum, which does not depend on the thread count."""
    gen = torch.Generator().manual_seed(0)
    x0 = 3 * torch.randn(700, 40, generator=gen)
    w0 = torch.randn(40, generator=gen)
    g = torch.randn(700, 40, generator=gen)
    results, threads_before = {}, torch.get_num_threads()
    try:
        for fused, threads in ((True, 2), (True, 1), (False, 2)):
            kernels_on(monkeypatch, fused)
            torch.set_num_threads(threads)
            x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
            y = rms_norm(x, w if weighted else None, 1e-6)
            results[fused, threads] = (y, *torch.autograd.grad(y, (x, w) if weighted else (x,), g))
    finally:
        torch.set_num_threads(threads_before)
    for a, b in zip(results[True, 2], results[True, 1]):
        assert torch.equal(a, b)
    for a, b in zip(results[True, 2], results[False, 2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)


def test_fused_rms_norm_leaves_strided_inputs_to_the_eager_path_and_refuses_double_backward():
    x = torch.randn(6, 8, 5).transpose(1, 2).requires_grad_()  # not contiguous
    w = torch.randn(8, requires_grad=True)
    ref = torch.nn.functional.rms_norm(x, (8,), w, 1e-6)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), ref)
    x = torch.randn(4, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(rms_norm(x, w, 1e-6).sum(), x, create_graph=True)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_fused_rotary_qkv_equals_rope_on_the_projection_views(dtype, tol, monkeypatch):
    """model/csrc/rope.cpp against apply_rope on strided views of the fused projection: the heads
    forward; backward with gradients in any layout (strided along T here), or for q alone."""
    cos, sin = rope_tables(20, 8, 10000.0)
    qkv0 = torch.randn(2, 13, 3 * 3 * 8, dtype=dtype)  # 13 of 20 positions, 3 heads of 8
    grads = [torch.randn(2, 13, 3, 8, dtype=dtype).transpose(1, 2) for _ in range(3)]  # [B, H, T, D], strided
    results = {}
    for fused in (True, False):
        kernels_on(monkeypatch, fused)
        qkv = qkv0.clone().requires_grad_()
        heads = rotary_qkv(qkv, 3, cos, sin)
        results[fused] = (*heads, *torch.autograd.grad(heads, qkv, grads, retain_graph=True),
                          *torch.autograd.grad(heads[0], qkv, grads[0]))
    for a, b in zip(results[True], results[False]):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=tol)
    q, k, v = results[False][:3]
    torch.testing.assert_close(v, qkv0.view(2, 13, 3, 3, 8)[:, :, 2].transpose(1, 2), rtol=0, atol=0)
    kernels_on(monkeypatch, True)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda t: rotary_qkv(t, 3, cos, sin), (qkv0[:1, :5].clone().requires_grad_(),))
        with pytest.raises(RuntimeError, match="no double backward"):
            x = qkv0.clone().requires_grad_()
            torch.autograd.grad(rotary_qkv(x, 3, cos, sin)[0].sum(), x, create_graph=True)


def test_fused_kernels_under_bf16_autocast_follow_the_eager_path(monkeypatch):
    """bfloat16 activations (CPU autocast): the rotary kernel gives float32 heads from a bf16
    projection (as the eager path does) and a bf16 gradient equal to the eager one; the SwiGLU
    kernel computes in float32 and rounds once, within one bf16 ulp of PyTorch's two roundings, NaN
    where PyTorch has NaN."""
    gen = torch.Generator().manual_seed(0)
    cos, sin = rope_tables(20, 8, 10000.0)
    qkv0 = torch.randn(2, 13, 3 * 3 * 8, generator=gen).bfloat16()
    grads = [torch.randn(2, 3, 13, 8, generator=gen) for _ in range(3)]
    gate_up0 = (4 * torch.randn(37, 2 * 21, generator=gen)).bfloat16()
    gate_up0[0, 0] = float("nan")
    g_act = torch.randn(37, 21, generator=gen).bfloat16()
    results = {}
    for fused in (True, False):
        kernels_on(monkeypatch, fused)
        qkv, gate_up = qkv0.clone().requires_grad_(), gate_up0.clone().requires_grad_()
        heads = rotary_qkv(qkv, 3, cos, sin)
        act = swiglu_fn(gate_up, 7.0)
        results[fused] = (*heads, *torch.autograd.grad(heads, qkv, grads), act, *torch.autograd.grad(act, gate_up, g_act))
    (q, k, v, d_qkv, act, d_act), (q_ref, k_ref, v_ref, d_qkv_ref, act_ref, d_act_ref) = results[True], results[False]
    assert q.dtype == k.dtype == v.dtype == q_ref.dtype == torch.float32 and d_qkv.dtype == torch.bfloat16
    for a, b in ((q, q_ref), (k, k_ref), (v, v_ref)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert torch.equal(d_qkv, d_qkv_ref)
    assert act.dtype == d_act.dtype == torch.bfloat16
    for a, b in ((act, act_ref), (d_act, d_act_ref)):
        assert torch.equal(a.isnan(), b.isnan())
        torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -7, atol=1e-6, equal_nan=True)


def test_cpu_attention_runs_in_float32_under_bf16_autocast(monkeypatch):
    """PyTorch's CPU attention backward is slower in bf16 than in float32, and autocast would run it
    in bf16: the dense attention hands it float32 heads with autocast off, on the fused and eager
    paths alike."""
    import torch.nn.functional as F

    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, **kw):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 16))
    for fused in (True, False):
        kernels_on(monkeypatch, fused)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, ids)
        loss.backward()
    assert seen and all(s == (torch.float32, torch.float32, torch.float32, False) for s in seen)
