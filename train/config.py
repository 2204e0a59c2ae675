"""Typed configuration of a run. Each dataclass is one config group under `configs/`.

The root schema is registered with Hydra's ConfigStore, so every YAML file merged on top of it is
checked against these types: an unknown key or a value of the wrong type fails composition.
Semantic checks (ranges, combinations) live in `train.validate`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Union

from hydra.core.config_store import ConfigStore


@dataclass
class AttentionConfig:
    """V4 attention (model.attention=v4): a sliding window of raw tokens plus compressed entries."""
    layers: List[str] = field(default_factory=list)  # window | csa | hca per layer; [] = V4-Flash's shape
    window: int = 64  # raw tokens each query sees (itself included)
    head_dim: int = 32
    rope_dim: int = 16  # RoPE on the last rope_dim channels of queries and the shared key/value
    q_head_norm: bool = True  # V4: each head's query RMS-normalised (no weight) before RoPE; false: ablation
    # RoPE base of layers with a compressor (CSA, HCA), with YaRN; window-only layers: model.rope_theta
    compress_rope_theta: float = 160000.0
    yarn_factor: float = 16.0  # 1: no YaRN
    yarn_original_seq_len: int = 0  # 0: model.max_seq_len / yarn_factor (V4-Flash: 1M / 16 = 65536)
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    q_lora: int = 64  # rank of the query projection
    out_groups: int = 2  # grouped low-rank output projection: head groups ...
    out_lora: int = 64  # ... each projected to this rank
    csa_ratio: int = 4  # tokens per compressed entry (CSA pools 2x that, overlapping)
    csa_topk: int = 16  # compressed entries the indexer selects per query
    hca_ratio: int = 16  # tokens per compressed entry in HCA (dense over entries)
    index_heads: int = 4
    index_dim: int = 16
    indexer_warmup_steps: int = 100  # CSA attends densely (indexer learns by KL) before sparse top-k
    indexer_warmup: str = "indexer_only"  # what trains during those steps: indexer_only (V3.2/V4) | all
    indexer_kl_weight: float = 1.0
    # Sequences longer than this are attended a chunk of this many queries (rounded down to a
    # multiple of the window attention's chunk, window/2 for an even window) at a time; in
    # training each chunk's scores are recomputed in backward instead of kept: memory linear in
    # T, for one more attention forward. 0: never. 2048: on the CPU one pass is faster at 2K and
    # chunks are faster from 4K (benchmarks/attention.py).
    query_chunk: int = 2048


@dataclass
class MoEConfig:
    """DeepSeekMoE (model.ffn=moe): shared + fine-grained routed SwiGLU experts."""
    n_experts: int = 8
    top_k: int = 2
    n_shared: int = 1
    expert_hidden: int = 64
    route_scale: float = 1.5  # selected affinities are normalised, then scaled by this
    bias_gamma: float = 0.001  # auxiliary-loss-free balancing: selection-bias step per optimizer step
    balance_weight: float = 1.0e-4  # sequence-wise balance loss
    hash_layers: int = 1  # the first layers route by a fixed token-id hash
    clamp: float = 10.0  # SwiGLU clamps: gate <= clamp, linear part in [-clamp, clamp]
    # auto: torch._grouped_mm where it serves (CPU fp32/bf16/fp16; CUDA bf16 on compute capability 9/10:
    # model/moe.py grouped_mm_supported), else the batched matmul over groups padded to the largest |
    # padded: always that (`python -m benchmarks.moe` compares them)
    grouped_matmul: str = "auto"


@dataclass
class ModelConfig:
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    ffn_hidden: int = 0  # 0: 8/3·d_model rounded up to a multiple of 32
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    dropout: float = 0.0
    init_std: float = 0.02
    tie_embeddings: bool = False
    residual: str = "residual"  # residual | hc | mhc
    n_streams: int = 4  # hyper-connection expansion rate (hc, mhc)
    sinkhorn_iters: int = 20  # mhc: Sinkhorn–Knopp iterations
    fused_hc: bool = True  # hc/mhc on CPU: fused C++ kernels (model/csrc), eager PyTorch where they cannot build
    activation_checkpointing: bool = False  # recompute each block in backward (saves activation memory)
    attention: str = "dense"  # dense (multi-head RoPE) | v4 (window + compressed entries, model.attn)
    ffn: str = "dense"  # dense (SwiGLU) | moe (model.moe)
    mtp_depth: int = 0  # 1: V4's next-next-token block
    mtp_weight: float = 0.3  # MTP loss weight, ...
    mtp_weight_decayed: float = 0.1  # ... and once the learning rate decays
    attn: AttentionConfig = field(default_factory=AttentionConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | muon
    lr: float = 3e-3  # peak lr (with muon: of the Muon half)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW (the AdamW half with muon)
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False  # weight decay on embeddings (norms and biases never decay)
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # final lr as a fraction of the peak
    decay_fraction: float = 0.2  # wsd: share of the run spent decaying
    # Muon (name=muon): hidden matrices; embeddings, head, norms and 0/1-D parameters use AdamW.
    adamw_lr: float = 3e-3  # peak lr of the AdamW half
    adamw_weight_decay: float = 0.1
    momentum: float = 0.95
    nesterov: bool = True
    momentum_type: str = "classical"  # classical (V4: M = μM + G) | ema (torch: M = μM + (1-μ)G)
    ns_schedule: str = "v4_hybrid"  # v4_hybrid | keller | polar_express
    ns_steps: int = 5  # iterations for keller / polar_express (v4_hybrid is 8 + 2)
    ns_method: str = "standard"  # standard | gram
    # gram: 0-based iterations at which X and its Gram matrix are formed again; null = the
    # schedule's default (v4_hybrid: 2, 5, 8; keller, polar_express: 2)
    ns_restarts: Optional[List[int]] = None
    ns_dtype: str = "bf16"  # bf16 | fp32
    adjust_lr_fn: str = "match_rms_adamw"  # match_rms_adamw (rms_target·sqrt(max(m, n))) | original
    rms_target: float = 0.18
    per_head: bool = False  # orthogonalise each attention head's q/k/v rows on their own
    qk_clip_tau: float = 0.0  # QK-Clip threshold on the max attention logit (0 = off; Kimi K2: 100)


@dataclass
class DataConfig:
    source: str = "shakespeare"  # shakespeare | pycode | files | hub
    path: Optional[str] = None  # files: a file, a directory or a glob (.txt and other text, .jsonl, .parquet)
    name: Optional[str] = None  # hub: a dataset name, or a local dataset directory
    config_name: Optional[str] = None  # hub: the dataset's configuration
    split: str = "train"  # hub: the split to read (the validation split is carved out of it)
    text_field: str = "text"  # column holding the text (json, parquet, hub)
    tokenizer: str = "byte"  # byte | bpe | path to a tokenizer.json | pretrained:NAME
    vocab_size: int = 4096  # bpe: vocabulary size to train
    seq_len: int = 256
    val_fraction: float = 0.05  # share of documents held out for validation
    cache_dir: str = "~/.cache/v4lab/data"
    num_proc: int = 1  # processes for datasets.map during preparation
    shard_tokens: int = 100_000_000  # tokens per shard file


@dataclass
class TrainerConfig:
    max_steps: int = 1500
    # sequences per rank per forward pass; auto: the largest that divides global_batch_size / ranks,
    # at most max_micro_batch_size (train/batch.py), so every world size trains the same trajectory
    micro_batch_size: Union[int, str] = "auto"
    max_micro_batch_size: int = 16  # the memory cap for auto
    global_batch_size: int = 16  # sequences per optimizer step over all ranks and micro-batches
    grad_clip: float = 1.0  # 0 disables clipping
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 500
    keep_last: int = 2
    resume: str = "auto"  # auto | never | path to a checkpoint directory
    precision: str = "auto"  # auto (bf16 where the device supports it) | bf16 | fp32
    # float32 matmuls on CUDA (V4's attention scores, the MoE router, Muon's float32 Newton-Schulz)
    # in TF32: about 7x float32's tensor rate on an H100, 10 bits of mantissa per product
    tf32: bool = True
    progress: bool = True
    # A step whose loss or gradient is not finite is never applied. stop: checkpoint the last good
    # state and exit with an error; skip: count it, log it and go on (at most max_skipped_steps).
    on_nonfinite: str = "stop"  # stop | skip
    max_skipped_steps: int = 10
    # Loss-spike policy (OLMo-core's skip-step optimizer): skip: an update whose loss or gradient
    # norm is more than spike_sigma standard deviations above the mean of the previous spike_window
    # steps is not applied (once the window is half full). off: nothing is measured.
    on_spike: str = "off"  # off | skip
    spike_sigma: float = 6.0
    spike_window: int = 128
    # glibc: keep freed memory for reuse instead of page-faulting fresh pages every step (train/host.py)
    reuse_freed_memory: bool = True
    # MFU's denominator, dense TFLOP/s per device; None: the accelerator's datasheet figure, or on
    # CPU a matmul measured at start-up (train/mfu.py)
    peak_tflops: Optional[float] = None
    profile: Optional[str] = None  # START:END: torch.profiler trace of those steps in out_dir/profile/
    # every block through torch.compile (train/compile.py); the default is measured: configs/trainer/default.yaml
    compile: bool = False


@dataclass
class ProbesConfig:
    every: int = 0  # steps between stability probes; 0 = off


@dataclass
class StudyConfig:
    """Learning-rate studies (train/study.py). Stage 1 trains one point of a log grid of learning
    rates; `python -m train.report --lr` finds each curve's best lr and writes it to lr_sweep.json;
    stage 2 trains each curve at that lr. `configs/study/`: default (no study), sweep, tuned."""
    stage: int = 0  # 0: no study | 1: a point of the lr grid | 2: the best lr that best_lr_from holds
    lr_step: int = 0  # stage 1: every key of lr_keys is multiplied by 10^(lr_step · lr_spacing)
    lr_grid: str = "range(-3,4)"  # stage 1: the lr_step values `-m` sweeps (a Hydra sweep: range(a,b) or a,b,c)
    lr_spacing: float = 0.5  # stage 1: decades between grid points (0.5: half a decade)
    lr_keys: List[str] = field(default_factory=lambda: ["optim.lr"])  # scaled together: their ratio is held
    best_lr_from: Optional[str] = None  # stage 2: the lr_sweep.json written by `python -m train.report --lr`
    allow_edge_lr: bool = False  # stage 2: accept a best lr at the edge of stage 1's grid (not a tuned lr)
    allow_other_budget: bool = False  # stage 2: accept an lr tuned under other fixed settings (length, width, ...)


@dataclass
class LauncherConfig:
    nproc_per_node: int = 1  # ranks per node
    nnodes: int = 1  # > 1: run launch.py on every node with its launcher.node_rank (torchrun rendezvous)
    node_rank: int = 0
    master_addr: Optional[str] = None  # node 0's address, reachable from every node (multi-node)
    master_port: int = 29500
    hostfile: Optional[str] = None  # DeepSpeed hostfile: DeepSpeed's launcher starts every node from here
    dry_run: bool = False  # print the command(s) and environment, run nothing
    collective_timeout_s: int = 600  # a collective waiting longer (a dead rank) fails the run


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "v4lab"
    group: Optional[str] = None
    name: Optional[str] = None
    tags: List[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    probes: ProbesConfig = field(default_factory=ProbesConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    seed: int = 0
    out_dir: str = "outputs/run"


@dataclass
class SampleConfig:
    """`python -m train.sample RUN [key=value ...]`."""
    prompt: str = ""  # text to continue ("" = the start of a new document)
    max_new_tokens: int = 256
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 0  # sample among the k most likely tokens (0 = all)
    top_p: float = 1.0  # sample among the fewest tokens holding this much probability (1 = all)
    seed: int = 0
    n: int = 1  # samples, one after another
    stop_at_eos: bool = True  # a sample ends at the end-of-document token
    cache: bool = True  # decoding cache (false: recompute the whole context every token)
    device: str = "auto"  # auto | cpu | cuda | cuda:N


@dataclass
class EvaluateConfig:
    """`python -m train.evaluate RUN [data=PRESET] [data.KEY=VALUE ...] [key=value ...]`. The
    tokenizer is always the run's; data.seq_len and data.cache_dir default to the run's."""
    data: DataConfig = field(default_factory=DataConfig)
    split: str = "val"  # val | train | all (both)
    max_batches: int = 0  # evaluate at most this many batches (0 = every window of the split)
    micro_batch_size: int = 0  # windows per forward pass (0 = the run's trainer.micro_batch_size)
    name: Optional[str] = None  # eval/<name>.json (default: from the data, e.g. shakespeare_val)
    overwrite: bool = False  # replace an eval/<name>.json of another evaluation (same one: always replaced)
    device: str = "auto"


def register_configs() -> None:
    ConfigStore.instance().store(name="schema", node=Config)
    ConfigStore.instance().store(name="sample_schema", node=SampleConfig)
    ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)
