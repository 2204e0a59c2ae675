"""Sampling: cached decoding against recomputing the whole context, the sampling filters against
brute force, and the command line (seed, corpus, bad prompts, sliding context)."""
import pytest
import torch

from model import build_model
from model.generate import Sampling, filter_logits, generate
from tests.conftest import WORDS, compose_config
from train import sample


def decode(model, prompt, steps, use_cache, context, seed=1, sampling=Sampling(1.0)):
    g = torch.Generator().manual_seed(seed)
    out = list(generate(model, prompt, steps, sampling, context, use_cache=use_cache, generator=g))
    return torch.stack([s.token for s in out], 1), torch.stack([s.logits for s in out], 1), [s.slid for s in out]


def assert_cached_equals_recomputed(model, prompt, steps, context, slides):
    """Decoding through the cache gives the tokens and logits (1e-5) of recomputing the context,
    across `slides` slides of the context window."""
    cached, cached_logits, slid = decode(model, prompt, steps, True, context=context)
    plain, plain_logits, _ = decode(model, prompt, steps, False, context=context)
    assert sum(slid) == slides
    assert torch.equal(cached, plain)
    torch.testing.assert_close(cached_logits, plain_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("residual", ["residual", "hc", "mhc"])
def test_cached_decoding_equals_recomputing_the_context(residual):
    """Same tokens and logits (1e-5) at every step, through a prompt prefill, one-token steps and
    two slides of the context (the cache rebuilt from the kept half)."""
    cfg = compose_config(["model=tiny", f"model.residual={residual}", "model.max_seq_len=24"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 256).eval()
    prompt = torch.randint(1, 256, (2, 7))
    assert_cached_equals_recomputed(model, prompt, 40, context=24, slides=2)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 0.1)])
def test_cache_continues_positions(dtype, tol):
    """A prompt fed in pieces through the cache gives the logits of one full forward; also for a
    model in bf16, whose cache holds bf16 keys and values while the CPU attends in float32."""
    cfg = compose_config(["model=tiny"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 256).eval().to(dtype)
    ids = torch.randint(1, 256, (2, 20))
    cache = model.new_cache(2, 20)
    with torch.no_grad():
        pieces = [model(ids[:, a:b], cache=cache) for a, b in ((0, 9), (9, 10), (10, 16), (16, 20))]
        torch.testing.assert_close(torch.cat(pieces, 1).float(), model(ids).float(), atol=tol, rtol=0)


def test_top_k_and_top_p_keep_what_brute_force_keeps():
    """top-k keeps the k largest logits; top-p then keeps the most likely of those until their
    probability (renormalised over the survivors) reaches p."""
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    for k, p in ((5, 1.0), (0, 0.7), (10, 0.5), (0, 1e-6)):
        kept = torch.isfinite(filter_logits(logits, Sampling(1.0, k, p)))
        for row, keep in zip(logits, kept):
            survivors = row.argsort(descending=True).tolist()[: k or None]
            probs = torch.softmax(row[survivors], 0).tolist()
            expected, mass = set(), 0.0
            for i, q in zip(survivors, probs):
                if mass >= p:
                    break
                expected.add(i)
                mass += q
            assert set(keep.nonzero().flatten().tolist()) == expected, (k, p)


def run_sample(capsys, *args):
    code = sample.main([*map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


class Recording(torch.nn.Module):
    """A stand-in model that records how many tokens each forward sees (no cache)."""
    supports_cache, max_seq_len = False, 64

    def __init__(self):
        super().__init__()
        self.lengths = []

    def forward(self, idx):
        self.lengths.append(idx.size(1))
        return torch.zeros(idx.size(0), idx.size(1), 10)


@pytest.mark.parametrize("prompt", [3, 12])
def test_the_context_slides_to_its_newest_half(prompt):
    """The model sees at most `context` tokens: a longer prompt's newest ones; when one more would
    not fit, the newest context // 2 remain."""
    model = Recording()
    steps = list(generate(model, torch.zeros(1, prompt, dtype=torch.long), 12, Sampling(temperature=0),
                          context=8, use_cache=False))
    expected, seen = [], min(prompt, 8)
    for _ in range(12):
        if seen > 8:
            seen = 4
        expected.append(seen)
        seen += 1
    assert model.lengths == expected and max(model.lengths) == 8
    assert [s.slid for s in steps] == [prompt > 8] + [a < b for a, b in zip(expected[1:], expected)]


def test_sampling_draws_only_what_top_k_and_top_p_keep():
    from model.generate import next_token

    logits = torch.tensor([[3.0, 2.5, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(next_token(logits, Sampling(temperature=1.0, top_k=1), g).tolist()) == {0}
    assert set(next_token(logits, Sampling(temperature=1.0, top_k=2), g).tolist()) == {0, 1}
    assert set(next_token(logits, Sampling(temperature=1.0, top_p=0.3), g).tolist()) == {0}
    assert set(next_token(logits, Sampling(temperature=1.0), g).tolist()) == {0, 1, 2, 3, 4}


def test_streamed_text_holds_back_a_character_cut_in_half():
    """Byte tokens arrive one at a time: a multi-byte character is printed once it is whole, never as
    a replacement character."""
    import io

    from data.tokenizer import ByteTokenizer

    out = io.StringIO()
    stream, written = sample.TextStream(ByteTokenizer(), out), []
    for b in "é!€".encode():
        stream.add(b)
        written.append(out.getvalue())
    assert stream.close() == "é!€" and out.getvalue() == "é!€\n"
    assert written == ["", "é", "é!", "é!", "é!", "é!€"]


def test_same_seed_same_text_and_text_from_the_corpus(trained_run, capsys):
    a = run_sample(capsys, trained_run, "seed=5", "max_new_tokens=120", "temperature=0.7")
    b = run_sample(capsys, trained_run, "seed=5", "max_new_tokens=120", "temperature=0.7")
    c = run_sample(capsys, trained_run, "seed=6", "max_new_tokens=120", "temperature=0.7")
    assert a[0] == 0 and a[1] == b[1] and a[1] != c[1]
    assert "tokens/s" in a[2]
    allowed = set("".join(WORDS) + " .\n")
    text = a[1] + c[1]
    assert sum(ch in allowed for ch in text) / len(text) > 0.97, text
    words = [w.strip(".") for w in text.split() if w.strip(".")]
    assert sum(w in WORDS for w in words) / len(words) > 0.8, text


@pytest.mark.parametrize("stop", ["true", "false"])
def test_the_end_of_document_token_ends_the_sample(trained_run, capsys, monkeypatch, stop):
    """stop_at_eos=true (the default) ends a sample at the first end-of-document token, which is not
    printed; false prints past it."""
    from model.generate import Step

    def eos_then_letters(model, ids, max_new_tokens, *args):
        for token in [0, *[ord("a")] * (max_new_tokens - 1)]:  # byte tokenizer: EOS is id 0
            yield Step(torch.tensor([token]), torch.zeros(1, 256), False)
    monkeypatch.setattr(sample, "generate", eos_then_letters)
    code, out, err = run_sample(capsys, trained_run, "max_new_tokens=5", "prompt=the", f"stop_at_eos={stop}")
    assert code == 0
    assert (out, "[1 tokens" in err) == (("the\n", True) if stop == "true" else ("theaaaa\n", False))


def test_uncached_command_gives_the_same_text(trained_run, capsys):
    a = run_sample(capsys, trained_run, "seed=2", "max_new_tokens=50", "prompt=the cat")
    # a prompt given twice: the last one, as the last of any override given twice
    b = run_sample(capsys, trained_run, "seed=2", "max_new_tokens=50", "prompt=a dog", "prompt=the cat", "cache=false")
    assert a[0] == b[0] == 0 and a[1] == b[1] and a[1].startswith("the cat")
    assert "decoding cache" in a[2] and "no cache: the context is recomputed" in b[2]


def test_a_prompt_is_refused_from_the_first_id_outside_the_vocabulary():
    """The model embeds ids 0 … vocab_size - 1: a prompt holding the id vocab_size is refused, one
    holding only smaller ones is the end-of-document token followed by its ids."""
    from data.tokenizer import ByteTokenizer
    from train.load import LoadError

    tok = ByteTokenizer()
    assert sample.encode_prompt(tok, "az", ord("z") + 1) == [tok.eos_id, ord("a"), ord("z")]
    with pytest.raises(LoadError, match=f"token id {ord('z')}, outside the model's vocabulary of {ord('z')}"):
        sample.encode_prompt(tok, "az", ord("z"))


def test_sliding_context_is_said_once(trained_run, capsys):
    code, out, err = run_sample(capsys, trained_run, "max_new_tokens=100", "stop_at_eos=false")  # context 32
    assert code == 0 and err.count("outgrew the model's context of 32 tokens") == 1


@pytest.mark.parametrize("prompt,what", [("a\0b", "NUL byte"), ("caf\udce9", "not valid UTF-8")])
def test_prompt_outside_the_tokenizer_is_refused(trained_run, capsys, prompt, what):
    code, out, err = run_sample(capsys, trained_run, f"prompt={prompt}")
    assert code == 2 and what in err and err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.parametrize("arg,what", [("tempreature=1", "tempreature"), ("top_p=0", "top_p"), ("top_k=x", "top_k"), ("top_k=-1", "top_k"),
                                      ("temperature=nan", "temperature"), ("temperature=inf", "temperature"),
                                      ("temperature=1e-45", "temperature"), ("top_p=nan", "top_p")])
def test_bad_arguments_are_refused(trained_run, capsys, arg, what):
    code, out, err = run_sample(capsys, trained_run, arg)
    assert code == 2 and what in err and err.count("\n") == 1


V4 = ["model=v4_tiny", "model.attn.window=8", "model.attn.csa_topk=3", "model.attn.hca_ratio=8"]


@pytest.mark.parametrize("sparse", [False, True], ids=["dense-warmup", "sparse"])
def test_v4_cached_decoding_equals_recomputing_the_context(sparse):
    """V4 attention's cache (raw window, entries, the block being compressed; CSA's indexer keys)
    through a prefill, one-token steps that complete CSA and HCA blocks, and slides; MTP ignored."""
    cfg = compose_config([*V4, "model.max_seq_len=48"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 256).eval()
    model.on_step_start(10**6 if sparse else 0, lr_decaying=False)
    assert model.supports_cache and sum(b.attn.sparse for b in model.blocks) == (2 if sparse else 0)
    prompt = torch.randint(1, 256, (2, 11))
    assert_cached_equals_recomputed(model, prompt, 50, context=48, slides=1)


def test_v4_cache_continues_positions():
    """A sequence fed through the cache in pieces of 1–13 tokens, across block boundaries, gives
    the logits of one full forward (sparse CSA)."""
    cfg = compose_config([*V4, "model.max_seq_len=64"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 256).eval()
    model.on_step_start(10**6, lr_decaying=False)
    ids = torch.randint(1, 256, (2, 64))
    cache = model.new_cache(2, 64)
    cuts = [0, 13, 14, 15, 16, 23, 31, 32, 33, 45, 46, 58, 64]
    with torch.no_grad():
        pieces = [model(ids[:, a:b], cache=cache) for a, b in zip(cuts, cuts[1:])]
        torch.testing.assert_close(torch.cat(pieces, 1), model(ids), atol=1e-5, rtol=0)
