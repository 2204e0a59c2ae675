"""The trainer end to end in-process: learning, accumulation, presets, resume, divergence."""
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import (CONFIGS, V4_RUN, compose_config, interrupted_run, metrics_rows, without_measured,
                            word_corpus)
from train.trainer import Diverged, Trainer


@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_loss_decreases_over_30_steps(tiny_config, optim):
    cfg = tiny_config(f"optim={optim}", "trainer.max_steps=30", "trainer.eval_every=0", "optim.lr=1e-2",
                      "optim.warmup_steps=2")
    summary = Trainer(cfg).fit()
    losses = [m["loss"] for m in metrics_rows(cfg.out_dir)]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert summary["final_val_loss"] < losses[0]


def test_metrics_keys_and_token_count(tiny_config):
    """A row's lr is the rate its step applied (warm-up .5, 1, then cosine from the peak down to
    min_lr_ratio), not the next step's, which the scheduler has moved to by the time the row is written."""
    from optim.schedule import lr_multiplier

    cfg = tiny_config("trainer.max_steps=4", "trainer.eval_every=2")
    Trainer(cfg).fit()
    rows = metrics_rows(cfg.out_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all({"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"} <= r.keys() for r in rows)
    assert ["val_loss" in r for r in rows] == [False, True, False, True]
    assert [r["tokens"] for r in rows] == [8 * 32 * s for s in (1, 2, 3, 4)]
    o = cfg.optim
    applied = [o.lr * lr_multiplier(s, max_steps=4, schedule=o.schedule, warmup_steps=2, min_lr_ratio=o.min_lr_ratio,
                                    decay_fraction=o.decay_fraction) for s in range(4)]
    assert o.schedule == "cosine" and applied == [o.lr * m for m in (0.5, 1.0, 1.0, o.min_lr_ratio)]
    assert [r["lr"] for r in rows] == applied
    assert not any("lr/adamw" in r for r in rows)  # one optimizer, one rate


@pytest.mark.parametrize("zero", [0, 2])
def test_a_muon_run_logs_its_adamw_halfs_rate_too(zero, tiny_config):
    """`lr` is the Muon half's (optim.lr); the AdamW half (embeddings, head, norms) has optim.adamw_lr
    on the same schedule, logged as lr/adamw, at ZeRO 0 and 2 (DeepSpeed's groups keep their keys)."""
    cfg = tiny_config("optim=muon", "optim.lr=0.02", "optim.adamw_lr=0.004", "trainer.max_steps=3",
                      f"deepspeed.zero_stage={zero}")
    Trainer(cfg).fit()
    rows = metrics_rows(cfg.out_dir)
    assert rows[-1]["lr"] > 0 and [r["lr/adamw"] for r in rows] == pytest.approx([r["lr"] * 0.2 for r in rows], rel=1e-12)


def test_gradient_accumulation_matches_one_big_batch(tiny_config, tmp_path):
    """4 micro-batches of 2 sequences must update exactly like one batch of 8 (fp32, no dropout)."""
    runs = []
    for i, micro in enumerate((8, 2)):
        cfg = tiny_config("trainer.max_steps=5", "trainer.eval_every=0", f"trainer.micro_batch_size={micro}",
                          "trainer.checkpoint_every=0", "trainer.grad_clip=0.5")
        cfg.out_dir = str(tmp_path / f"acc{i}")
        # Same windows in the same order: the loader's order depends on window count per step only.
        Trainer(cfg).fit()
        runs.append(metrics_rows(cfg.out_dir))
    for a, b in zip(*runs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_the_gradient_norm_without_clipping_is_measured_at_every_zero_stage(tiny_config, tmp_path):
    """trainer.grad_clip=0 at ZeRO ≥ 1 logged grad_norm 0.0: the trainer measured p.grad, which
    ZeRO had moved into its partitions (and a non-finite gradient would have read as finite)."""
    norms = []
    for stage in (0, 1):
        cfg = tiny_config("trainer.max_steps=3", "trainer.eval_every=0", "trainer.checkpoint_every=0",
                          "trainer.grad_clip=0", f"deepspeed.zero_stage={stage}")
        cfg.out_dir = str(tmp_path / f"z{stage}")
        Trainer(cfg).fit()
        norms.append([r["grad_norm"] for r in metrics_rows(cfg.out_dir)])
    assert min(norms[0]) > 0.1 and norms[1] == pytest.approx(norms[0], rel=1e-4)


def test_gradients_are_clipped_alike_at_every_zero_stage(tiny_config, tmp_path):
    """trainer.grad_clip clips at ZeRO-0 (the trainer itself) and at ZeRO >= 1 (DeepSpeed): the same
    losses and norms at both stages, and not those of the unclipped run (the clip is active)."""
    runs = {}
    for stage, clip in ((0, 0.05), (1, 0.05), (0, 0)):
        cfg = tiny_config("trainer.max_steps=3", "trainer.eval_every=0", "trainer.checkpoint_every=0",
                          "optim.lr=1e-2", f"trainer.grad_clip={clip}", f"deepspeed.zero_stage={stage}")
        cfg.out_dir = str(tmp_path / f"z{stage}-{clip}")
        Trainer(cfg).fit()
        runs[stage, clip] = metrics_rows(cfg.out_dir)
    clipped, zero1, unclipped = ([r[k] for r in rows for k in ("loss", "grad_norm")] for rows in runs.values())
    assert min(unclipped[1::2]) > 0.5  # gradient norms well above the clip
    assert zero1 == pytest.approx(clipped, rel=1e-5)
    # step 3's loss (measured: 5e-3 apart): Adam's first update is blind to a gradient's scale
    assert abs(clipped[-2] - unclipped[-2]) > 1e-3, (clipped, unclipped)


def test_a_short_last_validation_batch_counts_for_its_windows(tiny_config, tmp_path):
    """A validation split that ends in a short batch: every window weighs the same in the validation
    loss (the short batch by its share of a full one), as train.evaluate scores it."""
    corpus = word_corpus(tmp_path / "corpus", n_docs=18)  # 50 validation windows
    t = Trainer(tiny_config("data.source=files", f"data.path={corpus}", "trainer.eval_batches=1000"))
    sizes = [x.size(0) for x, _ in t.val_batches]
    assert 0 < sizes[-1] < t.micro_batch == sizes[0]
    with torch.no_grad():
        t.engine.eval()
        losses = [float(t.engine(x, y)) for x, y in t.val_batches]
    assert t.evaluate() == pytest.approx(sum(n * loss for n, loss in zip(sizes, losses)) / sum(sizes), rel=1e-6)


def test_the_fused_kernels_are_loaded_before_the_first_step_is_timed(tiny_config, monkeypatch):
    """Loading (on a fresh machine building, ~25 s) the model's CPU kernels happened inside step 1,
    whose time counts as training: tokens/s and MFU. The trainer loads them when it is built."""
    from model import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "known", {})
    Trainer(tiny_config("model.residual=mhc"))
    assert {"rms_norm", "rope", "swiglu", "hyper_connection"} <= cpu_kernels.known.keys()


EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_preset_trains_two_steps(name, tmp_path, data_cache):
    cfg = compose_config([f"experiment={name}", "trainer.max_steps=2", "trainer.progress=false",
                          "logger.wandb.mode=disabled"], out_dir=tmp_path / name, cache_dir=data_cache)
    summary = Trainer(cfg).fit()
    assert summary["steps"] == 2 and summary["status"] == "completed"
    assert torch.isfinite(torch.tensor(summary["final_val_loss"]))


@pytest.mark.parametrize("model", [["model.dropout=0.1"], [*V4_RUN, "model.attn.indexer_warmup_steps=4"]],
                         ids=["dense-dropout", "v4-tiny"])
def test_resume_continues_exactly(tiny_config, tmp_path, model):
    """Kill a run after step 7 (last checkpoint at 5); the resumed run's log equals an uninterrupted
    one (dropout RNG; for V4-tiny also the MoE biases, the sparse switch after step 4, the MTP weight)."""
    common = ("trainer.max_steps=10", "trainer.eval_every=5", "trainer.checkpoint_every=5", *model)
    ref = tiny_config(*common)
    ref.out_dir = str(tmp_path / "ref")
    Trainer(ref).fit()

    cfg = tiny_config(*common)
    cfg.out_dir = str(tmp_path / "resumed")
    interrupted_run(cfg, after_step=7)
    assert len(metrics_rows(cfg.out_dir)) == 7
    Trainer(cfg).fit()
    assert without_measured(metrics_rows(cfg.out_dir)) == without_measured(metrics_rows(ref.out_dir))


def test_non_finite_loss_stops_with_error(tiny_config):
    cfg = tiny_config("trainer.max_steps=5")
    t = Trainer(cfg)
    t.engine.module.forward = lambda x, y: (t.engine.module.head.weight.sum() * float("nan"))
    with pytest.raises(Diverged, match="diverged at step 1"):
        t.fit()
    summary = json.loads((Path(cfg.out_dir) / "summary.json").read_text())
    assert summary["status"] == "diverged"


def test_bf16_autocast_follows_fp32(tiny_config, tmp_path):
    """precision=bf16 runs the forward under autocast over fp32 weights (what a GPU gets by default).
    On the mHC model (fused kernels under autocast) its losses must differ from fp32's (autocast is
    on) and stay within 0.01 of them at each of 8 steps (measured: at most 3.4e-4)."""
    losses, summaries = {}, {}
    for precision in ("fp32", "bf16"):
        cfg = tiny_config("model.residual=mhc", "model.n_streams=4", "trainer.max_steps=8", "trainer.eval_every=8",
                          f"trainer.precision={precision}", "optim=muon", "optim.warmup_steps=2")
        cfg.out_dir = str(tmp_path / precision)
        t = Trainer(cfg)
        summaries[precision] = t.fit()
        losses[precision] = [r["loss"] for r in metrics_rows(cfg.out_dir)]
    assert summaries["bf16"]["precision"] == "bf16"
    assert all(p.dtype == torch.float32 for p in t.engine.module.parameters())
    gaps = [abs(a - b) for a, b in zip(losses["fp32"], losses["bf16"])]
    assert len(gaps) == 8 and min(gaps) > 0 and max(gaps) < 0.01, gaps
    assert abs(summaries["bf16"]["final_val_loss"] - summaries["fp32"]["final_val_loss"]) < 0.01


def test_bf16_gradients_are_reduced_in_fp32_at_zero_2(tiny_config):
    """DeepSpeed's torch_autocast tags nn.Linear weights to have their gradients reduced in bf16 at
    ZeRO-1/2 (on one rank too): rounded, where every other parameter's stay fp32. No tag here."""
    from deepspeed.runtime.torch_autocast import get_comm_dtype

    t = Trainer(tiny_config("trainer.precision=bf16", "deepspeed.zero_stage=2", "trainer.max_steps=1"))
    assert t.precision == "bf16"
    assert {get_comm_dtype(p) for p in t.engine.module.parameters()} == {torch.float32}


def test_metrics_carry_mfu_and_peak_memory(tiny_config):
    """mfu = FLOPs/token × tokens/s ÷ peak, with the peak given; memory is the process's peak RSS
    on CPU; the summary carries both, environment.json the peak."""
    import resource

    cfg = tiny_config("trainer.max_steps=2", "trainer.eval_every=0", "trainer.peak_tflops=0.5")
    t = Trainer(cfg)
    summary = t.fit()
    rows = metrics_rows(cfg.out_dir)
    for r in rows:
        assert r["mfu"] == pytest.approx(t.flops_per_token * r["tokens_per_s"] / 0.5e12, rel=1e-12)
        assert 0.01 < r["mem/peak_gb"] <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    assert summary["mfu"] == pytest.approx(t.flops_per_token * summary["tokens_per_s"] / 0.5e12, rel=1e-12)
    assert summary["mem/peak_gb"] >= rows[-1]["mem/peak_gb"]
    peak = json.loads((Path(cfg.out_dir) / "environment.json").read_text())[-1]["peak"]
    assert peak["peak_tflops_per_device"] == 0.5 and peak["peak_source"] == "trainer.peak_tflops"


def test_cpu_peak_is_measured_once_at_the_runs_precision(tiny_config):
    from train.mfu import measured_matmul_tflops

    cfg = tiny_config("trainer.max_steps=1", "trainer.eval_every=0")
    t = Trainer(cfg)
    t.fit()
    peak = json.loads((Path(cfg.out_dir) / "environment.json").read_text())[-1]["peak"]
    assert peak["peak_source"].startswith("measured: float32")
    tflops, n = measured_matmul_tflops(torch.float32, torch.get_num_threads())
    assert peak["peak_tflops_per_device"] == tflops and peak["peak_source"].startswith(f"measured: float32 {n}x{n}")
    assert 0 < metrics_rows(cfg.out_dir)[0]["mfu"] < 1


def test_profile_writes_a_trace_of_the_chosen_steps_with_block_ranges(tiny_config):
    cfg = tiny_config("trainer.max_steps=4", "trainer.eval_every=0", "trainer.profile=2:3")
    Trainer(cfg).fit()
    traces = list((Path(cfg.out_dir) / "profile").iterdir())
    assert [p.name for p in traces] == ["trace_rank0_steps2-3.json"]
    names = {e.get("name") for e in json.loads(traces[0].read_text())["traceEvents"]}
    assert {"step 2", "step 3"} <= names and not {"step 1", "step 4"} & names
    assert {f"blocks.{i}{part}" for i in (0, 1) for part in ("", ".attn", ".ffn")} <= names
    assert any(n and n.startswith("aten::") for n in names)  # the operators inside the ranges


def test_profile_of_compiled_blocks_names_the_compiled_regions(tiny_config, fresh_compiler):
    """Compiled blocks have no ranges of ours (the compiler fuses across them): the trace shows
    the compiler's regions and graphs, forward and backward, inside the chosen steps."""
    cfg = tiny_config("trainer.max_steps=3", "trainer.eval_every=0", "trainer.profile=2:3", "trainer.compile=true")
    Trainer(cfg).fit()
    (trace,) = (Path(cfg.out_dir) / "profile").iterdir()
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    assert {"step 2", "step 3", "CompiledFunction", "CompiledFunctionBackward"} <= names
    assert any(n and n.startswith("Torch-Compiled Region") for n in names)


@pytest.mark.parametrize("native,expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_takes_bf16_only_where_the_gpu_has_bf16_units(native, expected, monkeypatch):
    """torch.cuda.is_bf16_supported() counts emulated bf16 (V100, T4) by default: slower than fp32."""
    from train.trainer import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    assert resolve_precision("auto", torch.device("cuda")) == expected
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"


@pytest.mark.parametrize("device,tf32,expected", [("cuda", True, "high"), ("cuda", False, "highest"),
                                                  ("cpu", True, "highest")])
def test_tf32_is_set_for_cuda_only(device, tf32, expected):
    from train.trainer import set_matmul_precision

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        set_matmul_precision(torch.device(device), tf32)
        assert torch.get_float32_matmul_precision() == expected
    finally:
        torch.set_float32_matmul_precision(before)


def test_the_engine_takes_the_gpu_this_rank_picked():
    """DeepSpeed would set_device(LOCAL_RANK): an invalid ordinal where a SLURM task sees only its own GPU."""
    from train.trainer import engine_device_args

    assert engine_device_args(torch.device("cuda", 0)).device_rank == 0
    assert engine_device_args(torch.device("cuda", 3)).device_rank == 3
    assert engine_device_args(torch.device("cpu")) is None
