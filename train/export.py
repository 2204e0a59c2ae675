"""Export a trained run for other tools:

    python -m train.export RUN --format safetensors|hf [--dtype fp32|bf16] [--out DIR]

RUN is a run directory (its newest valid checkpoint) or a checkpoint directory; the weights are
consolidated from any ZeRO stage and world size (train/load.py). The default DIR is
RUN/export/<format>-<dtype>; nothing else in the run directory changes.

- `safetensors`: `model.safetensors` (our parameter names, every persistent buffer, one tensor
  per tied pair), the run's `config.yaml`, and a tokenizer transformers loads. `from_exported(DIR)`
  rebuilds the model bit for bit.
- `hf`: a transformers checkpoint: plain-residual dense models as `LlamaForCausalLM`
  (model/hf_llama.py, with `generation_config.json`), V4 models (mHC, V4 attention, MoE) as
  `DeepseekV4ForCausalLM` (model/hf_v4.py); `config.json`, `model.safetensors` and the tokenizer,
  so `AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)` load it.
  hc/mhc models without V4 attention have no transformers architecture and are refused (export
  them as safetensors).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from train.cli import fail
from train.load import (EXIT_CONFIG, LoadError, at_step, build_from_state, checkpoint_config, checkpoint_step,
                        consolidated_state_dict, locate, run_tokenizer)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
WEIGHTS = "model.safetensors"


def hf_refusal(model_cfg) -> str | None:
    """Why a model has no `--format hf` export here, or None (checked on the config alone)."""
    from model.hf_llama import refusal

    if model_cfg.attention == "v4":
        from model import build_model
        from model.hf_v4 import NotExportable, hf_config

        try:  # the layout decides, not the weights: an untrained model of the same config
            model = build_model(model_cfg, 256)
        except Exception as e:  # as load.build_from_state says it for the other formats
            raise LoadError(f"the model its config.yaml describes cannot be built by this version of v4lab: "
                            f"{str(e).strip() or type(e).__name__}") from None
        try:
            hf_config(model)
        except NotExportable as e:
            return f"{e}; export with --format safetensors (loads with train.load.from_exported)"
        return None
    why = refusal(model_cfg)
    if why:
        return (f"{why} and no other transformers architecture fits it; export with --format safetensors "
                f"(loads with train.load.from_exported)")
    return None


def write_safetensors(model, cfg_path: Path, out: Path, dtype: torch.dtype, step: int) -> None:
    from safetensors.torch import save_model

    # the step travels with the weights: it decides V4's phase (dense CSA in the indexer's warm-up)
    save_model(model.to(dtype), str(out / WEIGHTS), metadata={"format": "pt", "v4lab": "1", "step": str(step)})
    shutil.copyfile(cfg_path, out / "config.yaml")


def write_hf_llama(model, cfg, out: Path, dtype: torch.dtype, dtype_name: str, eos_id: int) -> None:
    from safetensors.torch import save_file

    from model.hf_llama import llama_config, llama_state_dict

    state = {k: v.to(dtype) for k, v in model.state_dict().items()}
    save_file(llama_state_dict(state, cfg.model), str(out / WEIGHTS), metadata={"format": "pt"})
    config = llama_config(cfg.model, model.vocab_size, eos_id, {"fp32": "float32", "bf16": "bfloat16"}[dtype_name])
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": eos_id, "eos_token_id": eos_id, "do_sample": True, "temperature": 0.8}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))


def main(argv: list[str] | None = None) -> int:
    from data.tokenizer import save_for_transformers

    parser = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="run directory or checkpoint directory")
    parser.add_argument("--format", required=True, choices=("safetensors", "hf"))
    parser.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    parser.add_argument("--out", type=Path, default=None, help="output directory (default RUN/export/FORMAT-DTYPE)")
    usage = " ".join(parser.format_usage().split()[1:])  # one line, as every refusal here
    parser.error = lambda message: sys.exit(fail(f"{message}. Usage: {usage}", EXIT_CONFIG))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run_dir, ckpt = locate(args.run)
        cfg, cfg_path = checkpoint_config(run_dir, ckpt)
        if args.format == "hf" and (why := hf_refusal(cfg.model)):
            raise LoadError(f"--format hf: {why}", EXIT_CONFIG)
        out = (args.out or run_dir / "export" / f"{args.format}-{args.dtype}").expanduser().resolve()
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise LoadError(f"--out {out} exists and is not empty; choose a new directory or empty it", EXIT_CONFIG)
        step = checkpoint_step(ckpt)
        model = at_step(build_from_state(cfg, consolidated_state_dict(ckpt), ckpt), step)
        tokenizer = run_tokenizer(cfg, run_dir)
    except LoadError as e:
        return fail(str(e), e.code)
    out.mkdir(parents=True, exist_ok=True)
    dtype = DTYPES[args.dtype]
    if args.format == "safetensors":
        write_safetensors(model, cfg_path, out, dtype, step)
    elif cfg.model.attention == "v4":
        from model.hf_v4 import save_hf_v4

        save_hf_v4(model, cfg, out, dtype)
    else:
        write_hf_llama(model, cfg, out, dtype, args.dtype, tokenizer.eos_id)
    save_for_transformers(tokenizer, out, cfg.data.seq_len)
    (out / "export.json").write_text(json.dumps({"checkpoint": str(ckpt), "step": step, "format": args.format,
                                                 "dtype": args.dtype}, indent=2))
    print(f"exported {ckpt} (step {step}) as {args.format} {args.dtype} -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
