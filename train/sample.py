"""Sample text from a trained run:

    python -m train.sample RUN [prompt=TEXT] [max_new_tokens=256] [temperature=0.8] [top_k=K]
                               [top_p=P] [seed=S] [n=N] [stop_at_eos=true] [cache=true] [device=auto]

RUN is a run directory (its newest valid checkpoint) or a checkpoint directory. `prompt=` takes
the rest of its argument verbatim (no Hydra quoting needed). Text streams to stdout as it is
decoded; the tokens/s of each sample go to stderr. Each sample starts a new document: the prompt
follows the end-of-document token, as every document did in training.
"""
from __future__ import annotations

import math
import sys
import time

import torch

from data.tokenizer import ByteTokenizer
from model.generate import Sampling, generate
from train.cli import compose_args, fail, split_args
from train.load import EXIT_CONFIG, LoadError, load_run

USAGE = "python -m train.sample RUN_OR_CHECKPOINT_DIR [prompt=TEXT] [max_new_tokens=N] [temperature=T] ..."


def _refuse(key: str, value, accepted: str):
    raise LoadError(f"invalid argument {key}={value!r}. Accepted: {accepted}.", EXIT_CONFIG)


def check(args) -> None:
    if args.max_new_tokens < 0:
        _refuse("max_new_tokens", args.max_new_tokens, "an integer ≥ 0")
    if not (args.temperature == 0 or 1e-6 <= args.temperature < math.inf):  # nan, inf, denormals: no distribution
        _refuse("temperature", args.temperature, "0 (greedy) or a finite number ≥ 1e-6")
    if args.top_k < 0:
        _refuse("top_k", args.top_k, "an integer ≥ 0 (0 = off)")
    if not 0 < args.top_p <= 1:
        _refuse("top_p", args.top_p, "a number in (0, 1] (1 = off)")
    if args.n < 1:
        _refuse("n", args.n, "an integer ≥ 1")


def encode_prompt(tokenizer, text: str, vocab_size: int) -> list[int]:
    """The end-of-document token, then the prompt's ids; text the tokenizer cannot represent
    exactly is refused, naming the characters."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise LoadError(f"the prompt is not valid UTF-8 (bytes {text[e.start:e.end].encode('utf-8', 'surrogateescape')!r} "
                        f"at character {e.start}); accepted: UTF-8 text", EXIT_CONFIG) from None
    if isinstance(tokenizer, ByteTokenizer) and "\0" in text:
        raise LoadError("the prompt holds a NUL byte (\\x00), which the byte tokenizer reserves for the end of a "
                        "document; accepted: any other UTF-8 text", EXIT_CONFIG)
    ids = [int(i) for i in tokenizer.encode_batch([text])[0]]
    unk = getattr(getattr(getattr(tokenizer, "tok", None), "model", None), "unk_token", None)
    unk_id = tokenizer.tok.token_to_id(unk) if unk else None
    if unk_id is not None and unk_id in ids:
        raise LoadError(f"the prompt holds text the run's tokenizer has no token for (it maps to {unk!r}); "
                        f"accepted: text its vocabulary covers", EXIT_CONFIG)
    if any(i >= vocab_size for i in ids):
        raise LoadError(f"the prompt encodes to token id {max(ids)}, outside the model's vocabulary of {vocab_size}",
                        EXIT_CONFIG)
    return [tokenizer.eos_id, *ids]


class TextStream:
    """Prints decoded text as tokens arrive, holding back an incomplete UTF-8 character."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out, self.ids, self.shown = tokenizer, out or sys.stdout, [], 0

    def add(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # maybe the first bytes of a character: wait for the rest
            return
        self.out.write(text[self.shown:])
        self.out.flush()
        self.shown = len(text)

    def close(self) -> str:
        text = self.tokenizer.decode(self.ids)
        self.out.write(text[self.shown:] + "\n")
        self.out.flush()
        return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        run, overrides = split_args(argv, USAGE)
        prompts = [o.split("=", 1)[1] for o in overrides if o.startswith("prompt=")]
        args = compose_args("sample_schema", [o for o in overrides if not o.startswith("prompt=")])
        args.prompt = prompts[-1] if prompts else args.prompt
        check(args)
        loaded = load_run(run, args.device)
        prompt = encode_prompt(loaded.tokenizer, args.prompt, loaded.model.vocab_size)
    except LoadError as e:
        return fail(str(e), e.code)
    model, tok = loaded.model, loaded.tokenizer
    device = model.embed.weight.device
    context = loaded.config.data.seq_len  # what the model was trained to see
    use_cache = args.cache and model.supports_cache
    print(f"{loaded.checkpoint} (step {loaded.step}), {device}, context {context} tokens, "
          f"{'decoding cache' if use_cache else 'no cache: the context is recomputed for every token'}",
          file=sys.stderr, flush=True)
    if args.cache and not use_cache:
        print("note: this model's attention has no decoding cache here; sampling recomputes the context",
              file=sys.stderr, flush=True)
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    said = []

    def on_slide():
        if not said:
            said.append(True)
            print(f"\n[note: the text outgrew the model's context of {context} tokens; from here on the context "
                  f"slides: when full, it keeps the newest {max(1, context // 2)} tokens]", file=sys.stderr, flush=True)

    for i in range(args.n):
        if args.n > 1:
            print(f"--- sample {i + 1} of {args.n} ---", flush=True)
        stream = TextStream(tok)
        sys.stdout.write(args.prompt)
        start, count = time.perf_counter(), 0
        ids = torch.tensor([prompt], device=device)
        for step in generate(model, ids, args.max_new_tokens, sampling, context, use_cache, generator, on_slide):
            token = int(step.token[0])
            count += 1
            if args.stop_at_eos and token == tok.eos_id:
                break
            stream.add(token)
        stream.close()
        elapsed = time.perf_counter() - start
        print(f"[{count} tokens in {elapsed:.2f} s: {count / max(elapsed, 1e-9):,.1f} tokens/s]", file=sys.stderr,
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
