"""Decoding is bound by memory bandwidth, measured: each decode step reads every weight and the
whole KV cache to produce one token per row, so tokens/s x bytes read per token approaches the
machine's copy bandwidth, whatever the FLOPs. Batching shares one read of the weights among B
rows; smaller weights (bf16, int8) read fewer bytes; speculative decoding reads the target's
weights once per several tokens.

    meshformer generate RUN_DIR --bench [--draft DRAFT_RUN] [--batch-sizes 1,8] [--tokens N]

The copy bandwidth is timed in the same run (a large tensor copy, read + write bytes), so the
share is against what this machine delivers now, not a datasheet number. A model whose weights
fit in the CPU's caches can read faster than memory copies: its share exceeds 1, and it is not
bound by memory bandwidth.
"""
from __future__ import annotations

import copy
import time

import torch

from trainer.inference_weights import kv_bytes_per_position, prepare_weights, weight_bytes_per_step
from trainer.model import KVCache, Transformer
from trainer.speculative import SpecStats, speculative_generate

COPY_BYTES = 1 << 28        # 256 MiB: far beyond any CPU cache, so the copy runs at memory speed
VARIANTS = (("fp32", "none"), ("bf16", "none"), ("fp32", "int8"), ("bf16", "int8"))


def copy_bandwidth(nbytes: int = COPY_BYTES, repeats: int = 5) -> float:
    """Bytes/s of a large tensor copy, counting the bytes read and the bytes written; the best
    of `repeats` (the others met a busy machine)."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


@torch.no_grad()
def time_plain_decode(model: Transformer, prompt: torch.Tensor, steps: int) -> dict:
    """Greedy decode `steps` tokens for each row of `prompt` [B, T], timed from the prefill on (its
    pass yields the first token), as speculative decoding is, so the two compare."""
    batch = prompt.shape[0]
    cache = KVCache()
    start = time.perf_counter()
    nxt = model(prompt, start_pos=0, cache=cache)[:, -1:].argmax(-1)
    positions = cache.attended()
    for _ in range(steps - 1):
        nxt = model(nxt, start_pos=len(cache), cache=cache)[:, -1:].argmax(-1)
        positions += cache.attended()
    seconds = time.perf_counter() - start
    read = steps * weight_bytes_per_step(model, batch) + positions * kv_bytes_per_position(model, batch)
    return {"tokens": batch * steps, "seconds": seconds, "bytes_read": read}


def spec_bytes_read(target: Transformer, draft: Transformer, stats: SpecStats) -> int:
    """Bytes a speculative run read: each pass of either model reads its weights and its cache."""
    return (stats.target_passes * weight_bytes_per_step(target, 1)
            + stats.target_kv_positions * kv_bytes_per_position(target, 1)
            + stats.draft_passes * weight_bytes_per_step(draft, 1)
            + stats.draft_kv_positions * kv_bytes_per_position(draft, 1))


@torch.no_grad()
def time_speculative_decode(target: Transformer, draft: Transformer, prompt: torch.Tensor, steps: int,
                            draft_tokens: int) -> dict:
    """Greedy speculative decoding of `steps` tokens, timed from the prefill (its first round) on."""
    start = time.perf_counter()
    _, stats = speculative_generate(target, draft, prompt, steps, draft_tokens, temperature=0)
    seconds = time.perf_counter() - start
    return {"tokens": stats.emitted, "seconds": seconds, "bytes_read": spec_bytes_read(target, draft, stats),
            "acceptance": stats.acceptance_rate, "tokens_per_target_pass": stats.tokens_per_target_pass}


def fastest(measure, repeats: int = 3) -> dict:
    """The fastest of `repeats` timings: on a shared machine the slower ones met other work."""
    return min((measure() for _ in range(repeats)), key=lambda t: t["seconds"])


def row(name: str, batch: int, timed: dict, bandwidth: float) -> dict:
    tok_s = timed["tokens"] / timed["seconds"]
    read_s = timed["bytes_read"] / timed["seconds"]
    out = {"variant": name, "batch": batch, "tokens_per_s": tok_s, "bytes_per_token": timed["bytes_read"] / timed["tokens"],
           "read_gb_per_s": read_s / 1e9, "bandwidth_share": read_s / bandwidth}
    for key in ("acceptance", "tokens_per_target_pass"):
        if key in timed:
            out[key] = timed[key]
    return out


def run_bench(target: Transformer, prompt: list[int], steps: int, batch_sizes: list[int],
              draft: Transformer | None = None, draft_tokens: int = 4) -> dict:
    """Rows of decode speed and bandwidth share for the VARIANTS x batch sizes, then (with a
    draft) speculative decoding at batch 1 in fp32 and with an int8 target. `target` and
    `draft` come in fp32 and are left as they are (each variant quantizes a copy)."""
    bandwidth = copy_bandwidth()
    rows = []
    variants = {}
    for dtype, quantize in VARIANTS:
        name = dtype if quantize == "none" else f"{quantize} ({dtype} act.)"
        model = variants[(dtype, quantize)] = prepare_weights(copy.deepcopy(target), dtype, quantize)
        for batch in batch_sizes:
            timed = fastest(lambda: time_plain_decode(model, torch.tensor([prompt] * batch), steps))
            rows.append(row(name, batch, timed, bandwidth))
    if draft is not None:
        for dtype, quantize in (("fp32", "none"), ("fp32", "int8")):
            spec_target = variants[(dtype, quantize)]
            name = f"speculative k={draft_tokens}" + ("" if quantize == "none" else f", {quantize} target")
            timed = fastest(lambda: time_speculative_decode(spec_target, draft, torch.tensor([prompt]), steps,
                                                            draft_tokens))
            rows.append(row(name, 1, timed, bandwidth))
    return {"copy_gb_per_s": bandwidth / 1e9, "rows": rows}


def format_bench(result: dict) -> str:
    lines = [f"copy bandwidth measured now: {result['copy_gb_per_s']:.1f} GB/s (read + write of a 256 MiB copy)",
             f"{'variant':<28} {'batch':>5} {'tok/s':>9} {'KB/token':>9} {'GB/s read':>9} {'share':>6}  notes"]
    for r in result["rows"]:
        note = (f"acceptance {r['acceptance']:.2f}, {r['tokens_per_target_pass']:.2f} tokens/target pass"
                if "acceptance" in r else "")
        lines.append(f"{r['variant']:<28} {r['batch']:>5} {r['tokens_per_s']:>9.0f} {r['bytes_per_token'] / 1e3:>9.1f} "
                     f"{r['read_gb_per_s']:>9.2f} {r['bandwidth_share']:>6.3f}  {note}")
    return "\n".join(lines)
