"""Sample text from a model with a KV cache: a quick look at what a checkpoint learned."""
from __future__ import annotations

import torch

from core.cli_args import at_least
from core.errors import UsageError
from trainer.model import KVCache, Transformer


def check_request(prompt_len: int, max_new_tokens: int, temperature: float, top_k: int, limit: int) -> None:
    """Refuse, naming the option, a request the model cannot serve (before any weight is loaded)."""
    if prompt_len == 0:
        raise UsageError("--prompt: empty; give at least one character to continue")
    at_least("--tokens", max_new_tokens, 1, "new tokens to sample")
    at_least("--temperature", temperature, 0, "0 = greedy")
    at_least("--top-k", top_k, 0, "0 = sample among all tokens")
    if prompt_len >= limit:
        raise UsageError(f"--prompt: {prompt_len} tokens fill the context of model.max_seq_len={limit}; "
                         f"give at most {limit - 1}")
    if prompt_len + max_new_tokens > limit:
        raise UsageError(f"--tokens: {max_new_tokens} after a {prompt_len}-token prompt exceed model.max_seq_len="
                         f"{limit}; give at most {limit - prompt_len}")


@torch.no_grad()
def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.8,
             top_k: int = 0, generator: torch.Generator | None = None, eot_id: int | None = None) -> torch.Tensor:
    """Extend `prompt` [B, T] by up to `max_new_tokens` tokens. The prompt is run once (prefill),
    then each new token attends to the cached keys and values of all earlier ones."""
    model.eval()
    check_request(prompt.shape[1], max_new_tokens, temperature, top_k, model.cfg.max_seq_len)
    cache = KVCache()
    logits = model(prompt, start_pos=0, cache=cache)[:, -1]
    out, pos = prompt, prompt.shape[1]
    for _ in range(max_new_tokens):
        if temperature <= 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits.float() / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        out = torch.cat([out, nxt], dim=1)
        if eot_id is not None and bool((nxt == eot_id).all()):
            break
        logits = model(nxt, start_pos=pos, cache=cache)[:, -1]
        pos += 1
    return out
