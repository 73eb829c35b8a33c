"""Our tokenizer as Hugging Face tokenizer files, so `AutoTokenizer.from_pretrained(export)` and
`pipeline("text-generation", export)` encode text to the ids the model was trained on.

- a tokenizers JSON (data.tokenizer = 'hf:...', or the one of pre-tokenized shards): its own file,
  without its post-processor: we train on `encode(text, add_special_tokens=False)`, so a template
  that adds BOS/EOS would give the model ids it never saw in that place;
- the byte tokenizer: an equivalent byte-level BPE with no merges: the 256 bytes are ids 0..255
  (through GPT-2's byte -> printable-character table, which the ByteLevel pre-tokenizer and
  decoder apply) and end-of-text is 256. `split_special_tokens` keeps the literal text
  "<|endoftext|>" as bytes, as ours does;
- tiktoken, or pre-tokenized shards whose tokenizer is not on this machine: nothing (the caller
  says so).
"""
from __future__ import annotations

import json
from pathlib import Path

BYTE_EOT = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: each byte -> one printable character (printable Latin-1 bytes map to
    themselves, the others to 256 + n in order). tokenizers' ByteLevel uses this same table but
    exposes only its alphabet, not the mapping, so it is spelled out here."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_level_tokenizer(eot_id: int = 256):
    """A `tokenizers.Tokenizer` giving data/tokenizer.py's ByteTokenizer ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    table = bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={table[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(BYTE_EOT, special=True, normalized=False)])
    if tok.token_to_id(BYTE_EOT) != eot_id:
        raise AssertionError(f"byte-level tokenizer gave end-of-text id {tok.token_to_id(BYTE_EOT)}, not {eot_id}")
    return tok


def write_hf_tokenizer(tok, out_dir: Path, max_len: int) -> list[str]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json for `tok` (one of
    data/tokenizer.py's); returns the names written, [] when the tokenizer has no such form."""
    out_dir = Path(out_dir)
    split_special = False
    if tok.spec == "bytes":
        byte_level_tokenizer(tok.eot_id).save(str(out_dir / "tokenizer.json"))
        eot, split_special = BYTE_EOT, True
    elif tok.spec.startswith("hf:"):
        spec = json.loads(Path(tok.spec[3:]).read_text())
        spec["post_processor"] = None
        (out_dir / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False, indent=1) + "\n")
        eot = token_string(spec, tok.eot_id)
    else:
        return []
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eot, "model_max_length": max_len,
              # decode() as ours does: no "cleanup" of spaces before punctuation
              "clean_up_tokenization_spaces": False, "split_special_tokens": split_special,
              "add_bos_token": False, "add_eos_token": False}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps({"eos_token": eot}, indent=2) + "\n")
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def token_string(spec: dict, token_id: int) -> str:
    """The token of `token_id` in a tokenizers JSON (added tokens first, then the model's vocab)."""
    for added in spec.get("added_tokens", []):
        if added.get("id") == token_id:
            return added["content"]
    vocab = spec.get("model", {}).get("vocab", {})
    found = [t for t, i in vocab.items() if i == token_id] if isinstance(vocab, dict) else []
    if not found:
        raise ValueError(f"the tokenizer has no token with id {token_id} (its end-of-text)")
    return found[0]


def generation_config(eot_id: int) -> dict:
    """generation_config.json: generation stops at end-of-text, as `meshformer generate` does."""
    return {"eos_token_id": eot_id, "pad_token_id": eot_id}
