"""Prepared token files and the loader: reuse, header checks, determinism, resume, rank slices."""

from pathlib import Path

import numpy as np
import pytest
import torch

from data.loader import TokenLoader, validation_batches
from data.shards import load_manifest, load_tokenizer_of, prepare, read_tokens, write_tokens
from data.sources import DataError, load_corpus
from data.tokenizer import ByteTokenizer
from train.config import DataConfig


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for i in range(12):  # random letters: every 16-token window is unique, so windows can be compared by content
        letters = rng.choice(list("abcdefghijklmnopqrstuvwxyzé \n"), size=3000)
        (root / f"doc{i:02d}.txt").write_text("".join(letters))
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def data_config(cache, **kw) -> DataConfig:
    return DataConfig(**{"source": "files", "val_fraction": 0.2, "cache_dir": str(cache), **kw})


@pytest.fixture(scope="module")
def prepared(corpus, cache):
    return prepare(data_config(cache, path=str(corpus)))


def all_tokens(prepared, split):
    shards = load_manifest(prepared)["splits"][split]["shards"]
    return np.concatenate([read_tokens(prepared / s["file"]) for s in shards])


def test_preparation_is_cached_and_split_by_document(prepared, corpus, cache):
    splits = load_manifest(prepared)["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == 12 and splits["val"]["documents"] >= 1
    texts = load_corpus(data_config(cache, path=str(corpus)))["text"]
    assert splits["train"]["tokens"] + splits["val"]["tokens"] == sum(len(t.encode()) + 1 for t in texts)
    # Every document lands whole on one side: each split decodes to a set of whole documents.
    tok = ByteTokenizer()
    eos_positions = np.flatnonzero(all_tokens(prepared, "val") == tok.eos_id)
    val_texts = {bytes(d.astype(np.uint8)).decode() for d in np.split(all_tokens(prepared, "val"), eos_positions + 1) if len(d)}
    val_texts = {t.rstrip("\0") for t in val_texts}
    assert val_texts and val_texts <= set(texts)
    mtime = (prepared / "train_00000.bin").stat().st_mtime_ns
    assert prepare(data_config(cache, path=str(corpus))) == prepared
    assert (prepared / "train_00000.bin").stat().st_mtime_ns == mtime


def test_byte_tokenizer_drops_nul_and_round_trips():
    tok = ByteTokenizer()
    (ids,) = tok.encode_batch(["héllo\0"])
    assert tok.eos_id not in ids and tok.decode(ids) == "héllo"


def test_windows_are_shifted_by_one(prepared):
    loader = TokenLoader(prepared, 16, 4, seed=0)
    x, y = next(loader)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_same_seed_same_order_other_seed_other_order(prepared):
    a, b, c = (TokenLoader(prepared, 16, 4, seed=s) for s in (0, 0, 1))
    xa, xb, xc = (torch.cat([next(ld)[0] for _ in range(5)]) for ld in (a, b, c))
    assert torch.equal(xa, xb) and not torch.equal(xa, xc)


def test_each_epoch_has_its_own_order_and_a_loaded_state_forgets_the_old_one(prepared):
    """Windows are visited in a per-(seed, epoch) permutation; a loader that has already served
    batches and is given another epoch's state serves exactly what a fresh loader given it does."""
    fresh = TokenLoader(prepared, 16, 4, seed=0)
    first = next(fresh)[0]
    used = TokenLoader(prepared, 16, 4, seed=0)
    for _ in range(3):
        next(used)
    state = {**fresh.state_dict(), "epoch": 1, "position": 0}
    used.load_state_dict(state)
    again = TokenLoader(prepared, 16, 4, seed=0)
    again.load_state_dict(state)
    second = next(again)[0]
    assert not torch.equal(first, second)  # epoch 1 is another permutation
    assert torch.equal(next(used)[0], second)


def test_a_shard_of_a_whole_number_of_windows_gives_only_whole_windows(prepared, tmp_path):
    """A window is seq_len + 1 tokens at a stride of seq_len: 64 tokens hold 3 windows of 16, not 4."""
    import json
    import shutil

    from data.loader import Windows

    copy = Path(shutil.copytree(prepared, tmp_path / "copy"))
    manifest = json.loads((copy / "manifest.json").read_text())
    shard = manifest["splits"]["train"]["shards"][0]
    manifest["splits"]["train"]["shards"] = [{**shard, "tokens": 64}]
    write_tokens(copy / shard["file"], np.arange(1, 65), manifest["vocab_size"])
    (copy / "manifest.json").write_text(json.dumps(manifest))
    windows = Windows(copy, "train", 16)
    assert len(windows) == 3
    x, y = windows.batch(np.arange(3))
    assert torch.equal(x[-1], torch.arange(33, 49)) and torch.equal(y[-1], torch.arange(34, 50))


def test_resume_continues_on_the_next_batch(prepared):
    ref = TokenLoader(prepared, 16, 4, seed=3)
    expected = [next(ref) for _ in range(48)][40:]
    first = TokenLoader(prepared, 16, 4, seed=3)
    for _ in range(40):
        next(first)
    state = first.state_dict()
    resumed = TokenLoader(prepared, 16, 4, seed=3)
    resumed.load_state_dict(state)
    for (x, y), (ex, ey) in zip((next(resumed) for _ in range(8)), expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_ranks_are_disjoint_and_cover_the_epoch(prepared):
    ranks = [TokenLoader(prepared, 16, 4, seed=0, rank=r, world_size=2) for r in range(2)]
    tokens = all_tokens(prepared, "train")
    n_steps = ranks[0].steps_per_epoch
    seen = [set() for _ in ranks]
    for r, loader in enumerate(ranks):
        for _ in range(n_steps):
            x, _ = next(loader)
            for row in x:
                seen[r].add(row.numpy().tobytes())
    assert not seen[0] & seen[1]
    windows = {np.asarray(tokens[i * 16:(i + 1) * 16], dtype=np.int64).tobytes() for i in range(ranks[0].n_windows)}
    assert len(seen[0] | seen[1]) == n_steps * 8
    assert (seen[0] | seen[1]) <= windows


def test_loader_state_mismatch_is_an_error(prepared):
    state = TokenLoader(prepared, 16, 4, seed=0).state_dict()
    with pytest.raises(DataError, match="seq_len"):
        TokenLoader(prepared, 32, 4, seed=0).load_state_dict(state)
    with pytest.raises(DataError, match="seed"):
        TokenLoader(prepared, 16, 4, seed=1).load_state_dict(state)


def test_another_global_batch_continues_from_the_same_position(prepared):
    """A resume with a larger global batch reads on from where the run was: within the epoch no
    window twice and none skipped, up to a last step that would not fit."""
    first = TokenLoader(prepared, 16, 4, seed=2, global_batch=8)
    seen = [row.numpy().tobytes() for _ in range(10) for row in next(first)[0]]
    second = TokenLoader(prepared, 16, 4, seed=2, global_batch=12)
    second.load_state_dict(first.state_dict())
    n, steps = second.n_windows, (second.n_windows - 40) // 12
    seen += [row.numpy().tobytes() for _ in range(3 * steps) for row in next(second)[0]]
    assert len(seen) == len(set(seen)) == 40 + 12 * steps > n - 12
    next(second)
    assert second.epoch == 1 and second.position == 4


def step_windows(loaders, accum: int) -> list[bytes]:
    """The windows one optimizer step reads over all ranks, as a sorted list (a step's gradient is a sum)."""
    return sorted(row.numpy().tobytes() for _ in range(accum) for ld in loaders for row in next(ld)[0])


LAYOUTS = [(8, 1), (4, 1), (2, 2), (4, 2), (1, 8)]  # (micro_batch, world_size) for a global batch of 8


@pytest.mark.parametrize("first,second", [(LAYOUTS[0], LAYOUTS[2]), (LAYOUTS[3], LAYOUTS[1]), (LAYOUTS[4], LAYOUTS[0])])
def test_position_is_global_so_any_layout_resumes_the_same_order(prepared, first, second):
    """Every layout reads the same windows in each optimizer step; a state saved at one layout
    continues at another, across epoch boundaries that fall on whole steps: within an epoch no
    window repeats and every one is read."""
    def loaders(layout):
        mb, ws = layout
        return [TokenLoader(prepared, 16, mb, seed=5, rank=r, world_size=ws, global_batch=8) for r in range(ws)]

    reference = loaders(LAYOUTS[0])
    per_epoch = reference[0].windows_per_epoch // 8
    assert reference[0].n_windows % 8  # a tail the epoch boundary must drop
    expected = [step_windows(reference, 1) for _ in range(2 * per_epoch + 3)]
    a = loaders(first)
    got = [step_windows(a, 8 // (first[0] * first[1])) for _ in range(per_epoch - 2)]
    b = loaders(second)
    for ld in b:
        ld.load_state_dict(a[0].state_dict())
    got += [step_windows(b, 8 // (second[0] * second[1])) for _ in range(per_epoch + 5)]
    assert got == expected
    for epoch in range(2):
        seen = [w for step in got[epoch * per_epoch:(epoch + 1) * per_epoch] for w in step]
        assert len(seen) == len(set(seen)) == per_epoch * 8


def test_loader_reads_states_saved_before_positions_were_global(prepared):
    """Version 1 counted micro-steps of a fixed micro_batch × world_size; it resumes the same order."""
    ref = TokenLoader(prepared, 16, 4, seed=3, global_batch=8)
    for _ in range(6):
        next(ref)
    old = {"epoch": 0, "step_in_epoch": 3, "seed": 3, "fingerprint": ref.fingerprint, "seq_len": 16,
           "micro_batch": 4, "world_size": 2}
    resumed = TokenLoader(prepared, 16, 4, seed=3, global_batch=8)
    resumed.load_state_dict(old)
    assert all(torch.equal(next(resumed)[0], next(ref)[0]) for _ in range(4))


def test_batch_digest_names_the_windows_whatever_the_layout(prepared, monkeypatch):
    monkeypatch.setenv("V4LAB_BATCH_DIGEST", "1")
    one = TokenLoader(prepared, 16, 4, seed=0, global_batch=8)
    two = [TokenLoader(prepared, 16, 4, seed=0, rank=r, world_size=2, global_batch=8) for r in range(2)]
    digests = []
    for _ in range(3):
        next(one), next(one), [next(ld) for ld in two]
        digests.append((one.take_digest(), sum(ld.take_digest() for ld in two)))
    assert all(a == b for a, b in digests) and len({a for a, _ in digests}) == 3
    monkeypatch.delenv("V4LAB_BATCH_DIGEST")
    off = TokenLoader(prepared, 16, 4, seed=0)
    next(off)
    assert off.take_digest() is None


def test_validation_batches_are_fixed(prepared):
    a = validation_batches(prepared, 16, 4, 3)
    b = validation_batches(prepared, 16, 4, 3)
    assert len(a) == 3 and all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, b))


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_gets_the_same_validation_batches_when_windows_run_short(prepared, world):
    """With fewer windows than eval_batches x micro x ranks, every rank still gets the same number of
    batches of the same sizes (under ZeRO-3 each forward is a collective: one rank's extra batch
    would wait for the others forever), disjoint, as many windows as the split holds for each."""
    from data.loader import Windows

    n = len(Windows(prepared, "val", 16))
    micro = max(1, n // (2 * world) - 1)  # leaves a remainder of windows per rank past whole batches
    ranks = [validation_batches(prepared, 16, micro, 1000, rank, world) for rank in range(world)]
    sizes = [[len(x) for x, _ in batches] for batches in ranks]
    assert all(s == sizes[0] for s in sizes) and sum(sizes[0]) == n // world, sizes
    rows = [tuple(r.tolist()) for batches in ranks for x, _ in batches for r in x]
    assert len(rows) == len(set(rows))


@pytest.mark.parametrize("damage,words", [
    (lambda b: b[:-3], "truncated"),
    (lambda b: b"NOTMAGIC" + b[8:], "magic"),
    (lambda b: b[:8] + (7).to_bytes(8, "little") + b[16:], "version 7"),
    (lambda b: b[:20], "shorter than its header"),
    (lambda b: b + b"\x07\x00" * 3, "truncated or corrupt"),  # bytes past the header's count: not its tokens
])
def test_damaged_token_file_is_named(damage, words, tmp_path):
    path = tmp_path / "train.bin"
    write_tokens(path, np.arange(100, dtype=np.uint16), 256)
    assert np.array_equal(read_tokens(path), np.arange(100))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataError, match=words) as err:
        read_tokens(path)
    assert str(path) in str(err.value)


def test_bpe_is_trained_on_train_split_saved_and_reusable(corpus, cache, tmp_path):
    bpe = prepare(data_config(cache, path=str(corpus), tokenizer="bpe", vocab_size=300))
    manifest = load_manifest(bpe)
    assert manifest["vocab_size"] == 300 and (bpe / "tokenizer.json").is_file()
    tok = load_tokenizer_of(bpe, manifest)
    train = all_tokens(bpe, "train")
    assert train.dtype == np.uint16 and train.max() < 300
    first_doc = train[: np.flatnonzero(train == tok.eos_id)[0]]
    assert len(first_doc) < len(tok.decode(first_doc).encode())  # merges happened
    assert tok.decode(first_doc) in set(load_corpus(data_config(cache, path=str(corpus)))["text"])
    # The saved tokenizer.json, given as data.tokenizer, reproduces the same tokens.
    again = prepare(data_config(tmp_path, path=str(corpus), tokenizer=str(bpe / "tokenizer.json")))
    assert np.array_equal(all_tokens(again, "train"), train)


def test_jsonl_parquet_and_hub_path_read_the_same_documents(tmp_path, cache):
    texts = [f"document {i}: " + "xyz" * i for i in range(20)]
    import datasets
    ds = datasets.Dataset.from_dict({"body": texts, "id": list(range(20))})
    (tmp_path / "j").mkdir()
    (tmp_path / "p").mkdir()
    ds.to_json(tmp_path / "j" / "part.jsonl")
    ds.to_parquet(tmp_path / "p" / "part.parquet")
    runs = [
        prepare(data_config(cache, path=str(tmp_path / "j"), text_field="body")),
        prepare(data_config(cache, path=str(tmp_path / "p" / "part.parquet"), text_field="body")),
        # data.source=hub with a local dataset directory: datasets.load_dataset, as for a hub name.
        prepare(data_config(cache, source="hub", name=str(tmp_path / "j"), text_field="body")),
    ]
    for prepared in runs:
        assert load_manifest(prepared)["splits"]["train"]["documents"] + load_manifest(prepared)["splits"]["val"]["documents"] == 20
        assert np.array_equal(all_tokens(prepared, "train"), all_tokens(runs[0], "train"))


def test_missing_text_field_names_the_columns(tmp_path, cache):
    (tmp_path / "d.jsonl").write_text('{"body": "a"}\n{"body": "b"}\n')
    with pytest.raises(DataError, match="text_field='text'.*body"):
        prepare(data_config(cache, path=str(tmp_path / "d.jsonl")))


def test_small_shards_are_cut_and_loaded_without_straddling(corpus, cache):
    sharded = prepare(data_config(cache, path=str(corpus), shard_tokens=5000))
    shards = load_manifest(sharded)["splits"]["train"]["shards"]
    assert len(shards) > 3 and all(s["tokens"] <= 5000 for s in shards)
    loader = TokenLoader(sharded, 16, 4, seed=0)
    assert loader.n_windows == sum((s["tokens"] - 1) // 16 for s in shards)
    tokens = all_tokens(sharded, "train")
    whole = tokens.tobytes()
    for _ in range(20):
        x, y = next(loader)
        for row_x, row_y in zip(x, y):
            window = np.concatenate([row_x[:1].numpy(), row_y.numpy()]).astype(tokens.dtype).tobytes()
            assert window in whole


def test_token_id_beyond_vocab_names_the_file(prepared, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(prepared, bad)
    shard = bad / "train_00000.bin"
    tokens = np.array(read_tokens(shard))
    tokens[:: 7] = 300
    write_tokens(shard, tokens, 256)
    loader = TokenLoader(bad, 16, 4, seed=0)
    with pytest.raises(DataError, match=f"{shard}.*300"):
        for _ in range(10):
            next(loader)


def three_documents(tmp_path) -> Path:
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(3):
        (root / f"doc{i}.txt").write_text(f"document {i} " * 50)
    return root


def test_a_prepared_local_corpus_is_found_again_without_reading_it(tmp_path, monkeypatch):
    """Every rank of every run calls prepare: it must not re-read (and re-hash) the corpus while its
    files are unchanged, and must read it again once one changes."""
    import data.shards

    root = three_documents(tmp_path)
    cfg = data_config(tmp_path / "cache", path=str(root))
    first = prepare(cfg)
    with monkeypatch.context() as m:
        m.setattr(data.shards, "load_corpus", lambda *args: pytest.fail("the unchanged corpus was read again"))
        assert prepare(cfg) == first
    other_tokenizer = prepare(data_config(tmp_path / "cache", path=str(root), tokenizer="bpe", vocab_size=280))
    assert other_tokenizer != first
    (root / "doc1.txt").write_text("DOCUMENT 1 " * 50)  # the same size
    second = prepare(cfg)
    assert second != first
    assert b"DOCUMENT 1" in b"".join(bytes(all_tokens(second, s).astype(np.uint8)) for s in ("train", "val"))


def test_a_read_only_cache_still_serves_its_prepared_data(tmp_path, monkeypatch):
    import shutil

    import data.shards

    root = three_documents(tmp_path)
    cfg = data_config(tmp_path / "cache", path=str(root))
    first = prepare(cfg)
    shutil.rmtree(tmp_path / "cache" / ".index")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(data.shards.tempfile, "mkstemp", refuse)
    assert prepare(cfg) == first


def test_concurrent_preparation_builds_one_valid_copy(corpus, tmp_path):
    import subprocess
    import sys
    code = (
        "from data.shards import prepare; from train.config import DataConfig; "
        f"print(prepare(DataConfig(source='files', path={str(corpus)!r}, val_fraction=0.2, cache_dir={str(tmp_path)!r})))"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs) and outs[0] == outs[1]
    assert [p.name for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith(".")] == [outs[0].split("/")[-1]]
    TokenLoader(tmp_path / outs[0].split("/")[-1], 16, 4, seed=0)


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_parallel_preparation_equals_serial(corpus, tmp_path, tokenizer):
    serial = prepare(data_config(tmp_path / "1", path=str(corpus), tokenizer=tokenizer, vocab_size=280))
    parallel = prepare(data_config(tmp_path / "2", path=str(corpus), tokenizer=tokenizer, vocab_size=280, num_proc=2))
    for split in ("train", "val"):
        assert np.array_equal(all_tokens(serial, split), all_tokens(parallel, split))


# -- the user's files: identity by content, what is read, what a failed build leaves --------------
def _docs(root, texts: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def _text(prepared) -> str:
    return bytes(int(t) for s in ("train", "val") for t in all_tokens(prepared, s) if t < 256).decode()


def test_a_corpus_is_known_by_its_content(tmp_path):
    """A copy elsewhere or a touched file is the same corpus (same fingerprint: a run resumes on
    it); a file changed with its modification time kept is another, read afresh (datasets' own
    cache, keyed by path and time, served the old text)."""
    import os
    import shutil

    texts = {f"d{i}.txt": f"document {i} " * 40 for i in range(6)}
    a = _docs(tmp_path / "a", texts)
    first = prepare(data_config(tmp_path / "cache", path=str(a)))
    copy = shutil.copytree(a, tmp_path / "b")
    (a / "d1.txt").touch()
    for p in (a, copy):
        assert prepare(data_config(tmp_path / "cache", path=str(p))) == first
    stat = (a / "d3.txt").stat()
    (a / "d3.txt").write_text("edited doc " * 40)  # the same size, in place (the same inode)
    os.utime(a / "d3.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns))  # cp -p, touch -r, rsync -a
    assert (a / "d3.txt").stat().st_size == stat.st_size and (a / "d3.txt").stat().st_ino == stat.st_ino
    edited = prepare(data_config(tmp_path / "cache", path=str(a)))
    assert edited != first and "edited doc" in _text(edited) and "document 3 " not in _text(edited)
    # a run whose loader state holds the path-and-time fingerprint of before still resumes on the same files
    loader = TokenLoader(first, 16, 4, seed=0)
    state = {**loader.state_dict(), "fingerprint": load_manifest(first)["also_known_as"][0]}
    TokenLoader(first, 16, 4, seed=0).load_state_dict(state)
    with pytest.raises(DataError, match="saved fingerprint"):
        TokenLoader(first, 16, 4, seed=0).load_state_dict({**state, "fingerprint": "f" * 64})


def test_what_a_directory_holds_besides_the_corpus_is_not_read(tmp_path):
    """.git/, an editor's hidden folder and __pycache__ are not documents; a file that is not text
    is named in the error."""
    root = _docs(tmp_path / "c", {"a.txt": "alpha " * 50, "b.txt": "beta " * 50, ".git/config": "[core] secret",
                                  ".ipynb_checkpoints/a.txt": "gamma", "__pycache__/x.txt": "delta"})
    text = _text(prepare(data_config(tmp_path / "cache", path=str(root))))
    assert "alpha" in text and "beta" in text and not {"secret", "gamma", "delta"} & set(text.split())
    (root / "blob.txt").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataError, match=r"blob.txt is not readable UTF-8 text"):
        prepare(data_config(tmp_path / "cache", path=str(root)))


def test_one_text_file_is_read_as_its_paragraphs(tmp_path):
    """`data.path=input.txt`, as nanoGPT's: one file, which was one document and could never be split."""
    f = tmp_path / "input.txt"
    f.write_text("\n\n".join(f"paragraph {i} " * 20 for i in range(10)))
    manifest = load_manifest(prepare(data_config(tmp_path / "cache", path=str(f))))
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 10


def test_records_without_text_are_named(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "one document"}\n{"other": 5}\n{"text": "a third"}\n')
    with pytest.raises(DataError, match="document 1 of the corpus has no text"):
        prepare(data_config(tmp_path / "cache", path=str(f)))


def test_a_failed_or_killed_build_leaves_no_temporary_directory(tmp_path, monkeypatch):
    from data import shards

    root = _docs(tmp_path / "c", {f"d{i}.txt": f"doc {i} " * 30 for i in range(4)})
    cfg = data_config(tmp_path / "cache", path=str(root))

    def full_disk(*args):
        raise OSError("No space left on device")
    with monkeypatch.context() as m:
        m.setattr(shards.ShardWriter, "write", full_disk)
        with pytest.raises(OSError):
            prepare(cfg)
    assert not list((tmp_path / "cache").glob(".files-*"))
    out = prepare(cfg)
    shutil_rmtree = __import__("shutil").rmtree
    shutil_rmtree(out)
    (out.parent / f".{out.name}.killed").mkdir()  # what a kill -9 mid-build leaves
    (out.parent / f".{out.name}.killed" / "train_00000.bin").write_bytes(b"x" * 1000)
    assert prepare(cfg) == out and not list((tmp_path / "cache").glob(f".{out.name}.*"))


def test_a_tiny_corpus_holds_out_every_copy_of_its_validation_document(tmp_path):
    root = _docs(tmp_path / "c", {"a.txt": "same text " * 20, "b.txt": "same text " * 20, "c.txt": "other " * 20})
    prepared = prepare(data_config(tmp_path / "cache", path=str(root), val_fraction=0.01))
    train, val = (bytes(int(t) for t in all_tokens(prepared, s) if t < 256).decode() for s in ("train", "val"))
    assert not ("same text" in train and "same text" in val)


def test_a_special_tokens_spelling_in_text_is_text_not_a_document_end(tmp_path):
    """A document quoting `<|endoftext|>` keeps it as characters: EOS only where documents end
    (it ended them in the middle), decoded back to the text, and transformers' tokenizer of an
    export encodes it the same way. Data prepared before this rule keeps resuming where no document
    holds a spelling (the tokens are the same), not where one does."""
    from transformers import AutoTokenizer

    from data.shards import SPECIALS_RULE, _tokenizer_id, fingerprint, files_fingerprint
    from data.sources import corpus_files
    from data.tokenizer import save_for_transformers

    quoting = {f"d{i}.txt": f"document {i} ends with <|endoftext|> and goes on {i} " * 20 for i in range(6)}
    plain = {f"d{i}.txt": f"document {i} goes on {i} " * 20 for i in range(6)}
    for name, texts in (("quoting", quoting), ("plain", plain)):
        cfg = data_config(tmp_path / "cache", path=str(_docs(tmp_path / name, texts)), tokenizer="bpe", vocab_size=300)
        prepared = prepare(cfg)
        manifest = load_manifest(prepared)
        tok = load_tokenizer_of(prepared, manifest)
        train = all_tokens(prepared, "train")
        ends = np.flatnonzero(train == tok.eos_id)
        assert len(ends) == manifest["splits"]["train"]["documents"] and ends[-1] == len(train) - 1
        docs = [tok.decode(d) for d in np.split(train, ends[:-1] + 1)]
        assert set(docs) <= set(texts.values())
        label, identity, before = _tokenizer_id(cfg)
        assert identity == f"bpe300|{SPECIALS_RULE}" and before == "bpe300"
        legacy = fingerprint(files_fingerprint(cfg, corpus_files(cfg)), before, cfg.val_fraction, cfg.shard_tokens)
        assert (legacy in manifest["also_known_as"]) == (name == "plain")
    save_for_transformers(tok, tmp_path, 256)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    text = quoting["d0.txt"]
    assert hf(text)["input_ids"] == [int(i) for i in tok.encode_batch([text])[0]]
    assert tok.eos_id not in hf(text)["input_ids"]
