"""train.export: safetensors round trip bit for bit, transformers Llama parity (logits, greedy
generation, tokenizer), refusals, and weights consolidated from ZeRO-3 and 2-rank checkpoints."""
import json
import shutil

import pytest
import torch

from data.tokenizer import ByteTokenizer, save_for_transformers, train_bpe
from model import build_model
from model.generate import Sampling, generate
from tests.conftest import TINY, compose_config, edit_configs, launch
from train import export
from train.export import write_hf_llama
from train.load import LoadError, consolidated_state_dict, from_exported, load_run, locate
from train.trainer import Trainer

transformers = pytest.importorskip("transformers")


def test_safetensors_round_trip_is_bit_for_bit(trained_run, tmp_path, capsys):
    assert export.main([str(trained_run), "--format", "safetensors", "--out", str(tmp_path / "st")]) == 0
    trained = load_run(trained_run, tokenizer=False).model
    rebuilt = from_exported(tmp_path / "st")
    a, b = trained.state_dict(), rebuilt.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randint(1, 256, (2, 32))
    with torch.no_grad():
        assert torch.equal(trained(x), rebuilt(x))
    assert export.main([str(trained_run), "--format", "safetensors", "--dtype", "bf16", "--out", str(tmp_path / "bf")]) == 0
    half = from_exported(tmp_path / "bf")
    assert all(torch.equal(v, a[k].bfloat16()) for k, v in half.state_dict().items())

    # what is not such an export: one LoadError naming the file and why, not safetensors' or torch's
    from safetensors.torch import save_file
    broken = {"fp16": lambda d: save_file({k: v.half() for k, v in a.items()}, d / "model.safetensors"),
              "another model": lambda d: (d / "config.yaml").write_text(
                  (d / "config.yaml").read_text().replace("n_layers: 2", "n_layers: 3", 1)),
              "transformers weights": lambda d: save_file({"model.embed_tokens.weight": a["embed.weight"]},
                                                          d / "model.safetensors"),
              "cut short": lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:99])}
    for case, words in [("fp16", "holds F16 weights; accepted: F32, BF16"), ("another model", "does not fit the model"),
                        ("transformers weights", "holds no embed.weight"), ("cut short", "cannot be read")]:
        d = shutil.copytree(tmp_path / "st", tmp_path / case)
        broken[case](d)
        with pytest.raises(LoadError, match=words):
            from_exported(d)


@pytest.mark.parametrize("extra", [[], ["model.tie_embeddings=true", "model.n_heads=4", "model.rope_theta=500",
                                        "model.norm_eps=0.01"]])  # an eps large enough to move the logits
def test_llama_export_matches_our_model(extra, tmp_path):
    """Logits to 1e-5 and the same greedy continuation through AutoModelForCausalLM; transformers'
    generate stops at the run's end-of-document token (config.json and generation_config.json)."""
    cfg = compose_config(["model=tiny", "model.max_seq_len=64", *extra])
    torch.manual_seed(0)
    ours = build_model(cfg.model, 256).eval()
    for p in ours.parameters():  # norms away from 1: a mixed-up norm would show
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
    write_hf_llama(ours, cfg, tmp_path, torch.float32, "fp32", eos_id=0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    x = torch.randint(1, 256, (2, 64))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), atol=1e-5, rtol=0)
        prompt = x[:, :8]
        mine = torch.stack([s.token for s in generate(ours, prompt, 40, Sampling(temperature=0), context=64)], 1)
        theirs = hf.generate(prompt, max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(theirs[:, 8:], mine)
    assert hf.config.eos_token_id == hf.generation_config.eos_token_id == 0
    assert hf.config.rms_norm_eps == cfg.model.norm_eps


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_tokenizer_round_trips_through_autotokenizer(kind, tmp_path):
    # í is bytes C3 AD: AD is the one byte between GPT-2's printable ranges ("¬" and "®")
    text = "ROMEO: But soft — what light through yonder window breaks? naïve así ✓ 🎉\n\tx = 1"
    tok = ByteTokenizer() if kind == "byte" else train_bpe(iter([[text * 3, "the cat sat on the mat"] * 10]), 300)
    save_for_transformers(tok, tmp_path, 256)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ids = auto(text)["input_ids"]
    assert ids == [int(i) for i in tok.encode_batch([text])[0]]
    assert auto.decode(ids) == text and auto.eos_token_id == tok.eos_id
    assert auto.model_max_length == 256  # the context: transformers truncates and warns past it


def test_hf_export_is_in_the_dtype_asked_and_never_writes_into_a_used_directory(trained_run, tmp_path, capsys):
    """--dtype bf16 writes bf16 weights and says so in config.json, export.json records the
    checkpoint and its step, the tokenizer the run's context; an --out that holds anything (here
    the first export) is refused in one line before a byte of it changes."""
    from safetensors import safe_open

    out = tmp_path / "hf"
    assert export.main([str(trained_run), "--format", "hf", "--dtype", "bf16", "--out", str(out)]) == 0
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((out / "export.json").read_text()) == {  # what was exported, from which checkpoint
        "checkpoint": str(locate(trained_run)[1]), "step": 80, "format": "hf", "dtype": "bf16"}
    # the tokenizer's context is the one the run trained at (32 tokens), not the model's 256 positions
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 32
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    capsys.readouterr()
    assert export.main([str(trained_run), "--format", "hf", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out {out} exists and is not empty" in err and err.count("\n") == 1
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before


@pytest.mark.parametrize("residual", ["hc", "mhc"])
def test_hf_refuses_hyper_connections_naming_safetensors(tmp_path, trained_run, residual, capsys):
    run = shutil.copytree(trained_run, tmp_path / "run")
    edit_configs(run, "residual: residual", f"residual: {residual}")
    assert export.main([str(run), "--format", "hf"]) == 2
    err = capsys.readouterr().err
    assert f"model.residual={residual}" in err and "--format safetensors" in err and err.count("\n") == 1
    assert not (run / "export").exists()


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_checkpoint_consolidates_to_the_trained_weights(tmp_path, data_cache, stage):
    """DeepSpeed's consolidation of a ZeRO-1/3 checkpoint is exactly what the trainer held."""

    cfg = compose_config([*TINY, f"deepspeed.zero_stage={stage}", "trainer.max_steps=3"], out_dir=tmp_path / "run",
                         cache_dir=data_cache)
    trainer = Trainer(cfg)
    trainer.fit()
    held = trainer.full_state_dict()
    _, ckpt = locate(tmp_path / "run")
    exported = consolidated_state_dict(ckpt)
    assert exported.keys() == held.keys() and all(torch.equal(exported[k], held[k]) for k in held)


@pytest.mark.slow
def test_zero3_and_two_rank_checkpoints_export_the_weights_of_one_rank_zero0(tmp_path, data_cache):
    base = [*TINY, "trainer.max_steps=4", f"data.cache_dir={data_cache}"]
    weights = {}
    for name, extra in {"zero0": [], "zero3": ["deepspeed.zero_stage=3"],
                        "zero2x2": ["deepspeed.zero_stage=2", "launcher.nproc_per_node=2"]}.items():
        if name == "zero2x2":
            proc = launch(*base, *extra, f"out_dir={tmp_path / name}")
            assert proc.returncode == 0, proc.stderr[-3000:]
        else:  # one rank: in this process
            Trainer(compose_config([*base, *extra], out_dir=tmp_path / name)).fit()
        assert export.main([str(tmp_path / name), "--format", "safetensors"]) == 0
        weights[name] = from_exported(tmp_path / name / "export" / "safetensors-fp32").state_dict()
    for name in ("zero3", "zero2x2"):
        assert weights[name].keys() == weights["zero0"].keys()
        for k, v in weights["zero0"].items():  # other summation orders: last-bit differences, as tests/test_distributed.py
            assert torch.allclose(weights[name][k], v, atol=5e-5, rtol=1e-4), (name, k)
    manifest = json.loads((tmp_path / "zero2x2" / "checkpoints" / "step_00000004" / "manifest.json").read_text())
    assert manifest["world_size"] == 2


def fake_run(root, overrides, model, step=1):
    """A run directory in the trainer's layout (config.yaml, one ZeRO-0 checkpoint of `model` at `step`)."""
    from omegaconf import OmegaConf

    ckpt = root / "checkpoints" / f"step_{step:08d}"
    ckpt.mkdir(parents=True)
    (root / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(compose_config(overrides))))
    torch.save({"module": model.state_dict()}, ckpt / "mp_rank_00_model_states.pt")
    files = {f.name: f.stat().st_size for f in ckpt.iterdir()}
    (ckpt / "manifest.json").write_text(json.dumps({"step": step, "world_size": 1, "files": files}))
    return root


@pytest.mark.parametrize("step", [1, 500], ids=["warm-up", "sparse"])
def test_v4_run_exports_to_deepseek_v4(step, tmp_path):
    """--format hf on a V4 run goes through model/hf_v4.py: transformers' DeepseekV4ForCausalLM
    loads it with every weight and computes our logits, with CSA as the checkpoint's step trained
    it: dense in the indexer's warm-up (100 steps), top-2 past it (of 10 entries at 40 tokens);
    the safetensors export comes back the same way."""
    overrides = ["model=v4_tiny", "model.attn.window=8", "model.max_seq_len=64", "model.attn.csa_topk=2"]
    torch.manual_seed(0)
    ours = build_model(compose_config(overrides).model, 256).eval()
    ours.on_step_start(step, lr_decaying=False)
    run = fake_run(tmp_path / "run", overrides, ours, step)
    assert export.main([str(run), "--format", "hf"]) == 0
    out = run / "export" / "hf-fp32"
    assert json.loads((out / "config.json").read_text())["index_topk"] == (16 if step == 1 else 2)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert type(hf).__name__ == "DeepseekV4ForCausalLM" and not info["missing_keys"]
    ids = torch.randint(1, 256, (1, 40))
    assert export.main([str(run), "--format", "safetensors"]) == 0
    st = run / "export" / "safetensors-fp32"
    (st / "export.json").unlink()  # the weights' own metadata carry the step
    rebuilt = from_exported(st)
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(ids).logits, ours(ids), atol=1e-5, rtol=0)
        assert torch.equal(rebuilt(ids), ours(ids))
    from safetensors.torch import save_model
    save_model(ours, str(st / "model.safetensors"), metadata={"format": "pt"})  # an export that does not say
    with pytest.raises(LoadError, match="which step"):
        from_exported(st)
    assert transformers.AutoTokenizer.from_pretrained(out)("the cat")["input_ids"] == list(b"the cat")


def test_hf_export_of_a_model_this_version_cannot_build_is_a_load_error():
    """A config.yaml whose V4 layout this version does not know: one line and status 5, as the
    safetensors format says it (the hf check used to raise the builder's KeyError)."""
    cfg = compose_config(["experiment=v4"]).model
    cfg.attn.layers = ["window", "bogus"]
    with pytest.raises(LoadError, match="cannot be built by this version of v4lab") as err:
        export.hf_refusal(cfg)
    assert err.value.code == 5


@pytest.mark.parametrize("args,words", [(["--format", "onnx"], "invalid choice: 'onnx'"),
                                        (["--format", "hf", "--dtype", "fp16"], "invalid choice: 'fp16'"),
                                        ([], "--format")])
def test_bad_export_arguments_give_one_line_and_status_2(args, words, trained_run, capsys):
    with pytest.raises(SystemExit) as stop:
        export.main([str(trained_run), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
