"""Prepared token files and the loader: reuse, header checks, determinism, resume, rank slices."""
import json

import numpy as np
import pytest
import torch

from data.loader import TokenLoader, validation_batches
from data.shards import prepare, read_tokens, write_tokens
from data.sources import DataError, load_documents
from data.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for i in range(12):  # random letters: every 16-token window is unique, so windows can be compared by content
        letters = rng.choice(list("abcdefghijklmnopqrstuvwxyzé \n"), size=3000)
        (root / f"doc{i:02d}.txt").write_text("".join(letters))
    return root


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    return prepare("files", str(corpus), "byte", 0.2, str(tmp_path_factory.mktemp("cache")))


def test_preparation_is_cached_and_split_by_document(prepared, corpus, tmp_path):
    manifest = json.loads((prepared / "manifest.json").read_text())
    splits = manifest["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == 12 and splits["val"]["documents"] >= 1
    docs = load_documents("files", str(corpus))
    total = sum(len(ByteTokenizer().encode(t)) for t in docs["text"])
    assert splits["train"]["tokens"] + splits["val"]["tokens"] == total
    assert prepare("files", str(corpus), "byte", 0.2, str(prepared.parent)) == prepared
    mtime = (prepared / "train.bin").stat().st_mtime_ns
    prepare("files", str(corpus), "byte", 0.2, str(prepared.parent))
    assert (prepared / "train.bin").stat().st_mtime_ns == mtime


def test_byte_tokenizer_round_trip_with_eos():
    tok = ByteTokenizer()
    ids = tok.encode("héllo\0")
    assert ids[-1] == tok.eos_id and 0 not in ids[:-1]
    assert tok.decode(ids) == "héllo"


def test_windows_are_shifted_by_one(prepared):
    loader = TokenLoader(prepared, 16, 4, seed=0)
    x, y = next(loader)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_same_seed_same_order_other_seed_other_order(prepared):
    a, b, c = (TokenLoader(prepared, 16, 4, seed=s) for s in (0, 0, 1))
    xa, xb, xc = (torch.cat([next(ld)[0] for _ in range(5)]) for ld in (a, b, c))
    assert torch.equal(xa, xb) and not torch.equal(xa, xc)


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
    tokens = read_tokens(prepared / "train.bin")
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
    with pytest.raises(DataError, match="world_size"):
        TokenLoader(prepared, 16, 4, seed=0, world_size=2).load_state_dict(state)


def test_validation_batches_are_fixed(prepared):
    a = validation_batches(prepared, 16, 4, 3)
    b = validation_batches(prepared, 16, 4, 3)
    assert len(a) == 3 and all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, b))


@pytest.mark.parametrize("damage,words", [
    (lambda b: b[:-3], "truncated"),
    (lambda b: b"XXXXXXXX" + b[8:], "magic"),
    (lambda b: b[:8] + (7).to_bytes(8, "little") + b[16:], "version 7"),
    (lambda b: b[:20], "shorter than its header"),
])
def test_damaged_token_file_is_named(damage, words, tmp_path):
    path = tmp_path / "train.bin"
    write_tokens(path, np.arange(100, dtype=np.uint16), 256)
    assert np.array_equal(read_tokens(path), np.arange(100))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataError, match=words) as err:
        read_tokens(path)
    assert str(path) in str(err.value)
