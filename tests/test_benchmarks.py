"""The benchmark scripts behind the README's performance figures run, as a user types them, on a
tiny model, and print their ratios as finite positive numbers. Timings are not checked (the
benchmarks measure, tests do not): a script that crashes or prints nan fails here."""
import math
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, word_corpus

NUMBER = r"([0-9][0-9.,]*|nan|inf)"
# the session's prepared data (attention and sampling set their own; data prepares a small corpus of its own)
CACHE = "data.cache_dir={data_cache}"

# (script and arguments, a pattern each of whose groups is a printed ratio)
RUNS = {
    "minimal_gpt": (["minimal_gpt", "--steps", "1", "--rounds", "1", "model=tiny", CACHE],
                    rf"ours-plain / minimal = {NUMBER}; ours / minimal = {NUMBER}"),
    "overhead": (["overhead", "--steps", "1", "--rounds", "1", "model=tiny", CACHE], rf"ours / plain = {NUMBER}"),
    "compile-pair": (["compile", "--steps", "1", "--rounds", "1", "--eager", "--pair", "model.residual=residual",
                      "model.residual=mhc", "model=tiny", CACHE], rf"step time .* = {NUMBER}"),
    "attention": (["attention", "--model", "v4_tiny", "--lengths", "256,512", "--rounds", "1", "--measure", "both"],
                  rf"512 .* {NUMBER}x, {NUMBER}x, {NUMBER}x(?s:.*)T=512 / T=256: window {NUMBER}x, csa {NUMBER}x, "
                  rf"hca {NUMBER}x"),
    "residual": (["residual", "--steps", "1", "--rounds", "1", "model=tiny", CACHE], rf"mhc-eager .* {NUMBER}x"),
    "sampling": (["sampling", "--tokens", "8", "--rounds", "1"], rf"cache / no cache: {NUMBER}x"),
    "moe": (["moe", "--tokens", "64", "--rounds", "1"], rf"skewed .* padded / grouped_mm = {NUMBER}x"),
    "probes": (["probes", "--every", "2", "--rounds", "1", "model=tiny", CACHE], rf"probes every 2 +{NUMBER} ms/step"),
    "data": (["data", "--vocab", "300", "--batches", "20", "--train-steps", "1", "data.source=files",
              "data.path={corpus}", "model=tiny"], rf"ratio loader / training = {NUMBER}x"),
    "distributed": (["distributed", "--reps", "1", "--steps", "2", "--rounds", "1", "model=tiny", CACHE],
                    rf"2 ranks / 1 rank: {NUMBER}x"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_benchmark_script_runs_and_prints_its_ratios(name, data_cache, tmp_path):
    args, pattern = RUNS[name]
    corpus = word_corpus(tmp_path / "corpus", n_docs=8)
    cmd = [sys.executable, "-m", f"benchmarks.{args[0]}",
           *(a.format(data_cache=data_cache, corpus=corpus) for a in args[1:])]
    # the scripts' temporary run directories (checkpoints included) go where pytest cleans up
    env = {**os.environ, "WANDB_MODE": "disabled", "TMPDIR": str(tmp_path)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    match = re.search(pattern, done.stdout)
    assert match, f"no line matching {pattern!r} in:\n{done.stdout[-3000:]}"
    for ratio in match.groups():
        value = float(ratio.replace(",", ""))
        assert math.isfinite(value) and value > 0, f"{name} printed {ratio}"


def test_peak_memory_counts_only_what_the_run_allocates():
    """The CPU profiler's allocation total carries what earlier profiles saw allocated and not
    freed; the measurement starts from the total before the run."""
    import torch

    from benchmarks.attention import peak_memory_bytes

    kept = []
    peak_memory_bytes(lambda: kept.append(torch.ones(4 << 20)), torch.device("cpu"))  # 16 MiB, kept
    peak = peak_memory_bytes(lambda: torch.ones(1 << 20).sum(), torch.device("cpu"))  # 4 MiB, freed
    assert 4 << 20 <= peak < 5 << 20


@pytest.mark.slow
def test_a_pair_of_other_batch_sizes_counts_each_ones_tokens(data_cache, tmp_path):
    """`--pair` took the first contender's tokens per step for both: a pair of batch sizes 8 and 16
    printed a tokens/s ratio of half the truth. Tokens/s ratio = (16·128 / 8·64) ÷ step-time ratio;
    the second contender's two overrides both apply."""
    cmd = [sys.executable, "-m", "benchmarks.compile", "--steps", "1", "--rounds", "1", "--eager", "--pair",
           "trainer.global_batch_size=8", "trainer.global_batch_size=16 data.seq_len=128", "model=tiny",
           "data.seq_len=64", f"data.cache_dir={data_cache}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "TMPDIR": str(tmp_path)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tokens/step trainer.global_batch_size=8 512, trainer.global_batch_size=16 data.seq_len=128 2048;" in done.stdout
    tokens, steps = map(float, re.search(rf"ratio tokens/s .* = {NUMBER}; step time .* = {NUMBER}", done.stdout).groups())
    assert tokens == pytest.approx(4.0 / steps, rel=5e-3)


def test_saved_activation_bytes_leave_the_weights_out():
    """A Linear saves its input and a transposed view of its weight (a plain tensor sharing the
    parameter's storage): only the input is activation memory."""
    import torch

    from benchmarks.residual import saved_activation_bytes

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(512, 512)  # with a bias: addmm, which saves the weight's transposed view

        def forward(self, x, targets):
            return (self.lin(x * 2.0) ** 2).mean()
    x = torch.randn(2, 512, requires_grad=True)  # as activations are: the Linear keeps its weight for x's gradient
    # x * 2.0 (saved by the Linear) and lin's output (saved by the square): 2 × 2 × 512 floats
    assert saved_activation_bytes(Model(), x, None) == 2 * 2 * 512 * 4


def test_a_pair_of_one_contender_twice_is_refused():
    """Its ratio would read as a comparison of two settings; nothing is built or trained."""
    cmd = [sys.executable, "-m", "benchmarks.compile", "--pair", "model.residual=mhc", "model.residual=mhc"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "both contenders are 'model.residual=mhc'" in done.stderr
