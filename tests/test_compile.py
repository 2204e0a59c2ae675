"""trainer.compile: compiled blocks train as eager ones do (fp32, 1e-5), in one graph per block
(no graph breaks) compiled once (no recompiles after the first steps); the fused hyper-connection
kernels are torch.library custom ops that pass opcheck."""
import os
import shutil

import pytest
import torch

from model import hc_kernel
from tests.conftest import TINY, V4_RUN, compose_config, metrics_rows
from train.compile import frames_compiled, graph_breaks
from train.trainer import Trainer

# One worker compiles them in turn: variants share many of Inductor's graphs and kernels (V4 at
# ZeRO-2 nearly all of the ZeRO-0 run's), which a second worker compiling at once would build again.
pytestmark = pytest.mark.xdist_group("compile")
needs_kernels = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None,
                                   reason="no C++ compiler: the kernels cannot build")


def coefficients(n: int, c: int, mix: bool, dtype=torch.float64, requires_grad=True):
    gen = torch.Generator().manual_seed(0)
    k = n * n + 2 * n if mix else n

    def r(*shape, scale=1.0):
        return (scale * torch.randn(shape, generator=gen, dtype=dtype)).requires_grad_(requires_grad)

    empty = torch.empty(0, dtype=dtype)
    return [r(k, n * c, scale=0.3), r(3 if mix else 1, scale=0.7) + 0.0, r(n),
            r(n) if mix else empty, r(n, n) if mix else empty]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float64])
@pytest.mark.parametrize("mix", [True, False], ids=["mix", "reduce"])
def test_mhc_in_ops_pass_opcheck(mix, dtype):
    n, c, tokens = 4, 8, 19
    x = torch.randn(tokens, n * c, dtype=dtype, requires_grad=True)
    params = [p.detach().requires_grad_(p.numel() > 0) for p in coefficients(n, c, mix, dtype)]
    torch.library.opcheck(hc_kernel.mhc_in_forward_op, (x, *params, n, 20, 1e-6, 1e-6))
    with torch.no_grad():
        x_in, pre, post, res, mp, rinv = hc_kernel.mhc_in_forward_op(x, *params, n, 20, 1e-6, 1e-6)
    phi, alpha, _, _, b_res = (p.detach() for p in params)
    grads = [torch.randn_like(t) for t in (x_in, post, res)]
    # a consuming mix's gradient exists only where mhc_in has the mix rows
    for g_mix in (torch.randn_like(x.detach()), torch.empty(0, dtype=dtype))[0 if mix else 1:]:
        torch.library.opcheck(hc_kernel.mhc_in_backward_op, (x.detach(), phi, alpha, b_res, pre, post, mp, rinv,
                                                             *grads, g_mix, res, n, 20, 1e-6))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float64])
def test_mix_ops_pass_opcheck(dtype):
    n, c, tokens = 4, 8, 19

    def r(*shape):
        return torch.randn(shape, dtype=dtype, requires_grad=True)

    x, y, post, res = r(tokens, n * c), r(tokens, c), r(tokens, n), r(tokens, n * n)
    torch.library.opcheck(hc_kernel.mix_forward_op, (x, y, post, res, n))
    g = torch.randn(tokens, n * c, dtype=dtype)
    for want_dx in (True, False):
        torch.library.opcheck(hc_kernel.mix_backward_op, tuple(t.detach() for t in (x, y, post, res, g)) + (n, want_dx))


@needs_kernels
def test_compiled_hyper_connection_is_one_graph_with_the_eager_gradients():
    """The kernels inside a compiled function: no graph break, and the ops' registered autograd
    (no Link hand-over) gives the eager Link path's outputs and gradients."""
    from model.mhc import HyperConnection

    torch.manual_seed(0)
    hc = HyperConnection("mhc", 4, 8, index=1)
    with torch.no_grad():
        hc.alpha.fill_(0.7)
        hc.b_res.add_(0.3 * torch.randn(4, 4))
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(2, 7, 4, 8)

    def run(fn):
        xs = x.clone().requires_grad_()
        out = fn(xs)
        return [out, *torch.autograd.grad(out.square().sum(), [xs, hc.phi.weight, hc.alpha, hc.b_res, lin.weight])]

    assert hc_kernel.available()  # known before tracing, as the trainer sees to (cpu_kernels.load_for)
    breaks = graph_breaks()
    compiled = run(torch.compile(lambda xs: hc(xs, lin), fullgraph=True))
    eager = run(lambda xs: hc(xs, lin))
    assert graph_breaks() == breaks
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def train_steps(overrides, out_dir, cache, steps=5):
    """Losses of `steps` steps (run_step: probes included), the frames compiled in each step, and
    the graph breaks in all of them."""
    cfg = compose_config([*overrides, "trainer.max_steps=100", "trainer.eval_every=0", "trainer.checkpoint_every=0",
                          "trainer.progress=false", "logger.wandb.mode=disabled", "trainer.precision=fp32"],
                         out_dir=out_dir, cache_dir=cache)
    t = Trainer(cfg)
    assert bool(t.compiled) == cfg.trainer.compile
    t.callbacks.clear()  # no metrics file: the losses come back from run_step
    losses, frames, breaks = [], [], graph_breaks()
    for _ in range(steps):
        before = frames_compiled()
        losses.append(t.run_step()["loss"])
        frames.append(frames_compiled() - before)
    return losses, frames, graph_breaks() - breaks


def check_compiled_equals_eager(overrides, tmp_path, data_cache, compiling_steps=(1, 2)):
    """`compiling_steps`: the steps that may compile (the first two: forward, then backward and
    what the first optimizer step changes); some frame must be compiled in them and none after."""
    eager, _, _ = train_steps([*overrides, "trainer.compile=false"], tmp_path / "eager", data_cache)
    compiled, frames, breaks = train_steps([*overrides, "trainer.compile=true"], tmp_path / "compiled", data_cache)
    assert sum(frames[:2]) > 0, "nothing was compiled in the first steps"  # else every check below passes
    assert breaks == 0, "graph breaks in compiled blocks"
    assert [step for step, n in enumerate(frames, 1) if n and step not in compiling_steps] == [], \
        f"the blocks were compiled again after the first steps (frames compiled per step: {frames})"
    assert compiled == pytest.approx(eager, rel=1e-5)
    return frames


def test_compiled_training_equals_eager_residual(tmp_path, data_cache, fresh_compiler):
    """The one fast case (tiny dense model, ZeRO-0, probes on every other step)."""
    check_compiled_equals_eager([*TINY, "probes.every=2"], tmp_path, data_cache)


def test_compile_time_is_logged_once_counted_in_the_summary_and_kept_out_of_tokens_per_s(tmp_path, data_cache,
                                                                                           caplog, fresh_compiler):
    """Step 1 compiles the training graphs, the first evaluation the no-grad ones: both go into
    summary.json's compile_s, one log line reports step 1's, and step 1's tokens/s leaves them out
    (counted, step 1 would take longer than the compiling)."""
    import json
    import logging

    cfg = compose_config([*TINY, "trainer.compile=true", "trainer.max_steps=5", "trainer.eval_every=2",
                          "trainer.checkpoint_every=0", "trainer.precision=fp32"],
                         out_dir=tmp_path, cache_dir=data_cache)
    t = Trainer(cfg)
    evaluate, evaluations = t.evaluate, []

    def timed_evaluate():
        before = t.compile_s
        loss = evaluate()
        evaluations.append(t.compile_s - before)
        return loss

    t.evaluate = timed_evaluate
    with caplog.at_level(logging.INFO, logger="train.trainer"):
        t.fit()
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("torch.compile:")]
    assert len(logged) == 1 and "in step 1" in logged[0]
    assert evaluations[0] > 0 and evaluations[1:] == [0.0] * (len(evaluations) - 1)
    step1_compile_s = json.loads((tmp_path / "summary.json").read_text())["compile_s"] - evaluations[0]
    assert step1_compile_s > 0
    rows = metrics_rows(tmp_path)
    step1_s = t.tokens_per_step / rows[0]["tokens_per_s"]
    assert step1_s < 0.5 * step1_compile_s


@pytest.mark.slow
@pytest.mark.parametrize("variant,stage", [("residual", 2), ("hc", 0), ("hc", 2), ("mhc", 0), ("mhc", 2),
                                           ("v4-mtp-warmup", 0), ("v4", 2), ("mhc-probes-checkpointing", 1),
                                           ("mhc-unfused", 0)])
def test_compiled_training_equals_eager(variant, stage, tmp_path, data_cache, fresh_compiler):
    """Every variant at ZeRO 0 and 2 (the fast case is residual at ZeRO-0); residual at ZeRO-2 with
    activation checkpointing (which calls the compiled block again in backward); hc and mhc: the
    fused kernels as custom ops inside the graph, and mhc at ZeRO-1 with probes and activation
    checkpointing together; mhc-unfused: the PyTorch path a GPU compiles (Inductor → Triton there)
    in place of the kernels; v4: CSA (sparse from the first step) and HCA attention with their
    window part, hashed and routed MoE through the grouped-matmul op, in mHC blocks; at ZeRO-0 also
    the MTP block, and the indexer's warm-up (dense CSA, only the indexer training) for two steps:
    step 3, the first sparse one, compiles again, and nothing after it. V4 caught a wrong gradient:
    Inductor's backward of the window's overlapping `unfold`."""
    # CSA and HCA each run the window attention too; two distinct block graphs (the MTP block's
    # window layer is a third)
    v4 = [*V4_RUN, "model.n_layers=2", "model.attn.layers=[csa,hca]"]
    # (overrides, the steps after the first two that must compile again)
    overrides, recompiling = {
        "residual": ([*TINY, "model.activation_checkpointing=true"], ()),
        "hc": ([*TINY, "model.residual=hc"], ()),
        "mhc": ([*TINY, "model.residual=mhc"], ()),
        "mhc-probes-checkpointing": ([*TINY, "model.residual=mhc", "probes.every=2",
                                      "model.activation_checkpointing=true"], ()),
        # three Sinkhorn iterations: the PyTorch path unrolls each into the graph (20 took 10 s more cold)
        "mhc-unfused": ([*TINY, "model.residual=mhc", "model.fused_hc=false", "model.sinkhorn_iters=3"], ()),
        "v4": ([*v4, "model.mtp_depth=0", "model.attn.indexer_warmup_steps=0"], ()),
        "v4-mtp-warmup": ([*v4, "model.mtp_depth=1", "model.attn.indexer_warmup_steps=2"], (3,)),
    }[variant]
    frames = check_compiled_equals_eager([*overrides, f"deepspeed.zero_stage={stage}"], tmp_path, data_cache,
                                         compiling_steps=(1, 2, *recompiling))
    assert all(frames[step - 1] > 0 for step in recompiling), f"frames compiled per step: {frames}"


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_compiled_run_resumes_onto_the_uninterrupted_eager_run(stage, tmp_path, data_cache, caplog, fresh_compiler):
    """A compiled run killed after step 3 (checkpoint at 2) resumes onto the uninterrupted eager
    run, and its checkpoint names the weights as the eager run's does: at ZeRO-2 with whole graphs,
    at ZeRO-3 where DeepSpeed's parameter hooks break the blocks' graphs (the trainer warns)."""
    import json

    from tests.conftest import interrupted_run

    common = [*TINY, f"deepspeed.zero_stage={stage}", "trainer.max_steps=5", "trainer.eval_every=0",
              "trainer.checkpoint_every=2"]

    def losses(out):
        return [r["loss"] for r in metrics_rows(out)]

    def saved_names(run):
        name = "zero_pp_rank_0_mp_rank_00_model_states.pt" if stage == 3 else "mp_rank_00_model_states.pt"
        path = tmp_path / run / "checkpoints" / "step_00000004" / name
        return torch.load(path, weights_only=False)["module"].keys()

    Trainer(compose_config(common, out_dir=tmp_path / "ref", cache_dir=data_cache)).fit()
    assert "trainer.compile with ZeRO-3" not in caplog.text
    resumed = [*common, "trainer.compile=true"]
    interrupted_run(compose_config(resumed, out_dir=tmp_path / "resumed", cache_dir=data_cache), after_step=3)
    assert ("trainer.compile with ZeRO-3" in caplog.text) == (stage == 3)
    Trainer(compose_config(resumed, out_dir=tmp_path / "resumed", cache_dir=data_cache)).fit()
    starts = json.loads((tmp_path / "resumed" / "environment.json").read_text())
    assert [s["from_step"] for s in starts] == [0, 2]  # it resumed, rather than started again
    assert saved_names("resumed") == saved_names("ref")
    assert len(losses(tmp_path / "ref")) == 5
    assert losses(tmp_path / "resumed") == pytest.approx(losses(tmp_path / "ref"), rel=1e-5)


@pytest.mark.parametrize("kind,sparse", [("hca", False), ("csa", True)], ids=["hca", "csa-sparse"])
def test_attention_in_query_chunks_traces_into_one_graph(kind, sparse):
    """Past `query_chunk` queries V4 attention loops over chunks recomputed in backward
    (torch.utils.checkpoint): that traces into one graph (fullgraph) with the eager outputs and
    gradients. aot_eager: the tracing is what is checked; Inductor's kernels are the V4 test's."""
    from tests.test_v4 import D, attention

    attn = attention(kind, ratio=3, window=5, topk=2, sparse=sparse).train()
    attn.query_chunk = 10  # 19 queries: chunks of 10 and 9
    x = torch.randn(2, 19, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def run(fn):
        xs = x.clone().requires_grad_()
        out = fn(xs)
        loss = out.square().sum() + (attn.aux_loss if attn.aux_loss is not None else 0)
        return [out, *torch.autograd.grad(loss, [xs, *attn.parameters()], allow_unused=True)]

    eager = run(attn)
    compiled = run(torch.compile(attn, backend="aot_eager", fullgraph=True))
    for a, b in zip(compiled, eager):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
