"""Speculative decoding (Leviathan et al. 2023, Chen et al. 2023): a small draft model proposes k
tokens one at a time, the target scores all of them in ONE forward pass, and a rejection rule keeps
exactly the target's distribution:

    accept draft token d with probability min(1, p(d) / q(d))       p: target, q: draft
    on the first rejection emit a token from norm(max(0, p - q)) and drop the rest
    when all k are accepted, emit a bonus token from the target's next distribution

Each round costs one target pass and emits 1..k+1 tokens; decoding is bound by reading the
weights, so a pass over k+1 positions costs about what a pass over one does. Greedy decoding is
the same rule with one-hot p and q: a draft token is kept iff it is the target's argmax, and a
rejection emits the target's argmax, so the output is the target's own greedy output.

Both KV caches always hold a prefix of the emitted sequence; after a round they are truncated to
the tokens that survived (KVCache.truncate) and the next round feeds what each cache lacks.
Batch 1 only: rows of a batch accept different numbers of tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from core.errors import UsageError
from trainer.model import KVCache, Transformer


def next_token_probs(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """logits [..., V] -> the distribution a token is drawn from: temperature and top-k applied;
    temperature 0 is greedy, a one-hot of the argmax (so one acceptance rule serves both)."""
    logits = logits.float()
    if temperature <= 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.softmax(logits, -1)


def verify(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The acceptance rule for rows of target probabilities p [N, V], draft probabilities q [N, V]
    and draft tokens [N] drawn from q: (accepted [N] bool, replacement [N] drawn from
    norm(max(0, p - q)), the token to emit where a row is rejected)."""
    rows = torch.arange(len(drafts))
    p_d, q_d = p[rows, drafts], q[rows, drafts]
    u = torch.rand(len(drafts), generator=generator)
    accepted = u * q_d < p_d              # P(u < p/q) = min(1, p/q); q(d) > 0 as d was drawn from q
    residual = (p - q).clamp(min=0)
    total = residual.sum(-1, keepdim=True)
    # p == q leaves no residual but then a rejection has probability 0: any distribution will do
    residual = torch.where(total > 0, residual / total.clamp(min=1e-30), p)
    return accepted, torch.multinomial(residual, 1, generator=generator)[:, 0]


@dataclass
class SpecStats:
    """What a speculative run did; the pass and position counts give the bytes it read."""
    drafted: int = 0               # draft tokens proposed
    accepted: int = 0              # of them kept
    target_passes: int = 0
    draft_passes: int = 0
    target_kv_positions: float = 0.0   # cached positions attended (mean over layers), summed over passes
    draft_kv_positions: float = 0.0
    emitted: int = 0
    rounds: list[int] = field(default_factory=list)   # tokens emitted per round

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def tokens_per_target_pass(self) -> float:
        return self.emitted / self.target_passes if self.target_passes else float("nan")


def check_same_vocab(target_vocab: int, draft_vocab: int, target_tok: str, draft_tok: str) -> None:
    """A draft proposes ids the target must read the same way: same vocabulary, same tokenizer."""
    if target_tok != draft_tok or target_vocab != draft_vocab:
        raise UsageError(f"--draft: its tokenizer {draft_tok!r} with model.vocab_size={draft_vocab} differs from "
                         f"the target's {target_tok!r} with {target_vocab}; give a draft run trained with the same "
                         "tokenizer and vocabulary")


def _feed(model: Transformer, cache: KVCache, seq: torch.Tensor) -> torch.Tensor:
    """Run `model` on the tokens of `seq` [1, T] its cache lacks; their logits [1, T', V]."""
    return model(seq[:, len(cache):], start_pos=len(cache), cache=cache)


@torch.no_grad()
def speculative_generate(target: Transformer, draft: Transformer, prompt: torch.Tensor, max_new_tokens: int,
                         draft_tokens: int = 4, temperature: float = 0.8, top_k: int = 0,
                         generator: torch.Generator | None = None,
                         eot_id: int | None = None) -> tuple[torch.Tensor, SpecStats]:
    """Extend `prompt` [1, T] by up to `max_new_tokens` tokens from the target's distribution (its
    greedy output at temperature 0), `draft_tokens` proposals per round. Returns (tokens, stats)."""
    if prompt.shape[0] != 1:
        raise UsageError(f"speculative decoding takes one prompt (batch 1), got a batch of {prompt.shape[0]}")
    if draft_tokens < 1:
        raise UsageError(f"--draft-tokens: {draft_tokens}; give >= 1 tokens the draft proposes per round")
    target.eval()
    draft.eval()
    # a windowed layer's cache keeps draft_tokens + 1 positions more than its window: a round rolls back at most that
    tcache, dcache, stats = KVCache(draft_tokens + 1), KVCache(draft_tokens + 1), SpecStats()
    out, goal = prompt, prompt.shape[1] + max_new_tokens
    while out.shape[1] < goal:
        k = min(draft_tokens, goal - out.shape[1] - 1)      # never past prompt + max_new_tokens
        drafts, qs = [], []
        for _ in range(k):   # the draft proposes k tokens, one pass each
            logits = _feed(draft, dcache, torch.cat([out, *drafts], 1))[:, -1]
            stats.draft_passes += 1
            stats.draft_kv_positions += dcache.attended()
            q = next_token_probs(logits, temperature, top_k)
            drafts.append(torch.multinomial(q, 1, generator=generator))
            qs.append(q)
        proposal = torch.cat(drafts, 1) if drafts else None
        # the target scores the k proposals (and whatever its cache lacks) in one pass
        p_all = next_token_probs(_feed(target, tcache, torch.cat([out, *drafts], 1))[0, -(k + 1):], temperature, top_k)
        stats.target_passes += 1
        stats.target_kv_positions += tcache.attended()
        if k:
            accepted, replacement = verify(p_all[:k], torch.cat(qs), proposal[0], generator)
            n_ok = int(accepted.long().cumprod(0).sum())      # accepted before the first rejection
            last = replacement[n_ok] if n_ok < k else torch.multinomial(p_all[k], 1, generator=generator)[0]
            new = torch.cat([proposal[0, :n_ok], last.view(1)])
            stats.drafted += k
            stats.accepted += n_ok
        else:
            new = torch.multinomial(p_all[0], 1, generator=generator)
        if eot_id is not None and bool((new == eot_id).any()):
            new = new[: int((new == eot_id).nonzero()[0]) + 1]
        out = torch.cat([out, new.view(1, -1)], dim=1)
        stats.emitted += new.numel()
        stats.rounds.append(new.numel())
        # the caches keep only what was emitted before the newest token (it is fed next round)
        tcache.truncate(out.shape[1] - 1)
        dcache.truncate(out.shape[1] - 1)
        if eot_id is not None and int(out[0, -1]) == eot_id:
            break
    return out, stats
