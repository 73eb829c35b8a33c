"""Sample text from a model with a KV cache: a quick look at what a checkpoint learned."""
from __future__ import annotations

import torch

from trainer.model import KVCache, Transformer


@torch.no_grad()
def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.8,
             top_k: int = 0, generator: torch.Generator | None = None, eot_id: int | None = None) -> torch.Tensor:
    """Extend `prompt` [B, T] by up to `max_new_tokens` tokens. The prompt is run once (prefill),
    then each new token attends to the cached keys and values of all earlier ones."""
    model.eval()
    limit = model.cfg.max_seq_len
    if prompt.shape[1] + max_new_tokens > limit:
        raise ValueError(f"prompt ({prompt.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds model.max_seq_len={limit}")
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
