"""Tokenizers map one modality to local ids; TokenSpace joins modalities into one vocabulary."""

from armodal.tokenizers.base import (
    Tokenizer,
    TrainableTokenizer,
    check_tokenizer,
    tokenizer_from_config,
)
from armodal.tokenizers.space import TokenSpace
from armodal.tokenizers.text import BPETokenizer, ByteTokenizer, CharTokenizer

__all__ = [
    "Tokenizer",
    "TrainableTokenizer",
    "tokenizer_from_config",
    "check_tokenizer",
    "TokenSpace",
    "ByteTokenizer",
    "CharTokenizer",
    "BPETokenizer",
]
