"""The `[data]` section of a run config: where shards come from and how they become tokens."""

# No `from __future__ import annotations`: field types stay real types (dataclasses.fields(...).type),
# which the config loader maps TOML values and --data.key overrides onto.
import os
from dataclasses import dataclass
from typing import Literal

from core.config_parse import option

BUILTIN_PREFIX = "builtin:"
BUILTIN_CORPORA = ("builtin:stdlib",)


def default_cache_dir() -> str:
    """$MESHFORMER_CACHE, else ~/.cache/meshformer."""
    return os.environ.get("MESHFORMER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "meshformer")


@dataclass
class DataConfig:
    urls: list[str] = option("training data: tar shards, raw text (.txt, .jsonl/.jsonl.gz/.jsonl.zst, .parquet; "
        "tokenized while training), brace patterns (shard-{000000..000127}.tar), globs (corpus/*.jsonl.zst), "
        "shard-list files (*.list, or a *.txt of URLs, one a line), folders (their *.tar, else their raw text "
        "files), 'pipe:CMD' (a TRUSTED shell command that writes a file to stdout), or 'builtin:stdlib'",
        factory=lambda: ["builtin:stdlib"])
    weights: list[float] = option("mixing weights, one per urls entry (each entry is then its own source); "
        "empty = all urls form one source", factory=list)
    val_urls: list[str] = option("validation data (same forms as urls); empty = the val/ split `meshformer prepare` "
        "wrote beside a urls folder, or the built-in corpus' validation split, else no validation", factory=list)
    manifest: str = option("manifest.json written by `meshformer prepare` for shards that are not local files "
        "(pipe:); empty = look next to local shards, else scan the shards once", "")
    tokenizer: str = option("'bytes' (257 ids, no files), 'hf:/path/tokenizer.json', 'tiktoken:<encoding>' "
        "(must already be on this machine) or 'pretokenized' (use the tokens in the shards)", "bytes")
    eot_token: str = option("end-of-text token string for hf: tokenizers; empty = find <|endoftext|>, </s>, <eos>", "")
    text_field: str = option("tar sample field holding UTF-8 text", "txt")
    text_key: str = option("field holding the text in JSON lines records and the Parquet column read", "text")
    token_field: str = option("sample field holding pre-tokenized ids", "tokens.npy")
    num_workers: int = option("loader worker processes per rank (0 = in process)", 0)
    prefetch: int = option("batches each worker prepares ahead", 2)
    shuffle: bool = option("shuffle shard order and documents each epoch", True)
    shuffle_buffer: int = option("documents shuffled together inside a shard (0 or 1 = keep shard order)", 1000)
    on_corrupt: Literal["skip", "error"] = option("a truncated or corrupt tar: 'skip' (keep what was readable, count, log) or 'error'", "skip")
    cache_dir: str = option("where the built-in corpus and shard indexes live; empty = "
        "$MESHFORMER_CACHE or ~/.cache/meshformer", "")
    builtin_val_percent: float = option("percent of built-in corpus files (by path hash) held out for validation", 5.0)

    def resolved_cache_dir(self) -> str:
        return os.path.expanduser(self.cache_dir) if self.cache_dir else default_cache_dir()

    def validate(self) -> None:
        # A TOML string or a single --data.urls value is one pattern: accept it as a one-entry list.
        for name in ("urls", "val_urls"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [value] if value.strip() else [])
            elif not isinstance(value, (list, tuple)) or not all(isinstance(u, str) for u in value):
                raise ValueError(f"data.{name}: expected a URL string or a list of them, got {value!r}")
            else:
                setattr(self, name, [u for u in value if u.strip()])
        if not self.urls:
            raise ValueError("data.urls: empty; give shard paths, a brace pattern, a pipe: command "
                             "or 'builtin:stdlib'")
        for u in self.urls + self.val_urls:
            if u.startswith(BUILTIN_PREFIX) and u not in BUILTIN_CORPORA:
                raise ValueError(f"data.urls: unknown built-in corpus {u!r}; known: {', '.join(BUILTIN_CORPORA)}")
        if isinstance(self.weights, (int, float)):
            self.weights = [float(self.weights)]
        if self.weights:
            if len(self.weights) != len(self.urls):
                raise ValueError(f"data.weights: {len(self.weights)} weights for {len(self.urls)} urls; "
                                 "give one weight per urls entry, or none")
            if any(not w >= 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ValueError(f"data.weights: {self.weights} must be >= 0 with a positive sum")
        tok = self.tokenizer
        if not (tok in ("bytes", "pretokenized") or tok.startswith("hf:") or tok.startswith("tiktoken:")):
            raise ValueError(f"data.tokenizer: {tok!r} unknown; use 'bytes', 'hf:/path/tokenizer.json', "
                             "'tiktoken:<encoding>' or 'pretokenized'")
        if tok.startswith("hf:") and not os.path.isfile(tok[3:]):
            raise ValueError(f"data.tokenizer: no tokenizer file at {tok[3:]!r}; give 'hf:' plus the path of a "
                             "Hugging Face tokenizer.json")
        if self.eot_token and not (tok.startswith("hf:") or tok == "pretokenized"):
            raise ValueError(f"data.eot_token: {self.eot_token!r} is only read for hf: tokenizers; "
                             f"data.tokenizer={tok!r} has its own end-of-text id, leave data.eot_token empty")
        if tok == "pretokenized" and any(u.startswith(BUILTIN_PREFIX) for u in self.urls):
            raise ValueError("data.tokenizer: 'pretokenized' needs shards written by `meshformer prepare`; "
                             "the built-in corpus is tokenized on first use, use 'bytes' or 'hf:...'")
        for name in ("text_field", "token_field", "text_key"):
            if not getattr(self, name):
                raise ValueError(f"data.{name}: empty; give the sample field name, e.g. 'txt' or 'tokens.npy'")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers: {self.num_workers} must be >= 0 (0 = read in the training process)")
        if self.prefetch < 1:
            raise ValueError(f"data.prefetch: {self.prefetch} must be >= 1")
        if self.shuffle_buffer < 0:
            raise ValueError(f"data.shuffle_buffer: {self.shuffle_buffer} must be >= 0")
        if self.on_corrupt not in ("skip", "error"):
            raise ValueError(f"data.on_corrupt: {self.on_corrupt!r} must be 'skip' or 'error'")
        if not 0 <= self.builtin_val_percent < 100:
            raise ValueError(f"data.builtin_val_percent: {self.builtin_val_percent} must be in [0, 100)")
