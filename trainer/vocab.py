"""model.vocab_size from the tokenizer: 0 (auto) becomes its vocabulary rounded up to a multiple of 64.

The byte tokenizer's size is known from its name, so a config resolves it when loaded (core/run_config.py);
a tokenizer file (hf:, tiktoken:, the manifest of pre-tokenized shards) is read here, when a run starts.
"""
from __future__ import annotations

from core.errors import ConfigError
from core.model_config import VOCAB_MULTIPLE, ModelConfig, padded_vocab


def resolve_vocab(model: ModelConfig, tokenizer, tokenizer_name: str) -> str:
    """Set model.vocab_size when it is 0 (auto), check it holds every id; returns the phrase the
    startup line gives for where the value came from."""
    ids = tokenizer.vocab_size
    if tokenizer_name == "pretokenized" and tokenizer.spec != "pretokenized":
        tokenizer_name = f"pretokenized with {tokenizer.spec}"     # the shards' manifest names it
    if not model.vocab_size:
        model.vocab_size = padded_vocab(ids)
    elif ids > model.vocab_size:
        raise ConfigError(f"model.vocab_size: {model.vocab_size} is smaller than the tokenizer's vocabulary "
                          f"({ids} for data.tokenizer={tokenizer_name!r}); use at least {ids}, or 0 to follow "
                          "the tokenizer")
    if model.doc_mask and model.eot_id < 0:     # documents end where the data stream puts end-of-text
        model.eot_id = tokenizer.eot_id
    if model.vocab_size == padded_vocab(ids):   # auto, or set to what auto gives: the same words hold
        return f"the {ids} ids of data.tokenizer {tokenizer_name!r} rounded up to a multiple of {VOCAB_MULTIPLE}"
    return f"model.vocab_size; data.tokenizer {tokenizer_name!r} has {ids} ids"
