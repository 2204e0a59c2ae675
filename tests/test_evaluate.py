"""train.evaluate: the validation loss of the run reproduced bit for bit, bits per byte by hand,
other corpora with the run's tokenizer, the report's columns."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from data.tokenizer import ByteTokenizer, HFTokenizer, train_bpe
from model import build_model
from tests.conftest import compose_config, edit_configs, word_corpus
from train import evaluate
from train.evaluate import score
from train.report import write_report


@pytest.fixture
def run_copy(trained_run, tmp_path):
    return shutil.copytree(trained_run, tmp_path / "run")


def test_validation_split_reproduces_final_val_loss_exactly(run_copy, capsys):
    summary = json.loads((run_copy / "summary.json").read_text())
    assert evaluate.main([str(run_copy), "max_batches=2"]) == 0  # the run's trainer.eval_batches
    record = json.loads((run_copy / "eval" / "corpus_val.json").read_text())  # data.path=.../corpus
    assert record["loss"] == summary["final_val_loss"]
    assert record["perplexity"] == pytest.approx(math.exp(record["loss"]), rel=1e-12)
    assert "corpus_val: loss" in capsys.readouterr().out


def test_the_default_auto_micro_batch_is_resolved_as_the_trainer_resolved_it(run_copy):
    """config.yaml keeps trainer.micro_batch_size=auto (the default); the trainer resolved it at the
    checkpoint's world size, and so does evaluate."""
    from train.batch import micro_batch_size
    from train.load import run_config

    edit_configs(run_copy, "micro_batch_size: 4", "micro_batch_size: auto")
    expected = micro_batch_size(run_config(run_copy).trainer, 1)
    assert evaluate.main([str(run_copy), "max_batches=2", "name=auto"]) == 0
    assert json.loads((run_copy / "eval" / "auto.json").read_text())["micro_batch_size"] == expected


@pytest.mark.parametrize("world,expected", [(1, 16), (2, 8), (4, 4)])
def test_the_auto_micro_batch_is_the_one_of_the_checkpoints_world_size(tmp_path, world, expected):
    """A run on 2 ranks validated with micro-batches of 16 / 2 sequences per rank (micro_batch_size=auto);
    evaluate, one process, must batch as that run did, not as a one-rank run would."""
    from train.evaluate import run_micro_batch
    from train.manifest import seal

    cfg = compose_config(["trainer.global_batch_size=16", "trainer.max_micro_batch_size=16"])
    assert cfg.trainer.micro_batch_size == "auto"
    seal(tmp_path, step=1, world_size=world)
    assert run_micro_batch(cfg, tmp_path) == expected


def test_a_bf16_run_is_scored_in_bf16_as_it_validated(tiny_config):
    """precision=bf16 validates under bf16 autocast; evaluate scores it so (as its summary says), to
    its final_val_loss bit for bit, not in fp32."""
    from train.trainer import Trainer

    cfg = tiny_config("trainer.precision=bf16", "trainer.max_steps=1")
    summary = Trainer(cfg).fit()
    assert summary["precision"] == "bf16"
    assert evaluate.main([cfg.out_dir, "max_batches=2", "name=bf16"]) == 0  # TINY's trainer.eval_batches
    record = json.loads((Path(cfg.out_dir) / "eval" / "bf16.json").read_text())
    assert record["precision"] == "bf16" and record["loss"] == summary["final_val_loss"]


def test_a_v4_run_ending_on_its_indexer_warm_up_is_scored_as_it_validated(tiny_config):
    """After the warm-up's last step the checkpoint is sparse for sampling, export and evaluate
    (train/load.py at_step); the trainer's own final validation must score it so too."""
    from tests.conftest import V4_RUN
    from train.trainer import Trainer

    cfg = tiny_config(*V4_RUN, "model.attn.indexer_warmup_steps=3", "trainer.max_steps=3", "trainer.eval_every=3",
                      "model.attn.csa_topk=2")
    summary = Trainer(cfg).fit()
    assert evaluate.main([cfg.out_dir, "max_batches=2", "name=end"]) == 0
    assert json.loads((Path(cfg.out_dir) / "eval" / "end.json").read_text())["loss"] == summary["final_val_loss"]


def test_a_v4_run_ending_before_its_indexer_warm_up_ends_is_scored_dense(tiny_config):
    """The other side of the boundary: a checkpoint at the warm-up's last step but one trained and
    validated densely, so it is read back dense (at its own step, not the next), to the same loss."""
    from tests.conftest import V4_RUN
    from train.trainer import Trainer

    cfg = tiny_config(*V4_RUN, "model.attn.indexer_warmup_steps=4", "trainer.max_steps=3", "trainer.eval_every=3",
                      "model.attn.csa_topk=2")
    summary = Trainer(cfg).fit()
    assert evaluate.main([cfg.out_dir, "max_batches=2", "name=end"]) == 0
    assert json.loads((Path(cfg.out_dir) / "eval" / "end.json").read_text())["loss"] == summary["final_val_loss"]


class Stream:
    """Windows of seq_len + 1 tokens at stride seq_len over one token array (data.loader.Windows)."""

    def __init__(self, tokens, seq_len):
        self.tokens, self.seq_len = np.asarray(tokens), seq_len

    def __len__(self):
        return (len(self.tokens) - 1) // self.seq_len

    def batch(self, idx):
        rows = torch.tensor(np.stack([self.tokens[i * self.seq_len: i * self.seq_len + self.seq_len + 1] for i in idx]))
        return rows[:, :-1].long(), rows[:, 1:].long()


def test_bits_per_byte_by_hand():
    """Two documents 'héllo wörld' and 'ça va' (byte tokens, end-of-document 0), windows of 6:
    the scored targets are bytes 1..18 of the stream, which stand for 17 bytes of text (the
    end-of-document token among them stands for none); bits per byte = their nats / (17 ln 2)."""
    text = "héllo wörld".encode() + b"\0" + "ça va".encode() + b"\0"
    tokens = np.frombuffer(text, dtype=np.uint8).astype(np.int64)
    assert len(tokens) == 21  # 13 + 1 + 6 + 1
    torch.manual_seed(0)
    model = build_model(compose_config(["model=tiny"]).model, 256).eval()
    result = score(model, [Stream(tokens, 6)], micro_batch=2, max_batches=0,
                   byte_lengths=ByteTokenizer().byte_lengths(), progress=False)
    targets = tokens[1:19]  # three windows of six targets
    assert result["tokens"] == 18 and result["bytes"] == 17 == int((targets != 0).sum())
    with torch.no_grad():  # each window is its own context of six tokens
        windows = torch.tensor(tokens[:18]).view(3, 6)
        logp = torch.log_softmax(model(windows), -1).flatten(0, 1)
    nats = -float(logp[torch.arange(18), torch.tensor(targets)].sum())
    assert result["nats"] == pytest.approx(nats, rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(nats / (17 * math.log(2)), rel=1e-5)
    # two batches, the second half full: the loss weighs it by its share
    per_window = -logp[torch.arange(18), torch.tensor(targets)].view(3, 6).mean(1)
    expected = (per_window[:2].mean() + per_window[2] * 0.5) / 1.5
    assert result["loss"] == pytest.approx(float(expected), rel=1e-6)


def test_bits_per_byte_count_the_bytes_of_the_targets():
    """The bytes are those the scored tokens (the targets) stand for, not the inputs': an end-of-document
    token (no bytes) then 'héllo' (6 bytes), in two windows of 3; the inputs, which hold the
    end-of-document token and not the final 'o', stand for 5 bytes, the targets for all 6."""
    tokens = np.frombuffer(b"\0" + "héllo".encode(), dtype=np.uint8).astype(np.int64)
    torch.manual_seed(0)
    model = build_model(compose_config(["model=tiny"]).model, 256).eval()
    result = score(model, [Stream(tokens, 3)], micro_batch=2, max_batches=0,
                   byte_lengths=ByteTokenizer().byte_lengths(), progress=False)
    assert result["tokens"] == 6 and result["bytes"] == 6
    assert result["bits_per_byte"] == pytest.approx(result["nats"] / (6 * math.log(2)), rel=1e-12)


def test_bpe_bytes_per_id_add_up_to_the_text():
    texts = ["the cat sat on the mat. ", "naïve café — déjà vu ✓ ", "x = [i ** 2 for i in range(10)]\n"] * 20
    tok = train_bpe(iter([texts]), 300)
    lengths = tok.byte_lengths()
    for t in texts[:3] + ["unseen wörds 🎉"]:
        ids = tok.encode_batch([t])[0]
        assert int(lengths[ids].sum()) == len(t.encode())
    assert lengths[tok.eos_id] == 0
    assert isinstance(tok, HFTokenizer)


def test_another_corpus_with_the_runs_tokenizer_and_report(run_copy, tmp_path, capsys):
    other = word_corpus(tmp_path / "other", n_docs=6, seed=1)
    code = evaluate.main([str(run_copy), "data.source=files", f"data.path={other}", "split=all", "name=other"])
    assert code == 0, capsys.readouterr().err
    record = json.loads((run_copy / "eval" / "other.json").read_text())
    assert record["data"]["tokenizer"] == "byte" and record["seq_len"] == 32 and record["split"] == "all"
    assert record["bits_per_byte"] == pytest.approx(record["nats"] / (math.log(2) * record["bytes"]))
    report = write_report([run_copy]).read_text()
    assert f"other: {record['loss']:.4f} ({record['bits_per_byte']:.3f} bpb)" in report


@pytest.mark.parametrize("args,what,code", [(["data.pth=x"], "data.pth", 2), (["data=nope"], "data/nope", 2),
                                            (["split=test"], "split", 2), (["data.tokenizer=bpe"], "tokenizer", 2),
                                            (["name=../summary"], "name='../summary'", 2),
                                            (["name=a/b"], "name='a/b'", 2), (["name=.hidden"], "name", 2)])
def test_bad_arguments_are_refused(run_copy, capsys, args, what, code):
    assert evaluate.main([str(run_copy), *args]) == code
    err = capsys.readouterr().err
    assert what in err and err.startswith("error: ") and err.count("\n") == 1
    assert not (run_copy / "eval").exists()


def test_precision_is_the_runs_not_the_scoring_devices(tmp_path):
    """A run trained on a CPU (precision=auto: fp32) and scored on a GPU is scored in fp32, as it
    validated; without a summary (a run still going), the config resolves on the scoring device."""
    from train.evaluate import run_precision

    cfg = compose_config([])
    assert cfg.trainer.precision == "auto"
    assert run_precision(tmp_path, cfg, torch.device("cpu")) == "fp32"
    (tmp_path / "summary.json").write_text(json.dumps({"precision": "fp32"}))
    assert run_precision(tmp_path, cfg, torch.device("cuda")) == "fp32"
    (tmp_path / "summary.json").write_text(json.dumps({"precision": "bf16"}))
    assert run_precision(tmp_path, cfg, torch.device("cpu")) == "bf16"


def test_a_data_key_alone_changes_the_runs_own_data(run_copy, capsys):
    """`data.seq_len=16` scores the run's own corpus (the user's files) at 16 tokens, not the
    schema's default corpus: it was Shakespeare's."""
    assert evaluate.main([str(run_copy), "data.seq_len=16", "max_batches=1"]) == 0, capsys.readouterr().err
    record = json.loads((run_copy / "eval" / "corpus_val.json").read_text())
    run_data = yaml.safe_load((run_copy / "config.yaml").read_text())["data"]
    assert record["data"] == {**run_data, "seq_len": 16} and record["seq_len"] == 16


def test_an_evaluation_is_replaced_only_by_itself_or_when_asked(run_copy, capsys):
    """The same evaluation again replaces its record; another one under the same name is refused
    before it scores anything (the first record stays), unless overwrite=true."""
    assert evaluate.main([str(run_copy), "max_batches=1", "name=mine"]) == 0
    assert evaluate.main([str(run_copy), "max_batches=1", "name=mine"]) == 0
    first = (run_copy / "eval" / "mine.json").read_text()
    assert evaluate.main([str(run_copy), "max_batches=2", "name=mine"]) == 2
    err = capsys.readouterr().err
    assert "holds another evaluation (max_batches: 1)" in err and "overwrite=true" in err
    assert (run_copy / "eval" / "mine.json").read_text() == first
    summary = run_copy / "summary.json"  # the same run, had it trained (and so is scored) in bf16
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "precision": "bf16"}))
    assert evaluate.main([str(run_copy), "max_batches=1", "name=mine"]) == 2
    assert "holds another evaluation (precision: 'fp32')" in capsys.readouterr().err
    assert (run_copy / "eval" / "mine.json").read_text() == first
    assert evaluate.main([str(run_copy), "max_batches=2", "name=mine", "overwrite=true"]) == 0
    assert json.loads((run_copy / "eval" / "mine.json").read_text())["max_batches"] == 2


def test_a_learned_tokenizer_run_is_scored_with_its_own_tokenizer(tmp_path):
    """The run's own data of a BPE run is tokenized with the run's tokenizer.json, not with a BPE
    trained again on the corpus as it is now (a document added since gave other ids, silently)."""
    from train.cli import compose_args
    from train.evaluate import eval_data

    run_cfg = compose_config(["data.tokenizer=bpe"])
    (tmp_path / "tokenizer.json").write_text("{}")  # the run's copy (only its path is taken here)
    for overrides in ([], ["data.seq_len=16"]):
        data = eval_data(compose_args("evaluate", overrides), overrides, run_cfg, tmp_path)
        assert data.tokenizer == str(tmp_path / "tokenizer.json") and data.source == run_cfg.data.source
