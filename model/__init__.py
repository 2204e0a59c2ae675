"""Decoder-only language models for the V4 recipe at small scale."""
from model.transformer import Transformer, build_model

__all__ = ["Transformer", "build_model"]
