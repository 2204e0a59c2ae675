"""What a prepared directory is keyed by: each input that changes the tokens (validation share,
text field, file names, content, tokenizer) changes the key; earlier versions' keys of the same
tokens stay aliases; token files hold every id of the vocabulary."""
import numpy as np
import pytest

from data.shards import load_manifest, prepare, read_tokens, write_tokens
from data.sources import load_corpus
from tests.test_data import _docs, _text, data_config, three_documents


def _crc_is_val(text: str, val_fraction: float) -> bool:
    """The split rule (data.shards.SPLIT_RULE), restated."""
    import zlib

    return zlib.crc32(text.encode()) % 10000 < val_fraction * 10000


def test_another_val_fraction_is_another_prepared_directory(tmp_path):
    """val_fraction decides which documents are validation: data prepared at one fraction must not
    be served (from the fingerprint or from the files index) to a run that asked for another."""
    texts = {f"d{i:02d}.txt": f"document {i} of twenty " * 10 for i in range(20)}
    root = _docs(tmp_path / "c", texts)
    outs = {}
    for vf in (0.2, 0.5):
        outs[vf] = prepare(data_config(tmp_path / "cache", path=str(root), val_fraction=vf))
        manifest = load_manifest(outs[vf])
        assert manifest["val_fraction"] == vf
        assert manifest["splits"]["val"]["documents"] == sum(_crc_is_val(t, vf) for t in texts.values())
    assert outs[0.2] != outs[0.5]


def test_another_text_field_is_another_prepared_directory(tmp_path):
    """text_field decides which column is the text: one file read by each of its two columns is
    two corpora (the files fingerprint and the files index both know the field)."""
    import json

    f = tmp_path / "c.jsonl"
    f.write_text("".join(json.dumps({"a": f"alpha text {i} " * 10, "b": f"BETA TEXT {i} " * 10}) + "\n"
                         for i in range(20)))
    a, b = (prepare(data_config(tmp_path / "cache", path=str(f), text_field=field)) for field in ("a", "b"))
    assert a != b
    assert "alpha text" in _text(a) and "BETA" not in _text(a)
    assert "BETA TEXT" in _text(b) and "alpha" not in _text(b)


def test_the_same_bytes_under_other_file_names_are_another_corpus(tmp_path):
    """File names are part of a corpus's identity: they decide how a file is read (the same JSON
    lines as .jsonl are 40 records, as .txt two text documents), so only the bytes must not match."""
    import json

    docs = {}
    for ext in ("jsonl", "txt"):
        root = tmp_path / ext
        for part in ("a", "b"):
            records = "".join(json.dumps({"text": f"record {part}{i} " * 10}) + "\n" for i in range(20))
            _docs(root, {f"{part}.{ext}": records})
        manifest = load_manifest(prepare(data_config(tmp_path / "cache", path=str(root))))
        docs[ext] = manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"]
    assert docs == {"jsonl": 40, "txt": 2}


def test_bpe_is_trained_on_the_training_documents_only(tmp_path):
    """Validation documents are held out from the tokenizer too (else validation text is merged as
    training never saw it): the saved tokenizer is the one trained on the training split alone."""
    import random

    from data.tokenizer import load_tokenizer, train_bpe

    rng = random.Random(0)
    words = ["".join(rng.choice("bcdfghjklmnpqrstvwxz") for _ in range(5)) for _ in range(12)]
    texts = [f"{w} " * 60 for w in words]  # one word per document: its merges come from it alone
    root = _docs(tmp_path / "c", {f"d{i:02d}.txt": t for i, t in enumerate(texts)})
    out = prepare(data_config(tmp_path / "cache", path=str(root), tokenizer="bpe", vocab_size=300))
    train = [t for t in texts if not _crc_is_val(t, 0.2)]
    assert 0 < len(train) < len(texts) and load_manifest(out)["splits"]["train"]["documents"] == len(train)
    expected = train_bpe(iter([train]), 300).tok.get_vocab()
    assert load_tokenizer(str(out / "tokenizer.json")).tok.get_vocab() == expected


@pytest.mark.parametrize("vocab", [65535, 65536, 70000])
def test_token_files_hold_every_id_of_the_vocabulary(vocab, tmp_path):
    """uint16 only while every id fits it (ids up to 65535); larger vocabularies need uint32, or the
    highest ids wrap around to others silently."""
    ids = np.array([0, 1, 65534, vocab - 1])
    write_tokens(tmp_path / "t.bin", ids, vocab)
    back = read_tokens(tmp_path / "t.bin")
    assert back.dtype == (np.uint16 if vocab <= 65535 else np.uint32)
    assert np.array_equal(back, ids)


def test_aliases_are_the_fingerprints_earlier_versions_gave_the_same_tokens(tmp_path):
    """A run prepared by an earlier version resumes here when the tokens are the same: the
    path-and-time fingerprint (datasets' own), and, for a learned tokenizer, both content and
    path-and-time fingerprints from before special tokens' spellings were text, unless some
    document (training or validation) quotes one."""
    from data.shards import _tokenizer_id, files_fingerprint, fingerprint
    from data.sources import corpus_files

    plain = {f"d{i}.txt": f"document {i} goes on {i} " * 20 for i in range(8)}
    quoting = {**plain, "d1.txt": plain["d1.txt"] + "and quotes <|endoftext|>"}
    assert not _crc_is_val(quoting["d1.txt"], 0.2) and any(_crc_is_val(t, 0.2) for t in quoting.values())
    for name, texts, tokenizer in (("byte", plain, "byte"), ("bpe", plain, "bpe"), ("quoting", quoting, "bpe")):
        cfg = data_config(tmp_path / "cache", path=str(_docs(tmp_path / name, texts)), tokenizer=tokenizer,
                          vocab_size=300)
        manifest = load_manifest(prepare(cfg))
        _, identity, before = _tokenizer_id(cfg)
        content = files_fingerprint(cfg, corpus_files(cfg))
        path_and_time = load_corpus(cfg, None, tmp_path / "datasets" / name)._fingerprint  # any cache: same
        assert path_and_time != content
        expected = [fingerprint(path_and_time, identity, 0.2, cfg.shard_tokens)]
        if name == "bpe":
            expected += [fingerprint(c, before, 0.2, cfg.shard_tokens) for c in (content, path_and_time)]
        assert manifest["also_known_as"] == expected


def test_a_directory_built_while_waiting_for_the_lock_is_used(tmp_path, monkeypatch):
    """Ranks that wait on the lock while one builds must take its directory, not build it again
    (which would delete it under the ranks already reading it)."""
    import shutil

    from data import shards

    cfg = data_config(tmp_path / "cache", path=str(three_documents(tmp_path)))
    out = prepare(cfg)
    shutil.rmtree(tmp_path / "cache" / ".index")
    built = out.rename(tmp_path / "built")
    mtime = (built / "manifest.json").stat().st_mtime_ns

    class OtherProcessFinishes:
        def __init__(self, path):
            pass

        def __enter__(self):
            built.rename(out)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(shards, "FileLock", OtherProcessFinishes)
    monkeypatch.setattr(shards, "_build", lambda *args: pytest.fail("built again"))
    assert prepare(cfg) == out and (out / "manifest.json").stat().st_mtime_ns == mtime
