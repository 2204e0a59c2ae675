"""Token data: corpus sources, tokenizers, pre-tokenized shards and the resumable loader."""
