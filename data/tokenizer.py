"""Tokenizers: bytes (no files), a Hugging Face tokenizer.json, or a tiktoken encoding on this machine.

Every tokenizer has `.spec` (how the config named it), `.ident` (what its ids mean: equal idents
give equal ids, used to match pre-tokenized shards), `.vocab_size`, `.eot_id`, `.encode`, `.decode`
and `.encode_bytes` (UTF-8 bytes -> numpy ids, the hot path of the loader).
"""

from __future__ import annotations

import hashlib

import numpy as np

from core.errors import ConfigError

EOT_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]")


class ByteTokenizer:
    """ids 0..255 are the UTF-8 bytes, 256 is end-of-text."""

    spec = ident = "bytes"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    def __init__(self, path: str, eot_token: str = ""):
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as e:  # the library's message names no file
            raise ConfigError(f"data.tokenizer: cannot load Hugging Face tokenizer {path!r}: {e}") from e
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
        self.spec, self.ident = f"hf:{path}", f"hf:{digest}"
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        names = (eot_token,) if eot_token else EOT_CANDIDATES
        ids = [self._tok.token_to_id(n) for n in names]
        found = [i for i in ids if i is not None]
        if not found:
            raise ConfigError(f"data.eot_token: tokenizer {path!r} has none of {list(names)}; set data.eot_token "
                             "to its end-of-text token")
        self.eot_id = found[0]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_bytes(self, data: bytes) -> np.ndarray:
        return np.asarray(self.encode(data.decode("utf-8", errors="replace")), dtype=np.int64)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


class TiktokenTokenizer:
    def __init__(self, name: str):
        try:
            import tiktoken
        except ImportError as e:
            raise ConfigError(f"data.tokenizer: 'tiktoken:{name}' needs the tiktoken package "
                             "(pip install tiktoken), or use 'bytes' / 'hf:/path/tokenizer.json'") from e
        try:
            self._enc = tiktoken.get_encoding(name)
        except Exception as e:
            raise ConfigError(f"data.tokenizer: tiktoken encoding {name!r} is not available on this machine "
                             f"({e}); put its file in TIKTOKEN_CACHE_DIR beforehand (no downloads at run time)") from e
        self.spec = self.ident = f"tiktoken:{name}"
        self.vocab_size, self.eot_id = self._enc.n_vocab, self._enc.eot_token

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_bytes(self, data: bytes) -> np.ndarray:
        return np.asarray(self.encode(data.decode("utf-8", errors="replace")), dtype=np.int64)

    def decode(self, ids) -> str:
        return self._enc.decode([int(i) for i in ids])


class PretokenizedInfo:
    """Ids read from shards whose tokenizer cannot be rebuilt here: decode shows the ids."""

    def __init__(self, ident: str, vocab_size: int, eot_id: int):
        self.spec, self.ident, self.vocab_size, self.eot_id = "pretokenized", ident, vocab_size, eot_id

    def encode(self, text: str) -> list[int]:
        raise ConfigError("data.tokenizer: 'pretokenized' cannot encode text; set data.tokenizer to the tokenizer "
                         f"the shards were prepared with ({self.ident})")

    encode_bytes = encode

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)


def tokenizer_from_spec(spec: str, eot_token: str = ""):
    """Build a tokenizer from its config spelling ('bytes', 'hf:PATH', 'tiktoken:NAME')."""
    if spec == "bytes":
        return ByteTokenizer()
    if spec.startswith("hf:"):
        return HFTokenizer(spec[3:], eot_token)
    if spec.startswith("tiktoken:"):
        return TiktokenTokenizer(spec[len("tiktoken:"):])
    raise ConfigError(f"data.tokenizer: {spec!r} unknown; use 'bytes', 'hf:/path/tokenizer.json', "
                     "'tiktoken:<encoding>' or 'pretokenized'")
